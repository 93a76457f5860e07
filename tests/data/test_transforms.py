"""BLIP image transforms: eager == tf.data.map, numpy references for BLIP's ops, geometry checks."""
import io

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from blip_jax.data import transforms as T

ARGS = {"brightness": (1.3,), "sharpness": (1.4,), "shear_x": (0.15,), "shear_y": (-0.15,),
        "translate_x": (5.0,), "translate_y": (-5.0,), "rotate": (15.0,)}


@pytest.fixture
def image():
    rng = np.random.default_rng(0)
    return (rng.random((40, 48, 3)) * 150 + 50).astype(np.uint8)  # range [50, 200]: autocontrast acts


def _jpeg(array, quality=90):
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()


def _in_map(fn, *inputs):
    dataset = tf.data.Dataset.from_tensors(tuple(tf.constant(x) for x in inputs)).map(fn)
    return next(iter(dataset)).numpy()


@pytest.mark.parametrize("name", T.RANDAUG_OPS[1:])
def test_randaug_op_eager_equals_tf_data_map(name, image):
    op = getattr(T, name)
    eager = op(tf.constant(image), *ARGS.get(name, ())).numpy()
    assert eager.dtype == np.uint8 and eager.shape == image.shape
    np.testing.assert_array_equal(eager, _in_map(lambda x: op(x, *ARGS.get(name, ())), image))


def test_full_transforms_eager_equal_tf_data_map(image):
    encoded, seed = _jpeg(image), np.array([11, 3], np.int64)
    train = lambda e, s: T.train_transform(e, s, 32, 0.2)  # noqa: E731
    np.testing.assert_array_equal(train(tf.constant(encoded), tf.constant(seed)).numpy(),
                                  _in_map(train, encoded, seed))
    evaluate = lambda e: T.eval_transform(e, 24)  # noqa: E731
    np.testing.assert_array_equal(evaluate(tf.constant(encoded)).numpy(), _in_map(evaluate, encoded))
    augment = lambda x, s: T.random_augment(x, s)  # noqa: E731
    np.testing.assert_array_equal(augment(tf.constant(image), tf.constant(seed)).numpy(),
                                  _in_map(augment, image, seed))


# ---------------------------------------------------------------- numpy references (BLIP's randaugment.py)
def blip_autocontrast(img):
    out = np.empty_like(img)
    for c in range(3):
        ch = img[..., c]
        high, low = ch.max(), ch.min()
        if high <= low:
            table = np.arange(256)
        else:
            scale = 255 / (high - low)
            table = np.arange(256) * scale - low * scale
            table[table < 0], table[table > 255] = 0, 255
        out[..., c] = table.clip(0, 255).astype(np.uint8)[ch]
    return out


