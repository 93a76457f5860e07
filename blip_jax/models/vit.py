"""The BLIP image encoder: a timm-style pre-norm ViT that returns all tokens (blip.md §2.1)."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import flax.linen as nn
import numpy as np

from blip_jax.models.attention import dot_product_attention
from blip_jax.models.config import Options, VisionConfig
from blip_jax.models.layers import dense, dense_init, layer_norm, rematerialised


class DropPath(nn.Module):
    """Stochastic depth: drop the whole residual branch per sample."""

    rate: float

    @nn.compact
    def __call__(self, x, deterministic: bool):
        if self.rate == 0.0 or deterministic:
            return x
        keep = jax.random.bernoulli(self.make_rng("dropout"), 1.0 - self.rate, (x.shape[0],) + (1,) * (x.ndim - 1))
        return jnp.where(keep, x / (1.0 - self.rate), 0.0).astype(x.dtype)


class VitAttention(nn.Module):
    """Fused-qkv self-attention; qkv output features are [q | k | v], each (heads, head_dim)."""

    config: VisionConfig
    options: Options

    @nn.compact
    def __call__(self, x):
        width, heads = self.config.width, self.config.num_heads
        qkv = dense(3 * width, self.options, "qkv")(x)
        qkv = qkv.reshape(x.shape[0], x.shape[1], 3, heads, width // heads)
        out = dot_product_attention(qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2], impl=self.options.attention_impl)
        out = out.reshape(x.shape[0], x.shape[1], width)
        return dense(width, self.options, "proj")(out)


class VitBlock(nn.Module):
    """x += DropPath(Attn(LN(x))); x += DropPath(MLP(LN(x))). LayerNorm runs in float32."""

    config: VisionConfig
    options: Options
    drop_path_rate: float = 0.0

    @nn.compact
    def __call__(self, x, deterministic: bool = True):
        dtype, eps = self.options.compute_dtype, self.config.layer_norm_eps
        drop_path = DropPath(self.drop_path_rate)
        h = layer_norm(eps, self.options, "norm1")(x).astype(dtype)
        x = x + drop_path(VitAttention(self.config, self.options, name="attn")(h), deterministic)
        h = layer_norm(eps, self.options, "norm2")(x).astype(dtype)
        h = Mlp(self.config, self.options, name="mlp")(h)
        return x + drop_path(h, deterministic)


class Mlp(nn.Module):
    """fc1 -> exact GELU -> fc2."""

    config: VisionConfig
    options: Options

    @nn.compact
    def __call__(self, x):
        x = nn.gelu(dense(self.config.mlp_dim, self.options, "fc1")(x), approximate=False)
        return dense(self.config.width, self.options, "fc2")(x)


class PatchEmbed(nn.Module):
    """Non-overlapping patch projection: a conv with kernel = stride = patch size."""

    config: VisionConfig
    options: Options

    @nn.compact
    def __call__(self, pixels):
        patch = (self.config.patch_size,) * 2
        return nn.Conv(self.config.width, patch, strides=patch, padding="VALID", dtype=self.options.compute_dtype,
                       param_dtype=self.options.storage_dtype, kernel_init=dense_init, name="proj")(pixels)


class VisionTransformer(nn.Module):
    """pixels (B, H, W, 3) normalised NHWC -> all tokens (B, 1 + N, D), [CLS] first.

    Inputs at another resolution than `config.image_size` use a bicubically resampled pos_embed
    (like HF's `interpolate_pos_encoding=True`).
    """

    config: VisionConfig
    options: Options

    @nn.compact
    def __call__(self, pixels, deterministic: bool = True):
        config, options = self.config, self.options
        dtype, param_dtype = options.compute_dtype, options.storage_dtype
        x = PatchEmbed(config, options, name="patch_embed")(pixels.astype(dtype))
        batch, grid_h, grid_w, _ = x.shape
        x = x.reshape(batch, grid_h * grid_w, config.width)
        cls_token = self.param("cls_token", dense_init, (1, 1, config.width), param_dtype)
        pos_embed = self.param("pos_embed", dense_init, (1, 1 + config.num_patches, config.width), param_dtype)
        if grid_h * grid_w != config.num_patches:
            pos_embed = resample_pos_embed(pos_embed, (grid_h, grid_w))
        x = jnp.concatenate([jnp.broadcast_to(cls_token, (batch, 1, config.width)).astype(dtype), x], axis=1)
        x = x + pos_embed.astype(dtype)
        rates = np.linspace(0.0, config.drop_path_rate, config.depth)
        first_remat = config.depth - options.remat_vision_layers
        for i in range(config.depth):
            block = VitBlock
            if i >= first_remat:
                block = rematerialised(VitBlock, options, static_argnums=(2,))
            x = block(config, options, float(rates[i]), name=f"blocks_{i}")(x, deterministic)
        return layer_norm(config.layer_norm_eps, options, "norm")(x)


# On a CPU the encoder is bound by memory traffic, not FLOPs, once a block's activations outgrow the
# caches: the (heads, tokens, tokens) attention scores and fc1's (tokens, mlp_dim) output are streamed
# through DRAM several times (max, exp, sum, divide; bias, GELU). Running the encoder a few images at a
# time keeps them in L2/L3: ViT-B/16 at 384 px, batch 8, runs 1.36x faster on two cores, two images a
# pass (launch/benchmark_encode.py). A batch that fits the budget runs in one pass (at 224 px, batch 8,
# passes gain nothing and the loop costs training ~5%). Accelerators run the whole batch in one pass.
CPU_BYTES_PER_PASS = 32 << 20


def images_per_pass(batch: int, config: VisionConfig, options: Options, image_size: int) -> int:
    """How many of `batch` images one pass of the encoder takes (a divisor of `batch`).

    `options.images_per_pass` > 0 asks for at most that many; 0 picks: the whole batch on GPU/TPU,
    and on CPU the most images whose attention scores or MLP activations fit CPU_BYTES_PER_PASS. A pass
    always holds a multiple of the mesh's device count, so a batch sharded over the mesh stays evenly spread.
    """
    mesh = jax.sharding.get_abstract_mesh()
    devices = 1 if mesh.empty else mesh.size
    if batch % devices:
        return batch
    wanted = options.images_per_pass
    if not wanted:
        if jax.default_backend() != "cpu":
            return batch
        tokens = 1 + (image_size // config.patch_size) ** 2
        mlp_bytes = tokens * config.mlp_dim * jnp.dtype(options.compute_dtype).itemsize
        score_bytes = config.num_heads * tokens * tokens * 4  # the softmax runs in float32
        wanted = max(1, CPU_BYTES_PER_PASS // max(mlp_bytes, score_bytes)) * devices
    per_device = max(1, min(wanted, batch) // devices)
    while (batch // devices) % per_device:
        per_device -= 1
    return per_device * devices


def encode_in_passes(encoder: "VisionTransformer", pixels, deterministic: bool = True):
    """`encoder(pixels)` run `images_per_pass` images at a time (a loop, nn.scan), same results.

    Image i goes to pass i % passes, so every pass takes an even share of each device's examples.
    """
    batch, image_size = pixels.shape[0], pixels.shape[1]
    per_pass = images_per_pass(batch, encoder.config, encoder.options, image_size)
    if per_pass == batch:
        return encoder(pixels, deterministic)
    passes = batch // per_pass
    strided = pixels.reshape((per_pass, passes) + pixels.shape[1:])

    def one_pass(module, carry, images):
        return carry, module(images, deterministic)

    loop = nn.scan(one_pass, variable_broadcast="params", split_rngs={"params": False, "dropout": True},
                   in_axes=1, out_axes=1)
    _, tokens = loop(encoder, None, strided)
    return tokens.reshape((batch,) + tokens.shape[2:])


def _cubic_weights(distance, a=-0.75):
    """torch's bicubic convolution kernel (a = -0.75), evaluated at |distance|."""
    d = np.abs(distance)
    near = ((a + 2) * d - (a + 3)) * d * d + 1
    far = ((a * d - 5 * a) * d + 8 * a) * d - 4 * a
    return np.where(d <= 1, near, np.where(d < 2, far, 0.0))


def bicubic_matrix(in_size: int, out_size: int) -> np.ndarray:
    """(out, in) matrix equal to torch `interpolate(mode='bicubic', align_corners=False, size=out)` on one axis."""
    scale = in_size / out_size
    matrix = np.zeros((out_size, in_size), np.float64)
    for out_index in range(out_size):
        source = (out_index + 0.5) * scale - 0.5
        base = int(np.floor(source))
        frac = source - base
        for tap in range(-1, 3):
            weight = _cubic_weights(tap - frac)
            matrix[out_index, min(max(base + tap, 0), in_size - 1)] += weight
    return matrix


def resample_pos_embed(pos_embed, new_grid):
    """Resample (1, 1 + N, D) position embeddings to a new (h, w) patch grid; the [CLS] entry is kept.

    Reproduces PyTorch bicubic (a=-0.75, align_corners=False) exactly, unlike jax.image.resize (a=-0.5).
    Works on numpy arrays (conversion) and traced jax arrays (resolution change inside the model).
    """
    if isinstance(new_grid, int):
        new_grid = (new_grid, new_grid)
    xp = np if isinstance(pos_embed, np.ndarray) else jnp
    num_patches = pos_embed.shape[1] - 1
    old = int(round(num_patches ** 0.5))
    if old * old != num_patches:
        raise ValueError(f"pos_embed has {num_patches} patch positions, which is not a square grid")
    if (old, old) == tuple(new_grid):
        return pos_embed
    dim = pos_embed.shape[-1]
    grid = pos_embed[0, 1:].reshape(old, old, dim)
    rows = bicubic_matrix(old, new_grid[0]).astype(np.float32)
    cols = bicubic_matrix(old, new_grid[1]).astype(np.float32)
    if xp is np:
        resized = np.einsum("ih,jw,hwd->ijd", rows, cols, grid.astype(np.float32)).astype(pos_embed.dtype)
    else:
        resized = jnp.einsum("ih,jw,hwd->ijd", rows, cols, grid.astype(jnp.float32),
                             precision=jax.lax.Precision.HIGHEST).astype(pos_embed.dtype)
    return xp.concatenate([pos_embed[:, :1], resized.reshape(1, -1, dim)], axis=1)
