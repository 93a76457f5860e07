"""Decoding (blip_jax/decode.py): token ids identical to transformers' generate on tiny random BLIP models,
sampling that draws from exactly transformers' truncated distribution, and the KV-cache contract.

transformers is the oracle: each test builds a tiny `BlipForConditionalGeneration` /
`BlipForQuestionAnswering` with random weights, loads it with `blip_jax.load`, and compares ids.
Weights are drawn at 1/sqrt(fan_in) (BLIP's 0.02 init makes every image caption the same) and the [SEP]
bias is raised a little so sequences end at different lengths and the eos / padding paths are exercised.
"""
from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import jax  # noqa: E402

import blip_jax  # noqa: E402
from blip_jax import decode, logits_processors  # noqa: E402

VOCAB, PAD, CLS, SEP, DEC, ENC = 64, 0, 1, 2, 62, 63
SEEDS = (0, 1, 2)
BATCH = 4


def _hf_config(vision_width: int, text_width: int = 32):
    return transformers.BlipConfig(
        vision_config=dict(hidden_size=vision_width, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                           image_size=32, patch_size=8, layer_norm_eps=1e-6),
        text_config=dict(vocab_size=VOCAB, hidden_size=text_width, encoder_hidden_size=vision_width,
                         intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, max_position_embeddings=32,
                         bos_token_id=DEC, sep_token_id=SEP, pad_token_id=PAD, eos_token_id=SEP))


def _randomize(model, seed: int, eos_bias: float = 1.0):
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, param in model.named_parameters():
            if param.dim() >= 2:
                param.copy_(torch.randn(param.shape, generator=generator) / param.shape[-1] ** 0.5)
        model.text_decoder.cls.predictions.bias[SEP] += eos_bias
    return model.eval()


@pytest.fixture(scope="module")
def captioners():
    """seed -> (transformers model, ModelBundle). Vision width 48 != text width 32, so the cross-attention
    K/V projection of the image tokens is recognisable in the compiled program."""
    models = {}
    for seed in SEEDS:
        torch.manual_seed(seed)
        hf = _randomize(transformers.BlipForConditionalGeneration(_hf_config(48)), seed)
        models[seed] = (hf, blip_jax.load(hf))
    return models


@pytest.fixture(scope="module")
def vqa_models():
    models = {}
    for seed in SEEDS[:2]:
        torch.manual_seed(seed)
        hf = _randomize(transformers.BlipForQuestionAnswering(_hf_config(32)), seed)
        models[seed] = (hf, blip_jax.load(hf))
    return models


def _pixels(seed: int, batch: int = BATCH):
    nchw = torch.randn((batch, 3, 32, 32), generator=torch.Generator().manual_seed(100 + seed))
    return nchw, nchw.permute(0, 2, 3, 1).numpy()


def _pad_after_eos(ids: np.ndarray) -> np.ndarray:
    """transformers 5 fills the tail of a finished beam with [SEP] (`pad_token_id or eos` with pad 0);
    blip-jax pads with 0. Map the former onto the latter, checking the tail is only [SEP] / pad."""
    ids = ids.copy()
    for row in ids:
        ends = np.flatnonzero(row[1:] == SEP)
        if ends.size:
            tail = row[ends[0] + 2:]
            assert np.isin(tail, (PAD, SEP)).all(), row
            tail[:] = PAD
    return ids


def _assert_same(hf_ids, ours, context):
    hf_ids = _pad_after_eos(np.asarray(hf_ids))
    assert ours.dtype == np.int32
    assert ours.shape == hf_ids.shape, (context, ours.shape, hf_ids.shape)
    np.testing.assert_array_equal(ours, hf_ids, err_msg=str(context))


def _caption_pair(models, seed, prompt=None, **settings):
    hf, bundle = models[seed]
    nchw, nhwc = _pixels(seed)
    with torch.no_grad():
        input_ids = None if prompt is None else torch.tensor([prompt] * BATCH)
        hf_ids = hf.generate(pixel_values=nchw, input_ids=input_ids, **settings).numpy()
    ours = bundle.generate(nhwc, None if prompt is None else np.asarray([prompt]), **settings)
    return hf_ids, ours


