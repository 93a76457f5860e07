"""`synthetic_shapes`: an offline image-text dataset generated in seconds.

Each 64x64 image (JPEG, quality 95) holds 1-3 coloured shapes on a noisy grey background, placed on a 3x3 grid:
  1 shape : at one of 5 positions (left, right, top, bottom, middle)
  2 shapes: in the same row ("to the left of") or the same column ("above")
  3 shapes: in three different columns, described from left to right
Every object has a shape (4), a colour (6) and a size (2). Captions name every attribute, so the
natural hard negatives (one attribute changed) are wrong captions: retrieval and ITM need all of them.
Several captions per image come from templates and synonyms.

Splits (held out by construction, no image is shared): train 6000, val 200, test 300 images,
5 captions each. `ensure_built(data_dir)` builds it (a few seconds) and returns the builder.
"""
from __future__ import annotations

import hashlib
import io
import os
import random

import numpy as np
from PIL import Image, ImageDraw

import tensorflow_datasets as tfds

from blip_jax.data.text import SYNTHETIC_SHAPES_VOCAB

IMAGE_SIZE = 64
CAPTIONS_PER_IMAGE = 5
SPLIT_SIZES = {"train": 6000, "val": 200, "test": 300}
SPLIT_SEEDS = {"train": 1, "val": 2, "test": 3}

SHAPES = ("circle", "square", "triangle", "cross")
COLOURS = {
    "red": (215, 35, 35), "green": (40, 170, 60), "blue": (45, 80, 225),
    "yellow": (235, 215, 40), "purple": (145, 55, 190), "white": (245, 245, 245),
}
SIZES = {"small": 5, "large": 9}  # half-width in pixels
SHAPE_SYNONYMS = {"circle": ("circle", "disc"), "square": ("square", "box"),
                  "triangle": ("triangle",), "cross": ("cross", "plus sign")}
SIZE_SYNONYMS = {"small": ("small", "little", "tiny"), "large": ("large", "big")}
SINGLE_POSITIONS = {  # name -> (row, col), phrases
    "left": ((1, 0), ("on the left", "at the left side")),
    "right": ((1, 2), ("on the right", "at the right side")),
    "top": ((0, 1), ("at the top", "near the top")),
    "bottom": ((2, 1), ("at the bottom", "near the bottom")),
    "middle": ((1, 1), ("in the middle", "in the center")),
}
CELL = IMAGE_SIZE / 3


def _object_phrase(rng: random.Random, obj: dict) -> str:
    size = rng.choice(SIZE_SYNONYMS[obj["size"]])
    shape = rng.choice(SHAPE_SYNONYMS[obj["shape"]])
    return f"{size} {obj['colour']} {shape}"


def _article(phrase: str) -> str:
    return "an" if phrase[0] in "aeiou" else "a"


def _with_article(phrase: str) -> str:
    return f"{_article(phrase)} {phrase}"


def sample_scene(rng: random.Random) -> dict:
    """One scene: objects with (shape, colour, size, row, col) and the layout kind."""
    count = rng.choices([1, 2, 3], weights=[0.3, 0.4, 0.3])[0]
    objects = [{"shape": rng.choice(SHAPES), "colour": rng.choice(list(COLOURS)),
                "size": rng.choice(list(SIZES))} for _ in range(count)]
    if count == 1:
        position = rng.choice(list(SINGLE_POSITIONS))
        objects[0]["row"], objects[0]["col"] = SINGLE_POSITIONS[position][0]
        return {"objects": objects, "layout": position}
    if count == 2:
        layout = rng.choice(["horizontal", "vertical"])
        line, (first, second) = rng.randrange(3), sorted(rng.sample(range(3), 2))
        for obj, place in zip(objects, (first, second)):  # objects[0] is left of / above objects[1]
            obj["row"], obj["col"] = (line, place) if layout == "horizontal" else (place, line)
        return {"objects": objects, "layout": layout}
    for col, obj in enumerate(objects):  # left to right
        obj["row"], obj["col"] = rng.randrange(3), col
    return {"objects": objects, "layout": "row"}


def scene_captions(rng: random.Random, scene: dict, count: int = CAPTIONS_PER_IMAGE) -> list:
    """`count` distinct-as-possible captions naming every attribute of the scene."""
    objects, layout = scene["objects"], scene["layout"]
    captions = []
    for _ in range(count * 4):
        phrases = [_object_phrase(rng, obj) for obj in objects]
        a = [_with_article(p) for p in phrases]
        if len(objects) == 1:
            where = rng.choice(SINGLE_POSITIONS[layout][1])
            caption = rng.choice([f"{a[0]} {where}", f"there is {a[0]} {where}",
                                 f"{where}, {a[0]}", f"one {phrases[0]} {where}"])
        elif len(objects) == 2:
            if layout == "horizontal":
                forward, backward = "to the left of", "to the right of"
            else:
                forward, backward = rng.choice(["above", "over"]), "below"
            caption = rng.choice([f"{a[0]} {forward} {a[1]}", f"{a[1]} {backward} {a[0]}",
                                  f"two shapes: {a[0]} {forward} {a[1]}",
                                  f"there is {a[1]} {backward} {a[0]}"])
        else:
            listed = f"{a[0]}, {a[1]} and {a[2]}"
            caption = rng.choice([f"{listed} from left to right", f"from left to right: {listed}",
                                  f"three shapes: {listed}, from left to right"])
        if caption not in captions:
            captions.append(caption)
        if len(captions) == count:
            break
    return captions + [captions[i % len(captions)] for i in range(count - len(captions))]


