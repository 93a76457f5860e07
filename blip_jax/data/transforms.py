"""BLIP's image transforms as TensorFlow ops (blip.md §3.3), usable eagerly and inside tf.data.map.

Images are uint8 (H, W, 3) between ops, as in BLIP (PIL / cv2 uint8 at every step); only
`normalize` returns float32. Randomness is stateless: every random op takes a `seed` (2,) int tensor,
so an example's augmentation is a pure function of its seed.

Train: random_resized_crop (bicubic, scale (min_scale, 1), ratio (3/4, 4/3), torchvision's sampling)
-> random horizontal flip -> random_augment(2, 5) -> normalize (CLIP mean/std).
Eval: square bicubic resize (aspect ratio squashed, no centre crop) -> normalize.
"""
from __future__ import annotations

import math

import tensorflow as tf

from blip_jax.preprocess import CLIP_MEAN, CLIP_STD

FILL_VALUE = 128.0  # BLIP's RandomAugment fill colour (128, 128, 128)
MAX_LEVEL = 10.0
TRANSLATE_CONST = 10.0
RANDAUG_OPS = ("identity", "autocontrast", "brightness", "sharpness", "equalize",
               "shear_x", "shear_y", "translate_x", "translate_y", "rotate")


def _to_uint8(image: tf.Tensor) -> tf.Tensor:
    """Round and saturate a float image to uint8, like cv2/PIL output."""
    return tf.cast(tf.clip_by_value(tf.round(image), 0.0, 255.0), tf.uint8)


def _uniform(seed, shape=(), minval=0.0, maxval=1.0):
    return tf.random.stateless_uniform(shape, seed, minval=minval, maxval=maxval, dtype=tf.float32)


# ----------------------------------------------------------------------------- decode, crop, resize
def decode_rgb(encoded: tf.Tensor) -> tf.Tensor:
    """JPEG/PNG/GIF/BMP bytes -> uint8 (H, W, 3); grayscale expanded, alpha dropped."""
    image = tf.io.decode_image(encoded, channels=3, expand_animations=False)
    image.set_shape([None, None, 3])
    return image


def resized_crop_window(seed, height, width, scale=(0.2, 1.0), ratio=(3 / 4, 4 / 3)) -> tf.Tensor:
    """torchvision RandomResizedCrop.get_params: (top, left, h, w) int32, 10 tries then centre crop."""
    height_f, width_f = tf.cast(height, tf.float32), tf.cast(width, tf.float32)
    seeds = tf.random.experimental.stateless_split(seed, 4)
    area = height_f * width_f
    target_area = area * _uniform(seeds[0], [10], scale[0], scale[1])
    aspect = tf.exp(_uniform(seeds[1], [10], math.log(ratio[0]), math.log(ratio[1])))
    w = tf.round(tf.sqrt(target_area * aspect))
    h = tf.round(tf.sqrt(target_area / aspect))
    valid = (w > 0) & (w <= width_f) & (h > 0) & (h <= height_f)
    first = tf.argmax(tf.cast(valid, tf.int32))
    w_try, h_try = w[first], h[first]
    top_try = tf.floor(_uniform(seeds[2]) * (height_f - h_try + 1))
    left_try = tf.floor(_uniform(seeds[3]) * (width_f - w_try + 1))
    in_ratio = width_f / height_f
    w_fb = tf.where(in_ratio > ratio[1], tf.round(height_f * ratio[1]), width_f)
    h_fb = tf.where(in_ratio < ratio[0], tf.round(width_f / ratio[0]), height_f)
    top_fb, left_fb = tf.floor((height_f - h_fb) / 2), tf.floor((width_f - w_fb) / 2)
    found = tf.reduce_any(valid)
    window = tf.where(found, tf.stack([top_try, left_try, h_try, w_try]),
                      tf.stack([top_fb, left_fb, h_fb, w_fb]))
    return tf.cast(window, tf.int32)


