"""`blip_jax.load(...)` and the `ModelBundle` it returns: one object per model with pure, jitted methods.

A blip-jax checkpoint directory (what `bundle.save(path)` and `blip-jax convert` write) holds:
  config.json         {"format": "blip-jax", "format_version": 1, "task": ..., "model": <model ConfigDict>}
  params.safetensors  the parameters, flat, keys are '/'-joined flax paths ("visual_encoder/blocks_0/attn/qkv/kernel")
It is plain safetensors so any tool can read it; no Orbax is needed for a model (Orbax holds train states).

Pixels are NHWC float32, already normalised (`blip_jax.preprocess_images`). input_ids come as the BERT
tokenizer gives them ([CLS] first, right padding); the methods put [ENC] / [DEC] in position 0 exactly
as the reference does (blip.md §2.2).
"""
from __future__ import annotations

import json
import os
from typing import Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from blip_jax.convert import keymap

FORMAT = "blip-jax"
FORMAT_VERSION = 1
CONFIG_FILE = "config.json"
PARAMS_FILE = "params.safetensors"
DTYPES = ("float32", "bfloat16", "float16")


def _with_first_token(input_ids, token_id: int):
    """ids (B, T) with position 0 replaced by `token_id` ([ENC] or [DEC])."""
    input_ids = jnp.asarray(input_ids, jnp.int32)
    return input_ids.at[:, 0].set(token_id)


