"""Input pipelines: tfds -> tf.data (BLIP transforms) -> text -> global jax.Arrays on a mesh.

Public API (config = `default_input_config()` or `config.input` of a training config):
  train_iterator(config, mesh, start_step=0) -> iterator of dicts of global arrays, one per step:
      'image' (B, S, S, 3) float32 CLIP-normalised NHWC, 'input_ids' (B, L) int32,
      'attention_mask' (B, L) int32, 'image_id' (B,) int32.  B = config.batch_size (global).
  eval_batches(config, mesh, split=None) -> iterator of dicts of global arrays over a held-out split:
      'image', 'image_id', 'index' (row in split order, -1 for padding), 'mask' (B,) bool.
      Every process yields the same number of batches (padded; padding has mask False).
  eval_texts(config, split=None) -> dict: 'texts' (cleaned captions), 'text_image_index' (T,)
      row of each text's image, 'image_ids' (N,), 'image_text_indices' list of lists (image -> texts).
  text_batches(config, mesh, texts) -> global batches 'input_ids', 'attention_mask', 'index', 'mask'.
  host_train_batches(config, start_step=0, process_index=None, process_count=None)
      -> the same training batches as numpy, for one process (no jax involved).

Determinism and resume: the example stream is epoch after epoch, each epoch the process's split
shuffled with seed (config.seed, epoch); batch k is stream items [k*b, (k+1)*b) (b = per-process
batch). Each example's crop/flip/RandomAugment and caption choice depend only on (seed, example,
epoch). Restarting at step k starts at epoch k*b // n and skips k*b % n *encoded* records, so the
batches equal an uninterrupted run's and no skipped image is decoded.
"""
from __future__ import annotations

import queue
import threading

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from blip_jax.data import host, transforms
from blip_jax.data.host import eval_texts, host_train_batches  # noqa: F401  (re-exported)

def default_input_config(name: str = "synthetic_shapes") -> ml_collections.ConfigDict:
    """config.input defaults. synthetic_shapes: 64 px, no crop/flip/RandAugment (they would change
    which caption is true); any other dataset: BLIP pre-training settings (224 px, scale 0.2, flip,
    RandAugment(2, 5), 30 tokens)."""
    synthetic = name == "synthetic_shapes"
    return ml_collections.ConfigDict({
        "name": name,                 # dataset (see datasets.py)
        "data_dir": None,             # tfds data_dir; None -> $TFDS_DATA_DIR or ~/tensorflow_datasets
        "split": "train",
        "eval_split": "test",
        "batch_size": 64 if synthetic else 512,  # global
        "eval_batch_size": 64 if synthetic else 256,  # global
        "image_size": 64 if synthetic else 224,
        "max_length": 30,             # tokens (30 pre-training, 35 retrieval, 40 captioning)
        "max_words": 30,              # pre_caption word cap
        "min_scale": 1.0 if synthetic else 0.2,  # RandomResizedCrop scale (0.5 for fine-tuning)
        "flip": not synthetic,
        "randaug": not synthetic,
        "shuffle_buffer": 10_000,
        "seed": 0,
        "tokenizer": "synthetic_shapes" if synthetic else "bert-base-uncased",
        "prefetch": 2,                # batches prepared ahead on device
        "data_axes": ("data",),       # mesh axes the batch dimension is sharded over
        "num_parallel_calls": -1,     # tf.data map parallelism; -1 = AUTOTUNE
    })


# ----------------------------------------------------------------------------- device side
def batch_sharding(mesh, data_axes=("data",)) -> jax.sharding.NamedSharding:
    """Batch dimension split over `data_axes` (those present in the mesh), the rest replicated."""
    axes = tuple(a for a in data_axes if a in mesh.axis_names)
    if not axes:
        raise ValueError(f"mesh axes {mesh.axis_names} contain none of data_axes {tuple(data_axes)}: "
                         "set config.input.data_axes to the mesh's data-parallel axis names")
    return jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(axes))


@jax.jit
def _normalize_on_device(image_uint8):
    mean = jnp.asarray(transforms.CLIP_MEAN, jnp.float32)
    std = jnp.asarray(transforms.CLIP_STD, jnp.float32)
    return (image_uint8.astype(jnp.float32) / 255.0 - mean) / std


def to_global(host_batch: dict, sharding) -> dict:
    """Per-process numpy batch -> global jax.Arrays (uint8 'image' becomes normalised float32)."""
    axes = sharding.spec[0] if isinstance(sharding.spec[0], tuple) else (sharding.spec[0],)
    divisor = int(np.prod([sharding.mesh.shape[a] for a in axes])) // jax.process_count()
    out = {}
    for key, value in host_batch.items():
        if value.shape[0] % max(divisor, 1):
            raise ValueError(f"per-process batch {value.shape[0]} is not divisible by the {divisor} local "
                             "devices on the data axes: change config.input.batch_size")
        out[key] = jax.make_array_from_process_local_data(sharding, value)
    if out.get("image") is not None and out["image"].dtype == jnp.uint8:
        out["image"] = _normalize_on_device(out["image"])
    return out


def _prefetch(iterator, size: int):
    """Runs `iterator` in a background thread, `size` items ahead."""
    if size <= 0:
        yield from iterator
        return
    items, done = queue.Queue(maxsize=size), object()

    def produce():
        try:
            for item in iterator:
                items.put(item)
            items.put(done)
        except BaseException as error:  # surfaced in the consumer
            items.put(error)

    threading.Thread(target=produce, daemon=True).start()
    while (item := items.get()) is not done:
        if isinstance(item, BaseException):
            raise item
        yield item


def train_iterator(config, mesh, start_step: int = 0):
    """Global training batches from `start_step` on (see the module docstring)."""
    sharding = batch_sharding(mesh, config.data_axes)
    host_batches = host_train_batches(config, start_step)
    return _prefetch((to_global(batch, sharding) for batch in host_batches), config.prefetch)


def eval_batches(config, mesh, split: str | None = None):
    """Global eval batches over a held-out split: 'image', 'image_id', 'index', 'mask'."""
    sharding = batch_sharding(mesh, config.data_axes)
    host_batches = host.host_eval_batches(config, split)
    return _prefetch((to_global(batch, sharding) for batch in host_batches), config.prefetch)


def text_batches(config, mesh, texts: list):
    """Global batches of tokenised texts (e.g. eval_texts(...)['texts']) with 'index' and 'mask'."""
    sharding = batch_sharding(mesh, config.data_axes)
    host_batches = host.host_text_batches(config, texts)
    return (to_global(batch, sharding) for batch in host_batches)
