"""The decode loops behind blip_jax/decode.py: transformers' `_sample` (greedy / sampling) and its
vectorised `_beam_search`, each one `lax.while_loop` with the KV cache in the loop state.

`forward(cache, ids (N, 1)) -> (logits (N, V) float32, cache)` advances the decoder by one token;
`static` / `dynamic` are decode.py's compiled settings and runtime arrays.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from blip_jax.logits_processors import apply_penalties, sampling_scores

_BIG = -1.0e9  # transformers' "very large negative" for beams that must not be picked


def _reorder_self_attention_cache(cache, rows):
    """Gather the decoder self-attention K/V (flat {path: array}) along axis 0 for beam search; scalars
    (cache / position indices) stay. Cross K/V are not in here: they are shared by an image's beams."""
    return {path: leaf[rows] if path[-1] in ("cached_key", "cached_value") else leaf
            for path, leaf in cache.items()}


def _write_column(sequences, column, values):
    """sequences[..., column] = values for a traced column index."""
    positions = jnp.arange(sequences.shape[-1])
    return jnp.where(positions == column, values[..., None], sequences)


def greedy_or_sample(forward, logits, cache, start_ids, static, dynamic):
    """transformers' `_sample` loop. start_ids (N, P); logits (N, V) for the next token.
    Returns (sequences (N, max_length), length)."""
    rows, prompt_length = start_ids.shape
    max_length = static.max_length
    sequences = jnp.full((rows, max_length), static.pad, jnp.int32).at[:, :prompt_length].set(start_ids)
    key = jax.random.wrap_key_data(dynamic["key"])

    def body(state):
        cur_len, sequences, unfinished, _, logits, cache = state
        if static.mode == "sample":
            scores = sampling_scores(logits, sequences, cur_len, dynamic, static.eos)
            tokens = jax.random.categorical(jax.random.fold_in(key, cur_len), scores, axis=-1)
        else:
            tokens = jnp.argmax(apply_penalties(logits, sequences, cur_len, dynamic, static.eos), axis=-1)
        tokens = jnp.where(unfinished, tokens.astype(jnp.int32), static.pad)
        sequences = _write_column(sequences, cur_len, tokens)
        unfinished = unfinished & (tokens != static.eos) & (cur_len + 1 < max_length)
        done = ~jnp.any(unfinished)
        logits, cache = jax.lax.cond(done, lambda: (logits, cache), lambda: forward(cache, tokens[:, None]))
        return cur_len + 1, sequences, unfinished, done, logits, cache

    state = (jnp.int32(prompt_length), sequences, jnp.ones((rows,), bool), jnp.bool_(False), logits, cache)
    cur_len, sequences, *_ = jax.lax.while_loop(lambda state: ~state[3], body, state)
    return sequences, cur_len


def _gather_beams(values, indices):
    """values (B, K, ...) , indices (B, K') -> (B, K', ...)."""
    indices = indices.reshape(indices.shape + (1,) * (values.ndim - 2))
    return jnp.take_along_axis(values, indices, axis=1)


