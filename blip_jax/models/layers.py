"""Layer constructors shared by the ViT and MED, so the dtype policy lives in one place.

Dense layers compute in `options.compute_dtype` and store `options.storage_dtype`; LayerNorm always
computes in float32 (its output is cast back by the caller where the next op wants compute dtype).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import flax.linen as nn

from blip_jax.models.config import Options

dense_init = nn.initializers.truncated_normal(0.02)


def dense(features: int, options: Options, name: str, kernel_init=dense_init) -> nn.Dense:
    return nn.Dense(features, dtype=options.compute_dtype, param_dtype=options.storage_dtype,
                    kernel_init=kernel_init, name=name)


def layer_norm(eps: float, options: Options, name: str | None = None) -> nn.LayerNorm:
    return nn.LayerNorm(eps, dtype=jnp.float32, param_dtype=options.storage_dtype, name=name)


def rematerialised(module_cls, options: Options, static_argnums):
    """`module_cls` with activations recomputed in the backward pass under `options.remat_policy`."""
    return nn.remat(module_cls, static_argnums=static_argnums, prevent_cse=False,
                    policy=getattr(jax.checkpoint_policies, options.remat_policy))