def resize_bicubic(image: tf.Tensor, size: int) -> tf.Tensor:
    """Square bicubic resize with antialiasing (PIL BICUBIC semantics), uint8 -> uint8."""
    resized = tf.image.resize(tf.cast(image, tf.float32), [size, size], method="bicubic", antialias=True)
    return _to_uint8(resized)


def _random_crop(image: tf.Tensor, seed, scale) -> tf.Tensor:
    """The RandomResizedCrop window of a decoded image, before the resize."""
    shape = tf.shape(image)
    top, left, h, w = tf.unstack(resized_crop_window(seed, shape[0], shape[1], scale))
    return image[top:top + h, left:left + w]


def random_resized_crop(image: tf.Tensor, seed, size: int, scale=(0.2, 1.0)) -> tf.Tensor:
    """RandomResizedCrop(size, scale, BICUBIC) on a decoded uint8 image."""
    return resize_bicubic(_random_crop(image, seed, scale), size)


def decode_and_random_resized_crop(encoded: tf.Tensor, seed, size: int, scale=(0.2, 1.0)) -> tf.Tensor:
    """Same result as decode_rgb + random_resized_crop; JPEGs decode only the crop window (faster)."""
    def jpeg_crop():
        shape = tf.image.extract_jpeg_shape(encoded)
        window = resized_crop_window(seed, shape[0], shape[1], scale)
        return tf.image.decode_and_crop_jpeg(encoded, window, channels=3)

    crop = tf.cond(tf.io.is_jpeg(encoded), jpeg_crop,
                   lambda: _random_crop(decode_rgb(encoded), seed, scale))
    crop.set_shape([None, None, 3])
    return resize_bicubic(crop, size)


def random_flip(image: tf.Tensor, seed) -> tf.Tensor:
    """Horizontal flip with probability 0.5 (captions untouched, as in BLIP)."""
    return tf.cond(_uniform(seed) < 0.5, lambda: tf.reverse(image, axis=[1]), lambda: image)


def normalize(image: tf.Tensor) -> tf.Tensor:
    """uint8 -> float32 (x / 255 - CLIP mean) / CLIP std."""
    scaled = tf.cast(image, tf.float32) / 255.0
    return (scaled - tf.constant(CLIP_MEAN)) / tf.constant(CLIP_STD)


# ----------------------------------------------------------------------------- RandomAugment ops
def autocontrast(image: tf.Tensor) -> tf.Tensor:
    """Per channel: stretch [min, max] to [0, 255] (cutoff 0), floor like BLIP's uint8 table."""
    low = tf.cast(tf.reduce_min(image, axis=[0, 1]), tf.float64)
    high = tf.cast(tf.reduce_max(image, axis=[0, 1]), tf.float64)
    scale = 255.0 / tf.maximum(high - low, 1.0)
    levels = tf.range(256, dtype=tf.float64)[:, None]
    table = tf.clip_by_value(levels * scale - low * scale, 0.0, 255.0)
    table = tf.where(high > low, tf.floor(table), levels)  # (256, 3)
    return _lookup_per_channel(image, tf.cast(table, tf.uint8))


def _lookup_per_channel(image: tf.Tensor, table: tf.Tensor) -> tf.Tensor:
    """out[..., c] = table[image[..., c], c] for a (256, 3) table."""
    index = tf.cast(image, tf.int32) * 3 + tf.range(3)
    return tf.gather(tf.reshape(table, [-1]), index)


