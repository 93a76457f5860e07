"""Starting weights for pre-training from scratch, as the original does (blip.md §2.1, §2.3).

* `config.init_vision_from`: ImageNet ViT/DeiT weights for `visual_encoder`, from
    - a Hugging Face `ViTModel` / `DeiTModel` directory (save_pretrained: model.safetensors or
      pytorch_model.bin; a `vit.` / `deit.` prefix from *ForImageClassification is accepted),
    - a timm `.pth` state dict (e.g. deit_base_patch16_224-b5f2ef4d.pth; needs torch),
    - a timm/big_vision AugReg `.npz` (e.g. the ViT-L i21k weights).
  Position embeddings are resampled bicubically to the model's grid; heads and distillation
  tokens are dropped.
* `config.init_text_from`: an HF BERT directory (bert-base-uncased) for `text_encoder`: embeddings
  (token types dropped, vocab resized: the extra rows such as [DEC]/[ENC] keep their fresh
  normal(0.02) init), every layer's self-attention (copied into both `attention` and the
  decoder's `decoder_attention`, since the original decoder is also loaded from BERT), FFN and
  LayerNorms, and the MLM head transform + bias as `lm_head`. Cross-attention stays newly
  initialised.

All functions take and return plain nested dicts of numpy arrays; shapes are checked and every
mismatch is reported in one line.
"""
from __future__ import annotations

import glob
import os
import re

import numpy as np

from blip_jax.convert.keymap import flatten
from blip_jax.models.vit import resample_pos_embed


# ------------------------------------------------------------------------------------------------
# Reading state dicts.
# ------------------------------------------------------------------------------------------------
def _load_torch(path):
    try:
        import torch
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError(f"{path} is a PyTorch file: install torch (CPU wheel) to read it") from e
    state = torch.load(path, map_location="cpu", weights_only=False)
    if isinstance(state, dict) and "model" in state and isinstance(state["model"], dict):
        state = state["model"]
    if isinstance(state, dict) and "state_dict" in state:
        state = state["state_dict"]
    return {k: v.detach().float().numpy() if v.is_floating_point() else v.numpy()
            for k, v in state.items() if hasattr(v, "numpy")}


def read_state_dict(path: str) -> dict:
    """name -> numpy array from an HF directory, a .safetensors, a torch .pth/.bin or an .npz file."""
    path = os.path.expanduser(path)
    if os.path.isdir(path):
        files = sorted(glob.glob(os.path.join(path, "*.safetensors")))
        if files:
            from safetensors.numpy import load_file
            state = {}
            for f in files:
                state.update(load_file(f))
            return state
        for name in ("pytorch_model.bin", "model.pth"):
            if os.path.exists(os.path.join(path, name)):
                return _load_torch(os.path.join(path, name))
        raise FileNotFoundError(f"{path} has no *.safetensors or pytorch_model.bin: pass a "
                                "save_pretrained directory")
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path} does not exist")
    if path.endswith(".safetensors"):
        from safetensors.numpy import load_file
        return dict(load_file(path))
    if path.endswith(".npz"):
        with np.load(path) as data:
            return {k: np.asarray(data[k]) for k in data.files}
    return _load_torch(path)


def _strip_prefix(state: dict, prefixes) -> dict:
    for prefix in prefixes:
        if any(k.startswith(prefix) for k in state):
            return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    return state


# ------------------------------------------------------------------------------------------------
# Vision.
# ------------------------------------------------------------------------------------------------
def _fit_pos_embed(pos_embed: np.ndarray, target_shape) -> np.ndarray:
    """(1, extra + N, D) -> (1, 1 + N', D): drop extra tokens beyond [CLS] (DeiT's distillation
    token), resample the grid bicubically."""
    num_target = target_shape[1] - 1
    grid = int(round(num_target ** 0.5))
    source_patches = pos_embed.shape[1] - 1
    if int(round(source_patches ** 0.5)) ** 2 != source_patches:  # cls + dist + grid
        pos_embed = np.concatenate([pos_embed[:, :1], pos_embed[:, 2:]], axis=1)
    return np.asarray(resample_pos_embed(pos_embed.astype(np.float32), (grid, grid)))


