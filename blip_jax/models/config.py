"""Model hyper-parameters: ConfigDict variants (tiny/base/large) and frozen views for the modules.

Configs are `ml_collections.ConfigDict`s (they are what users override and what checkpoints store);
modules take the frozen dataclasses below so they stay hashable under jit and remat.
"""
from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import ml_collections

VISION_VARIANTS = {
    # ViT-B/16 and ViT-L/16 as in BLIP (blip.md §2.1); tiny ones for tests and the CPU main job.
    "base": dict(patch_size=16, width=768, depth=12, num_heads=12, mlp_dim=3072),
    "large": dict(patch_size=16, width=1024, depth=24, num_heads=16, mlp_dim=4096),
    "small": dict(patch_size=8, width=128, depth=4, num_heads=4, mlp_dim=512),
    "tiny": dict(patch_size=8, width=32, depth=2, num_heads=2, mlp_dim=64),
}
TEXT_VARIANTS = {
    # BERT-base MED (blip.md §2.2); tiny ones for tests.
    "base": dict(hidden_size=768, num_layers=12, num_heads=12, intermediate_size=3072),
    "small": dict(hidden_size=128, num_layers=4, num_heads=4, intermediate_size=512),
    "tiny": dict(hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64),
}
DEFAULT_IMAGE_SIZE = {"base": 224, "large": 224, "small": 64, "tiny": 32}


def model_config(vision: str = "base", text: str = "base", image_size: int | None = None) -> ml_collections.ConfigDict:
    """The model ConfigDict for a ViT variant + MED variant (see docs/DESIGN.md for every field)."""
    if vision not in VISION_VARIANTS:
        raise ValueError(f"unknown vision variant {vision!r}: choose one of {sorted(VISION_VARIANTS)}")
    if text not in TEXT_VARIANTS:
        raise ValueError(f"unknown text variant {text!r}: choose one of {sorted(TEXT_VARIANTS)}")
    config = ml_collections.ConfigDict()
    config.vision = dict(
        image_size=image_size or DEFAULT_IMAGE_SIZE[vision],
        layer_norm_eps=1e-6,
        drop_path_rate=0.0,
        **VISION_VARIANTS[vision],
    )
    config.text = dict(
        vocab_size=30524,
        max_position_embeddings=512,
        layer_norm_eps=1e-12,
        hidden_dropout=0.1,
        attention_dropout=0.1,
        **TEXT_VARIANTS[text],
    )
    config.embed_dim = 256
    config.tokens = dict(pad=0, cls=101, sep=102, dec=30522, enc=30523)
    config.dtype = "float32"
    config.param_dtype = "float32"
    config.attention_impl = "xla"
    config.remat = dict(vision_layers=0, text_layers=0, policy="nothing_saveable")
    config.images_per_pass = 0  # 0: auto (models/vit.py images_per_pass)
    return config


@dataclasses.dataclass(frozen=True)
class VisionConfig:
    image_size: int = 224
    patch_size: int = 16
    width: int = 768
    depth: int = 12
    num_heads: int = 12
    mlp_dim: int = 3072
    layer_norm_eps: float = 1e-6
    drop_path_rate: float = 0.0

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2


@dataclasses.dataclass(frozen=True)
class TextConfig:
    vocab_size: int = 30524
    hidden_size: int = 768
    num_layers: int = 12
    num_heads: int = 12
    intermediate_size: int = 3072
    max_position_embeddings: int = 512
    layer_norm_eps: float = 1e-12
    hidden_dropout: float = 0.1
    attention_dropout: float = 0.1


@dataclasses.dataclass(frozen=True)
class Options:
    """Numerics and memory options shared by every module."""

    dtype: str = "float32"  # compute dtype (e.g. bfloat16)
    param_dtype: str = "float32"  # storage dtype
    attention_impl: str = "xla"  # "xla" | "cudnn"
    remat_vision_layers: int = 0  # remat the last N ViT blocks
    remat_text_layers: int = 0  # remat the last N MED layers
    remat_policy: str = "nothing_saveable"  # a name in jax.checkpoint_policies
    images_per_pass: int = 0  # ViT images per pass; 0 = auto (whole batch on GPU/TPU, cache-sized on CPU)

    @property
    def compute_dtype(self):
        return jnp.dtype(self.dtype)

    @property
    def storage_dtype(self):
        return jnp.dtype(self.param_dtype)


@dataclasses.dataclass(frozen=True)
class BlipConfig:
    vision: VisionConfig
    text: TextConfig
    options: Options
    embed_dim: int = 256


def _pick(cls, values) -> object:
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - names)
    if unknown:
        raise ValueError(f"unknown {cls.__name__} field(s) {unknown}: valid fields are {sorted(names)}")
    return cls(**values)


def frozen(config: ml_collections.ConfigDict) -> BlipConfig:
    """The hashable view of a model ConfigDict, validated with one clear error per problem."""
    vision = _pick(VisionConfig, dict(config.vision))
    text = _pick(TextConfig, dict(config.text))
    if vision.image_size % vision.patch_size:
        raise ValueError(
            f"model.vision.image_size {vision.image_size} is not a multiple of patch_size {vision.patch_size}: "
            "pick an image size divisible by the patch size")
    if vision.width % vision.num_heads or text.hidden_size % text.num_heads:
        raise ValueError("model width must be divisible by num_heads (model.vision / model.text)")
    remat = dict(config.get("remat", {}))
    options = Options(
        dtype=str(config.get("dtype", "float32")),
        param_dtype=str(config.get("param_dtype", "float32")),
        attention_impl=str(config.get("attention_impl", "xla")),
        remat_vision_layers=int(remat.get("vision_layers", 0)),
        remat_text_layers=int(remat.get("text_layers", 0)),
        remat_policy=str(remat.get("policy", "nothing_saveable")),
        images_per_pass=int(config.get("images_per_pass", 0)),
    )
    if options.images_per_pass < 0:
        raise ValueError(f"model.images_per_pass {options.images_per_pass} must be >= 0 (0 = automatic)")
    if options.attention_impl not in ("xla", "cudnn"):
        raise ValueError(f"model.attention_impl {options.attention_impl!r} must be 'xla' or 'cudnn'")
    return BlipConfig(vision=vision, text=text, options=options, embed_dim=int(config.get("embed_dim", 256)))
