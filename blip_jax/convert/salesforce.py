"""The original Salesforce BLIP checkpoints (.pth, blip.md §5.1–5.2) -> blip-jax.

- Read safely: `torch.load(weights_only=True)`; a pickle that references anything but tensors and
  plain containers is refused before any of its code runs.
- Base / large (and any other size) are inferred from the tensor shapes.
- The task is inferred from the key groups present, or chosen: a pre-training checkpoint
  (model_base.pth, model_large.pth, model_base_capfilt_large.pth) loads as any task, exactly as the
  original fine-tuning scripts start from it.
- Pre-training checkpoints list the shared encoder/decoder tensors under both `text_encoder.*` and
  `text_decoder.bert.*` (§2.3); they map onto the one shared tree and must agree.
- pos_embed is resampled (torch bicubic, align_corners=False) when image_size differs.
"""
from __future__ import annotations

import os
import pickle
import re
from typing import Mapping

import ml_collections
import numpy as np

from blip_jax.convert import keymap

_VISION_BLOCK = re.compile(r"visual_encoder\.blocks\.(\d+)\.")
_TEXT_LAYER = re.compile(r"\.encoder\.layer\.(\d+)\.")


# Pickle opcodes that import or call objects (GLOBAL, INST, REDUCE, OBJ, STACK_GLOBAL, NEWOBJ(_EX), EXT1-4).
_CODE_OPCODES = {ord(op) for op in "ciRo"} | {0x93, 0x81, 0x92, 0x82, 0x83, 0x84}


class UnsafeCheckpointError(pickle.UnpicklingError):
    """A checkpoint whose pickle would import or call something other than tensors and containers."""


def safe_torch_load(path: str):
    """torch.load(path, weights_only=True): tensors, dicts, lists, numbers and strings only.

    Raises UnsafeCheckpointError (one line, naming the file) for a pickle that would run code; the
    code never runs because the restricted unpickler refuses the global before calling anything.
    """
    import torch

    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint {path!r} does not exist: download it first "
                                "(the BLIP README lists the checkpoint URLs)")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        reason = " ".join(str(error).split())
        match = re.search(r"GLOBAL [\w.]+", reason)  # e.g. "unsupported GLOBAL posix.system"
        operand = re.search(r"Unsupported operand (\d+)", reason)
        if operand and int(operand.group(1)) in _CODE_OPCODES:
            match = operand
        if match is None:
            raise ValueError(f"{path} is not a readable PyTorch checkpoint ({reason[:160]}): "
                             "pass a BLIP .pth") from None
        detail = match.group(0)
        raise UnsafeCheckpointError(
            f"refused to load {path}: its pickle would run code ({detail}); nothing from it was executed. "
            "Only load checkpoints you trust, re-saved as a plain state dict (torch.save(model.state_dict()))"
        ) from None
    except (KeyError, EOFError, RuntimeError, OSError, ValueError) as error:
        raise ValueError(f"{path} is not a readable PyTorch checkpoint ({type(error).__name__}: "
                         f"{str(error)[:160]}): pass a BLIP .pth file") from None


def state_dict_from(checkpoint) -> dict[str, np.ndarray]:
    """The flat {key: numpy} model state of a loaded checkpoint ({'model': sd, ...}, {'state_dict': sd} or sd)."""
    from blip_jax.convert.hf import _numpy

    if isinstance(checkpoint, Mapping):
        for name in ("model", "state_dict", "module"):
            if isinstance(checkpoint.get(name), Mapping):
                checkpoint = checkpoint[name]
                break
    if not isinstance(checkpoint, Mapping) or not any(hasattr(v, "shape") for v in checkpoint.values()):
        raise ValueError("the checkpoint holds no state dict (expected {'model': {key: tensor}} or {key: tensor})")
    state = {}
    for key, value in checkpoint.items():
        if hasattr(value, "shape"):
            key = key[len("module."):] if key.startswith("module.") else key
            state[key] = _numpy(value)
    return state


def infer_task(state: Mapping[str, np.ndarray], source: str) -> str:
    """pretrain | retrieval | caption | vqa from which module groups the checkpoint has."""
    has = lambda prefix: any(key.startswith(prefix) for key in state)  # noqa: E731
    encoder, decoder, itm = has("text_encoder."), has("text_decoder."), has("itm_head.")
    if any(".self0." in key or "cls_head." in key for key in state):
        raise ValueError(f"{source} is an NLVR2 checkpoint (two cross-attentions per layer): blip-jax does not "
                         "implement NLVR2; use a pre-training, caption, retrieval or VQA checkpoint")
    if encoder and decoder and itm:
        return "pretrain"
    if encoder and itm:
        return "retrieval"
    if decoder and not encoder:
        return "caption"
    if encoder and decoder:
        return "vqa"
    raise ValueError(f"{source} has neither text_encoder.* nor text_decoder.* keys: not a BLIP checkpoint; "
                     "pass a BLIP .pth (blip.md §5.1)")


