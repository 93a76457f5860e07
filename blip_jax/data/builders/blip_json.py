"""A tfds builder for BLIP's annotation JSON (blip.md §3.1) over a local image root.

Accepted layouts (detected per file):
  captions  pre-training list [{"image", "caption": str}], COCO/Flickr Karpathy train (one entry
            per caption, optional "image_id"), Karpathy val/test ({"image", "caption": [str, ...]});
            entries of the same image are merged into one example with all its captions.
  vqa       [{"question_id"?, "question", "answer": [str] | str?, "image", "dataset"?}].

Example features: captions -> image (JPEG), image_id (int64, contiguous over the dataset),
image_path, captions (raw; pre_caption is applied by the pipeline); vqa -> image, image_id,
image_path, question_id, question, answers, dataset.

Bad images never stop a build: missing, empty, truncated, undecodable, too small, absurd aspect ratio
or too many pixels are skipped and written with path and reason to skipped.jsonl in the dataset's
directory. Images are converted to RGB (grayscale, RGBA, palette, CMYK, 16-bit), EXIF orientation is
applied, and anything that is not already a plain RGB JPEG is re-encoded as JPEG (quality 95).
Empty or non-text captions/questions are dropped and counted.
"""
from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import io
import json
import os

import numpy as np
import tensorflow_datasets as tfds
from PIL import Image, ImageOps, UnidentifiedImageError

from blip_jax.data.text import pre_caption

MIN_SIDE = 8
MAX_ASPECT = 20.0
SPLIT_WORDS = ("train", "val", "test")


@dataclasses.dataclass
class BlipJsonConfig(tfds.core.BuilderConfig):
    kind: str = "captions"  # or "vqa"


# ----------------------------------------------------------------------------- images
def _to_rgb(image: Image.Image) -> Image.Image:
    """Any PIL mode -> RGB. 16/32-bit integer images are scaled to 8 bits, alpha is dropped (as BLIP's
    .convert('RGB'))."""
    if image.mode.startswith("I"):
        pixels = np.asarray(image, dtype=np.float64)
        image = Image.fromarray(np.clip(np.round(pixels / 257.0), 0, 255).astype(np.uint8), "L")
    elif image.mode == "F":
        pixels = np.asarray(image, dtype=np.float64)
        span = max(pixels.max() - pixels.min(), 1e-12)
        image = Image.fromarray(np.round((pixels - pixels.min()) / span * 255).astype(np.uint8), "L")
    elif image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    return image.convert("RGB")


def load_image(path: str, max_side: int = 0) -> tuple:
    """(jpeg_bytes, None) for a usable image, else (None, reason)."""
    if not os.path.exists(path):
        return None, "missing file"
    if os.path.isdir(path):
        return None, "is a directory, not an image file"
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except OSError as error:
        return None, f"unreadable file: {error.strerror or error}"
    if not raw:
        return None, "empty file (0 bytes)"
    try:
        with Image.open(io.BytesIO(raw)) as image:
            width, height = image.size
            if min(width, height) < MIN_SIDE:
                return None, f"too small: {width}x{height} px (minimum side {MIN_SIDE})"
            if max(width, height) / min(width, height) > MAX_ASPECT:
                return None, f"absurd aspect ratio: {width}x{height} px (more than {MAX_ASPECT:g}:1)"
            image.load()  # raises on truncated or corrupt data
            orientation = image.getexif().get(0x0112, 1)
            too_big = max_side and max(width, height) > max_side
            if image.format == "JPEG" and image.mode == "RGB" and orientation == 1 and not too_big:
                return raw, None
            image = _to_rgb(ImageOps.exif_transpose(image))
            if too_big:
                image.thumbnail((max_side, max_side), Image.Resampling.BICUBIC)
            buffer = io.BytesIO()
            image.save(buffer, format="JPEG", quality=95)
            return buffer.getvalue(), None
    except Image.DecompressionBombError as error:
        return None, f"too many pixels: {error}"
    except UnidentifiedImageError:
        return None, "not an image (unrecognised format)"
    except (OSError, SyntaxError, ValueError, EOFError) as error:
        return None, f"corrupt or truncated image: {error}"


# ----------------------------------------------------------------------------- annotations
def parse_annotation_args(specs: list) -> dict:
    """['train=a.json', 'b_val.json', ...] -> {split: [files]}; a bare file's split comes from its
    name (train/val/test, else train)."""
    splits = collections.defaultdict(list)
    for spec in specs:
        split, sep, path = spec.partition("=")
        if not sep or os.path.exists(spec):
            path = spec
            stem = os.path.basename(spec).lower()
            split = next((word for word in SPLIT_WORDS if word in stem), "train")
        splits[split].append(path)
    return dict(splits)


def _read_json(path: str) -> list:
    if not os.path.isfile(path):
        raise ValueError(f"annotation file {path} does not exist: check --annotations")
    try:
        with open(path) as f:
            if path.endswith(".jsonl"):
                entries = [json.loads(line) for line in f if line.strip()]
            else:
                entries = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"annotation file {path} is not valid JSON ({error}): fix or re-download it") from None
    if not isinstance(entries, list):
        raise ValueError(f"annotation file {path} holds a {type(entries).__name__}, expected a list of "
                         "entries with 'image' and 'caption' (or 'question')")
    for index, entry in enumerate(entries):
        if not isinstance(entry, dict) or not isinstance(entry.get("image"), str):
            hint = " (has 'url': download the images and write local 'image' paths)" if \
                isinstance(entry, dict) and "url" in entry else ""
            raise ValueError(f"annotation file {path}: entry {index} has no 'image' path{hint}")
    return entries


