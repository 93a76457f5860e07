"""The one table that knows both names: PyTorch BLIP state-dict keys <-> blip-jax parameter paths.

Each row of `KEY_TABLE` maps one *module* (or one raw tensor) and says how its tensors change:

  kind        torch leaves            flax leaves          transform
  linear      weight (out,in), bias   kernel (in,out), bias  transpose
  conv        weight OIHW, bias       kernel HWIO, bias      (2, 3, 1, 0) permutation
  layernorm   weight, bias            scale, bias            none
  embedding   weight                  embedding              none
  tensor      the key itself          the path itself        none
  tied        an alias key            the leaf it aliases    none (equal on import, copied on export)

The ViT's fused `qkv` keeps torch's [q | k | v] output layout, each head-contiguous (blip.md §5.2), so its
kernel is a plain transpose of `attn.qkv.weight` (D, 3D); the model splits q/k/v after the matmul.

Columns: `jax` path template, `hf` key template (transformers' names, blip.md §5.3), `sf` key template
(the original Salesforce checkpoints, §5.2), `kind`, and `group` (which part of a model owns the row).
Templates use `{i}` (layer index), `{n}` (1|2), `{qkv}` (query|key|value) and, for the text rows,
`{J}` (flax MED root), `{T}` (torch BERT root), `{L}` (torch LM-head root), `{SA}` (flax self-attention
name: `attention`, or `decoder_attention` for the pre-training model's decoder path, §2.3).

`mapping_for(task, fmt)` instantiates the table for one task; `to_flax` / `to_torch` apply it with
shape checks and report every missing, unexpected, mis-shaped or disagreeing key in one error.
"""
from __future__ import annotations

import dataclasses
import functools
import re
from typing import Callable, Iterable, Mapping

import numpy as np

