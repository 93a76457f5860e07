"""Original Salesforce checkpoints: key scheme, size inference, pre-training's shared encoder/decoder tree.

The .pth files are built from tiny transformers models with the reverse of HF's published renames
(tiny_blip.HF_TO_SALESFORCE, written independently of blip_jax.convert.keymap). Widths are 128 with
2 heads so head_dim = 64 as in every released BLIP: `load(path)` must infer every size by itself.
"""
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import blip_jax
from blip_jax.convert import keymap
from tiny_blip import DEC, ENC, build, max_diff, nchw, padded_ids, pixels, to_salesforce

TOL = 1e-5
WIDTHS = dict(vision_width=128, text_width=128, vision_heads=2, text_heads=2, vision_eps=1e-6)


def tree_equal(a, b):
    return jax.tree.structure(a) == jax.tree.structure(b) and jax.tree.all(jax.tree.map(np.array_equal, a, b))


def momentum_and_queues(state):
    """What real pre-training / retrieval checkpoints also carry (§5.2) and blip-jax must skip."""
    extra = {"visual_encoder_m." + k[len("visual_encoder."):]: v.clone()
             for k, v in state.items() if k.startswith("visual_encoder.")}
    extra.update(image_queue=torch.randn(16, 8), text_queue=torch.randn(16, 8), queue_ptr=torch.zeros(1))
    return extra


@pytest.fixture(scope="module")
def retriever():
    return build("BlipForImageTextRetrieval", seed=11, scale=0.1, **WIDTHS)


@pytest.fixture(scope="module")
def pretrain(tmp_path_factory, retriever):
    """A BLIP_Pretrain-style checkpoint: the decoder lists the encoder's shared tensors again (§2.3), owns
    its self-attention (`.attention.` keys) and an LM head tied to the shared word embeddings. Returns
    (path, the equivalent HF captioner)."""
    decoder_source = build("BlipForConditionalGeneration", seed=12, scale=0.1, **WIDTHS)
    encoder_state = to_salesforce(retriever.state_dict())
    decoder_state = to_salesforce(decoder_source.state_dict())
    state = dict(encoder_state)
    state["temp"] = torch.tensor(0.05)
    for key, value in decoder_state.items():
        if not key.startswith("text_decoder."):
            continue
        if key.startswith("text_decoder.bert.") and ".attention." not in key:
            shared = "text_encoder." + key[len("text_decoder.bert."):]
            value = encoder_state[shared].clone() if shared in encoder_state else value
        state[key] = value
    state["text_decoder.cls.predictions.decoder.weight"] = state["text_encoder.embeddings.word_embeddings.weight"]
    state.update(momentum_and_queues(state))
    path = tmp_path_factory.mktemp("sf") / "model_tiny.pth"
    torch.save({"model": state, "config": {"vit": "tiny", "image_size": 32}, "epoch": 19}, str(path))
    # The same decoder as a transformers captioner (vision from the retriever, text_decoder as listed).
    captioner = build("BlipForConditionalGeneration", seed=13, scale=0.1, **WIDTHS)
    hf_state = {k.replace("visual_encoder.", "vision_model."): v for k, v in retriever.state_dict().items()
                if k.startswith("vision_model.")}
    hf_state.update({k: v for k, v in state.items() if k.startswith("text_decoder.")})
    captioner.load_state_dict(hf_state, strict=True)
    return path, captioner


def test_retrieval_pth_imports_the_same_parameters_as_hf(retriever, tmp_path):
    state = to_salesforce(retriever.state_dict())
    state["temp"] = torch.tensor(0.05)
    state.update(momentum_and_queues(state))
    path = tmp_path / "model_base_retrieval_coco.pth"
    torch.save({"model": state, "epoch": 5}, str(path))
    bundle = blip_jax.load(str(path))
    assert bundle.task == "retrieval"
    vision, text = bundle.config.vision, bundle.config.text
    assert (vision.width, vision.depth, vision.num_heads, vision.patch_size, vision.image_size) == (128, 2, 2, 8, 32)
    assert (text.hidden_size, text.num_layers, text.num_heads, text.vocab_size) == (128, 2, 2, 100)
    assert (bundle.config.tokens.dec, bundle.config.tokens.enc) == (DEC, ENC)
    assert vision.layer_norm_eps == 1e-6 and text.layer_norm_eps == 1e-12
    assert float(bundle.params["temp"]) == pytest.approx(0.05)
    from_hf = blip_jax.load(retriever)
    from_hf.params["temp"] = bundle.params["temp"]
    assert tree_equal(bundle.params, from_hf.params)  # from_hf is parity-tested against transformers
    # Another image size: pos_embed resampled exactly as for HF weights (torch bicubic).
    resized = blip_jax.load(str(path), image_size=48)
    assert resized.params["visual_encoder"]["pos_embed"].shape == (1, 37, 128)
    np.testing.assert_array_equal(resized.params["visual_encoder"]["pos_embed"],
                                  blip_jax.load(retriever, image_size=48).params["visual_encoder"]["pos_embed"])


@pytest.mark.parametrize("cls_name, task", [("BlipForConditionalGeneration", "caption"),
                                            ("BlipForQuestionAnswering", "vqa")])
