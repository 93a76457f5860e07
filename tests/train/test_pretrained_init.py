"""init_vision_from / init_text_from with tiny local HF ViT and BERT models (save_pretrained):
our encoders then reproduce the HF outputs."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from blip_jax.models import build_model, model_config  # noqa: E402
from blip_jax.models.blip import init_params  # noqa: E402
from blip_jax.train import pretrained_init  # noqa: E402


def _config():
    config = model_config("tiny", "tiny", 32)
    config.vision.update(patch_size=8, width=32, depth=2, num_heads=2, mlp_dim=64)
    config.text.update(vocab_size=40, hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64,
                       max_position_embeddings=16)
    config.tokens.update(pad=0, cls=1, sep=2, dec=38, enc=39)
    return config


@pytest.fixture(scope="module")
def params():
    return jax.device_get(init_params(_config(), "pretrain", jax.random.key(0)))


def _hf_vit(tmp_path, image_size):
    torch.manual_seed(0)
    hf_config = transformers.ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                       intermediate_size=64, image_size=image_size, patch_size=8,
                                       layer_norm_eps=1e-6, hidden_act="gelu")
    model = transformers.ViTModel(hf_config, add_pooling_layer=False).eval()
    with torch.no_grad():  # random, non-trivial embeddings
        model.embeddings.position_embeddings.normal_(0, 0.2)
        model.embeddings.cls_token.normal_(0, 0.2)
    model.save_pretrained(tmp_path)
    return model


def test_vit_from_hf_directory_matches_transformers(tmp_path, params):
    hf = _hf_vit(tmp_path, 32)
    loaded = pretrained_init.load_vision(str(tmp_path), params["visual_encoder"])
    pixels = np.random.default_rng(0).normal(size=(2, 32, 32, 3)).astype(np.float32)
    model = build_model(_config(), "pretrain")
    ours = model.apply({"params": {**params, "visual_encoder": loaded}}, jnp.asarray(pixels), method="image_embeds")
    with torch.no_grad():
        theirs = hf(pixel_values=torch.from_numpy(pixels.transpose(0, 3, 1, 2))).last_hidden_state.numpy()
    np.testing.assert_allclose(np.asarray(ours), theirs, atol=2e-5, rtol=1e-4)


def test_vit_pos_embed_is_resampled_and_timm_pth_loads(tmp_path, params):
    _hf_vit(tmp_path / "hf48", 48)  # a 6x6 grid onto our 4x4 grid
    loaded = pretrained_init.load_vision(str(tmp_path / "hf48"), params["visual_encoder"])
    assert loaded["pos_embed"].shape == params["visual_encoder"]["pos_embed"].shape
    source = pretrained_init.read_state_dict(str(tmp_path / "hf48"))["embeddings.position_embeddings"]
    np.testing.assert_array_equal(loaded["pos_embed"][:, 0], source[:, 0])  # [CLS] entry kept
    expected = torch.nn.functional.interpolate(
        torch.from_numpy(source[:, 1:].reshape(1, 6, 6, 32)).permute(0, 3, 1, 2), size=(4, 4), mode="bicubic",
        align_corners=False).permute(0, 2, 3, 1).reshape(1, 16, 32).numpy()
    np.testing.assert_allclose(loaded["pos_embed"][:, 1:], expected, atol=1e-5)
    # the same weights as a timm-style state dict (.pth), with a DeiT distillation token and a head
    hf_state = {k: torch.from_numpy(v) for k, v in pretrained_init.read_state_dict(str(tmp_path / "hf48")).items()}
    pos = hf_state["embeddings.position_embeddings"]
    state = {"cls_token": hf_state["embeddings.cls_token"], "dist_token": torch.zeros(1, 1, 32),
             "pos_embed": torch.cat([pos[:, :1], torch.zeros(1, 1, 32), pos[:, 1:]], 1),
             "head.weight": torch.zeros(10, 32),
             "patch_embed.proj.weight": hf_state["embeddings.patch_embeddings.projection.weight"],
             "patch_embed.proj.bias": hf_state["embeddings.patch_embeddings.projection.bias"],
             "norm.weight": hf_state["layernorm.weight"], "norm.bias": hf_state["layernorm.bias"]}
    for i in range(2):
        p = f"encoder.layer.{i}."
        qkv = [f"{p}attention.attention.{n}" for n in ("query", "key", "value")]
        state.update({
            f"blocks.{i}.norm1.weight": hf_state[p + "layernorm_before.weight"],
            f"blocks.{i}.norm1.bias": hf_state[p + "layernorm_before.bias"],
            f"blocks.{i}.attn.qkv.weight": torch.cat([hf_state[n + ".weight"] for n in qkv]),
            f"blocks.{i}.attn.qkv.bias": torch.cat([hf_state[n + ".bias"] for n in qkv]),
            f"blocks.{i}.attn.proj.weight": hf_state[p + "attention.output.dense.weight"],
            f"blocks.{i}.attn.proj.bias": hf_state[p + "attention.output.dense.bias"],
            f"blocks.{i}.norm2.weight": hf_state[p + "layernorm_after.weight"],
            f"blocks.{i}.norm2.bias": hf_state[p + "layernorm_after.bias"],
            f"blocks.{i}.mlp.fc1.weight": hf_state[p + "intermediate.dense.weight"],
            f"blocks.{i}.mlp.fc1.bias": hf_state[p + "intermediate.dense.bias"],
            f"blocks.{i}.mlp.fc2.weight": hf_state[p + "output.dense.weight"],
            f"blocks.{i}.mlp.fc2.bias": hf_state[p + "output.dense.bias"]})
    torch.save({"model": {k: v.detach().clone() for k, v in state.items()}}, tmp_path / "deit.pth")
    from_timm = pretrained_init.load_vision(str(tmp_path / "deit.pth"), params["visual_encoder"])
    for a, b in zip(jax.tree.leaves(loaded), jax.tree.leaves(from_timm)):
        np.testing.assert_allclose(a, b, atol=1e-6)


def test_bert_init_matches_transformers_and_resizes_vocab(tmp_path, params):
    torch.manual_seed(1)
    hf_config = transformers.BertConfig(vocab_size=38, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                        intermediate_size=64, max_position_embeddings=20, type_vocab_size=2)
    hf = transformers.BertForMaskedLM(hf_config).eval()
    with torch.no_grad():
        hf.bert.embeddings.token_type_embeddings.weight.zero_()  # BLIP drops token types
    hf.save_pretrained(tmp_path)
    loaded = pretrained_init.load_text(str(tmp_path), params["text_encoder"])
    embedding = loaded["embeddings"]["word_embeddings"]["embedding"]
    assert embedding.shape == (40, 32)
    saved = pretrained_init.read_state_dict(str(tmp_path))
    word_key = next(k for k in saved if k.endswith("embeddings.word_embeddings.weight"))
    np.testing.assert_array_equal(embedding[:38], saved[word_key])
    np.testing.assert_array_equal(embedding[38:], params["text_encoder"]["embeddings"]["word_embeddings"]["embedding"][38:])
    for i in range(2):  # cross-attention stays as initialised; decoder self-attention = BERT's
        np.testing.assert_array_equal(loaded[f"layer_{i}"]["crossattention"]["self"]["key"]["kernel"],
                                      params["text_encoder"][f"layer_{i}"]["crossattention"]["self"]["key"]["kernel"])
        np.testing.assert_array_equal(loaded[f"layer_{i}"]["decoder_attention"]["self"]["query"]["kernel"],
                                      loaded[f"layer_{i}"]["attention"]["self"]["query"]["kernel"])
    ids = np.array([[1, 5, 9, 17, 2, 0], [1, 7, 2, 0, 0, 0]], np.int32)
    mask = (ids != 0).astype(np.int32)
    model = build_model(_config(), "pretrain")
    full = {**params, "text_encoder": loaded}

    def text_states(module):
        return module.text_encoder(jnp.asarray(ids), jnp.asarray(mask), mode="text")
    ours = np.asarray(model.apply({"params": full}, method=text_states))
    with torch.no_grad():
        out = hf.base_model(input_ids=torch.from_numpy(ids).long(), attention_mask=torch.from_numpy(mask).long())
    np.testing.assert_allclose(ours * mask[..., None], out.last_hidden_state.numpy() * mask[..., None],
                               atol=2e-5, rtol=1e-4)
    np.testing.assert_array_equal(loaded["lm_head"]["bias"][:38], saved["cls.predictions.bias"])


def test_wrong_shapes_are_reported_in_one_line(tmp_path, params):
    _hf_vit(tmp_path, 32)
    wrong = dict(params["visual_encoder"])
    wrong["blocks_0"] = jax.tree.map(lambda x: np.zeros(x.shape[:-1] + (x.shape[-1] + 1,), x.dtype), wrong["blocks_0"])
    with pytest.raises(ValueError, match="do not fit") as error:
        pretrained_init.load_vision(str(tmp_path), wrong)
    assert "\n" not in str(error.value)
