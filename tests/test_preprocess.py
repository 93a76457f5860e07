"""preprocess_images == transformers BlipImageProcessor (RGB conversion, bicubic resize, CLIP mean/std)."""
import numpy as np
import pytest
from PIL import Image

from blip_jax.preprocess import preprocess_images

transformers = pytest.importorskip("transformers")


def _hf_pixels(images, size):
    from transformers.models.blip.image_processing_pil_blip import BlipImageProcessorPil

    processor = BlipImageProcessorPil(size={"height": size, "width": size})
    return processor(images, return_tensors="np")["pixel_values"].transpose(0, 2, 3, 1)


def test_matches_blip_image_processor_for_rgb_gray_rgba_and_paths(tmp_path):
    rng = np.random.default_rng(0)
    rgb = Image.fromarray(rng.integers(0, 256, (37, 53, 3), dtype=np.uint8))
    gray = Image.fromarray(rng.integers(0, 256, (41, 29), dtype=np.uint8), mode="L")
    rgba_array = rng.integers(0, 256, (30, 30, 4), dtype=np.uint8)
    rgba = Image.fromarray(rgba_array, mode="RGBA")
    path = tmp_path / "image.png"
    rgb.save(path)
    ours = preprocess_images([rgb, gray, rgba, str(path)], 48)
    theirs = _hf_pixels([rgb, gray, rgba, Image.open(path)], 48)
    assert ours.shape == (4, 48, 48, 3) and ours.dtype == np.float32
    np.testing.assert_allclose(ours, theirs, atol=1e-6, rtol=0)
    # a uint8 HWC array is treated like the PIL image it holds
    np.testing.assert_allclose(preprocess_images(np.asarray(rgb), 48)[0], theirs[0], atol=1e-6, rtol=0)


def test_bad_inputs_give_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        preprocess_images(str(tmp_path / "missing.jpg"), 32)
    with pytest.raises(ValueError, match="uint8"):
        preprocess_images([np.zeros((8, 8, 3), np.float32)], 32)
