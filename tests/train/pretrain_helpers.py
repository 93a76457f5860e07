"""Helpers for the pre-training tests: the very small config and random batches (importable
from test modules and from the multi-process worker)."""
import importlib.util
import os
import tempfile

import jax
import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# The loop tests compile the same small train step in several runs and subprocesses: a persistent
# XLA cache (keyed by the program) makes every compile after the first a load.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(tempfile.gettempdir(), "blip_jax_test_xla_cache"))
jax.config.update("jax_compilation_cache_dir", os.environ["JAX_COMPILATION_CACHE_DIR"])


def load_pretrain_config(variant="tiny"):
    spec = importlib.util.spec_from_file_location("pretrain_config", os.path.join(REPO, "configs", "pretrain.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(variant)


def shrink(config):
    """A model small enough that a train step compiles in seconds; same structure as tiny. Every test
    that trains uses exactly this config, so the persistent XLA cache serves one compiled step."""
    config.model.vision.update(image_size=16, patch_size=8, width=32, depth=1, num_heads=2, mlp_dim=64)
    config.model.text.update(vocab_size=64, hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64,
                             max_position_embeddings=16, hidden_dropout=0.0, attention_dropout=0.0)
    config.model.tokens.update(pad=0, cls=1, sep=2, dec=62, enc=63)
    config.model.embed_dim = 16
    config.input.image_size = 16
    config.input.max_length = 8
    config.batch_size = 8
    config.input.batch_size = 8
    config.itc.queue_size = 32
    config.itc.alpha_ramp_steps = 4
    config.optim.warmup_steps = 2
    config.total_steps = 6
    config.update(log_every_steps=1, checkpoint_every_steps=0, progress_bar=False)
    config.eval.update(k_test=4, num_captions=2, caption_max_len=8)
    config.input.eval_split = "val"
    return config


def random_batch(config, seed=0, batch_size=None):
    rng = np.random.default_rng(seed)
    b = batch_size or config.batch_size
    size, length = config.model.vision.image_size, config.input.max_length
    ids = rng.integers(5, config.model.text.vocab_size - 2, (b, length)).astype(np.int32)
    ids[:, 0] = config.model.tokens.cls
    lengths = rng.integers(3, length + 1, b)
    mask = (np.arange(length)[None] < lengths[:, None]).astype(np.int32)
    ids = np.where(mask == 1, ids, config.model.tokens.pad)
    ids[np.arange(b), lengths - 1] = config.model.tokens.sep
    return {"image": rng.normal(size=(b, size, size, 3)).astype(np.float32), "input_ids": ids,
            "attention_mask": mask, "image_id": (np.arange(b) // 2).astype(np.int32)}
