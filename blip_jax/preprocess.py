"""Test-time image preprocessing identical to transformers' `BlipImageProcessor`.

RGB conversion (transparency composited onto white), square bicubic resize with PIL, rescale by 1/255,
then CLIP mean/std normalisation (blip.md §2.1). Output is NHWC float32, ready for the ViT.
"""
from __future__ import annotations

import os
from typing import Iterable, Sequence

import numpy as np
from PIL import Image

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def _to_rgb(image) -> Image.Image:
    """A PIL RGB image from a path, a PIL image or an (H, W[, C]) uint8 array."""
    if isinstance(image, (str, os.PathLike)):
        if not os.path.isfile(image):
            raise FileNotFoundError(f"image file {os.fspath(image)!r} does not exist: pass an existing image path")
        with Image.open(image) as opened:
            opened.load()
            image = opened.copy()
    if isinstance(image, np.ndarray):
        array = image
        if array.ndim == 2:
            array = array[..., None]
        if array.ndim != 3 or array.shape[-1] not in (1, 3, 4):
            raise ValueError(f"image array of shape {image.shape} is not (H, W), (H, W, 1|3|4): pass HWC images")
        if array.dtype != np.uint8:
            raise ValueError(f"image array has dtype {array.dtype}: pass uint8 pixels in 0..255 (HWC)")
        if array.shape[-1] == 1:
            array = np.repeat(array, 3, axis=-1)
        image = Image.fromarray(array)
    if not isinstance(image, Image.Image):
        raise TypeError(f"cannot read an image from {type(image).__name__}: pass a path, a PIL image or a uint8 array")
    has_alpha = "A" in image.getbands() or image.info.get("transparency") is not None
    if has_alpha:
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def preprocess_image(image, image_size: int) -> np.ndarray:
    """One image (path | PIL | uint8 HWC array) -> (image_size, image_size, 3) float32, CLIP-normalised."""
    rgb = _to_rgb(image)
    resized = rgb.resize((image_size, image_size), resample=Image.Resampling.BICUBIC)
    pixels = (np.asarray(resized).astype(np.float64) * (1 / 255)).astype(np.float32)
    mean = np.asarray(CLIP_MEAN, np.float32)
    std = np.asarray(CLIP_STD, np.float32)
    return (pixels - mean) / std


def preprocess_images(images_or_paths, image_size: int) -> np.ndarray:
    """Images (paths, PIL images or uint8 HWC arrays; one or a sequence) -> (B, S, S, 3) float32 NHWC.

    Numerically the same as `BlipImageProcessor(size={'height': S, 'width': S})(images)['pixel_values']`
    transposed to NHWC.
    """
    if isinstance(images_or_paths, (str, os.PathLike, Image.Image)) or (
            isinstance(images_or_paths, np.ndarray) and images_or_paths.ndim in (2, 3)
            and images_or_paths.dtype == np.uint8):
        images: Sequence = [images_or_paths]
    elif isinstance(images_or_paths, np.ndarray) and images_or_paths.ndim == 4:
        images = list(images_or_paths)
    elif isinstance(images_or_paths, Iterable):
        images = list(images_or_paths)
    else:
        raise TypeError(f"preprocess_images got {type(images_or_paths).__name__}: pass an image, a path, or a list")
    if not images:
        raise ValueError("preprocess_images got no images: pass at least one image or path")
    if int(image_size) <= 0:
        raise ValueError(f"image_size {image_size} must be a positive number of pixels, e.g. 384")
    return np.stack([preprocess_image(image, int(image_size)) for image in images])
