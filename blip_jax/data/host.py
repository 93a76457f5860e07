"""Per-process (host) side of the input pipeline: tf.data over this process's share, numpy out.

Nothing here touches jax devices; pipeline.py turns these numpy batches into global jax.Arrays.
Process index/count default to jax's and can be given explicitly to simulate N processes.
"""
from __future__ import annotations

import math

import jax
import numpy as np
import tensorflow as tf

from blip_jax.data import datasets, text, transforms

_EPOCH_SEED_STRIDE = 1_000_003


def process_of(process_index=None, process_count=None) -> tuple:
    """(index, count), jax's unless given."""
    return (jax.process_index() if process_index is None else process_index,
            jax.process_count() if process_count is None else process_count)


def local_batch_size(global_batch: int, process_count: int) -> int:
    if global_batch % process_count:
        raise ValueError(f"batch size {global_batch} is not divisible by {process_count} processes: "
                         f"set config.input.batch_size to a multiple of {process_count}")
    return global_batch // process_count


def num_parallel(config):
    return tf.data.AUTOTUNE if config.num_parallel_calls in (None, -1) else config.num_parallel_calls


def text_arrays(config, tok, captions) -> dict:
    """Raw captions -> pre_caption -> fixed-length 'input_ids', 'attention_mask' (int32)."""
    cleaned = [text.pre_caption(c.decode("utf-8") if isinstance(c, bytes) else c, config.max_words)
               for c in captions]
    return text.tokenize(tok, cleaned, config.max_length)


