"""blip-jax: BLIP (Bootstrapping Language-Image Pre-training) in JAX/Flax.

The public face (imports are lazy, so `import blip_jax` stays cheap):
  blip_jax.load(src, task=None, image_size=None, dtype=None) -> ModelBundle
  blip_jax.preprocess_images(images_or_paths, image_size) -> (B, S, S, 3) float32
  blip_jax.tokenizer(name_or_path="bert-base-uncased") -> BERT tokenizer with [DEC] / [ENC]
"""
from __future__ import annotations

__version__ = "0.1.0"
__all__ = ["load", "preprocess_images", "tokenizer", "ModelBundle"]


def load(src, task=None, image_size=None, dtype=None):
    """A ModelBundle from a blip-jax checkpoint dir, a transformers BLIP dir or model, or a Salesforce .pth."""
    from blip_jax.api import load as _load

    return _load(src, task=task, image_size=image_size, dtype=dtype)


def preprocess_images(images_or_paths, image_size):
    """Images or paths -> NHWC float32 pixels, identical to transformers' BlipImageProcessor."""
    from blip_jax.preprocess import preprocess_images as _preprocess_images

    return _preprocess_images(images_or_paths, image_size)


def tokenizer(*args, **kwargs):
    """BLIP's BERT tokenizer ([DEC] and [ENC] added); see blip_jax.data.text.tokenizer."""
    from blip_jax.data.text import tokenizer as _tokenizer

    return _tokenizer(*args, **kwargs)


def __getattr__(name):
    if name == "ModelBundle":
        from blip_jax.api import ModelBundle

        return ModelBundle
    raise AttributeError(f"module 'blip_jax' has no attribute {name!r}")