class ModelBundle:
    """A BLIP model: `.config` (ConfigDict), `.params` (pytree), `.task`, `.model` (the flax module).

    Methods are pure functions of (params, inputs), jitted once per method and input shape; pass
    `params=` to evaluate other parameters (e.g. under jax.grad).
    Subclass or add methods with `_jitted(name, fn)`; decoding lives in blip_jax/decode.py.
    """

    def __init__(self, config: ml_collections.ConfigDict, params, task: str):
        from blip_jax.models.blip import build_model

        self.config = config
        self.params = params
        self.task = task
        self.model = build_model(config, task)
        self._compiled: dict[str, Callable] = {}
        self._tokenizers: dict = {}

    def __repr__(self):
        vision, text = self.config.vision, self.config.text
        return (f"ModelBundle(task={self.task!r}, vision={vision.width}x{vision.depth}@{vision.image_size}px, "
                f"text={text.hidden_size}x{text.num_layers}, dtype={self.config.dtype})")

    # -- plumbing ----------------------------------------------------------------------------------
    def _jitted(self, name: str, fn: Callable) -> Callable:
        """jax.jit(fn) cached under `name`; fn(params, *args)."""
        if name not in self._compiled:
            self._compiled[name] = jax.jit(fn)
        return self._compiled[name]

    def _need(self, method: str, tasks: tuple[str, ...], hint: str = "") -> None:
        if self.task not in tasks:
            raise ValueError(f"{method} needs a {' or '.join(tasks)} model, this one is {self.task!r}"
                             + (f": {hint}" if hint else ""))

    def _variables(self, params):
        return {"params": self.params if params is None else params}

    def _call(self, name: str, forward: Callable, params, pixels, *token_arrays):
        """forward(module, pixels, *token_arrays) as one cached jitted program (pixels f32, tokens i32)."""
        model = self.model

        def fn(variables, *args):
            return model.apply(variables, *args, method=forward)

        args = [jnp.asarray(pixels, jnp.float32)] + [jnp.asarray(a, jnp.int32) for a in token_arrays]
        return self._jitted(name, fn)(self._variables(params), *args)

    # -- pure methods ------------------------------------------------------------------------------
    def image_embeds(self, pixels, *, params=None):
        """pixels (B, H, W, 3) -> ViT tokens (B, 1 + N, D), [CLS] first."""
        return self._call("image_embeds", lambda module, pixels: module.image_embeds(pixels), params, pixels)

    def itc_similarity(self, pixels, input_ids, attention_mask, *, params=None):
        """Cosine similarity (B_img, B_txt) of projected [CLS] image and unimodal text ([CLS]) features."""
        self._need("itc_similarity", ("retrieval", "pretrain"))

        def forward(module, pixels, input_ids, attention_mask):
            image_feat = module.image_features(module.image_embeds(pixels))
            text_feat = module.text_features(input_ids, attention_mask)
            return jnp.einsum("ie,te->it", image_feat, text_feat, precision=jax.lax.Precision.HIGHEST)

        return self._call("itc_similarity", forward, params, pixels, input_ids, attention_mask)

    def itm_logits(self, pixels, input_ids, attention_mask, *, params=None):
        """Image-text matching logits (B, 2) [no-match, match] for pair b = (pixels[b], text[b]); [ENC] first."""
        self._need("itm_logits", ("retrieval", "pretrain"))
        enc = int(self.config.tokens.enc)

        def forward(module, pixels, input_ids, attention_mask):
            return module.itm_logits(_with_first_token(input_ids, enc), attention_mask, module.image_embeds(pixels))

        return self._call("itm_logits", forward, params, pixels, input_ids, attention_mask)

    def lm_logits(self, pixels, input_ids, attention_mask, *, params=None):
        """Image-conditioned decoder logits (B, T, V) float32, [DEC] first; logits[:, t] predicts token t + 1."""
        self._need("lm_logits", ("caption", "pretrain"),
                   "a VQA decoder reads the question; use answer_logits(pixels, question_ids, question_mask, "
                   "answer_ids, answer_mask)" if self.task == "vqa" else "")
        dec = int(self.config.tokens.dec)

        def forward(module, pixels, input_ids, attention_mask):
            return module.lm_logits(_with_first_token(input_ids, dec), attention_mask, module.image_embeds(pixels))

        return self._call("lm_logits", forward, params, pixels, input_ids, attention_mask)

    def question_states(self, pixels, question_ids, question_mask, *, params=None):
        """VQA: image-grounded question encoder states (B, Tq, H), [ENC] first (blip.md §2.7)."""
        self._need("question_states", ("vqa",))
        enc = int(self.config.tokens.enc)

        def forward(module, pixels, question_ids, question_mask):
            return module.encode_question(_with_first_token(question_ids, enc), question_mask,
                                          module.image_embeds(pixels))

        return self._call("question_states", forward, params, pixels, question_ids, question_mask)

    def answer_logits(self, pixels, question_ids, question_mask, answer_ids, answer_mask, *, params=None):
        """VQA answer-decoder logits (B, Ta, V): question [ENC]-encoded with the image, answer [DEC] first,
        the decoder cross-attends to the (padded) question states as in the reference."""
        self._need("answer_logits", ("vqa",))
        enc, dec = int(self.config.tokens.enc), int(self.config.tokens.dec)

        def forward(module, pixels, question_ids, question_mask, answer_ids, answer_mask):
            states = module.encode_question(_with_first_token(question_ids, enc), question_mask,
                                            module.image_embeds(pixels))
            return module.lm_logits(_with_first_token(answer_ids, dec), answer_mask, states, question_mask)

        return self._call("answer_logits", forward, params, pixels, question_ids, question_mask, answer_ids,
                          answer_mask)

    # -- decoding (blip_jax/decode.py) --------------------------------------------------------------
    def _tokenizer(self, tokenizer):
        """A tokenizer object, or a name / path for blip_jax.tokenizer (loaded once per bundle)."""
        if not isinstance(tokenizer, (str, os.PathLike)):
            return tokenizer
        if tokenizer not in self._tokenizers:
            from blip_jax.data.text import tokenizer as load_tokenizer

            self._tokenizers[tokenizer] = load_tokenizer(os.fspath(tokenizer))
        return self._tokenizers[tokenizer]

    def generate(self, pixels, prompt_ids=None, num_beams=1, max_length=20, min_length=0, repetition_penalty=None,
                 length_penalty=1.0, do_sample=False, top_p=1.0, top_k=0, temperature=1.0, num_return_sequences=1,
                 seed=0, early_stopping=False, *, params=None):
        """Caption token ids (B * num_return_sequences, L) int32, identical to transformers'
        `BlipForConditionalGeneration.generate`: [DEC] first, pad 0 after [SEP].

        prompt_ids: the tokenizer's ids for a prompt ([CLS] ... [SEP]; [CLS] becomes [DEC], [SEP] is dropped).
        Lengths count [DEC] and the prompt. repetition_penalty=None: 1.1 when sampling (BLIP), else 1.0.
        See blip_jax/decode.py for the exact semantics of each mode."""
        from blip_jax import decode

        self._need("generate", ("caption", "pretrain"), "for VQA use answer(pixels, question_ids)")
        return decode.generate(
            self.model, self.params if params is None else params, pixels, prompt_ids, tokens=dict(self.config.tokens),
            num_beams=num_beams, max_length=max_length, min_length=min_length,
            repetition_penalty=repetition_penalty, length_penalty=length_penalty, early_stopping=early_stopping,
            do_sample=do_sample, top_p=top_p, top_k=top_k, temperature=temperature,
            num_return_sequences=num_return_sequences, seed=seed)

    def caption(self, pixels, tokenizer="bert-base-uncased", prompt=None, *, do_sample=False, num_beams=None,
                max_length=20, min_length=5, top_p=None, top_k=None, repetition_penalty=None, params=None,
                **generate_kwargs):
        """Captions (B * num_return_sequences strings) with BLIP's settings (blip.md §1.3, §2.6): beam search
        (3 beams, max 20, min 5, lengths counting the prompt) or, with do_sample, nucleus sampling (top_p 0.9,
        repetition penalty 1.1, and top_k 50: transformers' default, which BLIP's sampling ran with).
        The prompt (e.g. "a picture of ") is stripped from the text, as BLIP does.
        tokenizer: a tokenizer, or a name / path for blip_jax.tokenizer."""
        from blip_jax import decode

        tok = self._tokenizer(tokenizer)
        prompt_ids = None
        if prompt:
            prompt_ids = np.asarray(tok(prompt)["input_ids"], np.int32)[None]
        if num_beams is None:
            num_beams = 1 if do_sample else 3
        if top_p is None:
            top_p = 0.9 if do_sample else 1.0
        if top_k is None:
            top_k = 50 if do_sample else 0
        ids = self.generate(pixels, prompt_ids, num_beams=num_beams, max_length=max_length, min_length=min_length,
                            repetition_penalty=repetition_penalty, do_sample=do_sample, top_p=top_p, top_k=top_k,
                            params=params, **generate_kwargs)
        return decode.ids_to_text(tok, ids, prompt)

    def answer(self, pixels, question_ids, question_mask=None, num_beams=3, max_length=10, min_length=1,
               repetition_penalty=None, length_penalty=1.0, do_sample=False, top_p=1.0, top_k=0, temperature=1.0,
               num_return_sequences=1, seed=0, early_stopping=False, *, params=None):
        """VQA answer ids (B * num_return_sequences, L) as `BlipForQuestionAnswering.generate` returns them
        (BLIP_VQA's beam 3, max 10, min 1 by default). question_ids: tokenizer ids ([CLS] first, right padded);
        position 0 becomes [ENC] as in BLIP. question_mask defaults to ids != pad."""
        from blip_jax import decode

        self._need("answer", ("vqa",))
        return decode.answer(
            self.model, self.params if params is None else params, pixels, question_ids, question_mask,
            tokens=dict(self.config.tokens), num_beams=num_beams, max_length=max_length, min_length=min_length,
            repetition_penalty=repetition_penalty, length_penalty=length_penalty, early_stopping=early_stopping,
            do_sample=do_sample, top_p=top_p, top_k=top_k, temperature=temperature,
            num_return_sequences=num_return_sequences, seed=seed)

    def answer_text(self, pixels, questions, tokenizer="bert-base-uncased", *, params=None, **answer_kwargs):
        """Answers as strings for question strings (one per image, or one for all): BLIP's pre_question,
        tokenized (longest, max 35), then `answer`."""
        from blip_jax import decode
        from blip_jax.data.text import pre_question

        tok = self._tokenizer(tokenizer)
        questions = [questions] if isinstance(questions, str) else list(questions)
        encoded = tok([pre_question(q) for q in questions], padding="longest", truncation=True, max_length=35)
        ids = self.answer(pixels, np.asarray(encoded["input_ids"], np.int32),
                          np.asarray(encoded["attention_mask"], np.int32), params=params, **answer_kwargs)
        return decode.ids_to_text(tok, ids)

    # -- files -------------------------------------------------------------------------------------
    def save(self, path: str) -> str:
        """Write a blip-jax checkpoint directory (config.json + params.safetensors) that `load` reads."""
        save_checkpoint(path, self.config, self.params, self.task)
        return path

    def export_hf(self, path: str) -> str:
        """Write config.json + model.safetensors for transformers' Blip*.from_pretrained(path)."""
        from blip_jax.convert.hf import export_hf

        return export_hf(self.config, self.params, self.task, path)

    def export_salesforce(self) -> dict:
        """The parameters in the original BLIP key scheme (numpy), e.g. for torch.save({'model': ...})."""
        from blip_jax.convert.salesforce import export_salesforce_state

        return export_salesforce_state(self.params, self.task)


