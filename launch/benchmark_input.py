"""Input-pipeline throughput: img/s (and per core) with BLIP's train augmentations at 224 and 384 px.

Builds (once) a blip-json dataset of COCO-like 640x480 JPEGs, then times host_train_batches: read ->
decode+RandomResizedCrop (bicubic) -> flip -> RandomAugment(2, 5) -> batch -> pre_caption + tokenize.
Normalisation runs on the accelerator (pipeline.to_global) and is not timed here. Per core is
reported two ways: wall-clock img/s divided by the cores given, and images per CPU-second this
process used (the honest number when other jobs share the machine).

  python launch/benchmark_input.py                      # 224 and 384, with and without RandomAugment
  python launch/benchmark_input.py --sizes 224 --threads 1   # one core
"""
from __future__ import annotations

import argparse
import json
import os
import tempfile
import time

import numpy as np
from PIL import Image


def make_images(root: str, count: int, seed: int = 0) -> list:
    """COCO-like photos: smooth colour fields plus texture, 640x480, JPEG quality 90 (~60-120 KB)."""
    rng = np.random.default_rng(seed)
    entries = []
    for index in range(count):
        coarse = Image.fromarray((rng.random((12, 16, 3)) * 255).astype(np.uint8))
        field = np.asarray(coarse.resize((640, 480), Image.Resampling.BICUBIC), np.float32)
        texture = rng.normal(0, 12, field.shape)
        pixels = np.clip(field + texture, 0, 255).astype(np.uint8)
        name = f"photo_{index:05d}.jpg"
        Image.fromarray(pixels).save(os.path.join(root, name), quality=90)
        entries.append({"image": name, "caption": f"A photo of scene number {index}, with colours."})
    return entries


def ensure_dataset(data_dir: str, count: int) -> str:
    from blip_jax.data import datasets
    from blip_jax.data.builders import blip_json
    name = f"bench_photos_{count}"
    if datasets.blip_json_dir(name, data_dir) is None:
        root = os.path.join(data_dir, f"{name}_images")
        os.makedirs(root, exist_ok=True)
        annotations = os.path.join(root, "train.json")
        with open(annotations, "w") as f:
            json.dump(make_images(root, count), f)
        blip_json.build(name, {"train": [annotations]}, root, data_dir)
    return name


def measure(config, steps: int, warmup: int) -> tuple:
    """(images per wall second, images per CPU second of this process) over `steps` batches.

    Images per CPU second is the per-core throughput even when other jobs share the cores."""
    from blip_jax.data import host
    batches = host.host_train_batches(config, process_index=0, process_count=1)
    for _ in range(warmup):
        next(batches)
    start, cpu_start = time.perf_counter(), time.process_time()
    for _ in range(steps):
        next(batches)
    images = steps * config.batch_size
    return images / (time.perf_counter() - start), images / (time.process_time() - cpu_start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", default=os.path.join(tempfile.gettempdir(), "blip_jax_bench_tfds"))
    parser.add_argument("--images", type=int, default=512)
    parser.add_argument("--sizes", type=int, nargs="+", default=[224, 384])
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)),
                        help="cores tf.data may use (default: all available)")
    parser.add_argument("--no-randaug-too", action="store_true", help="also time without RandomAugment")
    args = parser.parse_args()

    import tensorflow as tf
    tf.config.threading.set_inter_op_parallelism_threads(args.threads)
    tf.config.threading.set_intra_op_parallelism_threads(1)
    from blip_jax.data import pipeline

    name = ensure_dataset(args.data_dir, args.images)
    print(f"dataset {name}: {args.images} 640x480 JPEGs; {args.threads} core(s); "
          f"batch {args.batch_size}, {args.steps} timed steps")
    for size in args.sizes:
        for randaug in ([True, False] if args.no_randaug_too else [True]):
            config = pipeline.default_input_config(name)
            config.update(data_dir=args.data_dir, batch_size=args.batch_size, image_size=size,
                          randaug=randaug, tokenizer="synthetic_shapes", num_parallel_calls=args.threads,
                          shuffle_buffer=args.images)
            rate, per_cpu_second = measure(config, args.steps, args.warmup)
            print(f"{size}px randaug={randaug}: {rate:7.1f} img/s total, {rate / args.threads:6.1f} img/s "
                  f"per core (wall / {args.threads}), {per_cpu_second:6.1f} img per CPU-second")


if __name__ == "__main__":
    main()