# ----------------------------------------------------------------------------------------------------
# The table.
# ----------------------------------------------------------------------------------------------------
_ROW_FIELDS = ("jax", "hf", "sf", "kind", "group")
KEY_TABLE: tuple[tuple[str, str | None, str | None, str, str], ...] = (
    # --- ViT (blip.md §2.1, §5.2, §5.3) ---------------------------------------------------------------
    ("visual_encoder/patch_embed/proj", "vision_model.embeddings.patch_embedding",
     "visual_encoder.patch_embed.proj", "conv", "vision"),
    ("visual_encoder/cls_token", "vision_model.embeddings.class_embedding",
     "visual_encoder.cls_token", "tensor", "vision"),
    ("visual_encoder/pos_embed", "vision_model.embeddings.position_embedding",
     "visual_encoder.pos_embed", "tensor", "vision"),
    ("visual_encoder/blocks_{i}/norm{n}", "vision_model.encoder.layers.{i}.layer_norm{n}",
     "visual_encoder.blocks.{i}.norm{n}", "layernorm", "vision"),
    ("visual_encoder/blocks_{i}/attn/qkv", "vision_model.encoder.layers.{i}.self_attn.qkv",
     "visual_encoder.blocks.{i}.attn.qkv", "linear", "vision"),
    ("visual_encoder/blocks_{i}/attn/proj", "vision_model.encoder.layers.{i}.self_attn.projection",
     "visual_encoder.blocks.{i}.attn.proj", "linear", "vision"),
    ("visual_encoder/blocks_{i}/mlp/fc{n}", "vision_model.encoder.layers.{i}.mlp.fc{n}",
     "visual_encoder.blocks.{i}.mlp.fc{n}", "linear", "vision"),
    ("visual_encoder/norm", "vision_model.post_layernorm", "visual_encoder.norm", "layernorm", "vision"),
    # --- MED / BERT (§2.2); text keys are the same in HF and Salesforce checkpoints -------------------
    ("{J}/embeddings/word_embeddings", "{T}.embeddings.word_embeddings",
     "{T}.embeddings.word_embeddings", "embedding", "text"),
    ("{J}/embeddings/position_embeddings", "{T}.embeddings.position_embeddings",
     "{T}.embeddings.position_embeddings", "embedding", "text"),
    ("{J}/embeddings/LayerNorm", "{T}.embeddings.LayerNorm", "{T}.embeddings.LayerNorm", "layernorm", "text"),
    ("{J}/layer_{i}/{SA}/self/{qkv}", "{T}.encoder.layer.{i}.attention.self.{qkv}",
     "{T}.encoder.layer.{i}.attention.self.{qkv}", "linear", "self_attention"),
    ("{J}/layer_{i}/{SA}/output/dense", "{T}.encoder.layer.{i}.attention.output.dense",
     "{T}.encoder.layer.{i}.attention.output.dense", "linear", "self_attention"),
    ("{J}/layer_{i}/{SA}/output/LayerNorm", "{T}.encoder.layer.{i}.attention.output.LayerNorm",
     "{T}.encoder.layer.{i}.attention.output.LayerNorm", "layernorm", "self_attention"),
    ("{J}/layer_{i}/crossattention/self/{qkv}", "{T}.encoder.layer.{i}.crossattention.self.{qkv}",
     "{T}.encoder.layer.{i}.crossattention.self.{qkv}", "linear", "text"),
    ("{J}/layer_{i}/crossattention/output/dense", "{T}.encoder.layer.{i}.crossattention.output.dense",
     "{T}.encoder.layer.{i}.crossattention.output.dense", "linear", "text"),
    ("{J}/layer_{i}/crossattention/output/LayerNorm", "{T}.encoder.layer.{i}.crossattention.output.LayerNorm",
     "{T}.encoder.layer.{i}.crossattention.output.LayerNorm", "layernorm", "text"),
    ("{J}/layer_{i}/intermediate/dense", "{T}.encoder.layer.{i}.intermediate.dense",
     "{T}.encoder.layer.{i}.intermediate.dense", "linear", "text"),
    ("{J}/layer_{i}/output/dense", "{T}.encoder.layer.{i}.output.dense",
     "{T}.encoder.layer.{i}.output.dense", "linear", "text"),
    ("{J}/layer_{i}/output/LayerNorm", "{T}.encoder.layer.{i}.output.LayerNorm",
     "{T}.encoder.layer.{i}.output.LayerNorm", "layernorm", "text"),
    # --- LM head (decoders); the output matrix is tied to the word embeddings -------------------------
    ("{J}/lm_head/transform/dense", "{L}.transform.dense", "{L}.transform.dense", "linear", "lm_head"),
    ("{J}/lm_head/transform/LayerNorm", "{L}.transform.LayerNorm", "{L}.transform.LayerNorm", "layernorm",
     "lm_head"),
    ("{J}/lm_head/bias", "{L}.bias", "{L}.bias", "tensor", "lm_head"),
    ("{J}/embeddings/word_embeddings/embedding", "{L}.decoder.weight", "{L}.decoder.weight", "tied", "lm_head"),
    ("{J}/lm_head/bias", "{L}.decoder.bias", "{L}.decoder.bias", "tied", "lm_head"),
    # --- Contrastive / matching heads (§2.3); transformers has no `temp` ------------------------------
    ("vision_proj", "vision_proj", "vision_proj", "linear", "heads"),
    ("text_proj", "text_proj", "text_proj", "linear", "heads"),
    ("itm_head", "itm_head", "itm_head", "linear", "heads"),
    ("temp", None, "temp", "tensor", "heads"),
)

# Tensors that checkpoints carry but no blip-jax model uses: BERT position-id buffers, the momentum
# encoders and the ITC queues of pre-training / retrieval checkpoints (§5.2).
IGNORED_KEYS = re.compile(
    r"(.*\.position_ids"
    r"|(visual_encoder_m|vision_proj_m|text_encoder_m|text_proj_m|text_decoder_m)\..*"
    r"|image_queue|text_queue|queue_ptr|idx_queue|ptr_queue)$")

# Parameters a format lacks, filled with the reference's initial value (transformers' retrieval model
# has no learnable temperature; BLIP initialises it to 0.07, §2.3).
DEFAULTS: Mapping[str, Callable[[], np.ndarray]] = {"temp": lambda: np.asarray(0.07, np.float32)}

