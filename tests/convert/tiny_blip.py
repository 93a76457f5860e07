"""Tiny random transformers BLIP models (torch, built locally; no hub) for the conversion tests."""
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

VOCAB, DEC, ENC, CLS, SEP, PAD = 100, 98, 99, 2, 3, 0
IMAGE, PATCH = 32, 8


def tiny_hf_config(vision_width=32, text_width=24, vision_heads=2, text_heads=4, vision_eps=1e-5):
    """Vision 2 layers / patch 8 / 32 px; text 2 layers; vocab 100 with [DEC]=98, [ENC]=99."""
    return transformers.BlipConfig(
        vision_config=dict(hidden_size=vision_width, intermediate_size=2 * vision_width, num_hidden_layers=2,
                           num_attention_heads=vision_heads, image_size=IMAGE, patch_size=PATCH,
                           layer_norm_eps=vision_eps),
        text_config=dict(vocab_size=VOCAB, hidden_size=text_width, intermediate_size=2 * text_width,
                         num_hidden_layers=2, num_attention_heads=text_heads, max_position_embeddings=40,
                         bos_token_id=DEC, pad_token_id=PAD, sep_token_id=SEP),
        image_text_hidden_size=16)


def randomize(model, seed, scale=0.2):
    """Every parameter random (LayerNorm scales near 1) so transposes and swaps cannot hide.

    scale ~ 0.2 * sqrt(32 / width) keeps activations O(1), where float32 rounding stays well under 1e-5."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            noise = torch.randn(param.shape, generator=generator)
            if "norm" in name.lower() and name.endswith("weight"):
                param.copy_(1.0 + 0.1 * noise)
            else:
                param.copy_(scale * noise)
    return model.eval()


def build(cls_name, seed=0, scale=0.2, **config_kwargs):
    cls = getattr(transformers, cls_name)
    return randomize(cls(tiny_hf_config(**config_kwargs)), seed, scale)


def pixels(rng, batch, size=IMAGE):
    return rng.normal(size=(batch, size, size, 3)).astype(np.float32)


def padded_ids(rng, lengths, first=CLS, total=None):
    """Right-padded token ids ([first] w ... w [SEP] pad ...) of the given lengths, and their mask."""
    total = total or max(lengths)
    ids = np.full((len(lengths), total), PAD, np.int64)
    mask = np.zeros((len(lengths), total), np.int64)
    for row, length in enumerate(lengths):
        ids[row, :length] = np.concatenate([[first], rng.integers(5, 90, length - 2), [SEP]])
        mask[row, :length] = 1
    return ids, mask


def nchw(x):
    return torch.tensor(np.asarray(x).transpose(0, 3, 1, 2))


def max_diff(a, b):
    return float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))))


# Salesforce key scheme = the reverse of transformers' published renames (blip.md §5.3); written here
# independently of blip_jax.convert.keymap so the Salesforce test checks the table, not itself.
HF_TO_SALESFORCE = (
    ("vision_model.embeddings.patch_embedding", "visual_encoder.patch_embed.proj"),
    ("vision_model.embeddings.position_embedding", "visual_encoder.pos_embed"),
    ("vision_model.embeddings.class_embedding", "visual_encoder.cls_token"),
    ("vision_model.post_layernorm", "visual_encoder.norm"),
    ("vision_model.encoder.layers", "visual_encoder.blocks"),
    ("self_attn.projection", "attn.proj"),
    ("self_attn.qkv", "attn.qkv"),
    ("layer_norm1", "norm1"),
    ("layer_norm2", "norm2"),
)


def to_salesforce(hf_state):
    out = {}
    for key, value in hf_state.items():
        for old, new in HF_TO_SALESFORCE:
            key = key.replace(old, new)
        out[key] = value.detach().clone()
    return out
