"""config.init_from: parameters of a `blip_jax.load` source fitted onto the pre-training tree."""
import jax
import numpy as np
import pytest

from blip_jax import api
from blip_jax.models import model_config
from blip_jax.models.blip import init_params
from blip_jax.train import loop


def _config():
    config = model_config("tiny", "tiny", 16)
    config.vision.update(patch_size=8)
    config.text.update(vocab_size=40, max_position_embeddings=16)
    config.tokens.update(pad=0, cls=1, sep=2, dec=38, enc=39)
    config.embed_dim = 16
    return config


@pytest.mark.parametrize("task", ["pretrain", "retrieval"])
def test_init_from_a_saved_checkpoint(tmp_path, task):
    config = _config()
    saved = jax.device_get(init_params(config, task, jax.random.key(1)))
    api.save_checkpoint(str(tmp_path / task), config, saved, task)
    fresh = jax.device_get(init_params(config, "pretrain", jax.random.key(2)))
    params = loop.params_from_bundle(str(tmp_path / task), fresh)
    assert jax.tree.structure(params) == jax.tree.structure(fresh)
    for a, b in zip(jax.tree.leaves(params["visual_encoder"]), jax.tree.leaves(saved["visual_encoder"])):
        np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(params["text_encoder"]["layer_0"]["attention"]["self"]["query"]["kernel"],
                                  saved["text_encoder"]["layer_0"]["attention"]["self"]["query"]["kernel"])
    if task == "pretrain":
        for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(saved)):
            np.testing.assert_array_equal(a, b)