# How each task's MED trees sit in the torch state dict: flax root J, torch BERT root T, torch LM-head
# root L ('' = no head), flax self-attention name SA. The pre-training model's decoder path maps onto
# the encoder's tree: its own self-attention becomes `decoder_attention`, everything else it lists
# duplicates the encoder's (the same flax leaf, checked equal on import, written twice on export, §2.3).
MED_ROOTS: Mapping[str, tuple[dict, ...]] = {
    "caption": (dict(J="text_decoder", T="text_decoder.bert", L="text_decoder.cls.predictions", SA="attention"),),
    "retrieval": (dict(J="text_encoder", T="text_encoder", L="", SA="attention"),),
    "vqa": (dict(J="text_encoder", T="text_encoder", L="", SA="attention"),
            dict(J="text_decoder", T="text_decoder.bert", L="text_decoder.cls.predictions", SA="attention")),
    "pretrain": (dict(J="text_encoder", T="text_encoder", L="", SA="attention"),
                 dict(J="text_encoder", T="text_decoder.bert", L="text_decoder.cls.predictions",
                      SA="decoder_attention")),
}
TEXT_GROUPS = ("text", "self_attention", "lm_head")
TASK_GROUPS: Mapping[str, tuple[str, ...]] = {
    "caption": ("vision",),
    "retrieval": ("vision", "heads"),
    "vqa": ("vision",),
    "pretrain": ("vision", "heads"),
}
TASKS = tuple(MED_ROOTS)
FORMATS = ("hf", "sf")

_LEAVES = {  # kind -> ((torch leaf, flax leaf), ...)
    "linear": (("weight", "kernel"), ("bias", "bias")),
    "conv": (("weight", "kernel"), ("bias", "bias")),
    "layernorm": (("weight", "scale"), ("bias", "bias")),
    "embedding": (("weight", "embedding"),),
    "tensor": (("", ""),),
    "tied": (("", ""),),
}
_PLACEHOLDERS = {"i": r"\d+", "n": r"[12]", "qkv": r"query|key|value"}


def _to_flax_value(kind_leaf: str, array: np.ndarray) -> np.ndarray:
    if kind_leaf == "linear.weight":
        return array.T if array.ndim == 2 else array
    if kind_leaf == "conv.weight":
        return array.transpose(2, 3, 1, 0) if array.ndim == 4 else array
    return array


def _to_torch_value(kind_leaf: str, array: np.ndarray) -> np.ndarray:
    if kind_leaf == "linear.weight":
        return array.T
    if kind_leaf == "conv.weight":
        return array.transpose(3, 2, 0, 1)
    return array


def _torch_shape(kind_leaf: str, flax_shape: tuple) -> tuple:
    if kind_leaf == "linear.weight":
        return tuple(reversed(flax_shape))
    if kind_leaf == "conv.weight":
        h, w, i, o = flax_shape
        return (o, i, h, w)
    return tuple(flax_shape)


def _template_regex(template: str) -> re.Pattern:
    parts = re.split(r"(\{\w+\})", template)
    out = []
    for part in parts:
        name = part[1:-1] if part.startswith("{") else None
        if name in _PLACEHOLDERS:
            out.append(f"(?P<{name}>{_PLACEHOLDERS[name]})")
        else:
            out.append(re.escape(part))
    return re.compile("".join(out) + "$")


@dataclasses.dataclass(frozen=True)
class LeafRule:
    """One leaf-level mapping: a torch key template <-> a flax path template, plus its transform."""

    torch: str
    flax: str
    kind_leaf: str  # e.g. 'linear.weight', 'tensor.', 'tied.'
    tied: bool
    torch_re: re.Pattern
    flax_re: re.Pattern

    def flax_path(self, torch_key: str) -> str | None:
        match = self.torch_re.match(torch_key)
        return self.flax.format(**match.groupdict()) if match else None

    def torch_key(self, flax_path: str) -> str | None:
        match = self.flax_re.match(flax_path)
        return self.torch.format(**match.groupdict()) if match else None


def _substitute(template: str, roots: Mapping[str, str]) -> str:
    for name in ("J", "T", "L", "SA"):
        template = template.replace("{" + name + "}", roots.get(name, "{" + name + "}"))
    return template