def render_scene(rng: random.Random, noise_rng: np.random.Generator, scene: dict) -> np.ndarray:
    """(IMAGE_SIZE, IMAGE_SIZE, 3) uint8: noisy grey background plus the scene's shapes."""
    grey = rng.randrange(90, 150)
    background = grey + noise_rng.normal(0, 6, (IMAGE_SIZE, IMAGE_SIZE, 3))
    image = Image.fromarray(np.clip(background, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(image)
    for obj in scene["objects"]:
        r = SIZES[obj["size"]]
        cx = (obj["col"] + 0.5) * CELL + rng.uniform(-2, 2)
        cy = (obj["row"] + 0.5) * CELL + rng.uniform(-2, 2)
        colour = tuple(min(255, max(0, c + rng.randint(-15, 15))) for c in COLOURS[obj["colour"]])
        box = (cx - r, cy - r, cx + r, cy + r)
        if obj["shape"] == "circle":
            draw.ellipse(box, fill=colour)
        elif obj["shape"] == "square":
            draw.rectangle(box, fill=colour)
        elif obj["shape"] == "triangle":
            draw.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=colour)
        else:
            w = max(2, r // 3)
            draw.rectangle((cx - r, cy - w, cx + r, cy + w), fill=colour)
            draw.rectangle((cx - w, cy - r, cx + w, cy + r), fill=colour)
    return np.asarray(image)


def generate_split(split: str, size: int | None = None, seed_offset: int = 0):
    """Yields (key, example) for a split; deterministic for (split, seed_offset)."""
    rng = random.Random(f"synthetic_shapes-{SPLIT_SEEDS[split]}-{seed_offset}")
    noise_rng = np.random.default_rng([SPLIT_SEEDS[split], seed_offset, 20240])
    first_id = sum(SPLIT_SIZES[s] for s in list(SPLIT_SIZES)[: list(SPLIT_SIZES).index(split)])
    for index in range(SPLIT_SIZES[split] if size is None else size):
        scene = sample_scene(rng)
        pixels = render_scene(rng, noise_rng, scene)
        yield index, {"image": pixels, "image_id": first_id + index,
                      "captions": scene_captions(rng, scene)}


SPECIAL_TOKENS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


def caption_corpus(size_per_split: int = 1000) -> list:
    """Captions from every split: the corpus the shipped WordPiece vocab is built from."""
    return [c for split in SPLIT_SIZES
            for _, ex in generate_split(split, min(size_per_split, SPLIT_SIZES[split]))
            for c in ex["captions"]]


def write_vocab(path: str = SYNTHETIC_SHAPES_VOCAB) -> list:
    """Trains a WordPiece vocab on the caption grammar (tokenizers, as BERT's) and writes vocab.txt.

    Regenerate with `python -m blip_jax.data.builders.synthetic_shapes`. Every caption word ends up a
    whole token, plus single characters so nothing maps to [UNK].
    """
    from tokenizers import BertWordPieceTokenizer
    wordpiece = BertWordPieceTokenizer(lowercase=True)
    wordpiece.train_from_iterator(caption_corpus(), vocab_size=300, min_frequency=1,
                                  special_tokens=SPECIAL_TOKENS, limit_alphabet=100)
    vocab = sorted(wordpiece.get_vocab().items(), key=lambda item: item[1])
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        f.writelines(token + "\n" for token, _ in vocab)
    return [token for token, _ in vocab]


class SyntheticShapes(tfds.core.GeneratorBasedBuilder):
    """Coloured shapes with attribute captions; image_id unique over all splits."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "64 px, 1-3 shapes, 5 captions per image."}

    def _info(self):
        return self.dataset_info_from_configs(
            features=tfds.features.FeaturesDict({
                "image": tfds.features.Image(shape=(IMAGE_SIZE, IMAGE_SIZE, 3), encoding_format="jpeg"),
                "image_id": np.int64,
                "captions": tfds.features.Sequence(tfds.features.Text()),
            }),
            description=__doc__)

    def _split_generators(self, dl_manager):
        del dl_manager  # nothing to download
        return {split: self._generate_examples(split) for split in SPLIT_SIZES}

    def _generate_examples(self, split):
        for key, example in generate_split(split):
            buffer = io.BytesIO()  # JPEG: 4x smaller than PNG for noisy pixels; PIL is faster than tfds
            Image.fromarray(example["image"]).save(buffer, format="JPEG", quality=95)
            yield key, {**example, "image": buffer.getvalue()}


def ensure_built(data_dir: str | None = None) -> tfds.core.DatasetBuilder:
    """Builds synthetic_shapes under data_dir if missing (offline, seconds); returns its builder."""
    from blip_jax.data.datasets import default_data_dir
    builder = SyntheticShapes(data_dir=default_data_dir(data_dir))
    builder.download_and_prepare(download_config=tfds.download.DownloadConfig(
        try_download_gcs=False, verify_ssl=False))
    return builder


def image_digest(pixels: np.ndarray) -> str:
    """A content hash for checking that splits share no image."""
    return hashlib.sha1(np.ascontiguousarray(pixels).tobytes()).hexdigest()


if __name__ == "__main__":
    print(f"wrote {len(write_vocab())} tokens to {os.path.abspath(SYNTHETIC_SHAPES_VOCAB)}")