def vit_from_hf(state: dict, depth: int) -> dict:
    """HF ViTModel/DeiTModel state dict -> `visual_encoder` params (torch Linear (out,in) -> (in,out))."""
    state = _strip_prefix(state, ("vit.", "deit.", "model."))
    tree = {
        "cls_token": state["embeddings.cls_token"],
        "pos_embed": state["embeddings.position_embeddings"],
        "patch_embed": {"proj": {
            "kernel": state["embeddings.patch_embeddings.projection.weight"].transpose(2, 3, 1, 0),
            "bias": state["embeddings.patch_embeddings.projection.bias"]}},
        "norm": {"scale": state["layernorm.weight"], "bias": state["layernorm.bias"]},
    }
    for i in range(depth):
        p = f"encoder.layer.{i}."
        qkv_w = [state[f"{p}attention.attention.{n}.weight"] for n in ("query", "key", "value")]
        qkv_b = [state[f"{p}attention.attention.{n}.bias"] for n in ("query", "key", "value")]
        tree[f"blocks_{i}"] = {
            "norm1": {"scale": state[f"{p}layernorm_before.weight"], "bias": state[f"{p}layernorm_before.bias"]},
            "attn": {"qkv": {"kernel": np.concatenate(qkv_w, 0).T, "bias": np.concatenate(qkv_b, 0)},
                     "proj": {"kernel": state[f"{p}attention.output.dense.weight"].T,
                              "bias": state[f"{p}attention.output.dense.bias"]}},
            "norm2": {"scale": state[f"{p}layernorm_after.weight"], "bias": state[f"{p}layernorm_after.bias"]},
            "mlp": {"fc1": {"kernel": state[f"{p}intermediate.dense.weight"].T, "bias": state[f"{p}intermediate.dense.bias"]},
                    "fc2": {"kernel": state[f"{p}output.dense.weight"].T, "bias": state[f"{p}output.dense.bias"]}},
        }
    return tree


def vit_from_timm(state: dict, depth: int) -> dict:
    """timm VisionTransformer state dict (.pth) -> `visual_encoder` params."""
    state = _strip_prefix(state, ("module.", "visual_encoder."))
    tree = {
        "cls_token": state["cls_token"],
        "pos_embed": state["pos_embed"],
        "patch_embed": {"proj": {"kernel": state["patch_embed.proj.weight"].transpose(2, 3, 1, 0),
                                 "bias": state["patch_embed.proj.bias"]}},
        "norm": {"scale": state["norm.weight"], "bias": state["norm.bias"]},
    }
    for i in range(depth):
        p = f"blocks.{i}."
        tree[f"blocks_{i}"] = {
            "norm1": {"scale": state[p + "norm1.weight"], "bias": state[p + "norm1.bias"]},
            "attn": {"qkv": {"kernel": state[p + "attn.qkv.weight"].T, "bias": state[p + "attn.qkv.bias"]},
                     "proj": {"kernel": state[p + "attn.proj.weight"].T, "bias": state[p + "attn.proj.bias"]}},
            "norm2": {"scale": state[p + "norm2.weight"], "bias": state[p + "norm2.bias"]},
            "mlp": {"fc1": {"kernel": state[p + "mlp.fc1.weight"].T, "bias": state[p + "mlp.fc1.bias"]},
                    "fc2": {"kernel": state[p + "mlp.fc2.weight"].T, "bias": state[p + "mlp.fc2.bias"]}},
        }
    return tree


