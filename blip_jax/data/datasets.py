"""Which tfds dataset a name means, and its examples in one common format.

Common format (what pipeline.py consumes): {'image': encoded bytes (tf.string), 'image_id': int64,
'captions': (n,) tf.string, 'tfds_id': tf.string}. Images stay encoded here (SkipDecoding) so that
skipping or resuming never decodes an image.

Names:
  'synthetic_shapes'  the embedded dataset, built on first use (builders/synthetic_shapes.py)
  'coco_captions'     tfds' COCO 2014 with Karpathy splits; 'train' means train+restval (BLIP's 113k)
  anything else       a dataset built by `blip-jax build-dataset --format blip-json --name NAME`
                      under data_dir/blip_json/NAME, or any tfds name with image + captions
"""
from __future__ import annotations

import os

import tensorflow as tf
import tensorflow_datasets as tfds

COCO_SPLITS = {"train": "train+restval"}


def default_data_dir(data_dir: str | None = None) -> str:
    """data_dir, else $TFDS_DATA_DIR, else ~/tensorflow_datasets."""
    return os.path.expanduser(data_dir or os.environ.get("TFDS_DATA_DIR", "~/tensorflow_datasets"))


def blip_json_dir(name: str, data_dir: str | None = None) -> str | None:
    """The newest built version directory of a blip-json dataset, or None."""
    root = os.path.join(default_data_dir(data_dir), "blip_json", name)
    if not os.path.isdir(root):
        return None
    versions = sorted((d for d in os.listdir(root) if d[:1].isdigit() and
                       os.path.exists(os.path.join(root, d, "dataset_info.json"))),
                      key=lambda v: tuple(int(p) for p in v.split(".")))
    return os.path.join(root, versions[-1]) if versions else None


def load_builder(name: str, data_dir: str | None = None) -> tfds.core.DatasetBuilder:
    """A prepared tfds builder for `name` (see the module docstring)."""
    data_dir = default_data_dir(data_dir)
    if name == "synthetic_shapes":
        from blip_jax.data.builders import synthetic_shapes
        return synthetic_shapes.ensure_built(data_dir)
    directory = blip_json_dir(name, data_dir)
    if directory:
        return tfds.builder_from_directory(directory)
    try:
        builder = tfds.builder(name, data_dir=data_dir)
    except tfds.core.registered.DatasetNotFoundError:
        raise ValueError(f"dataset {name!r} not found in {data_dir}: build it with "
                         f"`blip-jax build-dataset --name {name} ...` or set config.input.data_dir") from None
    return builder  # an unprepared one fails in read_split with a clear message


def resolve_split(name: str, split: str) -> str:
    """Maps BLIP's split names onto the dataset's: coco_captions 'train' -> 'train+restval'."""
    if name == "coco_captions":
        return COCO_SPLITS.get(split, split)
    return split


def process_split(split: str, process_index: int, process_count: int):
    """This process's share of a split: tfds.even_splits(split, n)[i] (== split_for_jax_process)."""
    if process_count == 1:
        return split
    return tfds.even_splits(split, process_count)[process_index]


def num_examples(builder, split) -> int:
    """Examples in a split (expression); counts the records when there is no split metadata
    (e.g. under tfds.testing.mock_data)."""
    try:
        return builder.info.splits[split].num_examples
    except KeyError:
        records = builder.as_dataset(split=split, decoders={"image": tfds.decode.SkipDecoding()})
        return int(records.reduce(0, lambda count, _: count + 1))


def to_common_format(name: str, example: dict) -> dict:
    """One raw tfds example -> {'image', 'image_id', 'captions', 'tfds_id'}."""
    if name == "coco_captions":
        return {"image": example["image"], "image_id": tf.cast(example["image/id"], tf.int64),
                "captions": example["captions"]["text"], "tfds_id": example["tfds_id"]}
    missing = {"image", "image_id", "captions"} - set(example)
    if missing:
        raise ValueError(f"dataset {name!r} lacks field(s) {sorted(missing)}: it must have image, "
                         "image_id and captions (build it with `blip-jax build-dataset`)")
    return {"image": example["image"], "image_id": tf.cast(example["image_id"], tf.int64),
            "captions": example["captions"], "tfds_id": example["tfds_id"]}


def read_split(name: str, builder, split) -> tf.data.Dataset:
    """Examples of `split` in a fixed order, images still encoded, in the common format."""
    try:
        dataset = builder.as_dataset(
            split=split, shuffle_files=False, decoders={"image": tfds.decode.SkipDecoding()},
            read_config=tfds.ReadConfig(add_tfds_id=True, try_autocache=False, skip_prefetch=True,
                                        interleave_cycle_length=1))
    except AssertionError:  # tfds' "could not find data" for an unprepared dataset
        raise ValueError(f"dataset {name!r} is not prepared in {builder.data_dir}: run `tfds build "
                         f"{name} --data_dir <dir>` (or blip-jax build-dataset) first") from None
    return dataset.map(lambda example: to_common_format(name, example),
                       num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