# ----------------------------------------------------------------------------------------------------
# blip-jax checkpoint directories
# ----------------------------------------------------------------------------------------------------
def is_checkpoint_dir(path) -> bool:
    config_path = os.path.join(os.fspath(path), CONFIG_FILE)
    if not os.path.isfile(config_path):
        return False
    try:
        with open(config_path) as handle:
            return json.load(handle).get("format") == FORMAT
    except (OSError, ValueError):
        return False


def save_checkpoint(path: str, config: ml_collections.ConfigDict, params, task: str) -> None:
    from safetensors.numpy import save_file

    os.makedirs(path, exist_ok=True)
    flat = {name: np.array(value, order="C") for name, value in keymap.flatten(params).items()}  # 0-d stays 0-d
    save_file(flat, os.path.join(path, PARAMS_FILE), metadata={"format": FORMAT, "task": task})
    meta = {"format": FORMAT, "format_version": FORMAT_VERSION, "task": task, "model": config.to_dict()}
    with open(os.path.join(path, CONFIG_FILE), "w") as handle:
        json.dump(meta, handle, indent=2, sort_keys=True)


def read_checkpoint(path: str):
    """(config, params, task) of a blip-jax checkpoint directory."""
    from safetensors.numpy import load_file

    with open(os.path.join(path, CONFIG_FILE)) as handle:
        meta = json.load(handle)
    if meta.get("format_version", 0) > FORMAT_VERSION:
        raise ValueError(f"{path} was written by a newer blip-jax (format_version {meta['format_version']}): "
                         "upgrade blip-jax")
    params_path = os.path.join(path, PARAMS_FILE)
    if not os.path.isfile(params_path):
        raise FileNotFoundError(f"{path} has config.json but no {PARAMS_FILE}: the checkpoint is incomplete")
    params = keymap.unflatten(load_file(params_path))
    return ml_collections.ConfigDict(meta["model"]), params, meta["task"]


