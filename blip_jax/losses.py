"""BLIP pre-training objectives (blip.md §2.3, §2.9): pure functions, computed in float32.

* `itc_loss`: image-text contrastive loss against momentum features plus feature queues, with
    momentum distillation (targets = alpha * softmax(momentum sims) + (1 - alpha) * ground truth).
* `hard_negative_indices`: one similarity-weighted hard-negative image and text per sample,
    drawn with `jax.random.categorical` on masked log-weights (vectorised, no host sync).
* `itm_loss`: 2-way cross-entropy over positives and hard negatives.
* `lm_loss`: shifted token cross-entropy with label smoothing 0.1, pads ignored.

Negatives: the original takes in-batch negatives from the local GPU only. Here `negatives` is
`'global'` (the whole global batch, default) or `'local'` (only samples in the same data shard,
which reproduces the original's per-GPU behaviour under `jax.jit` on global arrays; `num_shards`
is the number of data-parallel shards the batch axis is split into, shard = row // (B / num_shards)).
"""
from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp

NEG_INF = -1e9  # finite, so that masked rows never turn into NaN through softmax


def _same_shard_mask(batch_size: int, num_shards: int) -> jax.Array:
    """(B, B) bool: True where row and column belong to the same data shard."""
    if batch_size % num_shards:
        raise ValueError(f"batch {batch_size} is not divisible by num_shards {num_shards}")
    shard = jnp.arange(batch_size) // (batch_size // num_shards)
    return shard[:, None] == shard[None, :]


def _in_batch_valid(batch_size: int, negatives: str, num_shards: int) -> Optional[jax.Array]:
    if negatives == "global":
        return None
    if negatives == "local":
        return _same_shard_mask(batch_size, num_shards)
    raise ValueError(f"negatives must be 'global' or 'local', got {negatives!r}")


def itc_targets(sim_momentum: jax.Array, positives: jax.Array, alpha, valid=None) -> jax.Array:
    """Momentum-distilled targets: alpha * softmax(sim_momentum) + (1 - alpha) * positives / #positives.

    sim_momentum: (B, N) logits; positives: (B, N) bool; valid: optional (B, N) bool of allowed columns.
    """
    if valid is not None:
        sim_momentum = jnp.where(valid, sim_momentum, NEG_INF)
    ground_truth = positives.astype(jnp.float32)
    ground_truth = ground_truth / jnp.maximum(ground_truth.sum(-1, keepdims=True), 1.0)
    return alpha * jax.nn.softmax(sim_momentum, axis=-1) + (1.0 - alpha) * ground_truth


def _soft_cross_entropy(logits, targets, valid=None):
    if valid is not None:
        logits = jnp.where(valid, logits, NEG_INF)
    return -jnp.sum(jax.nn.log_softmax(logits, axis=-1) * targets, axis=-1).mean()


def itc_loss(image_feat, text_feat, image_feat_m, text_feat_m, image_queue, text_queue, temp,
             alpha, *, image_ids=None, idx_queue=None, negatives: str = "global",
             num_shards: int = 1):
    """ITC with momentum distillation and queues (blip.md §2.3 step 3-4).

    image_feat, text_feat: (B, E) online features, L2-normalised.
    image_feat_m, text_feat_m: (B, E) momentum features, L2-normalised (no gradient flows).
    image_queue, text_queue: (Q, E) past momentum features (rows), L2-normalised.
    temp: scalar temperature, clamped to [0.001, 0.5]. alpha: distillation weight in [0, 1].
    image_ids: optional (B,) int image ids; with idx_queue (Q,) the ground truth becomes
        "every caption of the same image is a positive" (duplicate-image aware), as in retrieval.
    Returns (loss, aux) with aux = {'sim_i2t', 'sim_t2i'}: the (B, B) in-batch blocks of
        online-vs-momentum similarities (stop-gradient), which drive hard-negative mining.
    """
    f32 = jnp.float32
    image_feat, text_feat = image_feat.astype(f32), text_feat.astype(f32)
    image_feat_m = jax.lax.stop_gradient(image_feat_m.astype(f32))
    text_feat_m = jax.lax.stop_gradient(text_feat_m.astype(f32))
    image_queue = jax.lax.stop_gradient(image_queue.astype(f32))
    text_queue = jax.lax.stop_gradient(text_queue.astype(f32))
    temp = jnp.clip(jnp.asarray(temp, f32), 0.001, 0.5)
    batch = image_feat.shape[0]
    queue = image_queue.shape[0]

    image_feat_all = jnp.concatenate([image_feat_m, image_queue], axis=0)  # (B+Q, E)
    text_feat_all = jnp.concatenate([text_feat_m, text_queue], axis=0)

    if image_ids is None:
        in_batch_pos = jnp.eye(batch, dtype=bool)
        queue_pos = jnp.zeros((batch, queue), bool)
    else:
        if idx_queue is None:
            idx_queue = jnp.full((queue,), -100, image_ids.dtype)
        in_batch_pos = image_ids[:, None] == image_ids[None, :]
        queue_pos = image_ids[:, None] == idx_queue[None, :]
    positives = jnp.concatenate([in_batch_pos, queue_pos], axis=1)

    in_batch_valid = _in_batch_valid(batch, negatives, num_shards)
    if in_batch_valid is not None:
        valid = jnp.concatenate([in_batch_valid, jnp.ones((batch, queue), bool)], axis=1)
        positives = positives & valid
    else:
        valid = None

    sim_i2t_m = image_feat_m @ text_feat_all.T / temp
    sim_t2i_m = text_feat_m @ image_feat_all.T / temp
    sim_i2t_targets = jax.lax.stop_gradient(itc_targets(sim_i2t_m, positives, alpha, valid))
    sim_t2i_targets = jax.lax.stop_gradient(itc_targets(sim_t2i_m, positives, alpha, valid))

    sim_i2t = image_feat @ text_feat_all.T / temp
    sim_t2i = text_feat @ image_feat_all.T / temp
    loss_i2t = _soft_cross_entropy(sim_i2t, sim_i2t_targets, valid)
    loss_t2i = _soft_cross_entropy(sim_t2i, sim_t2i_targets, valid)
    aux = {"sim_i2t": jax.lax.stop_gradient(sim_i2t[:, :batch]),
                  "sim_t2i": jax.lax.stop_gradient(sim_t2i[:, :batch])}
    return (loss_i2t + loss_t2i) / 2, aux


