"""Task models: parameter layout, the pre-training model's structural sharing, temperature clamp."""
import jax
import jax.numpy as jnp
import numpy as np
from flax.traverse_util import flatten_dict

from blip_jax.models import build_model, init_params, model_config


def tiny():
    config = model_config("tiny", "tiny")
    config.text.vocab_size = 64
    return config


def test_pretrain_shares_everything_but_self_attention_by_structure():
    params = flatten_dict(init_params(tiny(), "pretrain", jax.random.key(0)), sep="/")
    text = [k for k in params if k.startswith("text_encoder/")]
    # Exactly one copy of embeddings / cross-attention / FFN, two self-attention blocks per layer.
    assert sum("word_embeddings" in k for k in text) == 1
    assert sum(k.startswith("text_encoder/layer_0/crossattention/self/query/kernel") for k in text) == 1
    assert "text_encoder/layer_0/decoder_attention/self/query/kernel" in params
    assert "text_encoder/layer_0/attention/self/query/kernel" in params
    assert not any(k.startswith("text_decoder") for k in params)


def test_gradients_from_encoder_and_decoder_accumulate_in_the_shared_leaf():
    config = tiny()
    model, params = build_model(config, "pretrain"), init_params(config, "pretrain", jax.random.key(0))
    pixels = jax.random.normal(jax.random.key(1), (2, 32, 32, 3))
    ids = jnp.array([[3, 5, 6, 7], [3, 8, 9, 0]])
    mask = (ids > 0).astype(jnp.int32)

    def encoder_loss(p):
        embeds = model.apply({"params": p}, pixels, method="image_embeds")
        return model.apply({"params": p}, ids, mask, embeds, method="itm_logits").sum()

    def decoder_loss(p):
        embeds = model.apply({"params": p}, pixels, method="image_embeds")
        return model.apply({"params": p}, ids, mask, embeds, method="lm_logits").sum()

    both = jax.grad(lambda p: encoder_loss(p) + decoder_loss(p))(params)
    enc, dec = jax.grad(encoder_loss)(params), jax.grad(decoder_loss)(params)
    shared = ("text_encoder", "layer_1", "crossattention", "self", "query", "kernel")
    get = lambda tree: np.asarray(flatten_dict(tree)[shared])  # noqa: E731
    assert np.abs(get(enc)).max() > 0 and np.abs(get(dec)).max() > 0
    np.testing.assert_allclose(get(both), get(enc) + get(dec), rtol=1e-5, atol=1e-8)
    # Self-attention is not shared: the encoder loss never reaches the decoder's own block.
    dec_sa = ("text_encoder", "layer_1", "decoder_attention", "self", "query", "kernel")
    assert np.abs(np.asarray(flatten_dict(enc)[dec_sa])).max() == 0


def test_temperature_is_clamped_like_the_reference():
    config = tiny()
    model, params = build_model(config, "retrieval"), init_params(config, "retrieval", jax.random.key(0))
    assert float(params["temp"]) == np.float32(0.07)
    for raw, expected in [(10.0, 0.5), (-1.0, 0.001), (0.2, 0.2)]:
        value = model.apply({"params": {**params, "temp": jnp.asarray(raw)}}, method="temperature")
        np.testing.assert_allclose(value, expected, rtol=1e-6)


def test_task_models_have_the_documented_top_level_trees():
    expected = {
        "caption": {"visual_encoder", "text_decoder"},
        "retrieval": {"visual_encoder", "text_encoder", "vision_proj", "text_proj", "itm_head", "temp"},
        "vqa": {"visual_encoder", "text_encoder", "text_decoder"},
        "pretrain": {"visual_encoder", "text_encoder", "vision_proj", "text_proj", "itm_head", "temp"},
    }
    for task, names in expected.items():
        assert set(init_params(tiny(), task, jax.random.key(0))) == names, task
    vqa = init_params(tiny(), "vqa", jax.random.key(0))
    # The VQA answer decoder cross-attends to question states: K/V width = text width.
    assert vqa["text_decoder"]["layer_0"]["crossattention"]["self"]["key"]["kernel"].shape == (32, 32)
