"""Optimiser and learning-rate schedules: config.optim -> an optax GradientTransformation.

The faithful default is the original's: AdamW (b1 0.9, b2 0.999, eps 1e-8), weight decay 0.05 on
*every* parameter, no clipping, no accumulation (blip.md §1.1, §7). Options:

* `weight_decay_mask='no_bias_norm'`: no decay on biases, LayerNorm, pos/cls embeddings, temp
  (anything with ndim < 2, plus `pos_embed`/`cls_token`), as LAVIS does.
* `schedule`: `'warmup_cosine'` (linear warmup + cosine decay by step, default),
  `'blip_pretrain'` (warmup `warmup_steps` inside epoch 0, then lr * decay_rate**epoch, floor
  min_lr), `'cosine_per_epoch'` (the original fine-tuning cosine, constant within an epoch),
  `'constant'`.
* `clip_grad_norm > 0`: global-norm clipping first in the chain.
* `grad_accum_steps > 1`: `optax.MultiSteps`. In-batch ITC/ITM negatives and the queue then see
  only the micro-batch, so accumulation is not the same as a larger batch.
* `freeze`: regexes on '/'-joined parameter paths; matching parameters get zero updates.
"""
from __future__ import annotations

import math
import re
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import optax

NO_DECAY_NAMES = re.compile(r"(^|/)(pos_embed|cls_token|temp)$")


def path_str(path) -> str:
    """'a/b/c' for a jax tree path (dict keys, sequence indices, attributes)."""
    return jax.tree_util.keystr(path, simple=True, separator="/")


def make_schedule(optim_config, total_steps: int) -> Callable:
    """The learning-rate schedule as a function of the optimizer update count.

    optim_config fields: schedule, lr, warmup_steps, warmup_lr, min_lr, decay_rate,
    steps_per_epoch (epoch-based schedules).
    """
    name = optim_config.schedule
    lr = float(optim_config.lr)
    warmup_steps = int(optim_config.get("warmup_steps", 0))
    warmup_lr = float(optim_config.get("warmup_lr", 0.0))
    min_lr = float(optim_config.get("min_lr", 0.0))
    if name == "constant":
        return optax.constant_schedule(lr)
    if name == "warmup_cosine":
        return optax.warmup_cosine_decay_schedule(
            init_value=warmup_lr, peak_value=lr, warmup_steps=warmup_steps,
            decay_steps=max(total_steps, warmup_steps + 1), end_value=min_lr)
    if name not in ("blip_pretrain", "cosine_per_epoch"):
        raise ValueError(f"optim.schedule={name!r} is unknown: use warmup_cosine, blip_pretrain, "
                         "cosine_per_epoch or constant")
    steps_per_epoch = int(optim_config.get("steps_per_epoch", 0))
    if steps_per_epoch <= 0:
        raise ValueError(f"optim.schedule={name!r} needs optim.steps_per_epoch > 0: set it to "
                         "the number of optimizer steps in one epoch")
    if name == "blip_pretrain":
        decay_rate = float(optim_config.get("decay_rate", 0.9))

        def blip_pretrain(step):
            step = jnp.asarray(step, jnp.float32)
            epoch = jnp.floor(step / steps_per_epoch)
            warm = jnp.minimum(lr, warmup_lr + (lr - warmup_lr) * step / max(warmup_steps, 1))
            decayed = jnp.maximum(min_lr, lr * decay_rate ** epoch)
            return jnp.where(epoch == 0, warm, decayed)

        return blip_pretrain
    max_epoch = max(1, math.ceil(total_steps / steps_per_epoch))

    def cosine_per_epoch(step):
        epoch = jnp.floor(jnp.asarray(step, jnp.float32) / steps_per_epoch)
        return (lr - min_lr) * 0.5 * (1.0 + jnp.cos(jnp.pi * epoch / max_epoch)) + min_lr

    return cosine_per_epoch


def weight_decay_mask(kind: str) -> Callable | None:
    """None (decay all, the original) or a params -> bool-tree function for 'no_bias_norm'."""
    if kind in ("all", None, ""):
        return None
    if kind == "no_bias_norm":
        def mask(params):
            return jax.tree_util.tree_map_with_path(
                lambda p, x: not (jnp.ndim(x) < 2 or NO_DECAY_NAMES.search(path_str(p))), params)
        return mask
    raise ValueError(f"optim.weight_decay_mask={kind!r} is unknown: use 'all' or 'no_bias_norm'")


def freeze_labels(patterns: Sequence[str]) -> Callable:
    """params -> tree of 'frozen'|'train' labels (regex search on the '/'-joined path)."""
    compiled = [re.compile(p) for p in patterns]

    def labels(params):
        return jax.tree_util.tree_map_with_path(
            lambda p, _: "frozen" if any(c.search(path_str(p)) for c in compiled) else "train",
            params)
    return labels


def _as_list(value) -> list[str]:
    if not value:
        return []
    if isinstance(value, str):
        return [v.strip() for v in value.split(",") if v.strip()]
    return list(value)


def make_optimizer(optim_config, total_steps: int):
    """Returns (tx, schedule): the optax chain and the lr schedule (of the update count)."""
    schedule = make_schedule(optim_config, total_steps)
    parts = []
    clip = float(optim_config.get("clip_grad_norm", 0.0) or 0.0)
    if clip > 0:
        parts.append(optax.clip_by_global_norm(clip))
    mu_dtype = optim_config.get("mu_dtype", None) or None
    parts.append(optax.adamw(
        schedule, b1=float(optim_config.get("b1", 0.9)), b2=float(optim_config.get("b2", 0.999)),
        eps=float(optim_config.get("eps", 1e-8)),
        weight_decay=float(optim_config.get("weight_decay", 0.05)),
        mu_dtype=jnp.dtype(mu_dtype) if mu_dtype else None,
        mask=weight_decay_mask(optim_config.get("weight_decay_mask", "all"))))
    tx = optax.chain(*parts) if len(parts) > 1 else parts[0]
    frozen = _as_list(optim_config.get("freeze", ()))
    if frozen:
        tx = optax.multi_transform({"train": tx, "frozen": optax.set_to_zero()},
                                   freeze_labels(frozen))
    accum = int(optim_config.get("grad_accum_steps", 1) or 1)
    if accum > 1:
        tx = optax.MultiSteps(tx, every_k_schedule=accum, use_grad_mean=True)
    return tx, schedule
