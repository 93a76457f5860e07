"""Fixtures for the pre-training tests (helpers live in pretrain_helpers.py)."""
import ml_collections
import pytest

from pretrain_helpers import load_pretrain_config, shrink


@pytest.fixture(scope="session")
def base_tiny_config():
    return load_pretrain_config("tiny")


@pytest.fixture
def small_config(base_tiny_config):
    return shrink(ml_collections.ConfigDict(base_tiny_config.to_dict()))