def _kind(entries: list) -> str:
    return "vqa" if entries and "question" in entries[0] else "captions"


def _texts(value) -> tuple:
    """(kept texts, number dropped) for a caption/answer field (str or list)."""
    values = value if isinstance(value, list) else [value]
    kept = [v for v in values if isinstance(v, str) and pre_caption(v)]
    return kept, len(values) - len(kept)


def collect_examples(annotations: dict, image_root: str) -> tuple:
    """{split: [example without image bytes]}, kind, counts of dropped texts/examples."""
    kinds, counts, ids = {}, collections.Counter(), {}
    examples = {}
    for split, files in annotations.items():
        grouped = {}
        for path in files:
            entries = _read_json(path)
            kinds[path] = _kind(entries)
            for entry in entries:
                image_path = os.path.join(image_root, entry["image"])
                image_id = ids.setdefault(image_path, len(ids))
                if kinds[path] == "vqa":
                    question = entry.get("question")
                    if not isinstance(question, str) or not question.strip():
                        counts["dropped_questions"] += 1
                        continue
                    answers, dropped = _texts(entry.get("answer", []))
                    counts["dropped_answers"] += dropped
                    grouped[len(grouped)] = {
                        "image_path": image_path, "image_id": image_id, "question": question,
                        "question_id": int(entry.get("question_id", -1)), "answers": answers,
                        "dataset": str(entry.get("dataset", ""))}
                    continue
                captions, dropped = _texts(entry.get("caption"))
                counts["dropped_captions"] += dropped
                example = grouped.setdefault(image_path, {"image_path": image_path,
                                                          "image_id": image_id, "captions": []})
                example["captions"].extend(captions)
        examples[split] = []
        for example in grouped.values():
            if "captions" in example and not example["captions"]:
                counts["dropped_images_without_captions"] += 1
            else:
                examples[split].append(example)
    if len(set(kinds.values())) > 1:
        raise ValueError(f"annotation files mix layouts {kinds}: build caption and VQA datasets separately")
    return examples, next(iter(kinds.values()), "captions"), counts


# ----------------------------------------------------------------------------- builder
class BlipJson(tfds.core.GeneratorBasedBuilder):
    """Image-text pairs (or VQA) from BLIP annotation JSON; one config per dataset name."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Captions and VQA layouts; bad images skipped to skipped.jsonl."}

    def __init__(self, *, examples=None, max_side=0, workers=8, **kwargs):
        self._examples, self._max_side, self._workers = examples or {}, max_side, workers
        self.skipped = []
        super().__init__(**kwargs)

    def _info(self):
        common = {"image": tfds.features.Image(encoding_format="jpeg"), "image_id": np.int64,
                  "image_path": tfds.features.Text()}
        if self.builder_config.kind == "vqa":
            common.update(question_id=np.int64, question=tfds.features.Text(),
                          answers=tfds.features.Sequence(tfds.features.Text()),
                          dataset=tfds.features.Text())
        else:
            common["captions"] = tfds.features.Sequence(tfds.features.Text())
        return self.dataset_info_from_configs(features=tfds.features.FeaturesDict(common),
                                              description=__doc__)

    def _split_generators(self, dl_manager):
        del dl_manager
        return {split: self._generate_examples(split) for split in self._examples}

    def _generate_examples(self, split):
        examples = self._examples[split]
        with concurrent.futures.ThreadPoolExecutor(self._workers) as pool:
            for start in range(0, len(examples), 256):
                chunk = examples[start:start + 256]
                images = pool.map(lambda ex: load_image(ex["image_path"], self._max_side), chunk)
                for offset, (example, (encoded, reason)) in enumerate(zip(chunk, images)):
                    if reason:
                        self.skipped.append({"split": split, "path": example["image_path"], "reason": reason})
                        continue
                    yield start + offset, {**example, "image": encoded}


def build(name: str, annotations: dict, image_root: str, data_dir: str, max_side: int = 0,
          workers: int = 8) -> dict:
    """Builds data_dir/blip_json/<name>/1.0.0 and returns a summary (also written there)."""
    if not os.path.isdir(image_root):
        raise ValueError(f"image root {image_root} is not a directory: check --image-root")
    examples, kind, counts = collect_examples(annotations, image_root)
    builder = BlipJson(config=BlipJsonConfig(name=name, kind=kind), examples=examples,
                       max_side=max_side, workers=workers, data_dir=os.path.expanduser(data_dir))
    if builder.is_prepared():
        raise ValueError(f"dataset {name} already exists at {builder.data_dir}: delete it or pick another --name")
    builder.download_and_prepare(download_config=tfds.download.DownloadConfig(try_download_gcs=False))
    skipped_path = os.path.join(builder.data_dir, "skipped.jsonl")
    with open(skipped_path, "w") as f:
        f.writelines(json.dumps(record) + "\n" for record in builder.skipped)
    summary = {"name": name, "kind": kind, "path": builder.data_dir,
               "examples": {split: info.num_examples for split, info in builder.info.splits.items()},
               "skipped_images": len(builder.skipped),
               "skipped_by_reason": dict(collections.Counter(r["reason"].split(":")[0] for r in builder.skipped)),
               "skipped_file": skipped_path, **counts}
    with open(os.path.join(builder.data_dir, "build_summary.json"), "w") as f:
        json.dump(summary, f, indent=1)
    return summary
