"""Hugging Face BLIP <-> blip-jax: weights in (a local directory or an in-memory transformers model)
and out (config.json + model.safetensors that `Blip*.from_pretrained` loads).

Task <-> class: caption = BlipForConditionalGeneration, retrieval = BlipForImageTextRetrieval,
vqa = BlipForQuestionAnswering. Key names and transforms come from `keymap.KEY_TABLE`.
LayerNorm eps always come from the HF config (HF's vision default is 1e-5, the original's 1e-6).
Reading needs no torch for safetensors; `pytorch_model.bin` is read with torch.load(weights_only=True).
"""
from __future__ import annotations

import json
import os
from typing import Mapping

import jax
import ml_collections
import numpy as np

from blip_jax.convert import keymap

HF_CLASSES = {
    "caption": "BlipForConditionalGeneration",
    "retrieval": "BlipForImageTextRetrieval",
    "vqa": "BlipForQuestionAnswering",
}
TASK_OF_CLASS = {name: task for task, name in HF_CLASSES.items()}


# ----------------------------------------------------------------------------------------------------
# Config
# ----------------------------------------------------------------------------------------------------
def _as_dict(config) -> dict:
    if isinstance(config, Mapping):
        return dict(config)
    return config.to_dict()


def _square(value, name: str) -> int:
    if isinstance(value, (list, tuple)):
        if len(set(value)) != 1:
            raise ValueError(f"vision_config.{name}={list(value)} is not square: blip-jax supports square images")
        value = value[0]
    return int(value)


def config_from_hf(hf_config, image_size: int | None = None) -> ml_collections.ConfigDict:
    """A blip-jax model ConfigDict from a transformers BlipConfig (object or config.json dict)."""
    from blip_jax.models.config import model_config

    raw = _as_dict(hf_config)
    vision, text = dict(raw.get("vision_config") or {}), dict(raw.get("text_config") or {})
    # transformers' own defaults for fields a config.json may omit (configuration_blip.py).
    vision_defaults = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                           image_size=384, patch_size=16, hidden_act="gelu", layer_norm_eps=1e-5)
    text_defaults = dict(vocab_size=30524, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                         num_attention_heads=8, max_position_embeddings=512, hidden_act="gelu",
                         layer_norm_eps=1e-12, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
                         bos_token_id=30522, pad_token_id=0, sep_token_id=102, tie_word_embeddings=True)
    vision = {**vision_defaults, **{k: v for k, v in vision.items() if v is not None}}
    text = {**text_defaults, **{k: v for k, v in text.items() if v is not None}}
    for part, values in (("vision_config", vision), ("text_config", text)):
        if values["hidden_act"] != "gelu":
            raise ValueError(f"{part}.hidden_act={values['hidden_act']!r}: blip-jax implements BLIP's exact 'gelu' "
                             "only; convert a standard BLIP checkpoint")
    if not text.get("tie_word_embeddings", True) or not raw.get("tie_word_embeddings", True):
        raise ValueError("config.json has tie_word_embeddings=false: blip-jax ties the LM output matrix to the "
                         "word embeddings as BLIP does; convert a checkpoint with tied embeddings")
    config = model_config("base", "base")
    native_size = _square(vision["image_size"], "image_size")
    config.vision.update(dict(
        image_size=int(image_size or native_size), patch_size=_square(vision["patch_size"], "patch_size"),
        width=int(vision["hidden_size"]), depth=int(vision["num_hidden_layers"]),
        num_heads=int(vision["num_attention_heads"]), mlp_dim=int(vision["intermediate_size"]),
        layer_norm_eps=float(vision["layer_norm_eps"]), drop_path_rate=0.0))
    config.text.update(dict(
        vocab_size=int(text["vocab_size"]), hidden_size=int(text["hidden_size"]),
        num_layers=int(text["num_hidden_layers"]), num_heads=int(text["num_attention_heads"]),
        intermediate_size=int(text["intermediate_size"]),
        max_position_embeddings=int(text["max_position_embeddings"]),
        layer_norm_eps=float(text["layer_norm_eps"]), hidden_dropout=float(text["hidden_dropout_prob"]),
        attention_dropout=float(text["attention_probs_dropout_prob"])))
    config.embed_dim = int(raw.get("image_text_hidden_size", 256))
    dec = int(text["bos_token_id"])
    config.tokens.update(dict(pad=int(text["pad_token_id"]), sep=int(text["sep_token_id"]), dec=dec,
                              enc=dec + 1 if dec + 1 < config.text.vocab_size else config.text.vocab_size - 1,
                              cls=int(text.get("cls_token_id") or 101)))
    return config