def vit_from_npz(state: dict, depth: int) -> dict:
    """AugReg / big_vision .npz (timm `_load_weights` layout) -> `visual_encoder` params."""
    def get(name):
        return np.asarray(state[name])
    width = get("cls").shape[-1]
    tree = {
        "cls_token": get("cls"),
        "pos_embed": get("Transformer/posembed_input/pos_embedding"),
        "patch_embed": {"proj": {"kernel": get("embedding/kernel"), "bias": get("embedding/bias")}},
        "norm": {"scale": get("Transformer/encoder_norm/scale"), "bias": get("Transformer/encoder_norm/bias")},
    }
    for i in range(depth):
        p = f"Transformer/encoderblock_{i}/"
        a = p + "MultiHeadDotProductAttention_1/"
        qkv_kernel = np.concatenate([get(a + f"{n}/kernel").reshape(width, width) for n in ("query", "key", "value")], 1)
        qkv_bias = np.concatenate([get(a + f"{n}/bias").reshape(width) for n in ("query", "key", "value")])
        tree[f"blocks_{i}"] = {
            "norm1": {"scale": get(p + "LayerNorm_0/scale"), "bias": get(p + "LayerNorm_0/bias")},
            "attn": {"qkv": {"kernel": qkv_kernel, "bias": qkv_bias},
                     "proj": {"kernel": get(a + "out/kernel").reshape(width, width), "bias": get(a + "out/bias")}},
            "norm2": {"scale": get(p + "LayerNorm_2/scale"), "bias": get(p + "LayerNorm_2/bias")},
            "mlp": {"fc1": {"kernel": get(p + "MlpBlock_3/Dense_0/kernel"), "bias": get(p + "MlpBlock_3/Dense_0/bias")},
                    "fc2": {"kernel": get(p + "MlpBlock_3/Dense_1/kernel"), "bias": get(p + "MlpBlock_3/Dense_1/bias")}},
        }
    return tree


def load_vision(path: str, target: dict) -> dict:
    """`visual_encoder` params from `path` (HF dir, timm .pth, .npz), fitted to `target` (our init)."""
    depth = len([k for k in target if k.startswith("blocks_")])
    state = read_state_dict(path)
    if path.endswith(".npz"):
        tree = vit_from_npz(state, depth)
    elif any(k.endswith("embeddings.cls_token") for k in state):
        tree = vit_from_hf(state, depth)
    elif any(k.endswith("cls_token") for k in state):
        tree = vit_from_timm(state, depth)
    else:
        raise ValueError(f"{path} is neither an HF ViT/DeiT, a timm ViT state dict nor an AugReg npz")
    tree["pos_embed"] = _fit_pos_embed(np.asarray(tree["pos_embed"]), target["pos_embed"].shape)
    return _checked(tree, target, "visual_encoder")


# ------------------------------------------------------------------------------------------------
# Text.
# ------------------------------------------------------------------------------------------------
def _ln(state, prefix):
    scale = state.get(prefix + ".weight", state.get(prefix + ".gamma"))
    bias = state.get(prefix + ".bias", state.get(prefix + ".beta"))
    return {"scale": scale, "bias": bias}


def _dense(state, prefix):
    return {"kernel": state[prefix + ".weight"].T, "bias": state[prefix + ".bias"]}


def _rows(source: np.ndarray, target: np.ndarray) -> np.ndarray:
    """First rows from `source`, the remaining rows keep `target`'s (fresh init) values."""
    out = np.array(target, dtype=np.float32, copy=True)
    n = min(len(source), len(target))
    out[:n] = source[:n]
    return out


