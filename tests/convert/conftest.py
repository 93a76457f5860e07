"""Fixtures for the conversion tests (helpers live in tiny_blip.py)."""
import zlib

import numpy as np
import pytest


@pytest.fixture
def rng(request):
    """A seeded generator drawn fresh per test (seed = the test's name, stable across runs)."""
    return np.random.default_rng(zlib.crc32(request.node.name.encode()))
