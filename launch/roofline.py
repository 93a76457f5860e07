"""What float32 speed this CPU allows: the GEMM rate of torch (MKL) and XLA, and the ViT's FLOP count.

The benchmarks use this to say how far a measured ratio is from the hardware's limit: when the
reference already runs its GEMMs near the machine's GEMM rate, no float32 implementation can be many
times faster, however well it fuses the rest.
"""
from __future__ import annotations

import time


def vit_flops(image_size: int, patch: int = 16, width: int = 768, depth: int = 12, mlp: int = 3072) -> float:
    """Multiply-adds x 2 of one image through a ViT (patch embedding, every block; norms and softmax
    not counted, so this is a lower bound on the work)."""
    patches = (image_size // patch) ** 2
    tokens = patches + 1
    embed = 2 * patches * (patch * patch * 3) * width
    linear = 2 * tokens * width * (3 * width + width + 2 * mlp)
    attention = 2 * 2 * tokens * tokens * width
    return embed + depth * (linear + attention)


def caption_flops(images: int, rows: int, steps: int, image_size: int, vision_width: int = 768,
                  width: int = 768, layers: int = 12, intermediate: int = 3072, vocab: int = 30524) -> float:
    """A lower bound on the FLOPs of captioning `images` with `rows` decoder rows (images x beams) for
    `steps` tokens: the ViT, one projection of each image's tokens to cross-attention K/V per layer
    (however it is shared between beams), and per row and token the decoder layers and LM head."""
    tokens = (image_size // 16) ** 2 + 1
    cross_kv = 2 * images * tokens * vision_width * 2 * width * layers
    per_token = 2 * layers * (6 * width * width + 2 * width * intermediate) + 2 * (width * width + width * vocab)
    return images * vit_flops(image_size, width=vision_width) + cross_kv + rows * steps * per_token


def _best_seconds(fn, repeats: int) -> float:
    fn()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def gemm_rates(m: int, k: int, n: int, repeats: int = 5) -> dict[str, float]:
    """float32 GFLOP/s of one (m, k) @ (k, n) product in torch and in jitted XLA, on every core."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    import torch

    rng = np.random.default_rng(0)
    a, b = rng.standard_normal((m, k), np.float32), rng.standard_normal((k, n), np.float32)
    flops = 2.0 * m * k * n
    torch_a, torch_b = torch.from_numpy(a), torch.from_numpy(b)
    with torch.inference_mode():
        torch_s = _best_seconds(lambda: torch_a @ torch_b, repeats)
    jax_a, jax_b = jnp.asarray(a), jnp.asarray(b)
    product = jax.jit(jnp.matmul)
    jax_s = _best_seconds(lambda: product(jax_a, jax_b).block_until_ready(), repeats)
    return {"torch": flops / torch_s / 1e9, "jax": flops / jax_s / 1e9}
