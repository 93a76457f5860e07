"""MED: modes, masks, the KV cache and the attention switch."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from blip_jax.models import build_model, init_decode_cache, init_params, model_config
from blip_jax.models.attention import dot_product_attention


@pytest.fixture(scope="module")
def retrieval():
    config = model_config("tiny", "tiny")
    config.text.vocab_size = 64
    return build_model(config, "retrieval"), init_params(config, "retrieval", jax.random.key(0))


def test_text_mode_ignores_the_image_and_multimodal_uses_it(retrieval):
    model, params = retrieval
    ids = jnp.array([[1, 5, 6, 7, 2]])
    mask = jnp.ones_like(ids)
    image_a = jax.random.normal(jax.random.key(1), (1, 17, 32))
    image_b = jax.random.normal(jax.random.key(2), (1, 17, 32))
    text = lambda: model.apply({"params": params}, ids, mask, method="text_features")  # noqa: E731
    itm = lambda image: model.apply({"params": params}, ids, mask, image, method="itm_logits")  # noqa: E731
    assert text().shape == (1, 256)
    np.testing.assert_allclose(np.linalg.norm(text(), axis=-1), 1.0, rtol=1e-5)
    assert not np.allclose(itm(image_a), itm(image_b))


def test_padding_is_invisible_to_real_tokens(retrieval):
    model, params = retrieval
    short = jnp.array([[1, 5, 6, 2]])
    padded = jnp.array([[1, 5, 6, 2, 0, 0, 0]])
    garbage = jnp.array([[1, 5, 6, 2, 9, 9, 9]])
    mask = jnp.array([[1, 1, 1, 1, 0, 0, 0]])
    features = lambda ids, m: model.apply({"params": params}, ids, m, method="text_features")  # noqa: E731
    np.testing.assert_allclose(features(short, jnp.ones_like(short)), features(padded, mask), atol=1e-6)
    np.testing.assert_allclose(features(padded, mask), features(garbage, mask), atol=1e-6)


def test_decoder_is_causal():
    config = model_config("tiny", "tiny")
    config.text.vocab_size = 64
    model, params = build_model(config, "caption"), init_params(config, "caption", jax.random.key(0))
    image = jax.random.normal(jax.random.key(1), (1, 17, 32))
    ids_a, ids_b = jnp.array([[1, 5, 6, 7]]), jnp.array([[1, 5, 6, 9]])
    logits = lambda ids: model.apply(  # noqa: E731
        {"params": params}, ids, jnp.ones_like(ids), image, method="lm_logits")
    np.testing.assert_allclose(logits(ids_a)[:, :3], logits(ids_b)[:, :3], atol=1e-6)
    assert not np.allclose(logits(ids_a)[:, 3], logits(ids_b)[:, 3])


@pytest.mark.parametrize("task", ["caption", "vqa", "pretrain"])
def test_kv_cache_decoding_equals_the_full_forward(task):
    config = model_config("tiny", "tiny")
    config.text.vocab_size = 64
    model, params = build_model(config, task), init_params(config, task, jax.random.key(0))
    variables = {"params": params}
    states = jax.random.normal(jax.random.key(1), (2, 17 if task != "vqa" else 5, 32))
    ids = jax.random.randint(jax.random.key(2), (2, 7), 1, 64)
    full = model.apply(variables, ids, jnp.ones_like(ids), states, method="lm_logits")
    cache = init_decode_cache(model, params, 2, 10, states)
    step = lambda cache, chunk, enc: model.apply(  # noqa: E731
        {"params": params, "cache": cache}, chunk, None, enc, decode=True, method="lm_logits", mutable=["cache"])
    logits, updated = step(cache, ids[:, :3], states)  # prefill computes cross K/V once
    pieces = [logits]
    for t in range(3, 7):
        logits, updated = step(updated["cache"], ids[:, t:t + 1], None)  # cross K/V read from the cache
        pieces.append(logits)
    np.testing.assert_allclose(np.concatenate(pieces, 1), full, atol=1e-5)


def test_attention_masks_and_cudnn_switch_fall_back_to_the_same_numbers():
    rng = np.random.default_rng(0)
    q, k, v = (jnp.asarray(rng.normal(size=(2, 5, 2, 8)), jnp.float32) for _ in range(3))
    padding = jnp.array([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], bool)
    xla = dot_product_attention(q, k, v, key_padding_mask=padding, causal=True)
    cudnn = dot_product_attention(q, k, v, key_padding_mask=padding, causal=True, impl="cudnn")
    np.testing.assert_allclose(xla, cudnn, atol=1e-6)
    # Reference: explicit softmax over allowed keys only.
    scores = np.einsum("bthd,bshd->bhts", q, k) / np.sqrt(8)
    allowed = np.tril(np.ones((5, 5), bool))[None, None] & np.asarray(padding)[:, None, None, :]
    scores = np.where(allowed, scores, -np.inf)
    probs = np.exp(scores - scores.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    np.testing.assert_allclose(xla, np.einsum("bhts,bshd->bthd", probs, v), atol=1e-5)


def test_unknown_mode_and_missing_image_are_clear_errors(retrieval):
    model, params = retrieval
    ids = jnp.ones((1, 4), jnp.int32)
    with pytest.raises(ValueError, match="needs encoder_hidden_states"):
        model.apply({"params": params}, ids, ids, None, method="itm_logits")


def test_text_remat_gives_identical_gradients():
    config = model_config("tiny", "tiny")
    config.text.vocab_size = 64
    params = init_params(config, "pretrain", jax.random.key(0))
    image = jax.random.normal(jax.random.key(1), (2, 17, 32))
    ids = jnp.array([[3, 5, 6, 7], [3, 8, 9, 0]])
    mask = (ids > 0).astype(jnp.int32)

    def loss(p, cfg):
        model = build_model(cfg, "pretrain")
        text = model.apply({"params": p}, ids, mask, method="text_features").sum()
        return text + model.apply({"params": p}, ids, mask, image, method="lm_logits").sum()

    remat_config = model_config("tiny", "tiny")
    remat_config.text.vocab_size = 64
    remat_config.remat.text_layers = 2
    grads, remat_grads = jax.grad(loss)(params, config), jax.grad(loss)(params, remat_config)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), grads, remat_grads)