def blip_equalize(img):
    out = np.empty_like(img)
    for c in range(3):
        ch = img[..., c]
        hist = np.bincount(ch.ravel(), minlength=256).astype(np.float32)
        non_zero = hist[hist != 0]
        step = np.sum(non_zero[:-1]) // 255
        if step == 0:
            out[..., c] = ch
            continue
        n = np.empty_like(hist)
        n[0], n[1:] = step // 2, hist[:-1]
        out[..., c] = (np.cumsum(n) // step).clip(0, 255).astype(np.uint8)[ch]
    return out


def blip_brightness(img, factor):
    return (np.arange(256, dtype=np.float32) * factor).clip(0, 255).astype(np.uint8)[img]


def blip_sharpness(img, factor):
    kernel = np.ones((3, 3), np.float32)
    kernel[1, 1] = 5
    kernel /= 13
    x = img.astype(np.float32)
    degenerate = sum(kernel[i, j] * x[i:i + x.shape[0] - 2, j:j + x.shape[1] - 2]
                     for i in range(3) for j in range(3))
    degenerate = np.round(degenerate)  # cv2.filter2D on uint8 rounds
    out = x.copy()
    out[1:-1, 1:-1] = degenerate + factor * (x[1:-1, 1:-1] - degenerate)
    return out.clip(0, 255).astype(np.uint8)  # BLIP's astype wraps out-of-range values; we saturate


def test_autocontrast_equalize_brightness_sharpness_match_blip(image):
    x = tf.constant(image)
    np.testing.assert_array_equal(T.autocontrast(x).numpy(), blip_autocontrast(image))
    np.testing.assert_array_equal(T.equalize(x).numpy(), blip_equalize(image))
    np.testing.assert_array_equal(T.brightness(x, 1.3).numpy(), blip_brightness(image, 1.3))
    np.testing.assert_array_equal(T.sharpness(x, 1.4).numpy(), blip_sharpness(image, 1.4))
    # at M=5 both enhance ops are the identity, as in BLIP
    np.testing.assert_array_equal(T.brightness(x, 1.0).numpy(), image)
    np.testing.assert_array_equal(T.sharpness(x, 1.0).numpy(), image)


def test_geometric_ops_move_pixels_like_cv2(image):
    x = tf.constant(image)
    moved = T.translate_x(x, 5.0).numpy()  # content moves left by 5, right edge filled with 128
    np.testing.assert_array_equal(moved[:, :-5], image[:, 5:])
    assert (moved[:, -5:] == 128).all()
    moved = T.translate_y(x, -5.0).numpy()  # content moves down by 5
    np.testing.assert_array_equal(moved[5:], image[:-5])
    assert (moved[:5] == 128).all()
    sheared = T.shear_x(x, 1.0).numpy()  # out[y, x] = in[y, x - y]
    for y in (0, 7, 20):
        np.testing.assert_array_equal(sheared[y, y:], image[y, :image.shape[1] - y])
    square = image[:40, :40]
    rotated = T.rotate(tf.constant(square), 90.0).numpy()  # counter-clockwise about (W/2, H/2)
    np.testing.assert_array_equal(rotated[1:], np.rot90(square)[:-1])
    assert (rotated[0] == 128).all()


def test_resize_matches_pil_bicubic():
    rng = np.random.default_rng(1)
    smooth = np.asarray(Image.fromarray((rng.random((12, 16, 3)) * 255).astype(np.uint8)).resize(
        (96, 72), Image.Resampling.BILINEAR))
    ours = T.resize_bicubic(tf.constant(smooth), 40).numpy().astype(float)
    pil = np.asarray(Image.fromarray(smooth).resize((40, 40), Image.Resampling.BICUBIC)).astype(float)
    assert np.abs(ours - pil).mean() < 1.0 and np.abs(ours - pil).max() <= 8


def test_resized_crop_window_follows_torchvision_sampling():
    windows = np.stack([T.resized_crop_window(tf.constant([s, 0], tf.int64), 300, 400, (0.2, 1.0)).numpy()
                        for s in range(200)])
    top, left, h, w = windows.T
    assert (top >= 0).all() and (left >= 0).all() and (top + h <= 300).all() and (left + w <= 400).all()
    area = h * w / (300 * 400)
    assert area.min() >= 0.19 and area.max() <= 1.0 and area.std() > 0.1
    assert (w / h).min() >= 0.74 and (w / h).max() <= 1.34
    again = T.resized_crop_window(tf.constant([5, 0], tf.int64), 300, 400, (0.2, 1.0)).numpy()
    np.testing.assert_array_equal(again, windows[5])
    # scale (1, 1) on a square image can only take the whole image
    whole = T.resized_crop_window(tf.constant([1, 2], tf.int64), 64, 64, (1.0, 1.0)).numpy()
    np.testing.assert_array_equal(whole, [0, 0, 64, 64])


def test_jpeg_crop_decode_equals_full_decode_then_crop(image):
    encoded, seed = tf.constant(_jpeg(image)), tf.constant([4, 2], tf.int64)
    fast = T.decode_and_random_resized_crop(encoded, seed, 32, (0.2, 1.0)).numpy()
    slow = T.random_resized_crop(T.decode_rgb(encoded), seed, 32, (0.2, 1.0)).numpy()
    np.testing.assert_array_equal(fast, slow)


def test_random_augment_applies_two_ops_each_with_probability_half(image):
    seeds = tf.data.Dataset.range(300).map(lambda i: tf.stack([i, tf.constant(9, tf.int64)]))
    outputs = np.stack(list(seeds.map(lambda s: T.random_augment(tf.constant(image), s)).as_numpy_iterator()))
    unchanged = np.mean([np.array_equal(out, image) for out in outputs])
    # unchanged when each of the 2 draws is skipped (p .5) or a no-op at M=5 (identity, brightness,
    # sharpness: 3 of 10): (0.5 + 0.5 * 0.3) ** 2 = 0.4225
    assert 0.33 < unchanged < 0.52
    assert len({out.tobytes() for out in outputs}) > 30  # seeds pick different ops, signs, order


def test_flip_and_normalize(image):
    flips = [np.array_equal(T.random_flip(tf.constant(image), tf.constant([s, 1], tf.int64)).numpy(),
                            image[:, ::-1]) for s in range(40)]
    assert 10 < sum(flips) < 30
    normalized = T.normalize(tf.constant(np.full((2, 2, 3), 255, np.uint8))).numpy()
    np.testing.assert_allclose(normalized[0, 0], (1 - np.array(T.CLIP_MEAN)) / np.array(T.CLIP_STD), rtol=1e-6)
