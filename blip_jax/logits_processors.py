"""Logits processors with transformers' generate semantics, vectorised and jittable.

Each takes (N, V) float32 scores and returns processed scores; arguments that may change between
calls (penalties, lengths, top-k/top-p) can be traced values, so they never force a recompile.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


def as_float32(x) -> np.ndarray:
    return np.asarray(x, np.float64).astype(np.float32)


def top_p_threshold(top_p: float) -> np.ndarray:
    """transformers drops sorted tokens whose cumulative probability is <= 1 - top_p (computed in Python,
    compared in float32); top_p >= 1 disables the filter (threshold -1)."""
    return as_float32(1.0 - float(top_p) if float(top_p) < 1.0 else -1.0)


def _seen_tokens(sequences, cur_len, vocab_size):
    """(N, L) ids, of which the first cur_len are valid -> (N, V) bool: token occurs in the prefix."""
    rows = jnp.arange(sequences.shape[0])[:, None]
    valid = jnp.arange(sequences.shape[1])[None, :] < cur_len
    ids = jnp.where(valid, sequences, vocab_size)
    seen = jnp.zeros((sequences.shape[0], vocab_size + 1), bool).at[rows, ids].set(True)
    return seen[:, :vocab_size]


def apply_repetition_penalty(scores, sequences, cur_len, penalty):
    """RepetitionPenaltyLogitsProcessor: scores of tokens already in the prefix are divided by
    `penalty` when positive and multiplied by it when negative. scores (N, V) f32; sequences (N, L)."""
    seen = _seen_tokens(sequences, cur_len, scores.shape[-1])
    penalized = jnp.where(scores < 0, scores * penalty, scores / penalty)
    return jnp.where(seen, penalized, scores)


def apply_min_length(scores, cur_len, min_length, eos):
    """MinLengthLogitsProcessor: eos is impossible while the sequence (prompt included) is shorter."""
    blocked = (jnp.arange(scores.shape[-1]) == eos) & (cur_len < min_length)
    return jnp.where(blocked[None, :], -jnp.inf, scores)


def apply_top_k(scores, top_k):
    """TopKLogitsWarper: drop scores below the k-th largest. top_k (int, may be traced) in [1, V]."""
    kth_largest = jnp.sort(scores, axis=-1)[:, scores.shape[-1] - top_k]
    return jnp.where(scores < kth_largest[:, None], -jnp.inf, scores)


def apply_top_p(scores, threshold):
    """TopPLogitsWarper (min_tokens_to_keep=1): sort ascending, drop the tokens whose cumulative
    probability is <= threshold (= 1 - top_p), always keep the most likely one."""
    order = jnp.argsort(scores, axis=-1)
    sorted_scores = jnp.take_along_axis(scores, order, axis=-1)
    cumulative = jnp.cumsum(jax.nn.softmax(sorted_scores, axis=-1), axis=-1)
    remove_sorted = (cumulative <= threshold).at[:, -1].set(False)
    rows = jnp.arange(scores.shape[0])[:, None]
    remove = jnp.zeros(scores.shape, bool).at[rows, order].set(remove_sorted)
    return jnp.where(remove, -jnp.inf, scores)


def top_p_filter(logits, top_p: float):
    """The nucleus kept by `top_p` for (N, V) logits: the logits with everything outside set to -inf."""
    return apply_top_p(jnp.asarray(logits, jnp.float32), top_p_threshold(top_p))


def apply_penalties(scores, sequences, cur_len, dynamic, eos):
    """The processors every mode applies first: repetition penalty, then min length."""
    scores = apply_repetition_penalty(scores, sequences, cur_len, dynamic["repetition_penalty"])
    return apply_min_length(scores, cur_len, dynamic["min_length"], eos)


def sampling_scores(logits, sequences, cur_len, dynamic, eos):
    """The processed scores a sampling step draws from (repetition, min length, temperature, top-k, top-p)."""
    scores = apply_penalties(logits, sequences, cur_len, dynamic, eos) / dynamic["temperature"]
    scores = apply_top_k(scores, dynamic["top_k"])
    return apply_top_p(scores, dynamic["top_p_threshold"])
