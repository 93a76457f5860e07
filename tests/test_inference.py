"""`blip-jax caption | ask | match | classify` end to end through blip_jax.cli.main, on tiny random
checkpoints written with ModelBundle.save and a tiny WordPiece vocab made in a temp directory."""
from __future__ import annotations

import csv
import json
import os
import shutil

import jax
import numpy as np
import pytest
from PIL import Image

import blip_jax
from blip_jax import cli
from blip_jax.api import ModelBundle
from blip_jax.data.text import tokenizer as load_tokenizer
from blip_jax.models import build_model, model_config
from blip_jax.models.blip import dummy_inputs

WORDS = ["a", "picture", "of", "the", "red", "blue", "green", "square", "circle", "cat", "dog", "what", "color",
         "is", "on", "left", "right", "two", "one", "and", "##s", "?", "."]
VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + WORDS
CAPTION_ARGS = ["--beams", "2", "--max-length", "8", "--min-length", "3", "--batch-size", "2"]


def _checkpoint(root, task, seed):
    """A tiny random `task` model saved as a blip-jax checkpoint directory with the vocab beside it."""
    base = len(VOCAB)
    config = model_config("tiny", "tiny", image_size=32)
    config.text.vocab_size = base + 2
    config.text.max_position_embeddings = 40
    config.tokens = dict(pad=0, cls=2, sep=3, dec=base, enc=base + 1)
    # Random weights at 1/sqrt(fan_in) (BLIP's 0.02 init captions every image alike), drawn with numpy
    # from the parameter shapes: no init program to compile.
    shapes = jax.eval_shape(lambda: build_model(config, task).init(
        {"params": jax.random.key(0)}, *dummy_inputs(config, task)))["params"]
    rng = np.random.default_rng(seed)

    def draw(path, shape):
        name = path[-1].key
        if name == "scale":
            return np.ones(shape.shape, np.float32)
        if name == "temp":
            return np.float32(0.07)
        fan_in = shape.shape[-1] if name == "embedding" else int(np.prod(shape.shape[:-1])) or 1
        scale = 0.02 if name == "bias" else fan_in ** -0.5
        return (rng.standard_normal(shape.shape) * scale).astype(np.float32)
    params = jax.tree_util.tree_map_with_path(draw, shapes)
    path = os.path.join(root, task)
    ModelBundle(config, params, task).save(path)
    shutil.copy(os.path.join(root, "vocab.txt"), os.path.join(path, "vocab.txt"))
    return path


def _image(path, seed, size=(40, 30), mode="RGB"):
    rng = np.random.default_rng(seed)
    array = rng.integers(0, 256, (size[1], size[0], len(mode)), dtype=np.uint8)
    Image.fromarray(array[..., 0] if mode == "L" else array, mode).save(path)


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("inference"))
    with open(os.path.join(root, "vocab.txt"), "w") as handle:
        handle.write("\n".join(VOCAB) + "\n")
    images = os.path.join(root, "images")
    os.makedirs(os.path.join(images, "nested", "deeper"))
    _image(os.path.join(images, "a.png"), 0)
    _image(os.path.join(images, "b.jpg"), 1, size=(64, 48))
    _image(os.path.join(images, "nested", "c.png"), 2, mode="L")
    _image(os.path.join(images, "nested", "deeper", "d.png"), 3, mode="RGBA")
    _image(os.path.join(images, "nested", "deeper", "e.bmp"), 4, size=(33, 33))
    with open(os.path.join(images, "nested", "broken.jpg"), "wb") as handle:
        handle.write(b"\xff\xd8 this is not really a jpeg")
    with open(os.path.join(images, "notes.txt"), "w") as handle:
        handle.write("not an image, and not picked up by the folder scan")
    return dict(root=root, images=images, caption=_checkpoint(root, "caption", 0),
                retrieval=_checkpoint(root, "retrieval", 1), vqa=_checkpoint(root, "vqa", 2))


def _good_images(workspace):
    images = workspace["images"]
    return [os.path.join(images, name) for name in
            ("a.png", "b.jpg", "nested/c.png", "nested/deeper/d.png", "nested/deeper/e.bmp")]


def _jsonl(path):
    with open(path) as handle:
        return [json.loads(line) for line in handle]