@functools.lru_cache(maxsize=None)
def mapping_for(task: str, fmt: str) -> tuple[LeafRule, ...]:
    """The leaf rules of `KEY_TABLE` for one task ('caption'|'retrieval'|'vqa'|'pretrain') and format ('hf'|'sf')."""
    if task not in MED_ROOTS:
        raise ValueError(f"unknown task {task!r}: choose one of {', '.join(TASKS)}")
    if fmt not in FORMATS:
        raise ValueError(f"unknown checkpoint format {fmt!r}: choose 'hf' or 'sf'")
    column = _ROW_FIELDS.index(fmt)
    instances = [({}, TASK_GROUPS[task])] + [(roots, TEXT_GROUPS) for roots in MED_ROOTS[task]]
    rules = []
    for roots, groups in instances:
        for row in KEY_TABLE:
            jax_template, torch_template, kind, group = row[0], row[column], row[3], row[4]
            if group not in groups or torch_template is None:
                continue
            text_row = "{J}" in jax_template
            if text_row != bool(roots):
                continue
            if group == "lm_head" and not roots.get("L"):
                continue
            jax_module, torch_module = _substitute(jax_template, roots), _substitute(torch_template, roots)
            for torch_leaf, flax_leaf in _LEAVES[kind]:
                torch_key = f"{torch_module}.{torch_leaf}" if torch_leaf else torch_module
                flax_path = f"{jax_module}/{flax_leaf}" if flax_leaf else jax_module
                rules.append(LeafRule(
                    torch=torch_key, flax=flax_path, kind_leaf=f"{kind}.{torch_leaf}", tied=kind == "tied",
                    torch_re=_template_regex(torch_key), flax_re=_template_regex(flax_path)))
    return tuple(rules)


# ----------------------------------------------------------------------------------------------------
# Applying the table.
# ----------------------------------------------------------------------------------------------------
class KeyMappingError(ValueError):
    """Every problem found while mapping one checkpoint, reported together."""


@dataclasses.dataclass
class _Problems:
    missing: list = dataclasses.field(default_factory=list)
    unexpected: list = dataclasses.field(default_factory=list)
    misshaped: list = dataclasses.field(default_factory=list)
    disagreeing: list = dataclasses.field(default_factory=list)

    def raise_if_any(self, source: str, task: str, hint: str) -> None:
        sections = [("missing", self.missing), ("unexpected", self.unexpected),
                    ("wrong shape", self.misshaped), ("shared copies disagree", self.disagreeing)]
        count = sum(len(items) for _, items in sections)
        if not count:
            return
        summary = ", ".join(f"{len(items)} {name}" for name, items in sections if items)
        lines = [f"{source}: {count} key problem(s) for task {task!r} ({summary}); {hint}"]
        for name, items in sections:
            for item in items:
                lines.append(f"  {name}: {item}")
        raise KeyMappingError("\n".join(lines))


def flatten(tree, prefix="") -> dict[str, object]:
    """Nested dict -> {'a/b/c': leaf}."""
    out = {}
    for name, value in tree.items():
        path = f"{prefix}/{name}" if prefix else name
        if isinstance(value, Mapping):
            out.update(flatten(value, path))
        else:
            out[path] = value
    return out


def unflatten(flat: Mapping[str, object]) -> dict:
    """{'a/b/c': leaf} -> nested dict."""
    tree: dict = {}
    for path, value in flat.items():
        node = tree
        *parents, leaf = path.split("/")
        for name in parents:
            node = node.setdefault(name, {})
        node[leaf] = value
    return tree


