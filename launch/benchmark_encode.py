"""Image-encoder throughput: blip-jax ViT-B/16 vs transformers' BlipVisionModel, same weights, same run.

    python launch/benchmark_encode.py                 # ViT-B/16, 384 px, batch 8, float32, all CPU cores
    python launch/benchmark_encode.py --xla-flags=--xla_cpu_experimental_xnn_fusion_type=dot
    python launch/benchmark_encode.py --dtype bfloat16   # bf16 compute on the jax side (not float32)
    python launch/benchmark_encode.py --images-per-pass 8   # the whole batch in one pass (no CPU passes)

Both models get identical random weights (copied through blip-jax's HF key map) and identical pixels;
the script checks their outputs agree, then alternates timed rounds (torch, jax, torch, jax, ...) so
background load hits both alike. It reports, per framework, the best and median wall time per batch
(throughput = batch / best) and the process CPU seconds per batch (what the work costs, independent
of how many cores other processes leave free), and the ratios of both. Last it measures this machine's
float32 GEMM rate in torch and XLA (launch/roofline.py) and prints what fraction of it each encoder
reaches, and the ratio an encoder running every FLOP at that rate would have.
Weights are jit arguments (not baked-in constants), as in real use. See README.md, "Image-encoder speed".
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--image-size", type=int, default=384)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=5, help="timed rounds per framework (median reported)")
    parser.add_argument("--xla-flags", default="", help="extra XLA_FLAGS for the blip-jax side")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                        help="blip-jax compute dtype (params stay float32); the headline number is float32")
    parser.add_argument("--images-per-pass", type=int, default=0,
                        help="blip-jax ViT images per pass (0: automatic, see blip_jax/models/vit.py)")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: all cores)")
    parser.add_argument("--no-roofline", action="store_true", help="skip the GEMM-rate measurement")
    parser.add_argument("--skip-torch", action="store_true", help="time blip-jax only")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + args.xla_flags).strip()
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

    import jax
    import jax.numpy as jnp
    import flax.linen as nn
    import numpy as np
    import torch
    from transformers import BlipVisionConfig, BlipVisionModel

    from blip_jax.convert import keymap
    from blip_jax.models.config import Options, VisionConfig
    from blip_jax.models.vit import VisionTransformer, encode_in_passes

    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    hf_config = BlipVisionConfig(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                                 num_attention_heads=12, image_size=args.image_size, patch_size=16,
                                 layer_norm_eps=1e-6)
    torch_model = BlipVisionModel(hf_config).eval()
    with torch.no_grad():  # HF's vision init is ~1e-10; give every weight a realistic scale
        for name, param in torch_model.named_parameters():
            if "norm" in name and name.endswith("weight"):
                param.copy_(1 + 0.05 * torch.randn_like(param))
            else:
                param.copy_(0.02 * torch.randn_like(param))

    vision = VisionConfig(image_size=args.image_size, patch_size=16, width=768, depth=12, num_heads=12,
                          mlp_dim=3072, layer_norm_eps=1e-6)
    module = VisionTransformer(vision, Options(dtype=args.dtype, images_per_pass=args.images_per_pass))
    state = {"vision_model." + k: v.numpy() for k, v in torch_model.state_dict().items()}
    size = args.image_size
    expected = jax.eval_shape(lambda: {"visual_encoder": module.init(
        jax.random.key(0), jnp.zeros((1, size, size, 3)))["params"]})
    params = keymap.to_flax(state, expected, task="caption", fmt="hf", source="BlipVisionModel")
    params = jax.device_put(params["visual_encoder"])

    # encode_in_passes is what every BLIP model's image_embeds runs (cache-sized passes on CPU).
    encode = jax.jit(lambda p, pixels: nn.apply(encode_in_passes, module)({"params": p}, pixels))
    rng = np.random.default_rng(0)
    pixels = rng.normal(size=(args.batch, size, size, 3)).astype(np.float32)
    pixels_nchw = torch.tensor(pixels.transpose(0, 3, 1, 2).copy())
    pixels_jax = jax.device_put(pixels)

    def run_jax():
        return jax.block_until_ready(encode(params, pixels_jax))

    def run_torch():
        with torch.inference_mode():
            return torch_model(pixel_values=pixels_nchw).last_hidden_state

    start = time.perf_counter()
    ours = run_jax()
    compile_s = time.perf_counter() - start
    if not args.skip_torch:
        theirs = run_torch()
        diff = float(np.max(np.abs(np.asarray(ours) - theirs.numpy())))
        print(f"max |blip-jax - transformers| = {diff:.2e}")
        if diff > (1e-3 if args.dtype == "float32" else 0.5):
            print("outputs disagree: the comparison is void", file=sys.stderr)
            return 1
    walls = {"jax": [], "torch": []}
    cpus = {"jax": [], "torch": []}
    load_before = os.getloadavg()[0]
    for _ in range(args.rounds):
        for name, fn in (("torch", run_torch), ("jax", run_jax)):
            if name == "torch" and args.skip_torch:
                continue
            cpu_start, start = time.process_time(), time.perf_counter()
            fn()
            walls[name].append(time.perf_counter() - start)
            cpus[name].append(time.process_time() - cpu_start)
    load_after = os.getloadavg()[0]
    print(f"ViT-B/16 {size}px batch {args.batch} blip-jax {args.dtype} / torch float32 on {os.cpu_count()} CPU(s), "
          f"XLA_FLAGS={os.environ['XLA_FLAGS']!r}, jax compile {compile_s:.1f}s, "
          f"load average {load_before:.1f} -> {load_after:.1f}")
    summary = {}
    for name, label in (("jax", "blip-jax    "), ("torch", "transformers")):
        if not walls[name]:
            continue
        best, median, cpu = min(walls[name]), statistics.median(walls[name]), min(cpus[name])
        summary[name] = (best, cpu)
        extra = f", torch threads {torch.get_num_threads()}" if name == "torch" else ""
        print(f"{label}: {args.batch / best:6.3f} images/s  (best {best:6.2f} s/batch, median {median:6.2f} s, "
              f"{cpu:6.2f} CPU-s/batch{extra})")
    if "torch" in summary:
        print(f"ratio blip-jax / transformers: {summary['torch'][0] / summary['jax'][0]:.2f}x throughput "
              f"(best wall), {summary['torch'][1] / summary['jax'][1]:.2f}x CPU-seconds per batch")
        if not args.no_roofline and args.dtype == "float32":
            print_roofline(args, summary)
    return 0


def print_roofline(args, summary) -> None:
    """How fast float32 can go here: the encoder's FLOPs against the machine's measured GEMM rate."""
    from roofline import gemm_rates, vit_flops

    tokens = (args.image_size // 16) ** 2 + 1
    rates = gemm_rates(args.batch * tokens, 768, 3072)  # fc1, the encoder's largest GEMM
    peak = max(rates.values())
    flops = args.batch * vit_flops(args.image_size)
    print(f"roofline: {flops / 1e9:.0f} GFLOP per batch; float32 GEMM rate of this machine "
          f"(({args.batch * tokens}x768) @ (768x3072)): torch {rates['torch']:.0f}, XLA {rates['jax']:.0f} GFLOP/s")
    for name, label in (("jax", "blip-jax    "), ("torch", "transformers")):
        achieved = flops / summary[name][0] / 1e9
        print(f"  {label}: {achieved:.0f} GFLOP/s = {100 * achieved / peak:.0f}% of that rate")
    limit = summary["torch"][0] / (flops / peak / 1e9)
    print(f"  an encoder running every FLOP at that rate would be {limit:.2f}x transformers here")


if __name__ == "__main__":
    sys.exit(main())