def test_greedy_matches_transformers(captioners):
    lengths = set()
    for seed in SEEDS:
        for settings in (dict(max_length=12), dict(max_length=12, min_length=6),
                         dict(max_length=12, repetition_penalty=1.1)):
            hf_ids, ours = _caption_pair(captioners, seed, **settings)
            _assert_same(hf_ids, ours, (seed, settings))
            lengths.update(int(np.sum(row != PAD)) for row in ours)
    assert len(lengths) > 2, "the test models should produce captions of several lengths"


@pytest.mark.parametrize("num_beams,max_length,min_length", [(3, 12, 3), (3, 8, 5), (5, 15, 5)])
def test_beam_search_matches_transformers(captioners, num_beams, max_length, min_length):
    for seed in SEEDS:
        for repetition_penalty in (1.0, 1.1):
            settings = dict(num_beams=num_beams, max_length=max_length, min_length=min_length,
                            repetition_penalty=repetition_penalty)
            hf_ids, ours = _caption_pair(captioners, seed, **settings)
            _assert_same(hf_ids, ours, (seed, settings))
            # min_length counts [DEC]: no caption ends before it.
            for row in ours:
                ends = np.flatnonzero(row == SEP)
                assert not ends.size or ends[0] + 1 >= min_length


def test_beam_search_with_a_prompt_matches_transformers(captioners):
    prompt = [CLS, 10, 11, 12, SEP]  # what the tokenizer returns for a 3-token prompt
    for seed in SEEDS:
        for settings in (dict(num_beams=3, max_length=12, min_length=5),
                         dict(num_beams=3, max_length=12, min_length=5, repetition_penalty=1.1)):
            hf_ids, ours = _caption_pair(captioners, seed, prompt, **settings)
            _assert_same(hf_ids, ours, (seed, settings))
            np.testing.assert_array_equal(ours[:, :4], [[DEC, 10, 11, 12]] * BATCH)


def test_num_return_sequences_matches_transformers(captioners):
    for seed in SEEDS:
        settings = dict(num_beams=5, max_length=15, min_length=4, num_return_sequences=3)
        hf_ids, ours = _caption_pair(captioners, seed, **settings)
        _assert_same(hf_ids, ours, (seed, settings))
        assert ours.shape[0] == BATCH * 3
        # The returned beams of one image differ from each other.
        for image in range(BATCH):
            assert len({tuple(row) for row in ours[3 * image:3 * image + 3]}) == 3


@pytest.mark.parametrize("early_stopping,length_penalty", [(True, 0.6), ("never", 1.3)])
def test_length_penalty_and_early_stopping_match_transformers(captioners, early_stopping, length_penalty):
    for seed in SEEDS:
        settings = dict(num_beams=3, max_length=12, min_length=2, length_penalty=length_penalty,
                        early_stopping=early_stopping)
        hf_ids, ours = _caption_pair(captioners, seed, **settings)
        _assert_same(hf_ids, ours, (seed, settings))


@pytest.mark.parametrize("settings", [dict(num_beams=3, max_length=10, min_length=1),
                                      dict(num_beams=1, max_length=10, min_length=3, repetition_penalty=1.1)])
def test_vqa_answer_matches_transformers(vqa_models, settings):
    question = np.array([[CLS, 10, 11, 12, SEP, PAD], [CLS, 13, 14, SEP, PAD, PAD],
                         [CLS, 20, 21, 22, 23, SEP], [CLS, 5, SEP, PAD, PAD, PAD]])
    mask = (question != PAD).astype(np.int64)
    # BLIP encodes the question with [ENC] first; transformers takes ids literally, so give it [ENC].
    question_enc = question.copy()
    question_enc[:, 0] = ENC
    for seed, (hf, bundle) in vqa_models.items():
        nchw, nhwc = _pixels(seed)
        with torch.no_grad():
            hf_ids = hf.generate(input_ids=torch.tensor(question_enc), pixel_values=nchw,
                                 attention_mask=torch.tensor(mask), **settings).numpy()
        ours = bundle.answer(nhwc, question, mask, **settings)
        _assert_same(hf_ids, ours, (seed, settings))