# ----------------------------------------------------------------------------- training
def example_stream(config, start_item: int = 0, process_index=None, process_count=None) -> tuple:
    """(stream, local_size): this process's endless example stream from item `start_item`, images
    still encoded. Epoch e is the local split shuffled with seed (config.seed, e)."""
    process_index, process_count = process_of(process_index, process_count)
    builder = datasets.load_builder(config.name, config.data_dir)
    split = datasets.process_split(datasets.resolve_split(config.name, config.split),
                                   process_index, process_count)
    local_size = datasets.num_examples(builder, split)
    if local_size == 0:
        raise ValueError(f"split {config.split!r} of {config.name!r} has no examples for process "
                         f"{process_index}: use a larger split or fewer processes")
    records = datasets.read_split(config.name, builder, split)
    buffer = min(config.shuffle_buffer, local_size)

    def epoch_records(epoch):
        epoch_seed = tf.constant(config.seed, tf.int64) * _EPOCH_SEED_STRIDE + epoch
        shuffled = records.shuffle(buffer, seed=epoch_seed, reshuffle_each_iteration=False)
        return shuffled.map(lambda example: {**example, "epoch_seed": epoch_seed})

    stream = tf.data.Dataset.range(start_item // local_size, 2**62).flat_map(epoch_records)
    return stream.skip(start_item % local_size), local_size  # skips encoded records: no decoding


def train_dataset(config, start_step: int = 0, process_index=None, process_count=None) -> tf.data.Dataset:
    """tf.data of this process's training batches from `start_step`: {'image' uint8, 'caption',
    'image_id'}. Images are normalised later (on device)."""
    process_index, process_count = process_of(process_index, process_count)
    local_batch = local_batch_size(config.batch_size, process_count)
    stream, _ = example_stream(config, start_step * local_batch, process_index, process_count)

    def preprocess(example):
        example_key = tf.strings.to_hash_bucket_fast(example["tfds_id"], 2**62)
        seed = tf.stack([example_key, example["epoch_seed"]])
        image_seed, caption_seed = tf.unstack(tf.random.experimental.stateless_split(seed, 2))
        image = transforms.train_transform_uint8(
            example["image"], image_seed, config.image_size, config.min_scale,
            randaug=config.randaug, flip=config.flip)
        count = tf.shape(example["captions"])[0]
        choice = tf.random.stateless_uniform([], caption_seed, 0, tf.maximum(count, 1), dtype=tf.int32)
        return {"image": image, "caption": example["captions"][choice],
                "image_id": tf.cast(example["image_id"], tf.int32)}

    batches = stream.map(preprocess, num_parallel_calls=num_parallel(config), deterministic=True)
    batches = batches.batch(local_batch, drop_remainder=True)
    options = tf.data.Options()
    options.deterministic = True
    return batches.with_options(options).prefetch(2)


def host_train_batches(config, start_step: int = 0, process_index=None, process_count=None):
    """Numpy training batches for one process: image uint8 (b, S, S, 3), input_ids,
    attention_mask, image_id. Step `start_step` first."""
    tok = text.tokenizer(config.tokenizer)
    for batch in train_dataset(config, start_step, process_index, process_count).as_numpy_iterator():
        yield {"image": batch["image"], **text_arrays(config, tok, batch["caption"]),
               "image_id": batch["image_id"]}


# ----------------------------------------------------------------------------- evaluation
def _eval_split(config, split):
    """(builder, resolved split) for `split`, default config.eval_split."""
    builder = datasets.load_builder(config.name, config.data_dir)
    return builder, datasets.resolve_split(config.name, split or config.eval_split)


def host_eval_batches(config, split=None, process_index=None, process_count=None):
    """This process's eval batches, padded so every process yields the same number:
    'image' uint8, 'image_id' int32 (-1 pad), 'index' int32 (row in split order, -1 pad), 'mask' bool."""
    process_index, process_count = process_of(process_index, process_count)
    local_batch = local_batch_size(config.eval_batch_size, process_count)
    builder, split = _eval_split(config, split)
    shards = [datasets.process_split(split, i, process_count) for i in range(process_count)]
    sizes = [datasets.num_examples(builder, shard) for shard in shards]
    num_batches = math.ceil(max(sizes) / local_batch)
    offset, local_size = sum(sizes[:process_index]), sizes[process_index]
    records = datasets.read_split(config.name, builder, shards[process_index])

    def preprocess(position, example):
        return {"image": transforms.eval_transform_uint8(example["image"], config.image_size),
                "image_id": tf.cast(example["image_id"], tf.int32),
                "index": tf.cast(position + offset, tf.int32), "mask": tf.constant(True)}

    examples = records.enumerate().map(preprocess, num_parallel_calls=num_parallel(config),
                                       deterministic=True)
    padding = tf.data.Dataset.from_tensors({
        "image": tf.zeros([config.image_size] * 2 + [3], tf.uint8), "image_id": tf.constant(-1),
        "index": tf.constant(-1), "mask": tf.constant(False)}).repeat(num_batches * local_batch - local_size)
    batches = examples.concatenate(padding).batch(local_batch, drop_remainder=True).prefetch(2)
    yield from batches.as_numpy_iterator()


def eval_texts(config, split=None) -> dict:
    """All captions of an eval split for retrieval, in split order (same on every process).

    'texts': pre_caption'd captions; 'text_image_index': (T,) int32 row of each text's image;
    'image_ids': (N,) int64; 'image_text_indices': N lists of text rows (image -> its texts).
    """
    builder, split = _eval_split(config, split)
    records = datasets.read_split(config.name, builder, split).map(
        lambda example: {"image_id": example["image_id"], "captions": example["captions"]})
    texts, text_image_index, image_ids, image_text_indices = [], [], [], []
    for row, example in enumerate(records.as_numpy_iterator()):
        image_ids.append(int(example["image_id"]))
        image_text_indices.append(list(range(len(texts), len(texts) + len(example["captions"]))))
        for caption in example["captions"]:
            texts.append(text.pre_caption(caption.decode("utf-8"), config.max_words))
            text_image_index.append(row)
    return {"texts": texts, "text_image_index": np.asarray(text_image_index, np.int32),
            "image_ids": np.asarray(image_ids, np.int64), "image_text_indices": image_text_indices}


def host_text_batches(config, texts, process_index=None, process_count=None):
    """This process's rows of each global text batch (size eval_batch_size), padded:
    'input_ids', 'attention_mask' (b, L) int32, 'index' (b,) int32 (-1 pad), 'mask' (b,) bool."""
    process_index, process_count = process_of(process_index, process_count)
    local_batch = local_batch_size(config.eval_batch_size, process_count)
    tok = text.tokenizer(config.tokenizer)
    for start in range(0, len(texts), config.eval_batch_size):
        first = start + process_index * local_batch
        rows = list(range(first, min(first + local_batch, len(texts))))
        arrays = text.tokenize(tok, [texts[r] for r in rows] + [""] * (local_batch - len(rows)),
                               config.max_length)
        index = np.full(local_batch, -1, np.int32)
        index[:len(rows)] = rows
        yield {**arrays, "index": index, "mask": index >= 0}
