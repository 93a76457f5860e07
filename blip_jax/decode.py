"""Autoregressive decoding for BLIP: greedy, beam search and nucleus sampling over the KV cache.

Every mode is one compiled XLA program per (model, shapes, mode): the image encoder, the prefill of the
prompt (which also computes the cross-attention K/V once per image), and a `lax.while_loop` over the
tokens (decode_loops.py), with no host round trip per token. The token ids are those transformers' `generate` returns
for the same model (blip.md §2.6, §2.7), step by step:

  greedy / sampling  `GenerationMixin._sample`: logits -> repetition penalty -> min length
                     [-> temperature -> top-k -> top-p -> categorical]; pad after eos; stop when every
                     row has finished.
  beam search        `GenerationMixin._beam_search` (transformers >= 4.50, vectorised): log-softmax ->
                     repetition penalty -> min length -> top 2K over K*V -> running / finished beams
                     with the length penalty and the early-stopping heuristic, same -1e9 arithmetic.

Output: (B * num_return_sequences, L) int32, [DEC] first, pad (0) after [SEP], L cropped exactly as
transformers crops it. One deliberate difference: transformers 5 fills the tail of a finished beam
hypothesis with [SEP] (its fill value is `pad_token_id or eos`, and pad is 0); we fill it with pad 0,
as greedy/sampling and transformers 4.15 (the version BLIP used) do. Decoded text is identical.
Sampling draws from the same distributions as transformers, with JAX's RNG (seeded, reproducible).
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Mapping

import jax
import jax.numpy as jnp
import numpy as np

from blip_jax.decode_loops import beam_search, greedy_or_sample
from blip_jax.logits_processors import as_float32, top_p_threshold

# BLIP's special ids (bert-base-uncased + [DEC], [ENC]): the default `tokens`; ModelBundle passes its config's.
BLIP_TOKENS: Mapping[str, int] = {"pad": 0, "cls": 101, "sep": 102, "dec": 30522, "enc": 30523}


# ----------------------------------------------------------------------------------------------------
# Settings.
# ----------------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class _Static:
    """Everything that changes the compiled program (hashable, a jit static argument)."""

    mode: str  # "greedy" | "sample" | "beam"
    num_beams: int
    rows_per_input: int  # beams, or sampled sequences per input
    max_length: int
    eos: int
    pad: int


def _settings(*, vocab_size, eos, pad, num_beams, max_length, min_length, repetition_penalty, length_penalty,
              early_stopping, do_sample, top_p, top_k, temperature, num_return_sequences, seed, prompt_length,
              max_positions):
    """Validate the generation arguments (one-line errors) -> (_Static, dynamic dict of arrays)."""
    num_beams, max_length, min_length = int(num_beams), int(max_length), int(min_length)
    num_return_sequences = int(num_return_sequences)
    if num_beams < 1:
        raise ValueError(f"num_beams {num_beams} must be >= 1")
    if max_length <= prompt_length:
        raise ValueError(f"max_length {max_length} must exceed the prompt length {prompt_length} "
                         "(max_length counts [DEC] and the prompt tokens, as in BLIP)")
    if max_length > max_positions:
        raise ValueError(f"max_length {max_length} exceeds the decoder's {max_positions} position embeddings: "
                         f"use max_length <= {max_positions}")
    if min_length < 0:
        raise ValueError(f"min_length {min_length} must be >= 0")
    if repetition_penalty is None:
        repetition_penalty = 1.1 if do_sample else 1.0  # BLIP's sampling default (blip.md §2.6)
    if not float(repetition_penalty) > 0:
        raise ValueError(f"repetition_penalty {repetition_penalty} must be > 0 (1.0 = off)")
    if early_stopping not in (False, True, "never"):
        raise ValueError(f"early_stopping {early_stopping!r} must be False, True or 'never'")
    if num_return_sequences < 1:
        raise ValueError(f"num_return_sequences {num_return_sequences} must be >= 1")
    if do_sample:
        if num_beams != 1:
            raise ValueError("beam sampling (do_sample with num_beams > 1) is not supported: "
                             "use do_sample=True with num_beams=1, or beam search without sampling")
        if not float(temperature) > 0:
            raise ValueError(f"temperature {temperature} must be > 0")
        if not 0.0 <= float(top_p) <= 1.0:
            raise ValueError(f"top_p {top_p} must be in [0, 1]")
        if int(top_k) < 0:
            raise ValueError(f"top_k {top_k} must be >= 0 (0 = off)")
        mode = "sample"
    elif num_beams > 1:
        if num_return_sequences > num_beams:
            raise ValueError(f"num_return_sequences {num_return_sequences} must be <= num_beams {num_beams}")
        if 2 * num_beams > vocab_size:
            raise ValueError(f"num_beams {num_beams} needs a vocabulary of at least {2 * num_beams} tokens")
        mode = "beam"
    else:
        if num_return_sequences != 1:
            raise ValueError("greedy decoding returns one sequence per input: use num_beams >= "
                             f"{num_return_sequences} or do_sample=True for num_return_sequences > 1")
        mode = "greedy"
    static = _Static(mode=mode, num_beams=num_beams,
                     rows_per_input=num_beams if mode == "beam" else num_return_sequences,
                     max_length=max_length, eos=int(eos), pad=int(pad))

    # Length-penalty denominators, computed in float64 and cast, as torch divides a float32 tensor by
    # a Python float: final[n] = n ** lp for a hypothesis of n generated tokens; heuristic[cur_len] is
    # the best-possible-length denominator of `_check_early_stop_heuristic`.
    lengths = np.arange(max_length + 1)
    final = [float(n) ** float(length_penalty) if n > 0 else 1.0 for n in lengths]
    heuristic = []
    for cur_len in lengths:
        best = max_length - prompt_length if (early_stopping == "never" and length_penalty > 0.0) \
            else cur_len - prompt_length
        heuristic.append(float(best) ** float(length_penalty) if best > 0 else 1.0)
    top_k_effective = vocab_size if int(top_k) == 0 else min(max(int(top_k), 1), vocab_size)
    dynamic = dict(
        min_length=np.int32(min_length),
        repetition_penalty=as_float32(repetition_penalty),
        early_stopping=np.bool_(early_stopping is True),
        final_denominator=as_float32(final),
        heuristic_denominator=as_float32(heuristic),
        temperature=as_float32(temperature),
        top_k=np.int32(top_k_effective),
        top_p_threshold=top_p_threshold(top_p),
        key=jax.random.key_data(jax.random.key(int(seed))),
    )
    return static, dynamic


# ----------------------------------------------------------------------------------------------------
# Model plumbing: image / question encoding, prefill, expansion to beams, then the loop.
# ----------------------------------------------------------------------------------------------------
_CROSS_LEAVES = ("cross_key", "cross_value")


def _split_cross_attention(cache):
    """cache -> (cross-attention K/V, everything else), as flat {path: array} dicts. The cross K/V are
    constant during decoding, so they stay out of the loop state (no copies, no per-step traffic)."""
    from flax import traverse_util

    flat = traverse_util.flatten_dict(cache)
    cross = {path: leaf for path, leaf in flat.items() if path[-1] in _CROSS_LEAVES}
    return cross, {path: leaf for path, leaf in flat.items() if path[-1] not in _CROSS_LEAVES}


def _decode(model, params, encoder_states, start_ids, static: _Static, dynamic):
    """Prefill [DEC] + prompt against `encoder_states` (B, S, W) for B rows, expand to the beams /
    returned sequences, and run the loop. Returns what the loop returns."""
    from flax import traverse_util

    from blip_jax.models.blip import init_decode_cache

    batch = start_ids.shape[0]
    cache = init_decode_cache(model, params, batch, static.max_length, encoder_states)

    def apply(cache, ids, states):
        logits, variables = model.apply({"params": params, "cache": cache}, ids, None, states, None,
                                        decode=True, method="lm_logits", mutable=["cache"])
        return logits[:, -1].astype(jnp.float32), variables["cache"]

    # Prefill once per input: the prompt's self-attention K/V and the cross-attention K/V of the image
    # (or question) tokens. The cross K/V keep one row per input: the model's cross-attention shares
    # them between that input's beams / sampled sequences (blip_jax/models/med.py), so they are never
    # repeated, copied or recomputed. Everything else is repeated to one row per beam / sequence.
    logits, cache = apply(cache, start_ids, encoder_states)
    cross, rest = _split_cross_attention(cache)
    rows_per_input = static.rows_per_input
    logits = jnp.repeat(logits, rows_per_input, axis=0)
    rest = {path: jnp.repeat(leaf, rows_per_input, axis=0) if leaf.ndim else leaf for path, leaf in rest.items()}

    def forward(rest, ids):
        logits, cache = apply(traverse_util.unflatten_dict({**cross, **rest}), ids, None)
        return logits, _split_cross_attention(cache)[1]

    if static.mode == "beam":
        return beam_search(forward, logits, rest, start_ids, static, dynamic)
    return greedy_or_sample(forward, logits, rest, jnp.repeat(start_ids, rows_per_input, axis=0), static,
                             dynamic)


@functools.partial(jax.jit, static_argnames=("model", "static"))
def _caption_program(model, static, params, pixels, start_ids, dynamic):
    image_embeds = model.apply({"params": params}, pixels, method="image_embeds")
    return _decode(model, params, image_embeds, start_ids, static, dynamic)


@functools.partial(jax.jit, static_argnames=("model", "static"))
def _answer_program(model, static, params, pixels, question_ids, question_mask, start_ids, dynamic):
    image_embeds = model.apply({"params": params}, pixels, method="image_embeds")
    question_states = model.apply({"params": params}, question_ids, question_mask, image_embeds,
                                  method="encode_question")
    # The answer decoder attends to every question state, padding included (all-ones mask), as both
    # BLIP_VQA.generate and BlipForQuestionAnswering.generate do.
    return _decode(model, params, question_states, start_ids, static, dynamic)


# ----------------------------------------------------------------------------------------------------
# Public API.
# ----------------------------------------------------------------------------------------------------
def _text_config(model):
    return model.config.text


def decoder_start_ids(prompt_ids, batch_size: int, dec_token_id: int, pad_token_id: int = 0) -> np.ndarray:
    """Tokenizer output for the prompt ([CLS] ... [SEP], shape (P+2,) or (1|B, P+2)) -> the decoder's
    start ids (B, P+1): [CLS] becomes [DEC] and the trailing [SEP] is dropped (blip.md §2.6).
    None -> [DEC] alone."""
    if prompt_ids is None:
        return np.full((batch_size, 1), dec_token_id, np.int32)
    ids = np.array(prompt_ids, dtype=np.int64)
    if ids.ndim == 1:
        ids = ids[None]
    if ids.ndim != 2 or ids.shape[1] < 2:
        raise ValueError(f"prompt_ids has shape {ids.shape}: pass the tokenizer's [CLS] ... [SEP] ids, "
                         "shape (P,) or (batch, P) with P >= 2")
    if ids.shape[0] == 1 and batch_size > 1:
        ids = np.repeat(ids, batch_size, axis=0)
    if ids.shape[0] != batch_size:
        raise ValueError(f"prompt_ids has {ids.shape[0]} rows for {batch_size} images: pass one row or one per image")
    if np.any(ids[:, :-1] == pad_token_id):
        raise ValueError("prompt_ids contains padding: every row must be one unpadded prompt of the same length "
                         "(call generate once per prompt length)")
    ids[:, 0] = dec_token_id
    return ids[:, :-1].astype(np.int32)


def generate(model, params, pixels, prompt_ids=None, *, tokens=None, num_beams: int = 1, max_length: int = 20,
             min_length: int = 0, repetition_penalty: float | None = None, length_penalty: float = 1.0,
             early_stopping=False, do_sample: bool = False, top_p: float = 1.0, top_k: int = 0,
             temperature: float = 1.0, num_return_sequences: int = 1, seed: int = 0) -> np.ndarray:
    """Caption token ids, as `BlipForConditionalGeneration.generate` returns them.

    model: a `Captioner` (or any model with `image_embeds` + decoder `lm_logits`); params its parameters.
    pixels: (B, H, W, 3) float32 NHWC, preprocessed. prompt_ids: tokenizer ids of a prompt or None.
    tokens: the special ids {pad, sep, dec, ...} (default: BLIP_TOKENS).
    max_length / min_length count [DEC] and the prompt tokens. repetition_penalty=None means BLIP's
    default: 1.1 when sampling, 1.0 otherwise. top_k=0 is off (transformers samples with top_k=50 unless
    told otherwise: pass top_k=50 for its default). early_stopping: False | True | "never".
    Every argument except the shapes, num_beams, max_length, do_sample and num_return_sequences (when
    sampling) is a runtime value: changing it reuses the compiled program.
    Returns (B * num_return_sequences, L) int32 numpy.
    """
    pixels = jnp.asarray(pixels, jnp.float32)
    if pixels.ndim != 4 or pixels.shape[-1] != 3:
        raise ValueError(f"pixels has shape {tuple(pixels.shape)}: pass (batch, height, width, 3) NHWC float32 "
                         "from blip_jax.preprocess_images")
    tokens = dict(BLIP_TOKENS if tokens is None else tokens)
    start_ids = decoder_start_ids(prompt_ids, pixels.shape[0], tokens["dec"], tokens["pad"])
    static, dynamic = _settings(
        vocab_size=_text_config(model).vocab_size, eos=tokens["sep"], pad=tokens["pad"], num_beams=num_beams,
        max_length=max_length, min_length=min_length, repetition_penalty=repetition_penalty,
        length_penalty=length_penalty, early_stopping=early_stopping, do_sample=do_sample, top_p=top_p,
        top_k=top_k, temperature=temperature, num_return_sequences=num_return_sequences, seed=seed,
        prompt_length=start_ids.shape[1], max_positions=_text_config(model).max_position_embeddings)
    result = _caption_program(model, static, params, pixels, jnp.asarray(start_ids), dynamic)
    return _output(static, result, num_return_sequences)


def answer(model, params, pixels, question_ids, question_mask=None, *, tokens=None, replace_cls_with_enc=True,
           num_beams: int = 3, max_length: int = 10, min_length: int = 1, repetition_penalty: float | None = None,
           length_penalty: float = 1.0, early_stopping=False, do_sample: bool = False, top_p: float = 1.0,
           top_k: int = 0, temperature: float = 1.0, num_return_sequences: int = 1, seed: int = 0) -> np.ndarray:
    """VQA answer ids, as `BlipForQuestionAnswering.generate` returns them (defaults: BLIP_VQA's beam 3,
    max_length 10, min_length 1, blip.md §2.7).

    model: a `VqaModel`. question_ids (B, T) tokenizer ids ([CLS] question [SEP], right padded) with
    question_mask (B, T) (default: ids != pad). replace_cls_with_enc: put [ENC] in position 0 as BLIP
    does (transformers passes the ids literally; give [ENC]-first ids to compare). Returns (B*n, L) int32.
    """
    pixels = jnp.asarray(pixels, jnp.float32)
    tokens = dict(BLIP_TOKENS if tokens is None else tokens)
    question_ids = np.array(question_ids, dtype=np.int32)
    if question_ids.ndim == 1:
        question_ids = question_ids[None]
    if question_ids.shape[0] == 1 and pixels.shape[0] > 1:
        question_ids = np.repeat(question_ids, pixels.shape[0], axis=0)
    if question_ids.ndim != 2 or question_ids.shape[0] != pixels.shape[0]:
        raise ValueError(f"question_ids has shape {question_ids.shape} for {pixels.shape[0]} images: "
                         "pass (batch, length) tokenizer ids, one row per image")
    if question_mask is None:
        question_mask = (question_ids != tokens["pad"]).astype(np.int32)
    question_mask = np.broadcast_to(np.asarray(question_mask, np.int32), question_ids.shape)
    if replace_cls_with_enc:
        question_ids = question_ids.copy()
        question_ids[:, 0] = tokens["enc"]
    start_ids = np.full((pixels.shape[0], 1), tokens["dec"], np.int32)
    static, dynamic = _settings(
        vocab_size=_text_config(model).vocab_size, eos=tokens["sep"], pad=tokens["pad"], num_beams=num_beams,
        max_length=max_length, min_length=min_length, repetition_penalty=repetition_penalty,
        length_penalty=length_penalty, early_stopping=early_stopping, do_sample=do_sample, top_p=top_p,
        top_k=top_k, temperature=temperature, num_return_sequences=num_return_sequences, seed=seed,
        prompt_length=1, max_positions=_text_config(model).max_position_embeddings)
    result = _answer_program(model, static, params, pixels, jnp.asarray(question_ids),
                             jnp.asarray(question_mask), jnp.asarray(start_ids), dynamic)
    return _output(static, result, num_return_sequences)


def _output(static: _Static, result, num_return_sequences: int) -> np.ndarray:
    """The device result -> (B * num_return_sequences, L) int32, cropped as transformers crops it: to the
    loop's final length (greedy / sampling) or to the longest returned hypothesis (beam search)."""
    sequences, lengths = jax.device_get(result)
    if static.mode == "beam":
        sequences = sequences[:, :num_return_sequences]
        length = int(lengths[:, :num_return_sequences].max())
        sequences = sequences.reshape(-1, sequences.shape[-1])
    else:
        length = int(lengths)
    return np.ascontiguousarray(sequences[:, :length], dtype=np.int32)


def ids_to_text(tokenizer, ids, prompt: str | None = None) -> list[str]:
    """Token ids -> strings: skip special tokens, then strip the prompt by its character count, as
    BLIP does (`caption[len(prompt):]`, blip.md §2.6)."""
    texts = tokenizer.batch_decode(np.asarray(ids).tolist(), skip_special_tokens=True)
    if prompt:
        texts = [text[len(prompt):] for text in texts]
    return texts