def test_generate_argument_errors_are_one_line(captioners):
    _, bundle = captioners[0]
    _, pixels = _pixels(0, batch=2)
    cases = [
        (dict(num_beams=3, num_return_sequences=4), "num_return_sequences 4 must be <= num_beams 3"),
        (dict(num_return_sequences=2), "greedy decoding returns one sequence"),
        (dict(max_length=1), "must exceed the prompt length"),
        (dict(max_length=64), "position embeddings"),
        (dict(do_sample=True, num_beams=2), "beam sampling"),
        (dict(prompt_ids=[[CLS, 5, PAD, SEP]]), "padding"),
    ]
    for kwargs, message in cases:
        with pytest.raises(ValueError, match=message) as error:
            bundle.generate(pixels, **kwargs)
        assert "\n" not in str(error.value)
    with pytest.raises(ValueError, match="vqa"):
        bundle.answer(pixels, [[CLS, 5, SEP]])


# ----------------------------------------------------------------------------------------------------
# The KV-cache contract: cross-attention K/V of the image tokens are computed at prefill only.
# ----------------------------------------------------------------------------------------------------
def _dot_operand_shapes(jaxpr, inside_loop=False, found=None):
    """[(inside a while body?, lhs shape, rhs shape)] for every dot_general in a (nested) jaxpr."""
    found = [] if found is None else found
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "dot_general":
            found.append((inside_loop, tuple(eqn.invars[0].aval.shape), tuple(eqn.invars[1].aval.shape)))
        for name, param in eqn.params.items():
            for sub in (param if isinstance(param, (tuple, list)) else [param]):
                inner = getattr(sub, "jaxpr", sub)
                if hasattr(inner, "eqns"):
                    in_loop = inside_loop or (eqn.primitive.name == "while" and name == "body_jaxpr")
                    _dot_operand_shapes(inner, in_loop, found)
    return found


def test_cross_attention_keys_are_computed_once_per_image_not_per_step(captioners):
    _, bundle = captioners[0]
    _, pixels = _pixels(0)
    tokens = dict(bundle.config.tokens)
    static, dynamic = decode._settings(
        vocab_size=VOCAB, eos=SEP, pad=PAD, num_beams=3, max_length=12, min_length=0, repetition_penalty=1.0,
        length_penalty=1.0, early_stopping=False, do_sample=False, top_p=1.0, top_k=0, temperature=1.0,
        num_return_sequences=1, seed=0, prompt_length=1, max_positions=32)
    start = decode.decoder_start_ids(None, BATCH, tokens["dec"])
    jaxpr = jax.make_jaxpr(lambda params, pixels, start, dynamic: decode._caption_program(
        bundle.model, static, params, pixels, start, dynamic))(bundle.params, pixels, start, dynamic)
    dots = _dot_operand_shapes(jaxpr.jaxpr)
    image_tokens = (BATCH, 17, 48)  # 16 patches + [CLS], vision width 48
    cross_kv = [d for d in dots if d[1] == image_tokens and d[2] == (48, 32)]
    assert len(cross_kv) == 2 * 2, "key + value projection of the image tokens in each of the 2 decoder layers"
    assert not any(inside for inside, _, _ in cross_kv), "cross K/V recomputed inside the decoding loop"
    # And the loop does run the decoder: its self-attention projections (rows = BATCH * beams) are inside.
    assert any(inside and lhs[0] == BATCH * 3 and rhs == (32, 32) for inside, lhs, rhs in dots)


# ----------------------------------------------------------------------------------------------------
# Sampling: exact truncation, and draws that follow transformers' processed distribution.
# ----------------------------------------------------------------------------------------------------
def test_top_p_truncation_is_exact_on_a_hand_made_distribution():
    from transformers.generation.logits_process import TopPLogitsWarper

    probabilities = np.array([0.0625, 0.5, 0.125, 0.0625, 0.25])  # sorted: .5 .25 .125 .0625 .0625
    logits = np.log(probabilities)[None].astype(np.float32)
    # The nucleus is the smallest set of most likely tokens whose mass reaches top_p (at least one token).
    cases = [(0.3, {1}), (0.6, {1, 4}), (0.8, {1, 4, 2}), (0.95, {0, 1, 2, 3, 4}), (1.0, {0, 1, 2, 3, 4}),
             (0.0, {1})]
    for top_p, kept in cases:
        ours = np.asarray(logits_processors.top_p_filter(logits, top_p))[0]
        assert set(np.flatnonzero(np.isfinite(ours))) == kept, top_p
        np.testing.assert_array_equal(ours[sorted(kept)], logits[0, sorted(kept)])
        if 0.0 < top_p < 1.0:
            theirs = TopPLogitsWarper(top_p)(None, torch.from_numpy(logits)).numpy()[0]
            np.testing.assert_array_equal(np.isfinite(ours), np.isfinite(theirs))