def _count(pattern: re.Pattern, keys, prefix: str) -> int:
    indices = {int(m.group(1)) for key in keys if key.startswith(prefix) for m in [pattern.search(key)] if m}
    return max(indices) + 1 if indices else 0


def config_from_state(state: Mapping[str, np.ndarray], source: str, image_size: int | None = None,
                      overrides: Mapping[str, object] | None = None) -> ml_collections.ConfigDict:
    """The model config implied by the tensor shapes (ViT-B vs ViT-L, text sizes, vocab, image size).

    Head counts are not visible in shapes: width // 64 (12 for ViT-B and BERT-base, 16 for ViT-L), as
    in every released BLIP. `overrides` sets dotted fields afterwards, e.g. {'vision.num_heads': 2}.
    Eps follow the original (vision 1e-6, text 1e-12).
    """
    from blip_jax.models.config import model_config

    def need(key):
        if key not in state:
            raise ValueError(f"{source} has no {key}: not a BLIP checkpoint or a truncated file")
        return state[key]

    cls_token = need("visual_encoder.cls_token")
    patch = need("visual_encoder.patch_embed.proj.weight")
    pos_embed = need("visual_encoder.pos_embed")
    fc1 = need("visual_encoder.blocks.0.mlp.fc1.weight")
    width, patch_size = int(cls_token.shape[-1]), int(patch.shape[-1])
    grid = int(round((pos_embed.shape[1] - 1) ** 0.5))
    root = "text_encoder" if any(k.startswith("text_encoder.") for k in state) else "text_decoder.bert"
    words = need(f"{root}.embeddings.word_embeddings.weight")
    positions = need(f"{root}.embeddings.position_embeddings.weight")
    intermediate = need(f"{root}.encoder.layer.0.intermediate.dense.weight")
    hidden = int(words.shape[1])

    config = model_config("base", "base")
    config.vision.update(dict(
        image_size=int(image_size or grid * patch_size), patch_size=patch_size, width=width,
        depth=_count(_VISION_BLOCK, state, "visual_encoder."), num_heads=max(1, width // 64),
        mlp_dim=int(fc1.shape[0]), layer_norm_eps=1e-6, drop_path_rate=0.0))
    config.text.update(dict(
        vocab_size=int(words.shape[0]), hidden_size=hidden, num_layers=_count(_TEXT_LAYER, state, root + "."),
        num_heads=max(1, hidden // 64), intermediate_size=int(intermediate.shape[0]),
        max_position_embeddings=int(positions.shape[0]), layer_norm_eps=1e-12))
    if "vision_proj.weight" in state:
        config.embed_dim = int(state["vision_proj.weight"].shape[0])
    vocab = config.text.vocab_size
    config.tokens.update(dict(dec=vocab - 2, enc=vocab - 1))  # BLIP's tokenizer appends [DEC], [ENC] (§2.2)
    for dotted, value in (overrides or {}).items():
        node = config
        *parents, leaf = dotted.split(".")
        for name in parents:
            node = node[name]
        if leaf not in node:
            raise ValueError(f"config override {dotted!r} names no model config field")
        node[leaf] = value
    return config


def import_salesforce(src, task: str | None = None, image_size: int | None = None,
                      overrides: Mapping[str, object] | None = None):
    """(config, params, task) from a Salesforce .pth path, or an already loaded checkpoint / state dict.

    task: None = what the checkpoint is (pre-training checkpoints give 'pretrain'); a pre-training
    checkpoint may also be loaded as 'caption', 'retrieval' or 'vqa' (its other keys are skipped).
    """
    from blip_jax.convert.hf import import_state

    if isinstance(src, (str, os.PathLike)):
        source = os.fspath(src)
        state = state_dict_from(safe_torch_load(source))
    else:
        source = "Salesforce state dict"
        state = state_dict_from(src)
    found = infer_task(state, source)
    task = task or found
    if task not in keymap.TASKS:
        raise ValueError(f"unknown task {task!r}: choose one of {', '.join(keymap.TASKS)}")
    config = config_from_state(state, source, image_size, overrides)
    tolerate = keymap.other_task_keys(state, task, "sf") if task != found else ()
    params = import_state(state, config, task, "sf", source, tolerate=tolerate)
    return config, params, task


def export_salesforce_state(params, task: str) -> dict[str, np.ndarray]:
    """blip-jax params -> the original BLIP key scheme (numpy), shared tensors under every name that lists them."""
    import jax

    host_params = jax.tree.map(lambda x: np.asarray(x, np.float32), params)
    return keymap.to_torch(host_params, task=task, fmt="sf", include_tied=True)