def hf_config_from(config: ml_collections.ConfigDict, task: str):
    """A transformers BlipConfig describing a blip-jax model config (for export)."""
    from transformers import BlipConfig

    vision, text, tokens = config.vision, config.text, config.tokens
    if task == "vqa" and vision.width != text.hidden_size:
        raise ValueError(f"transformers' BlipForQuestionAnswering needs equal vision and text widths "
                         f"(got {vision.width} and {text.hidden_size}): it cannot hold this VQA model")
    hf = BlipConfig(
        vision_config=dict(
            hidden_size=vision.width, intermediate_size=vision.mlp_dim, num_hidden_layers=vision.depth,
            num_attention_heads=vision.num_heads, image_size=vision.image_size, patch_size=vision.patch_size,
            hidden_act="gelu", layer_norm_eps=vision.layer_norm_eps),
        text_config=dict(
            vocab_size=text.vocab_size, hidden_size=text.hidden_size, encoder_hidden_size=vision.width,
            intermediate_size=text.intermediate_size, num_hidden_layers=text.num_layers,
            num_attention_heads=text.num_heads, max_position_embeddings=text.max_position_embeddings,
            hidden_act="gelu", layer_norm_eps=text.layer_norm_eps, hidden_dropout_prob=text.hidden_dropout,
            attention_probs_dropout_prob=text.attention_dropout, bos_token_id=tokens.dec,
            pad_token_id=tokens.pad, sep_token_id=tokens.sep),
        image_text_hidden_size=config.embed_dim,
    )
    hf.architectures = [HF_CLASSES[task]]
    return hf


# ----------------------------------------------------------------------------------------------------
# Reading
# ----------------------------------------------------------------------------------------------------
def _numpy(tensor) -> np.ndarray:
    """A torch tensor (any float dtype) or array -> numpy, float32 for floating types."""
    if hasattr(tensor, "detach"):
        tensor = tensor.detach().cpu()
        if tensor.is_floating_point():
            tensor = tensor.float()
        return tensor.numpy()
    array = np.asarray(tensor)
    return array.astype(np.float32) if np.issubdtype(array.dtype, np.floating) else array


def _read_safetensors(path: str) -> dict[str, np.ndarray]:
    from safetensors import safe_open

    out = {}
    try:
        with safe_open(path, framework="np") as handle:
            for key in handle.keys():
                out[key] = _numpy(handle.get_tensor(key))
    except (TypeError, ValueError):  # e.g. bfloat16 tensors on a numpy without ml_dtypes support
        with safe_open(path, framework="pt") as handle:
            for key in handle.keys():
                out[key] = _numpy(handle.get_tensor(key))
    return out


def read_hf_state(directory: str) -> dict[str, np.ndarray]:
    """The weights of a transformers directory: model.safetensors (single or sharded) or pytorch_model.bin."""
    single = os.path.join(directory, "model.safetensors")
    index = os.path.join(directory, "model.safetensors.index.json")
    binary = os.path.join(directory, "pytorch_model.bin")
    if os.path.isfile(single):
        return _read_safetensors(single)
    if os.path.isfile(index):
        with open(index) as handle:
            files = sorted(set(json.load(handle)["weight_map"].values()))
        state = {}
        for name in files:
            state.update(_read_safetensors(os.path.join(directory, name)))
        return state
    if os.path.isfile(binary):
        from blip_jax.convert.salesforce import safe_torch_load

        loaded = safe_torch_load(binary)
        return {key: _numpy(value) for key, value in loaded.items() if hasattr(value, "shape")}
    raise FileNotFoundError(f"{directory} has no model.safetensors, model.safetensors.index.json or "
                            "pytorch_model.bin: point at a transformers BLIP directory (save_pretrained output)")