def equalize(image: tf.Tensor) -> tf.Tensor:
    """BLIP's equalize_func (PIL's ImageOps.equalize) per channel."""
    pixels = tf.cast(tf.reshape(image, [-1, 3]), tf.int32) + tf.range(3) * 256
    hist = tf.reshape(tf.math.bincount(tf.reshape(pixels, [-1]), minlength=768, maxlength=768), [3, 256])
    last_nonzero = 255 - tf.argmax(tf.reverse(tf.cast(hist > 0, tf.int32), axis=[1]), axis=1,
                                   output_type=tf.int32)
    last_count = tf.gather(hist, last_nonzero, batch_dims=1)
    step = (tf.reduce_sum(hist, axis=1) - last_count) // 255  # (3,)
    shifted = tf.concat([step[:, None] // 2, hist[:, :-1]], axis=1)
    table = tf.clip_by_value(tf.cumsum(shifted, axis=1) // tf.maximum(step, 1)[:, None], 0, 255)
    table = tf.where(step[:, None] == 0, tf.range(256)[None, :], table)
    return _lookup_per_channel(image, tf.cast(tf.transpose(table), tf.uint8))


def brightness(image: tf.Tensor, factor) -> tf.Tensor:
    """BLIP's brightness_func: table floor(clip(v * factor)). factor 1.0 (M=5) is the identity."""
    table = tf.floor(tf.clip_by_value(tf.range(256, dtype=tf.float32) * factor, 0.0, 255.0))
    return tf.gather(tf.cast(table, tf.uint8), tf.cast(image, tf.int32))


def sharpness(image: tf.Tensor, factor) -> tf.Tensor:
    """BLIP's sharpness_func: blend with a 3x3 smoothing (centre 5/13) inside a 1-px border."""
    def blend():
        kernel = tf.constant([[1.0, 1.0, 1.0], [1.0, 5.0, 1.0], [1.0, 1.0, 1.0]]) / 13.0
        kernel = tf.tile(kernel[:, :, None, None], [1, 1, 3, 1])
        source = tf.cast(image, tf.float32)
        degenerate = tf.round(tf.nn.depthwise_conv2d(source[None], kernel, [1, 1, 1, 1], "VALID")[0])
        inner = degenerate + factor * (source[1:-1, 1:-1] - degenerate)
        blended = tf.pad(inner, [[1, 1], [1, 1], [0, 0]]) + tf.pad(
            tf.zeros_like(inner), [[1, 1], [1, 1], [0, 0]], constant_values=1.0) * source
        return tf.cast(tf.clip_by_value(tf.floor(blended), 0, 255), tf.uint8)

    return tf.cond(tf.equal(factor, 1.0), lambda: image, blend)  # factor 1 (M=5): skip the conv


def _warp(image: tf.Tensor, inverse_map) -> tf.Tensor:
    """Bilinear warp, fill 128, where inverse_map = [a0..a2, b0..b2] maps output (x, y) to input."""
    shape = tf.shape(image)[:2]
    transform = tf.cast(tf.concat([tf.stack(inverse_map), [0.0, 0.0]], 0), tf.float32)[None]
    warped = tf.raw_ops.ImageProjectiveTransformV3(
        images=tf.cast(image, tf.float32)[None], transforms=transform, output_shape=shape,
        fill_value=FILL_VALUE, interpolation="BILINEAR", fill_mode="CONSTANT")[0]
    return _to_uint8(warped)


def shear_x(image, factor):
    """cv2.warpAffine with [[1, factor, 0], [0, 1, 0]]."""
    return _warp(image, [1.0, -factor, 0.0, 0.0, 1.0, 0.0])


def shear_y(image, factor):
    """cv2.warpAffine with [[1, 0, 0], [factor, 1, 0]]."""
    return _warp(image, [1.0, 0.0, 0.0, -factor, 1.0, 0.0])


def translate_x(image, offset):
    """Content moves left by `offset` pixels (BLIP/PIL convention)."""
    return _warp(image, [1.0, 0.0, offset, 0.0, 1.0, 0.0])


def translate_y(image, offset):
    """Content moves up by `offset` pixels."""
    return _warp(image, [1.0, 0.0, 0.0, 0.0, 1.0, offset])


def rotate(image, degrees):
    """Counter-clockwise rotation about (W/2, H/2), cv2.getRotationMatrix2D semantics."""
    shape = tf.cast(tf.shape(image), tf.float32)
    cx, cy = shape[1] / 2.0, shape[0] / 2.0
    radians = tf.cast(degrees, tf.float32) * (math.pi / 180.0)
    a, b = tf.cos(radians), tf.sin(radians)
    return _warp(image, [a, -b, (1.0 - a) * cx + b * cy, b, a, -b * cx + (1.0 - a) * cy])


def random_augment(image: tf.Tensor, seed, num_ops: int = 2, magnitude: float = 5.0) -> tf.Tensor:
    """BLIP's RandomAugment(N, M): N ops drawn with replacement, each applied with p=0.5.

    Levels: enhance factor (M/10)*1.8+0.1 (1.0 at M=5: brightness/sharpness are no-ops), shear
    (M/10)*0.3, translate (M/10)*10 px, rotate (M/10)*30 degrees; the last three with a random sign.
    """
    enhance = (magnitude / MAX_LEVEL) * 1.8 + 0.1
    shear = (magnitude / MAX_LEVEL) * 0.3
    translate = (magnitude / MAX_LEVEL) * TRANSLATE_CONST
    degrees = (magnitude / MAX_LEVEL) * 30.0
    for op_seed in tf.unstack(tf.random.experimental.stateless_split(seed, num_ops)):
        choice_seed, apply_seed, sign_seed = tf.unstack(tf.random.experimental.stateless_split(op_seed, 3))
        op_index = tf.random.stateless_uniform([], choice_seed, 0, len(RANDAUG_OPS), dtype=tf.int32)
        op_index = tf.where(_uniform(apply_seed) <= 0.5, op_index, 0)  # skipped -> identity
        sign = tf.where(_uniform(sign_seed) < 0.5, -1.0, 1.0)
        current = image
        branches = [
            lambda: current, lambda: autocontrast(current), lambda: brightness(current, enhance),
            lambda: sharpness(current, enhance), lambda: equalize(current),
            lambda: shear_x(current, sign * shear), lambda: shear_y(current, sign * shear),
            lambda: translate_x(current, sign * translate), lambda: translate_y(current, sign * translate),
            lambda: rotate(current, sign * degrees)]
        image = tf.switch_case(op_index, branches)
        image.set_shape(current.shape)
    return image


# ----------------------------------------------------------------------------- full transforms
def train_transform(encoded: tf.Tensor, seed, size: int, min_scale: float = 0.2,
                    randaug: bool = True, flip: bool = True) -> tf.Tensor:
    """Encoded image -> float32 (size, size, 3): BLIP's train transform (§3.3)."""
    return normalize(train_transform_uint8(encoded, seed, size, min_scale, randaug, flip))


def train_transform_uint8(encoded: tf.Tensor, seed, size: int, min_scale: float = 0.2,
                          randaug: bool = True, flip: bool = True) -> tf.Tensor:
    """train_transform before normalize: uint8 (size, size, 3), 4x less to move than float32."""
    crop_seed, flip_seed, augment_seed = tf.unstack(tf.random.experimental.stateless_split(seed, 3))
    image = decode_and_random_resized_crop(encoded, crop_seed, size, (min_scale, 1.0))
    if flip:
        image = random_flip(image, flip_seed)
    if randaug:
        image = random_augment(image, augment_seed)
    image.set_shape([size, size, 3])
    return image


def eval_transform(encoded: tf.Tensor, size: int) -> tf.Tensor:
    """Encoded image -> float32 (size, size, 3): Resize((S, S), BICUBIC) then normalize."""
    return normalize(eval_transform_uint8(encoded, size))


def eval_transform_uint8(encoded: tf.Tensor, size: int) -> tf.Tensor:
    """eval_transform before normalize: uint8 (size, size, 3)."""
    image = resize_bicubic(decode_rgb(encoded), size)
    image.set_shape([size, size, 3])
    return image