def load_text(path: str, target: dict) -> dict:
    """`text_encoder` params from an HF BERT directory, fitted to `target` (our init)."""
    full = read_state_dict(path)
    state = _strip_prefix(full, ("bert.", "model."))
    if "embeddings.word_embeddings.weight" not in state:
        raise ValueError(f"{path} is not an HF BERT checkpoint (no embeddings.word_embeddings.weight)")
    tree = {k: v for k, v in target.items()}  # crossattention etc. keep their init
    embeddings = dict(target["embeddings"])
    embeddings["word_embeddings"] = {"embedding": _rows(state["embeddings.word_embeddings.weight"],
                                                        target["embeddings"]["word_embeddings"]["embedding"])}
    embeddings["position_embeddings"] = {"embedding": _rows(
        state["embeddings.position_embeddings.weight"], target["embeddings"]["position_embeddings"]["embedding"])}
    embeddings["LayerNorm"] = _ln(state, "embeddings.LayerNorm")
    tree["embeddings"] = embeddings
    layers = sorted(int(m.group(1)) for k in target for m in [re.match(r"layer_(\d+)$", k)] if m)
    for i in layers:
        p = f"encoder.layer.{i}."
        layer = dict(target[f"layer_{i}"])
        self_attention = {
            "self": {n: _dense(state, f"{p}attention.self.{n}") for n in ("query", "key", "value")},
            "output": {"dense": _dense(state, f"{p}attention.output.dense"),
                       "LayerNorm": _ln(state, f"{p}attention.output.LayerNorm")},
        }
        layer["attention"] = self_attention
        if "decoder_attention" in layer:
            layer["decoder_attention"] = self_attention
        layer["intermediate"] = {"dense": _dense(state, f"{p}intermediate.dense")}
        layer["output"] = {"dense": _dense(state, f"{p}output.dense"), "LayerNorm": _ln(state, f"{p}output.LayerNorm")}
        tree[f"layer_{i}"] = layer
    if "lm_head" in target and "cls.predictions.bias" in full:
        tree["lm_head"] = {
            "transform": {"dense": _dense(full, "cls.predictions.transform.dense"),
                          "LayerNorm": _ln(full, "cls.predictions.transform.LayerNorm")},
            "bias": _rows(full["cls.predictions.bias"], target["lm_head"]["bias"]),
        }
    return _checked(tree, target, "text_encoder")


# ------------------------------------------------------------------------------------------------
def _checked(tree: dict, target: dict, name: str) -> dict:
    """Check `tree` has exactly `target`'s structure and shapes; cast to the target dtypes."""
    got, want = flatten(tree), flatten(target)
    problems = [f"missing {k}" for k in sorted(set(want) - set(got))]
    problems += [f"unexpected {k}" for k in sorted(set(got) - set(want))]
    problems += [f"{k}: {np.shape(got[k])} vs model {np.shape(want[k])}" for k in sorted(set(got) & set(want))
                 if tuple(np.shape(got[k])) != tuple(np.shape(want[k]))]
    if problems:
        raise ValueError(f"{name} weights do not fit the model config ({len(problems)} problems): "
                         + "; ".join(problems[:8]) + ("; ..." if len(problems) > 8 else ""))

    def cast(t, ref):
        if isinstance(t, dict):
            return {k: cast(t[k], ref[k]) for k in t}
        return np.asarray(t).astype(np.asarray(ref).dtype)
    return cast(tree, target)


def apply_pretrained(params: dict, config) -> tuple[dict, list]:
    """Overwrite `visual_encoder` / `text_encoder` from config.init_vision_from / init_text_from.
    Returns (params, log lines)."""
    params = dict(params)
    log = []
    if config.get("init_vision_from", ""):
        target = _to_numpy(params["visual_encoder"])
        params["visual_encoder"] = load_vision(config.init_vision_from, target)
        log.append(f"visual_encoder <- {config.init_vision_from}")
    if config.get("init_text_from", ""):
        target = _to_numpy(params["text_encoder"])
        params["text_encoder"] = load_text(config.init_text_from, target)
        log.append(f"text_encoder <- {config.init_text_from} (cross-attention newly initialised)")
    return params, log


def _to_numpy(tree):
    if isinstance(tree, dict):
        return {k: _to_numpy(v) for k, v in tree.items()}
    return np.asarray(tree)