def _expected_captions(workspace, paths, prompt=None):
    """The library's captions, one image at a time (in a batch of 2, the shape the CLI compiles for)."""
    bundle = blip_jax.load(workspace["caption"])
    tok = load_tokenizer(workspace["caption"])
    captions = {}
    for path in paths:
        pixels = blip_jax.preprocess_images([path, path], 32)
        captions[path] = bundle.caption(pixels, tok, prompt, num_beams=2, max_length=8, min_length=3)[0]
    return captions


def test_caption_folder_reports_a_broken_image_and_resumes(workspace, tmp_path, capsys):
    output = str(tmp_path / "captions.jsonl")
    code = cli.main(["caption", workspace["images"], "--model", workspace["caption"], "--output", output]
                    + CAPTION_ARGS)
    err = capsys.readouterr().err
    broken = os.path.join(workspace["images"], "nested", "broken.jpg")
    assert code == 1, "a failed image must make the exit code non-zero"
    assert f"cannot read {broken}: " in err and "not an image PIL can read" in err
    assert "5 captioned, 0 already done, 1 failed" in err and "img/s" in err
    records = _jsonl(output)
    expected = _expected_captions(workspace, _good_images(workspace))
    assert {record["image"]: record["caption"] for record in records} == expected
    assert len(set(expected.values())) > 1, "captions should depend on the image"

    # Rerun: everything already captioned is skipped; the broken image is reported again.
    code = cli.main(["caption", workspace["images"], "--model", workspace["caption"], "--output", output]
                    + CAPTION_ARGS)
    assert code == 1
    assert "0 captioned, 5 already done, 1 failed" in capsys.readouterr().err
    assert len(_jsonl(output)) == 5

    # An interrupted run left half a record; the next run drops it and captions that image again.
    with open(output) as handle:
        lines = handle.readlines()
    with open(output, "w") as handle:
        handle.writelines(lines[:3])
        handle.write(lines[3][: len(lines[3]) // 2])
    code = cli.main(["caption", *_good_images(workspace), "--model", workspace["caption"], "--output", output]
                    + CAPTION_ARGS)
    assert code == 0, capsys.readouterr().err
    assert "2 captioned, 3 already done, 0 failed" in capsys.readouterr().err
    records = _jsonl(output)
    assert {record["image"]: record["caption"] for record in records} == expected and len(records) == 5


def test_caption_csv_with_a_prompt_and_stdout(workspace, tmp_path, capsys):
    paths = _good_images(workspace)[:3]
    output = str(tmp_path / "captions.csv")
    code = cli.main(["caption", *paths, "--model", workspace["caption"], "--output", output,
                     "--prompt", "a picture of "] + CAPTION_ARGS)
    assert code == 0, capsys.readouterr().err
    with open(output, newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert {row["image"]: row["caption"] for row in rows} == _expected_captions(workspace, paths, "a picture of ")
    assert not any(row["caption"].startswith("a picture of") for row in rows)

    capsys.readouterr()
    code = cli.main(["caption", paths[0], "--model", workspace["caption"], "--tokenizer",
                     os.path.join(workspace["root"], "vocab.txt")] + CAPTION_ARGS)
    out = capsys.readouterr().out.strip().splitlines()
    assert code == 0
    assert out == [f"{paths[0]}\t{_expected_captions(workspace, paths[:1])[paths[0]]}"]


def test_caption_sampling_is_seeded(workspace, tmp_path, capsys):
    paths = _good_images(workspace)
    outputs = []
    for run, seed in enumerate(("1", "1", "2")):
        output = str(tmp_path / f"sampled{run}.jsonl")
        code = cli.main(["caption", *paths, "--model", workspace["caption"], "--output", output, "--sample",
                         "--top-p", "0.9", "--max-length", "10", "--batch-size", "2", "--seed", seed])
        assert code == 0, capsys.readouterr().err
        outputs.append({record["image"]: record["caption"] for record in _jsonl(output)})
    assert outputs[0] == outputs[1] and set(outputs[0]) == set(paths)
    assert outputs[0] != outputs[2]


def test_ask_answers_and_reports_unreadable_images(workspace, capsys):
    image = _good_images(workspace)[0]
    code = cli.main(["ask", image, "What color is the square?", "--model", workspace["vqa"]])
    out = capsys.readouterr().out.strip()
    assert code == 0
    bundle = blip_jax.load(workspace["vqa"])
    expected = bundle.answer_text(blip_jax.preprocess_images([image], 32), ["What color is the square?"],
                                  load_tokenizer(workspace["vqa"]))
    assert out == expected[0]

    broken = os.path.join(workspace["images"], "nested", "broken.jpg")
    assert cli.main(["ask", broken, "what is it?", "--model", workspace["vqa"]]) == 1
    assert f"cannot read {broken}" in capsys.readouterr().err


TEXTS = ["a red square", "two blue circles", "a green cat", "dog"]  # one shape for match and classify


@pytest.fixture(scope="module")
def retrieval_bundle(workspace):
    return blip_jax.load(workspace["retrieval"])


def _scores(bundle, workspace, image, texts):
    """ITC cosine and ITM probability through the ModelBundle API (the CLI has its own program)."""
    tok = load_tokenizer(workspace["retrieval"])
    encoded = tok(texts, padding="longest")
    ids, mask = np.asarray(encoded["input_ids"]), np.asarray(encoded["attention_mask"])
    pixels = blip_jax.preprocess_images([image], 32)
    cosine = np.asarray(bundle.itc_similarity(pixels, ids, mask))[0]
    logits = np.asarray(bundle.itm_logits(np.repeat(pixels, len(texts), 0), ids, mask))
    match = np.exp(logits[:, 1]) / np.exp(logits).sum(-1)
    return cosine, match


def test_match_prints_itm_probability_and_itc_cosine(workspace, retrieval_bundle, capsys):
    image = _good_images(workspace)[1]
    texts = TEXTS
    code = cli.main(["match", image, *texts, "--model", workspace["retrieval"]])
    lines = capsys.readouterr().out.strip().splitlines()
    assert code == 0 and lines[0] == "itm_prob\titc_cosine\ttext"
    cosine, match = _scores(retrieval_bundle, workspace, image, texts)
    for line, text, probability, similarity in zip(lines[1:], texts, match, cosine):
        printed_probability, printed_cosine, printed_text = line.split("\t")
        assert printed_text == text
        assert float(printed_probability) == pytest.approx(probability, abs=1e-4)
        assert float(printed_cosine) == pytest.approx(similarity, abs=1e-4)


def test_classify_ranks_by_itc_and_reranks_by_itm(workspace, retrieval_bundle, capsys):
    image = _good_images(workspace)[2]
    labels = TEXTS
    code = cli.main(["classify", image, "--labels", ",".join(labels), "--model", workspace["retrieval"],
                     "--top-k", "4"])
    lines = capsys.readouterr().out.strip().splitlines()
    assert code == 0 and lines[0] == image
    cosine, match = _scores(retrieval_bundle, workspace, image, labels)
    assert [line.split("\t")[-1] for line in lines[2:]] == [labels[i] for i in np.argsort(-cosine, kind="stable")]
    probabilities = [float(line.split("\t")[1]) for line in lines[2:]]
    assert sum(probabilities) == pytest.approx(1.0, abs=1e-3) and probabilities == sorted(probabilities, reverse=True)

    code = cli.main(["classify", image, "--labels", ",".join(labels), "--model", workspace["retrieval"],
                     "--top-k", "4", "--itm-rerank"])
    lines = capsys.readouterr().out.strip().splitlines()
    assert code == 0
    assert [line.split("\t")[-1] for line in lines[2:]] == [labels[i] for i in np.argsort(-match, kind="stable")]
    assert [float(line.split("\t")[1]) for line in lines[2:]] == pytest.approx(np.sort(match)[::-1], abs=1e-4)


def test_user_errors_are_one_line(workspace, tmp_path, capsys):
    image = _good_images(workspace)[0]
    cases = [
        (["caption", image, "--model", str(tmp_path / "missing")], "does not exist"),
        (["match", image, "a cat", "--model", workspace["caption"]], "needs a retrieval or pretrain model"),
        (["caption", image, "--model", workspace["caption"], "--output", str(tmp_path / "out.txt")],
         "must end in .jsonl or .csv"),
        (["classify", image, "--labels", "cat", "--model", workspace["retrieval"]], "fewer than two classes"),
    ]
    for argv, message in cases:
        assert cli.main(argv) == 2
        err = capsys.readouterr().err.strip()
        assert message in err and len(err.splitlines()) == 1, err