def task_from_architectures(architectures, source: str) -> str:
    for name in architectures or ():
        if name in TASK_OF_CLASS:
            return TASK_OF_CLASS[name]
    raise ValueError(f"{source}: cannot tell the task from architectures={list(architectures or [])}; "
                     f"pass task= one of {', '.join(HF_CLASSES)} ({', '.join(HF_CLASSES.values())})")


def task_of_model(model) -> str:
    name = type(model).__name__
    if name not in TASK_OF_CLASS:
        raise ValueError(f"in-memory model {name} is not a supported BLIP class: pass one of "
                         f"{', '.join(HF_CLASSES.values())}")
    return TASK_OF_CLASS[name]


def expected_params(config: ml_collections.ConfigDict, task: str):
    """The parameter shape tree of `task`'s model (no computation, no memory)."""
    from blip_jax.models.blip import init_params

    return jax.eval_shape(lambda: init_params(config, task, jax.random.key(0)))


def _resize_pos_embed(value: np.ndarray, shape: tuple) -> np.ndarray:
    from blip_jax.models.vit import resample_pos_embed

    grid = int(round((shape[1] - 1) ** 0.5))
    if grid * grid != shape[1] - 1:
        raise ValueError(f"cannot resample pos_embed to {shape[1] - 1} patches: not a square grid")
    return np.asarray(resample_pos_embed(value.astype(np.float32), (grid, grid)), np.float32)


def import_state(state: Mapping[str, np.ndarray], config: ml_collections.ConfigDict, task: str, fmt: str,
                 source: str, tolerate=()) -> dict:
    """Map a torch-named state dict onto `task`'s parameter tree (shape-checked, pos_embed resampled)."""
    return keymap.to_flax(state, expected_params(config, task), task=task, fmt=fmt, source=source,
                          resize_pos_embed=_resize_pos_embed, tolerate=tolerate)


def import_hf(src, task: str | None = None, image_size: int | None = None):
    """(config, params, task) from a transformers BLIP directory or in-memory model.

    src: a directory with config.json + model.safetensors | pytorch_model.bin, or a
    BlipForConditionalGeneration / BlipForImageTextRetrieval / BlipForQuestionAnswering instance.
    image_size: run at another resolution; pos_embed is resampled (torch bicubic, align_corners=False).
    """
    if isinstance(src, (str, os.PathLike)):
        directory = os.fspath(src)
        config_path = os.path.join(directory, "config.json")
        if not os.path.isfile(config_path):
            raise FileNotFoundError(f"{directory} has no config.json: point at a transformers BLIP directory")
        with open(config_path) as handle:
            raw = json.load(handle)
        found = task_from_architectures(raw.get("architectures"), config_path) if task is None else task
        state = read_hf_state(directory)
        source = directory
    else:
        found = task_of_model(src)
        raw = src.config.to_dict()
        state = {key: _numpy(value) for key, value in src.state_dict().items()}
        source = f"in-memory {type(src).__name__}"
    task = task or found
    if task != found:
        raise ValueError(f"{source} holds a {HF_CLASSES[found]} ({found}); it cannot be loaded as task {task!r}")
    config = config_from_hf(raw, image_size)
    params = import_state(state, config, task, "hf", source)
    return config, params, task


# ----------------------------------------------------------------------------------------------------
# Writing
# ----------------------------------------------------------------------------------------------------
def export_hf(config: ml_collections.ConfigDict, params, task: str, path: str) -> str:
    """Write config.json + model.safetensors that transformers' Blip*.from_pretrained(path) loads."""
    from safetensors.numpy import save_file

    if task not in HF_CLASSES:
        raise ValueError(f"task {task!r} has no transformers class: export one of {', '.join(HF_CLASSES)} "
                         "(load a pre-training checkpoint with task='caption' or 'retrieval' first)")
    hf_config = hf_config_from(config, task)
    host_params = jax.tree.map(lambda x: np.asarray(x, np.float32), params)
    state = keymap.to_torch(host_params, task=task, fmt="hf")
    os.makedirs(path, exist_ok=True)
    hf_config.save_pretrained(path)
    save_file(state, os.path.join(path, "model.safetensors"), metadata={"format": "pt"})
    return path