def test_caption_and_vqa_pth_import_the_same_parameters_as_hf(cls_name, task, tmp_path):
    model = build(cls_name, seed=14, scale=0.1, **WIDTHS)
    path = tmp_path / f"model_{task}.pth"
    torch.save({"model": to_salesforce(model.state_dict())}, str(path))
    bundle = blip_jax.load(str(path))
    assert bundle.task == task
    assert tree_equal(bundle.params, blip_jax.load(model).params)  # parity-tested against transformers


def test_pretrain_pth_is_one_shared_tree_with_parity(pretrain, retriever, rng):
    path, captioner = pretrain
    bundle = blip_jax.load(str(path))
    assert bundle.task == "pretrain"
    assert "text_decoder" not in bundle.params
    layer = bundle.params["text_encoder"]["layer_0"]
    assert {"attention", "decoder_attention", "crossattention", "intermediate", "output"} <= set(layer)
    assert "lm_head" in bundle.params["text_encoder"]

    images = pixels(rng, 2)
    ids, mask = padded_ids(rng, [7, 4])
    enc_ids, dec_ids = ids.copy(), ids.copy()
    enc_ids[:, 0], dec_ids[:, 0] = ENC, DEC
    with torch.no_grad():
        itm = retriever(input_ids=torch.tensor(enc_ids), pixel_values=nchw(images),
                        attention_mask=torch.tensor(mask)).itm_score
        itc = retriever(input_ids=torch.tensor(ids), pixel_values=nchw(images), attention_mask=torch.tensor(mask),
                        use_itm_head=False).itm_score
        lm = captioner(pixel_values=nchw(images), input_ids=torch.tensor(dec_ids),
                       attention_mask=torch.tensor(mask)).logits
    assert max_diff(bundle.itm_logits(images, ids, mask), itm) <= TOL
    assert max_diff(bundle.itc_similarity(images, ids, mask), itc) <= TOL
    real = mask.astype(bool)
    assert max_diff(np.asarray(bundle.lm_logits(images, ids, mask))[real], lm.numpy()[real]) <= TOL

    # The fine-tuning scripts start every task from this checkpoint: so does load(task=...).
    assert tree_equal(blip_jax.load(str(path), task="caption").params, blip_jax.load(captioner).params)
    as_retrieval = blip_jax.load(str(path), task="retrieval")
    assert float(as_retrieval.params["temp"]) == pytest.approx(0.05)
    as_retrieval.params["temp"] = blip_jax.load(retriever).params["temp"]
    assert tree_equal(as_retrieval.params, blip_jax.load(retriever).params)
    # A blip-jax pre-training model re-targets the same way, and exports both names again.
    assert tree_equal(blip_jax.load(bundle, task="caption").params, blip_jax.load(captioner).params)
    exported = bundle.export_salesforce()
    np.testing.assert_array_equal(exported["text_encoder.encoder.layer.1.output.dense.weight"],
                                  exported["text_decoder.bert.encoder.layer.1.output.dense.weight"])


def test_gradient_through_encoder_and_decoder_accumulates_in_the_shared_leaf(pretrain, rng):
    path, _ = pretrain
    bundle = blip_jax.load(str(path))
    images = pixels(rng, 2)
    ids, mask = padded_ids(rng, [6, 5])
    itm_weights = jnp.asarray(rng.normal(size=(2, 2)), jnp.float32)
    lm_weights = jnp.asarray(rng.normal(size=(2, 6, 100)), jnp.float32)
    image_embeds = bundle.image_embeds(images)  # the text paths are what share parameters
    enc_ids, dec_ids = ids.copy(), ids.copy()
    enc_ids[:, 0], dec_ids[:, 0] = ENC, DEC

    def encoder_loss(params):  # image-grounded encoder -> ITM head
        logits = bundle.model.apply({"params": params}, enc_ids, mask, image_embeds, method="itm_logits")
        return jnp.sum(logits * itm_weights)

    def decoder_loss(params):  # causal decoder -> LM head
        logits = bundle.model.apply({"params": params}, dec_ids, mask, image_embeds, method="lm_logits")
        return jnp.sum(logits * lm_weights)

    @jax.jit
    def grads(params):
        return jax.grad(encoder_loss)(params), jax.grad(decoder_loss)(params)

    g_encoder, g_decoder = (keymap.flatten(g) for g in grads(bundle.params))
    # Embeddings, cross-attention, FFN and their LayerNorms: one leaf that both paths write into.
    shared = [p for p in g_encoder if p.startswith("text_encoder/") and "lm_head" not in p
              and not re.search(r"/(decoder_)?attention/", p)]
    assert "text_encoder/layer_1/crossattention/self/key/kernel" in shared
    assert "text_encoder/layer_0/output/LayerNorm/scale" in shared
    assert "text_encoder/embeddings/word_embeddings/embedding" in shared
    for name in shared:
        assert np.any(g_encoder[name] != 0) and np.any(g_decoder[name] != 0), name
    for name in g_encoder:  # self-attention is the one thing not shared
        if re.search(r"/layer_\d+/decoder_attention/", name):
            assert not np.any(g_encoder[name]) and np.any(g_decoder[name]), name
        elif re.search(r"/layer_\d+/attention/", name):
            assert np.any(g_encoder[name]) and not np.any(g_decoder[name]), name
