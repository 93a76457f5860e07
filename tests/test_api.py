"""The public face: blip_jax.load / ModelBundle / save / the convert command."""
import argparse
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

import blip_jax
from blip_jax.convert import cli as convert_cli

torch = pytest.importorskip("torch")
sys.path.insert(0, os.path.join(os.path.dirname(__file__), "convert"))
from tiny_blip import build, pixels  # noqa: E402


@pytest.fixture(scope="module")
def retriever():
    return build("BlipForImageTextRetrieval", seed=31)


@pytest.fixture
def rng():
    return np.random.default_rng(2026)


def tree_equal(a, b):
    return jax.tree.structure(a) == jax.tree.structure(b) and jax.tree.all(jax.tree.map(np.array_equal, a, b))


def test_import_blip_jax_is_lazy():
    code = "import sys, blip_jax; print(callable(blip_jax.load), 'jax' in sys.modules, 'torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["True", "False", "False"]


def test_save_then_load_is_exact_and_methods_check_the_task(retriever, tmp_path):
    bundle = blip_jax.load(retriever)
    bundle.save(str(tmp_path / "ckpt"))
    assert sorted(os.listdir(tmp_path / "ckpt")) == ["config.json", "params.safetensors"]
    again = blip_jax.load(str(tmp_path / "ckpt"))
    assert again.task == "retrieval" and again.config.to_dict() == bundle.config.to_dict()
    assert tree_equal(again.params, bundle.params)
    assert isinstance(again, blip_jax.ModelBundle) and again.model is not None
    with pytest.raises(ValueError, match="lm_logits needs a caption or pretrain model, this one is 'retrieval'"):
        again.lm_logits(np.zeros((1, 32, 32, 3), np.float32), np.ones((1, 4), np.int32), np.ones((1, 4), np.int32))


def test_bfloat16_compute_keeps_float32_params(retriever, rng):
    bundle = blip_jax.load(retriever, dtype="bfloat16")
    assert bundle.config.dtype == "bfloat16"
    assert all(leaf.dtype == np.float32 for leaf in jax.tree.leaves(bundle.params))
    images = pixels(rng, 2)
    low = np.asarray(bundle.image_embeds(images), np.float32)
    with torch.no_grad():
        full = retriever.vision_model(pixel_values=torch.tensor(images.transpose(0, 3, 1, 2))).last_hidden_state
    error = np.max(np.abs(low - full.numpy()))
    assert np.all(np.isfinite(low)) and 1e-4 < error < 0.1  # bf16 rounding, not float32 and not garbage
    with pytest.raises(ValueError, match="compute dtype"):
        blip_jax.load(retriever, dtype="int8")


def test_convert_command_writes_a_checkpoint_load_reads(retriever, tmp_path, capsys):
    hf_dir = tmp_path / "hf"
    retriever.save_pretrained(str(hf_dir))
    parser = argparse.ArgumentParser()
    convert_cli.add_arguments(parser)
    out = tmp_path / "out"
    assert convert_cli.run(parser.parse_args([str(hf_dir), str(out), "--image-size", "48"])) == 0
    assert "task=retrieval" in capsys.readouterr().out
    converted = blip_jax.load(str(out))
    assert converted.task == "retrieval" and converted.config.vision.image_size == 48
    assert tree_equal(converted.params, blip_jax.load(str(hf_dir), image_size=48).params)
    # A second run into the same, now non-empty, directory is refused; a bad source is a one-line error.
    assert convert_cli.run(parser.parse_args([str(hf_dir), str(out)])) == 2
    assert convert_cli.run(parser.parse_args([str(tmp_path / "missing.pth"), str(tmp_path / "o2")])) == 1
    assert "does not exist" in capsys.readouterr().err
    # --to hf writes a transformers directory.
    assert convert_cli.run(parser.parse_args([str(out), str(tmp_path / "back"), "--to", "hf"])) == 0
    assert tree_equal(blip_jax.load(str(tmp_path / "back")).params, converted.params)


def test_tokenizer_is_the_data_tokenizer():
    from blip_jax.data.text import tokenizer

    ours, theirs = blip_jax.tokenizer("synthetic_shapes"), tokenizer("synthetic_shapes")
    assert ours("a red circle")["input_ids"] == theirs("a red circle")["input_ids"]
    assert (ours.dec_token_id, ours.enc_token_id) == (theirs.dec_token_id, theirs.enc_token_id)
