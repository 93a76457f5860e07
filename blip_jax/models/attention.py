"""One attention function for every BLIP block: masks, dropout, KV cache, and an `impl` switch.

`impl="xla"` is the plain einsum/softmax path (softmax in float32). `impl="cudnn"` calls
`jax.nn.dot_product_attention(implementation="cudnn")` where its limits allow (no dropout, bf16/fp16,
head_dim <= 128 and a multiple of 8, padding expressed as key lengths); otherwise it falls back to XLA.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import flax.linen as nn

NEG_INF = jnp.finfo(jnp.float32).min


def _cudnn_usable(query, key, dropout_active, mask) -> bool:
    head_dim = query.shape[-1]
    return (
        jax.default_backend() == "gpu"
        and not dropout_active
        and mask is None
        and query.dtype in (jnp.bfloat16, jnp.float16)
        and head_dim % 8 == 0
        and head_dim <= 128
        and key.dtype == query.dtype
    )


def dot_product_attention(
    query, key, value, *, key_padding_mask=None, causal=False, mask=None,
    dropout_rate=0.0, dropout_rng=None, deterministic=True, impl="xla", kv_heads_major=False,
):
    """Multi-head attention core.

    query: (B, T, H, Dh); key/value: (B, S, H, Dh), or (B, H, S, Dh) with `kv_heads_major` (how the
    decoding cache keeps the cross-attention K/V, so that no step has to transpose them).
    key_padding_mask: (B, S) bool, True = attend (right padding). causal: mask j > i.
    mask: optional extra (B, 1|H, T, S) bool (used by the KV cache). Returns (B, T, H, Dh).
    """
    dropout_active = dropout_rate > 0.0 and not deterministic
    if impl == "cudnn" and _cudnn_usable(query, key, dropout_active, mask):
        if kv_heads_major:
            key, value = key.swapaxes(1, 2), value.swapaxes(1, 2)
        lengths = None
        if key_padding_mask is not None:
            lengths = key_padding_mask.astype(jnp.int32).sum(-1)
        return jax.nn.dot_product_attention(
            query, key, value, is_causal=causal, key_value_seq_lengths=lengths, implementation="cudnn")

    scale = query.shape[-1] ** -0.5
    # Heads-major (B, H, T|S, Dh) operands make both products plain batched GEMMs (no relayout inside).
    query = query.swapaxes(1, 2)
    if not kv_heads_major:
        key, value = key.swapaxes(1, 2), value.swapaxes(1, 2)
    scores = jnp.einsum("bhtd,bhsd->bhts", query, key, preferred_element_type=jnp.float32) * scale
    allowed = None
    if key_padding_mask is not None:
        allowed = key_padding_mask[:, None, None, :].astype(bool)
    if causal:
        t, s = scores.shape[-2:]
        tri = jnp.tril(jnp.ones((t, s), bool), k=s - t)
        allowed = tri[None, None] if allowed is None else allowed & tri[None, None]
    if mask is not None:
        allowed = mask if allowed is None else allowed & mask
    if allowed is not None:
        scores = jnp.where(allowed, scores, NEG_INF)
    probs = jax.nn.softmax(scores.astype(jnp.float32), axis=-1)
    if dropout_active:
        keep = jax.random.bernoulli(dropout_rng, 1.0 - dropout_rate, probs.shape)
        probs = jnp.where(keep, probs / (1.0 - dropout_rate), 0.0)
    return jnp.einsum("bhts,bhsd->bhtd", probs.astype(value.dtype), value).swapaxes(1, 2)


class KeyValueCache(nn.Module):
    """Self-attention KV cache for autoregressive decoding (docs/DESIGN.md, decoding contract).

    The first call only creates zero buffers of the input's length; later calls write (B, T) new keys
    at `cache_index` and return the full buffers plus the (B, 1, T, max_len) mask of what may be read.
    """

    @nn.compact
    def __call__(self, key, value):
        initialized = self.has_variable("cache", "cached_key")
        cached_key = self.variable("cache", "cached_key", jnp.zeros, key.shape, key.dtype)
        cached_value = self.variable("cache", "cached_value", jnp.zeros, value.shape, value.dtype)
        cache_index = self.variable("cache", "cache_index", lambda: jnp.array(0, jnp.int32))
        if not initialized:
            return key, value, None, True
        index = cache_index.value
        new_tokens = key.shape[1]
        start = (0, index, 0, 0)
        cached_key.value = jax.lax.dynamic_update_slice(cached_key.value, key.astype(cached_key.value.dtype), start)
        cached_value.value = jax.lax.dynamic_update_slice(
            cached_value.value, value.astype(cached_value.value.dtype), start)
        cache_index.value = index + new_tokens
        max_length = cached_key.value.shape[1]
        query_positions = index + jnp.arange(new_tokens)
        readable = jnp.arange(max_length)[None, :] <= query_positions[:, None]
        return cached_key.value, cached_value.value, readable[None, None], False
