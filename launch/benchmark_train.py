"""Benchmark the pre-training step (not a test): step time, img/s, compile time, model TFLOPs per step
(XLA cost analysis), achieved TFLOP/s and MFU, and peak memory (XLA memory analysis).

    python launch/benchmark_train.py --config configs/pretrain.py:base --batch-size 64 --peak-tflops 989
    python launch/benchmark_train.py --config configs/pretrain.py:tiny --steps 10 [--config.x=y ...]

Runs on whatever devices JAX sees (CPU here, GPU/TPU as is) with random batches (no input pipeline:
this measures the model step). --peak-tflops is the per-device peak of your chip for the dtype used
(e.g. 989 for H100/H200 dense bf16); MFU = achieved / (peak x devices).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/pretrain.py:base")
    parser.add_argument("--batch-size", type=int, default=0, help="global batch (default: the config's)")
    parser.add_argument("--steps", type=int, default=5, help="timed steps after one warm-up step")
    parser.add_argument("--peak-tflops", type=float, default=0.0, help="per-device peak TFLOP/s for MFU")
    parser.add_argument("--json", default="", help="also write the numbers to this file")
    args, overrides = parser.parse_known_args(argv)

    import jax
    import numpy as np

    from blip_jax import sharding
    from blip_jax.train import loop
    from blip_jax.train.cli import load_config

    config = load_config(args.config, overrides)
    if args.batch_size:
        config.batch_size = args.batch_size
        config.input.batch_size = args.batch_size
        if config.itc.queue_size % args.batch_size:
            config.itc.queue_size = args.batch_size * max(1, config.itc.queue_size // args.batch_size)
    if config.input.tokenizer == "synthetic_shapes":
        loop.apply_tokenizer(config)  # the tiny vocab; base/large keep BERT's 30,524
    mesh = sharding.make_mesh(fsdp=config.sharding.fsdp)
    jax.set_mesh(mesh)
    parts = loop.build(config, mesh)
    state = jax.jit(parts["init"], out_shardings=parts["shardings"])(jax.random.key(0))

    rng = np.random.default_rng(0)
    b, size, length = config.batch_size, config.model.vision.image_size, config.input.max_length
    tokens = config.model.tokens
    ids = rng.integers(1000 if config.model.text.vocab_size > 2000 else 5, config.model.text.vocab_size - 2,
                       (b, length)).astype(np.int32)
    ids[:, 0] = tokens.cls
    ids[:, -1] = tokens.sep
    host_batch = {"image": rng.normal(size=(b, size, size, 3)).astype(np.float32), "input_ids": ids,
                  "attention_mask": np.ones((b, length), np.int32), "image_id": np.arange(b, dtype=np.int32)}
    batch = sharding.shard_batch(host_batch, mesh)

    start = time.perf_counter()
    compiled = parts["train_step"].lower(state, batch).compile()
    compile_s = time.perf_counter() - start
    flops_program = compiled
    if jax.default_backend() == "cpu" or config.model.get("images_per_pass", 0) not in (0, b):
        # The ViT may run in several passes (a loop; models/vit.py encode_in_passes), and XLA's cost
        # analysis counts a loop body once: count the FLOPs of the same step with the ViT in one pass.
        one_pass = config.copy_and_resolve_references()
        one_pass.model.images_per_pass = b
        flops_program = loop.build(one_pass, mesh)["train_step"].lower(state, batch).compile()
    cost = flops_program.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    flops = float((cost or {}).get("flops", 0.0))
    memory = compiled.memory_analysis()

    state, metrics = compiled(state, batch)  # warm-up
    jax.block_until_ready(metrics)
    start = time.perf_counter()
    for _ in range(args.steps):
        state, metrics = compiled(state, batch)
    jax.block_until_ready((state, metrics))
    step_s = (time.perf_counter() - start) / args.steps

    devices = jax.device_count()
    # cost_analysis counts the per-device (SPMD-partitioned) program; x devices = the whole step.
    step_tflops = flops * devices / 1e12
    achieved = step_tflops / step_s
    result = {
        "config": args.config, "devices": devices, "platform": jax.devices()[0].platform,
        "device_kind": jax.devices()[0].device_kind, "global_batch": b, "image_size": size,
        "compile_s": round(compile_s, 2), "step_s": round(step_s, 4), "img_per_s": round(b / step_s, 1),
        "tflops_per_step": round(step_tflops, 4), "achieved_tflops": round(achieved, 3),
        "loss": float(metrics["loss"]),
    }
    if args.peak_tflops:
        result["mfu"] = round(achieved / (args.peak_tflops * devices), 4)
    if memory is not None:
        peak = (memory.argument_size_in_bytes + memory.output_size_in_bytes + memory.temp_size_in_bytes
                - memory.alias_size_in_bytes)
        result.update(peak_memory_gib=round(peak / 2**30, 3),
                      temp_memory_gib=round(memory.temp_size_in_bytes / 2**30, 3),
                      argument_memory_gib=round(memory.argument_size_in_bytes / 2**30, 3))
    for key, value in result.items():
        print(f"{key:>20}: {value}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