def hard_negative_indices(key, sim_i2t, sim_t2i, *, image_ids=None, negatives: str = "global",
                          num_shards: int = 1):
    """Sample one hard-negative image per text and one hard-negative text per image.

    sim_i2t, sim_t2i: (B, B) in-batch similarities (row = query, column = candidate).
    Weights are softmax(sim) + 1e-4 with the positive (the diagonal, or every sample sharing
    the image id when image_ids is given) set to zero, and, for negatives='local', every
    candidate outside the query's data shard set to zero (blip.md §2.3 step 6).
    Returns (hard_negative_image_idx, hard_negative_text_idx), both (B,) int32:
        hard_negative_image_idx[b] is the image paired with text b,
        hard_negative_text_idx[b] is the text paired with image b.
    """
    f32 = jnp.float32
    batch = sim_i2t.shape[0]
    if image_ids is None:
        positive = jnp.eye(batch, dtype=bool)
    else:
        positive = image_ids[:, None] == image_ids[None, :]
    allowed = ~positive
    in_batch_valid = _in_batch_valid(batch, negatives, num_shards)
    if in_batch_valid is not None:
        allowed = allowed & in_batch_valid

    def log_weights(sim):
        weights = jax.nn.softmax(jax.lax.stop_gradient(sim).astype(f32), axis=-1) + 1e-4
        return jnp.where(allowed, jnp.log(weights), -jnp.inf)

    key_image, key_text = jax.random.split(key)
    hard_negative_image_idx = jax.random.categorical(key_image, log_weights(sim_t2i), axis=-1)
    hard_negative_text_idx = jax.random.categorical(key_text, log_weights(sim_i2t), axis=-1)
    return hard_negative_image_idx.astype(jnp.int32), hard_negative_text_idx.astype(jnp.int32)


def itm_loss(logits, labels):
    """Mean 2-way cross-entropy. logits: (N, 2); labels: (N,) int in {0, 1} (1 = matched)."""
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    return -jnp.take_along_axis(logp, labels[:, None].astype(jnp.int32), axis=-1).mean()


def itm_labels(batch_size: int) -> jax.Array:
    """Labels for [B positives, B (text, hard-negative image), B (hard-negative text, image)]."""
    return jnp.concatenate([jnp.ones((batch_size,), jnp.int32), jnp.zeros((2 * batch_size,), jnp.int32)])


def lm_loss(logits, ids, *, pad_id: int = 0, label_smoothing: float = 0.1):
    """Next-token cross-entropy, logits[:, :-1] vs ids[:, 1:], mean over non-pad targets.

    logits: (B, T, V); ids: (B, T) with the [DEC] token at position 0. Pads are ignored and
    [SEP] is a target (it is not a pad). Label smoothing follows torch.nn.CrossEntropyLoss:
    target = (1 - eps) * one_hot + eps / V.
    """
    logits = logits[:, :-1].astype(jnp.float32)
    targets = ids[:, 1:]
    mask = (targets != pad_id).astype(jnp.float32)
    logp = jax.nn.log_softmax(logits, axis=-1)
    nll = -jnp.take_along_axis(logp, targets[..., None].astype(jnp.int32), axis=-1)[..., 0]
    smooth = -logp.mean(axis=-1)
    per_token = (1.0 - label_smoothing) * nll + label_smoothing * smooth
    return jnp.sum(per_token * mask) / jnp.maximum(mask.sum(), 1.0)


def alpha_at(step, alpha: float, ramp_steps: int):
    """Distillation weight: alpha * min(1, step / ramp_steps) (ramped over the first 2 epochs)."""
    if ramp_steps <= 0:
        return jnp.asarray(alpha, jnp.float32)
    return alpha * jnp.minimum(1.0, jnp.asarray(step, jnp.float32) / ramp_steps)
