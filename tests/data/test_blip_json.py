"""blip-json builder: good images of every mode survive, every kind of bad file is skipped with a reason."""
import io
import json
import os
import struct
import zlib

import numpy as np
import tensorflow_datasets as tfds
from PIL import Image

from blip_jax.data import cli, datasets
from blip_jax.data.builders import blip_json


def _save(path, image, **kwargs):
    image.save(path, **kwargs)
    return os.path.basename(path)


def _huge_png_header(width, height):
    """A PNG whose header claims width x height (a decompression bomb without the memory)."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 10)) + \
        chunk(b"IEND", b"")


def make_image_root(root):
    """Good images in many modes (name -> expected (H, W)), and >= 8 kinds of bad files."""
    rng = np.random.default_rng(0)
    rgb = Image.fromarray((rng.random((24, 32, 3)) * 255).astype(np.uint8))
    good = {
        _save(root / "rgb.jpg", rgb): (24, 32),
        _save(root / "gray.png", rgb.convert("L")): (24, 32),
        _save(root / "rgba.png", rgb.convert("RGBA")): (24, 32),
        _save(root / "palette.gif", rgb.convert("P")): (24, 32),
        _save(root / "cmyk.jpg", rgb.convert("CMYK")): (24, 32),
        _save(root / "gray16.png", Image.fromarray((np.arange(24 * 32).reshape(24, 32) * 80).astype(np.uint16))): (24, 32),
    }
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise on display: stored 24x32 shows as 32x24
    good[_save(root / "exif_rotated.jpg", rgb, exif=exif.tobytes())] = (32, 24)
    jpeg = io.BytesIO()
    rgb.save(jpeg, "JPEG")
    png = io.BytesIO()
    rgb.save(png, "PNG")
    bad = {"missing.jpg": "missing file"}
    (root / "empty.jpg").write_bytes(b"")
    bad["empty.jpg"] = "empty file"
    (root / "truncated.jpg").write_bytes(jpeg.getvalue()[: len(jpeg.getvalue()) // 2])
    bad["truncated.jpg"] = "corrupt or truncated"
    (root / "truncated.png").write_bytes(png.getvalue()[: len(png.getvalue()) // 2])
    bad["truncated.png"] = "corrupt or truncated"
    (root / "text.jpg").write_text("this is not an image")
    bad["text.jpg"] = "not an image"
    (root / "random.png").write_bytes(rng.bytes(500))
    bad["random.png"] = "not an image"
    _save(root / "strip.png", Image.new("RGB", (20000, 10)))
    bad["strip.png"] = "absurd aspect ratio"
    _save(root / "tiny.png", Image.new("RGB", (2, 2)))
    bad["tiny.png"] = "too small"
    (root / "folder.jpg").mkdir()
    bad["folder.jpg"] = "is a directory"
    (root / "bomb.png").write_bytes(_huge_png_header(40000, 40000))
    bad["bomb.png"] = "too many pixels"
    return good, bad


def test_build_keeps_every_good_image_and_lists_every_bad_one(tmp_path, capsys):
    root = tmp_path / "images"
    root.mkdir()
    good, bad = make_image_root(root)
    train = [{"image": name, "caption": f"A photo of {name}!"} for name in list(good) + list(bad)]
    train += [{"image": "rgb.jpg", "caption": "second caption"}, {"image": "rgb.jpg", "caption": "  ..  "},
              {"image": "gray.png", "caption": 17}, {"image": "cmyk.jpg", "caption": ""}]
    test = [{"image": "rgb.jpg", "caption": ["one", "two", None]}]
    (tmp_path / "train.json").write_text(json.dumps(train))
    (tmp_path / "coco_karpathy_test.json").write_text(json.dumps(test))
    args = ["--annotations", f"train={tmp_path / 'train.json'}", str(tmp_path / "coco_karpathy_test.json"),
            "--image-root", str(root), "--name", "tiny", "--data-dir", str(tmp_path / "tfds")]
    assert cli.main(args) == 0
    printed = capsys.readouterr().out
    assert f"skipped images: {len(bad)}" in printed and "dropped captions: 4" in printed

    builder = datasets.load_builder("tiny", str(tmp_path / "tfds"))
    assert builder.info.splits["train"].num_examples == len(good)
    examples = {os.path.basename(ex["image_path"].decode()): ex
                for ex in tfds.as_numpy(builder.as_dataset(split="train"))}
    assert set(examples) == set(good)
    for name, shape in good.items():
        assert examples[name]["image"].shape == shape + (3,), name
    assert sorted(examples["rgb.jpg"]["captions"]) == [b"A photo of rgb.jpg!", b"second caption"]
    gray16 = examples["gray16.png"]["image"]
    assert gray16.max() > 200 and gray16.min() < 10  # scaled from 16 bits, not clipped to 255

    skipped = [json.loads(line) for line in open(os.path.join(builder.data_dir, "skipped.jsonl"))]
    reasons = {os.path.basename(r["path"]): r["reason"] for r in skipped}
    assert set(reasons) == set(bad)
    for name, reason in bad.items():
        assert reason in reasons[name], (name, reasons[name])
    test_example = next(iter(tfds.as_numpy(builder.as_dataset(split="test"))))
    assert list(test_example["captions"]) == [b"one", b"two"]
    assert test_example["image_id"] == examples["rgb.jpg"]["image_id"]


def test_vqa_layout(tmp_path):
    Image.new("RGB", (16, 16), (200, 10, 10)).save(tmp_path / "a.jpg")
    entries = [{"question_id": 7, "question": "What colour?", "answer": ["red", "red", 3], "image": "a.jpg",
                "dataset": "vqa"}, {"question": "Is it red?", "answer": "yes", "image": "a.jpg", "dataset": "vg"},
               {"question": "", "answer": "no", "image": "a.jpg"}]
    (tmp_path / "vqa_train.json").write_text(json.dumps(entries))
    summary = blip_json.build("vqa_tiny", {"train": [str(tmp_path / "vqa_train.json")]}, str(tmp_path),
                              str(tmp_path / "tfds"))
    assert summary["kind"] == "vqa" and summary["examples"]["train"] == 2
    assert summary["dropped_questions"] == 1 and summary["dropped_answers"] == 1
    rows = sorted(tfds.as_numpy(datasets.load_builder("vqa_tiny", str(tmp_path / "tfds"))
                                .as_dataset(split="train")), key=lambda ex: ex["question"])
    assert rows[0]["question"] == b"Is it red?" and list(rows[0]["answers"]) == [b"yes"]
    assert rows[1]["question_id"] == 7 and list(rows[1]["answers"]) == [b"red", b"red"]


def test_cli_errors_are_one_line_and_name_the_problem(tmp_path, capsys):
    (tmp_path / "bad.json").write_text("{not json")
    code = cli.main(["--annotations", str(tmp_path / "bad.json"), "--image-root", str(tmp_path),
                     "--name", "x", "--data-dir", str(tmp_path)])
    error = capsys.readouterr().err.strip()
    assert code == 2 and "bad.json" in error and "not valid JSON" in error and "\n" not in error
    assert cli.main(["--format", "blip-json", "--name", "x"]) == 2
    assert "--annotations --image-root" in capsys.readouterr().err


def test_split_is_inferred_from_file_names():
    parsed = blip_json.parse_annotation_args(["coco_karpathy_train.json", "a/flickr30k_val.json",
                                              "test=x.json", "pretrain_extra.json"])
    assert parsed == {"train": ["coco_karpathy_train.json", "pretrain_extra.json"],
                      "val": ["a/flickr30k_val.json"], "test": ["x.json"]}


def test_max_side_downscales_and_keeps_aspect(tmp_path):
    Image.new("RGB", (100, 50), (10, 200, 10)).save(tmp_path / "wide.png")
    encoded, reason = blip_json.load_image(str(tmp_path / "wide.png"), max_side=40)
    assert reason is None
    image = Image.open(io.BytesIO(encoded))
    assert image.format == "JPEG" and image.size == (40, 20)
    original, _ = blip_json.load_image(str(tmp_path / "wide.png"))
    assert Image.open(io.BytesIO(original)).size == (100, 50)
