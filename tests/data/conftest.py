"""Shared fixtures: the synthetic_shapes dataset built once per session in a temp data_dir."""
import pytest


@pytest.fixture(scope="session")
def shapes_data_dir(tmp_path_factory):
    from blip_jax.data.builders import synthetic_shapes
    data_dir = str(tmp_path_factory.mktemp("tfds"))
    synthetic_shapes.ensure_built(data_dir)
    return data_dir


@pytest.fixture
def shapes_config(shapes_data_dir):
    from blip_jax.data import pipeline
    config = pipeline.default_input_config("synthetic_shapes")
    config.data_dir = shapes_data_dir
    config.batch_size = 16
    config.eval_batch_size = 32
    config.prefetch = 0
    return config