def _retarget(config, params, found: str, task: str, image_size, source: str):
    """Same weights as another task's model and/or at another image size (pos_embed resampled)."""
    from blip_jax.convert.hf import import_state
    from blip_jax.convert.salesforce import export_salesforce_state

    if task == found and (image_size is None or image_size == config.vision.image_size):
        return config, params
    config = ml_collections.ConfigDict(config.to_dict())
    if image_size:
        config.vision.image_size = int(image_size)
    # Go through the original key scheme: it names every module of every task once, so e.g. a
    # pre-training model's decoder path becomes a captioner's text_decoder (blip.md §2.3, §5.2).
    state = export_salesforce_state(params, found)
    tolerate = keymap.other_task_keys(state, task, "sf") if task != found else ()
    return config, import_state(state, config, task, "sf", source, tolerate=tolerate)


def _is_torch_module(src) -> bool:
    return any(cls.__module__.startswith("torch.nn") and cls.__name__ == "Module" for cls in type(src).__mro__)


def load(src, task: str | None = None, image_size: int | None = None, dtype: str | None = None) -> ModelBundle:
    """A ModelBundle from any BLIP weights.

    src: a blip-jax checkpoint directory | a transformers BLIP directory (config.json + model.safetensors or
      pytorch_model.bin) | an in-memory BlipForConditionalGeneration / BlipForImageTextRetrieval /
      BlipForQuestionAnswering | an original Salesforce .pth | another ModelBundle.
    task: 'caption' | 'retrieval' | 'vqa' | 'pretrain'; None = what src holds. A pre-training checkpoint
      loads as any task (its shared encoder/decoder tree is split as the fine-tuning scripts do).
    image_size: run at another resolution (pos_embed resampled like torch bicubic, align_corners=False).
    dtype: compute dtype ('float32' | 'bfloat16' | 'float16'); parameters stay float32.
    """
    from blip_jax.convert import hf, salesforce

    if task is not None and task not in keymap.TASKS:
        raise ValueError(f"unknown task {task!r}: choose one of {', '.join(keymap.TASKS)}")
    if dtype is not None and str(jnp.dtype(dtype)) not in DTYPES:
        raise ValueError(f"dtype {dtype!r} is not a compute dtype blip-jax supports: use one of {DTYPES}")
    if isinstance(src, ModelBundle):
        config, params = _retarget(src.config, src.params, src.task, task or src.task, image_size, repr(src))
        task = task or src.task
    elif _is_torch_module(src):
        config, params, task = hf.import_hf(src, task=task, image_size=image_size)
    elif isinstance(src, (str, os.PathLike)):
        path = os.path.expanduser(os.fspath(src))
        if path.startswith(("http://", "https://", "gs://")):
            raise ValueError(f"{path} is a URL: download it first and pass the local path (blip-jax reads local files)")
        if os.path.isdir(path):
            if is_checkpoint_dir(path):
                config, params, found = read_checkpoint(path)
                config, params = _retarget(config, params, found, task or found, image_size, path)
                task = task or found
            elif os.path.isfile(os.path.join(path, "config.json")):
                config, params, task = hf.import_hf(path, task=task, image_size=image_size)
            else:
                raise FileNotFoundError(f"{path} has no config.json: pass a blip-jax checkpoint directory, a "
                                        "transformers BLIP directory or a Salesforce .pth file")
        elif os.path.isfile(path):
            if path.endswith((".safetensors", ".json")):
                raise ValueError(f"{path} is one file of a checkpoint directory: pass the directory that holds "
                                 "it together with config.json")
            config, params, task = salesforce.import_salesforce(path, task=task, image_size=image_size)
        else:
            raise FileNotFoundError(f"{path} does not exist: pass a blip-jax checkpoint directory, a transformers "
                                    "BLIP directory, a Salesforce .pth file or an in-memory transformers model")
    else:
        raise TypeError(f"cannot load a BLIP model from {type(src).__name__}: pass a path, a transformers BLIP "
                        "model or a ModelBundle")
    if dtype is not None:
        config = ml_collections.ConfigDict(config.to_dict())
        config.dtype = str(jnp.dtype(dtype))
    params = jax.tree.map(jnp.asarray, params)
    return ModelBundle(config, params, task)