def beam_search(forward, logits, cache, start_ids, static, dynamic):
    """transformers' vectorised `_beam_search`. start_ids (B, P); logits (B*K, V) and cache for B*K rows
    (the K beams of image b are rows b*K .. b*K+K-1). Returns the finished hypotheses, best first:
    (sequences (B, K, max_length), lengths (B, K))."""
    batch, prompt_length = start_ids.shape
    beams, max_length = static.num_beams, static.max_length
    vocab = logits.shape[-1]
    keep = 2 * beams  # one eos token: max(2, 1 + n_eos) * num_beams candidates
    early_true = dynamic["early_stopping"]
    top_beam_mask = jnp.arange(keep) < beams

    running = jnp.full((batch, beams, max_length), static.pad, jnp.int32)
    running = running.at[:, :, :prompt_length].set(start_ids[:, None, :])
    state = dict(
        cur_len=jnp.int32(prompt_length),
        running=running,
        running_scores=jnp.zeros((batch, beams), jnp.float32).at[:, 1:].set(_BIG),
        sequences=running,
        lengths=jnp.full((batch, beams), prompt_length, jnp.int32),
        scores=jnp.full((batch, beams), _BIG, jnp.float32),
        finished=jnp.zeros((batch, beams), bool),
        improvable=jnp.ones((batch, 1), bool),
        done=jnp.bool_(False),
        logits=logits,
        cache=cache,
    )

    def body(state):
        cur_len = state["cur_len"]
        flat_running = state["running"].reshape(batch * beams, max_length)
        log_probs = jax.nn.log_softmax(state["logits"], axis=-1)
        log_probs = apply_penalties(log_probs, flat_running, cur_len, dynamic, static.eos)
        accumulated = log_probs.reshape(batch, beams, vocab) + state["running_scores"][:, :, None]
        topk_scores, topk_indices = jax.lax.top_k(accumulated.reshape(batch, beams * vocab), keep)
        source_beam = topk_indices // vocab
        tokens = (topk_indices % vocab).astype(jnp.int32)
        topk_sequences = _write_column(_gather_beams(state["running"], source_beam), cur_len, tokens)
        hits = (tokens == static.eos) | (cur_len + 1 >= max_length)

        # Running beams for the next step: the best `beams` candidates that did not just finish.
        running_candidates = topk_scores + hits.astype(jnp.float32) * _BIG
        next_indices = jax.lax.top_k(running_candidates, beams)[1]
        running = _gather_beams(topk_sequences, next_indices)
        running_scores = _gather_beams(running_candidates, next_indices)
        running_source = _gather_beams(source_beam, next_indices)

        # Finished hypotheses: merge the candidates that just finished (top `beams` only) into the best.
        just_finished = hits & top_beam_mask[None, :]
        finished_scores = topk_scores / dynamic["final_denominator"][cur_len + 1 - prompt_length]
        batch_full = jnp.all(state["finished"], axis=-1, keepdims=True) & early_true
        finished_scores = finished_scores + batch_full.astype(jnp.float32) * _BIG
        finished_scores = finished_scores + (~state["improvable"]).astype(jnp.float32) * _BIG
        finished_scores = finished_scores + (~just_finished).astype(jnp.float32) * _BIG
        merged_scores = jnp.concatenate([state["scores"], finished_scores], axis=1)
        best = jax.lax.top_k(merged_scores, beams)[1]
        sequences = _gather_beams(jnp.concatenate([state["sequences"], topk_sequences], axis=1), best)
        lengths = _gather_beams(
            jnp.concatenate([state["lengths"], jnp.full((batch, keep), cur_len + 1, jnp.int32)], axis=1), best)
        scores = _gather_beams(merged_scores, best)
        finished = _gather_beams(jnp.concatenate([state["finished"], just_finished], axis=1), best)

        # Stopping: can a running beam still beat the worst finished one? (`_check_early_stop_heuristic`)
        cur_len = cur_len + 1
        best_possible = running_scores[:, :1] / dynamic["heuristic_denominator"][cur_len]
        worst_finished = jnp.where(finished, jnp.min(scores, axis=1, keepdims=True), _BIG)
        improvable = state["improvable"] & jnp.any(best_possible > worst_finished, axis=-1, keepdims=True)
        open_beams = ~(jnp.all(finished) & early_true)
        done = ~(jnp.any(improvable) & open_beams & ~jnp.all(hits))

        rows = (running_source + jnp.arange(batch)[:, None] * beams).reshape(batch * beams)
        last_tokens = jax.lax.dynamic_index_in_dim(running, cur_len - 1, axis=2, keepdims=False)
        last_tokens = last_tokens.reshape(batch * beams, 1)

        def advance():
            return forward(_reorder_self_attention_cache(state["cache"], rows), last_tokens)

        logits, cache = jax.lax.cond(done, lambda: (state["logits"], state["cache"]), advance)
        return dict(cur_len=cur_len, running=running, running_scores=running_scores, sequences=sequences,
                    lengths=lengths, scores=scores, finished=finished, improvable=improvable, done=done,
                    logits=logits, cache=cache)

    state = jax.lax.while_loop(lambda state: ~state["done"], body, state)
    # Pad (0) after each hypothesis. All `beams` finished hypotheses come back, best first, with their
    # lengths; the caller keeps num_return_sequences of them (so that number needs no recompilation).
    lengths = state["lengths"]
    sequences = jnp.where(jnp.arange(max_length) < lengths[:, :, None], state["sequences"], static.pad)
    return sequences, lengths