def test_top_k_and_temperature_match_transformers():
    from transformers.generation.logits_process import TemperatureLogitsWarper, TopKLogitsWarper

    logits = np.random.default_rng(0).normal(size=(3, 40)).astype(np.float32)
    for top_k in (1, 5, 17):
        theirs = TopKLogitsWarper(top_k)(None, TemperatureLogitsWarper(0.7)(None, torch.from_numpy(logits)))
        ours = logits_processors.apply_top_k(logits / np.float32(0.7), np.int32(top_k))
        np.testing.assert_array_equal(np.asarray(ours), theirs.numpy())


def test_repetition_penalty_matches_transformers():
    from transformers.generation.logits_process import RepetitionPenaltyLogitsProcessor

    rng = np.random.default_rng(1)
    scores = rng.normal(size=(3, 20)).astype(np.float32)
    sequences = rng.integers(0, 20, size=(3, 9))
    cur_len = 6  # only the first 6 ids are the prefix
    theirs = RepetitionPenaltyLogitsProcessor(1.3)(torch.from_numpy(sequences[:, :cur_len]), torch.from_numpy(scores))
    ours = logits_processors.apply_repetition_penalty(scores, sequences, np.int32(cur_len), np.float32(1.3))
    np.testing.assert_array_equal(np.asarray(ours), theirs.numpy())


def test_sampled_tokens_follow_the_truncated_distribution(captioners):
    """10,000 draws of the first caption token: frequencies match transformers' processed distribution
    (repetition penalty 1.1, temperature 0.8, top_p 0.9) by a chi-square test, and never leave the nucleus."""
    from scipy import stats
    from transformers.generation.logits_process import (RepetitionPenaltyLogitsProcessor, TemperatureLogitsWarper,
                                                        TopPLogitsWarper)

    hf, bundle = captioners[1]
    nchw, nhwc = _pixels(1, batch=1)
    draws = 10_000
    ids = bundle.generate(nhwc, do_sample=True, top_p=0.9, temperature=0.8, max_length=2,
                          num_return_sequences=draws, seed=3)
    assert ids.shape == (draws, 2) and (ids[:, 0] == DEC).all()
    with torch.no_grad():
        image_embeds = hf.vision_model(nchw)[0]
        start = torch.tensor([[DEC]])
        logits = hf.text_decoder(input_ids=start, encoder_hidden_states=image_embeds).logits[:, -1]
        scores = RepetitionPenaltyLogitsProcessor(1.1)(start, logits)
        scores = TopPLogitsWarper(0.9)(start, TemperatureLogitsWarper(0.8)(start, scores))
        expected = torch.softmax(scores, dim=-1).numpy()[0].astype(np.float64)
    nucleus = np.flatnonzero(expected > 0)
    assert 3 <= nucleus.size < VOCAB  # the filter really truncates, and leaves a real choice
    counts = np.bincount(ids[:, 1], minlength=VOCAB)
    assert counts[expected == 0].sum() == 0, "sampled a token outside the nucleus"
    chi2 = stats.chisquare(counts[nucleus], expected[nucleus] / expected[nucleus].sum() * draws)
    assert chi2.pvalue > 1e-3, chi2


def test_sampling_is_seeded_and_pads_after_eos(captioners):
    _, bundle = captioners[0]
    _, pixels = _pixels(0)
    settings = dict(do_sample=True, top_p=0.9, max_length=12, num_return_sequences=2)
    first = bundle.generate(pixels, seed=7, **settings)
    np.testing.assert_array_equal(first, bundle.generate(pixels, seed=7, **settings))
    assert not np.array_equal(first, bundle.generate(pixels, seed=8, **settings))
    assert first.shape[0] == 2 * BATCH and (first[:, 0] == DEC).all()
    for row in first:
        ends = np.flatnonzero(row == SEP)
        if ends.size:
            assert (row[ends[0] + 1:] == PAD).all()
