"""The pre-training state: one plain pytree (a dict), born sharded.

    params           the Pretrainer parameters
    momentum_params  EMA copies of visual_encoder, vision_proj, text_encoder (minus the decoder's
                     own self-attention and the LM head, which the momentum encoders never use),
                     text_proj (and temp, unused, so the Pretrainer binds)
    opt_state        optax state of the optimizer
    image_queue      (Q, E) float32 momentum image features, L2-normalised rows
    text_queue       (Q, E) float32 momentum text features
    idx_queue        (Q,) int32 image ids of the queued features (-100 = none)
    queue_ptr        () int32 next write position
    step             () int32 number of train steps taken
    num_skipped      () int32 steps whose update was skipped by the NaN policy
    rng              (2,) uint32 key data of the base PRNG key (typed keys do not checkpoint)
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from blip_jax.models.blip import dummy_inputs

MOMENTUM_MODULES = ("visual_encoder", "vision_proj", "text_encoder", "text_proj", "temp")
MOMENTUM_EXCLUDE = ("decoder_attention", "lm_head")


def momentum_subset(params):
    """The parameters the momentum encoders use (a sub-tree of `params`, same leaves)."""
    def strip(tree):
        if isinstance(tree, dict):
            return {k: strip(v) for k, v in tree.items() if k not in MOMENTUM_EXCLUDE}
        return tree
    return {name: strip(params[name]) for name in MOMENTUM_MODULES if name in params}


def momentum_update(momentum_params, params, momentum: float):
    """theta_m <- m * theta_m + (1 - m) * theta, leafwise (blip.md §2.3)."""
    online = momentum_subset(params)
    return jax.tree.map(lambda m, p: (m * momentum + p.astype(m.dtype) * (1.0 - momentum)).astype(m.dtype),
                        momentum_params, online)


def enqueue(queue, values, ptr):
    """Write `values` (B, ...) into the ring buffer `queue` (Q, ...) at row `ptr`.

    Requires Q % B == 0 (validated with the config), so a write never wraps mid-batch."""
    start = (ptr,) + (0,) * (queue.ndim - 1)
    return jax.lax.dynamic_update_slice(queue, values.astype(queue.dtype), start)


def advance_ptr(ptr, batch_size: int, queue_size: int):
    return ((ptr + batch_size) % queue_size).astype(jnp.int32)


def init_queues(key, queue_size: int, embed_dim: int):
    """Random normal queues with L2-normalised rows, as the original registers them."""
    key_image, key_text = jax.random.split(key)

    def normalized(k):
        x = jax.random.normal(k, (queue_size, embed_dim), jnp.float32)
        return x / jnp.linalg.norm(x, axis=-1, keepdims=True)
    return normalized(key_image), normalized(key_text)


def create_state(model, model_config, tx, queue_size: int, rng_seed_key, params=None):
    """The initial state. Pure: call under `jax.jit(..., out_shardings=...)` to build it sharded.

    rng_seed_key: a typed PRNG key. params: optional starting parameters (e.g. from init_from).
    """
    key_params, key_queue, key_train = jax.random.split(rng_seed_key, 3)
    if params is None:
        params = model.init({"params": key_params}, *dummy_inputs(model_config, "pretrain"))["params"]
    image_queue, text_queue = init_queues(key_queue, queue_size, int(model_config.embed_dim))
    return {
        "params": params,
        "momentum_params": jax.tree.map(jnp.array, momentum_subset(params)),
        "opt_state": tx.init(params),
        "image_queue": image_queue,
        "text_queue": text_queue,
        "idx_queue": jnp.full((queue_size,), -100, jnp.int32),
        "queue_ptr": jnp.zeros((), jnp.int32),
        "step": jnp.zeros((), jnp.int32),
        "num_skipped": jnp.zeros((), jnp.int32),
        "rng": jax.random.key_data(key_train),
    }