def to_flax(state: Mapping[str, np.ndarray], expected, *, task: str, fmt: str, source: str,
            resize_pos_embed: Callable[[np.ndarray, tuple], np.ndarray] | None = None,
            tolerate: Iterable[str] = ()) -> dict:
    """A torch state dict (numpy values) -> the nested flax params of `expected` (a shape tree).

    expected: nested dict of arrays/ShapeDtypeStructs (e.g. `jax.eval_shape(model.init, ...)['params']`).
    resize_pos_embed(pos_embed, target_shape): called when `visual_encoder/pos_embed` differs in length;
      without it a different length is reported as a wrong shape.
    tolerate: torch keys that belong to other tasks of the same format (e.g. the text encoder of a
      pre-training checkpoint loaded as a captioner); they are skipped instead of reported as unexpected.
    Raises KeyMappingError listing every missing, unexpected, mis-shaped and disagreeing key at once.
    """
    rules = mapping_for(task, fmt)
    expected_shapes = {path: tuple(leaf.shape) for path, leaf in flatten(expected).items()}
    tolerate = set(tolerate)
    problems = _Problems()
    values: dict[str, np.ndarray] = {}
    origin: dict[str, str] = {}
    origin_rule: dict[str, LeafRule] = {}
    for key in sorted(state):
        if IGNORED_KEYS.match(key):
            continue
        matches = [(rule, rule.flax_path(key)) for rule in rules]
        matches = [(rule, path) for rule, path in matches if path is not None]
        if not matches:
            if key not in tolerate:
                problems.unexpected.append(f"{key} {tuple(np.shape(state[key]))} (no blip-jax parameter uses it)")
            continue
        rule, path = matches[0]
        if path not in expected_shapes:
            problems.unexpected.append(f"{key} {tuple(np.shape(state[key]))} -> {path}, which this {task} model "
                                       "does not have (more layers than the config?)")
            continue
        value = _to_flax_value(rule.kind_leaf, np.asarray(state[key]))
        if path in values:
            if values[path].shape != value.shape or not np.array_equal(values[path], value):
                problems.disagreeing.append(f"{key} != {origin[path]} (both map to {path})")
            continue
        values[path] = value
        origin[path] = key
        origin_rule[path] = rule
    for path, shape in expected_shapes.items():
        if path not in values:
            if path in DEFAULTS:
                values[path] = DEFAULTS[path]()
                continue
            wanted = [rule.torch_key(path) for rule in rules if not rule.tied]
            wanted = [key for key in wanted if key]
            problems.missing.append(f"{wanted[0] if wanted else '?'} (for {path}, shape {shape})")
            continue
        value = values[path]
        if value.shape == shape:
            continue
        if value.size == 1 and int(np.prod(shape)) == 1:  # a scalar saved as (1,), e.g. `temp`
            values[path] = value.reshape(shape)
            continue
        if path == "visual_encoder/pos_embed" and resize_pos_embed is not None and value.ndim == 3 \
                and len(shape) == 3 and value.shape[2] == shape[2] and value.shape[0] == 1:
            values[path] = resize_pos_embed(value, shape)
            continue
        rule = origin_rule[path]
        problems.misshaped.append(f"{origin[path]}: got {tuple(np.shape(state[origin[path]]))}, expected "
                                  f"{_torch_shape(rule.kind_leaf, shape)} (for {path})")
    hint = ("check that the checkpoint and the task match" if fmt == "sf" else
            "check that config.json describes these weights and that the task matches")
    problems.raise_if_any(source, task, hint)
    return unflatten({path: values[path] for path in expected_shapes})


def to_torch(params, *, task: str, fmt: str, include_tied: bool = False) -> dict[str, np.ndarray]:
    """Nested flax params -> a flat torch-named state dict of numpy arrays (shared leaves written under
    every name that lists them; tied aliases only with include_tied)."""
    rules = mapping_for(task, fmt)
    state: dict[str, np.ndarray] = {}
    unmapped = []
    for path, value in flatten(params).items():
        value = np.asarray(value)
        written = False
        for rule in rules:
            key = rule.torch_key(path)
            if key is None:
                continue
            written = True
            if rule.tied and not include_tied:
                continue
            state[key] = np.array(_to_torch_value(rule.kind_leaf, value), order="C")  # keeps 0-d scalars 0-d
        if not written and not (fmt == "hf" and path in DEFAULTS):
            unmapped.append(path)
    if unmapped:
        raise KeyMappingError(f"{len(unmapped)} blip-jax parameter(s) have no {fmt} key for task {task!r}: "
                              f"{', '.join(unmapped)}")
    return state


def other_task_keys(state: Iterable[str], task: str, fmt: str) -> list[str]:
    """The keys of `state` that some other task of `fmt` uses but `task` does not (e.g. a pre-training
    checkpoint's text encoder when loading a captioner): `to_flax(tolerate=...)` skips them."""
    own = mapping_for(task, fmt)
    rules = [rule for other in TASKS for rule in mapping_for(other, fmt)]
    return [key for key in state
            if (IGNORED_KEYS.match(key) or any(rule.torch_re.match(key) for rule in rules))
            and not any(rule.torch_re.match(key) for rule in own)]
