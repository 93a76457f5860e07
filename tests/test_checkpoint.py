"""Orbax checkpoints: restore onto another mesh (8 -> 1 and 1 -> 8 devices), keep last K, JSON meta,
resume order."""
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from blip_jax import checkpoint, sharding


def _state(mesh, rules):
    params = {"w": jnp.arange(64 * 128, dtype=jnp.float32).reshape(64, 128), "b": jnp.ones(3)}
    tx = optax.adamw(1e-3)
    state = {"params": params, "opt_state": tx.init(params), "step": jnp.int32(7),
             "rng": jax.random.key_data(jax.random.key(3))}
    shardings = sharding.tree_shardings(state, mesh, rules)
    return jax.device_put(state, shardings), shardings


@pytest.mark.parametrize("save_devices,restore_devices", [(8, 1), (1, 8)])
def test_restore_onto_a_different_mesh(tmp_path, save_devices, restore_devices):
    save_mesh = sharding.make_mesh(fsdp=save_devices if save_devices > 1 else 1,
                                   devices=jax.devices()[:save_devices])
    state, _ = _state(save_mesh, sharding.FSDP_RULES)
    writer = checkpoint.Checkpointer(str(tmp_path), keep=2)
    writer.save(7, state, {"step": 7, "data_position": {"start_step": 7}})
    writer.close()

    restore_mesh = sharding.make_mesh(devices=jax.devices()[:restore_devices])
    template, shardings = _state(restore_mesh, sharding.DEFAULT_RULES)
    reader = checkpoint.Checkpointer(str(tmp_path))
    restored, meta = reader.restore(checkpoint.abstract_target(template, shardings))
    reader.close()
    assert meta == {"step": 7, "data_position": {"start_step": 7}}
    for a, b in zip(jax.tree.leaves(state), jax.tree.leaves(restored)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    leaf = restored["params"]["w"]
    assert leaf.sharding.mesh.devices.size == restore_devices


def test_keeps_the_last_k_and_skips_existing(tmp_path):
    mesh = sharding.make_mesh()
    state, _ = _state(mesh, sharding.DEFAULT_RULES)
    writer = checkpoint.Checkpointer(str(tmp_path), keep=2)
    for step in (1, 2, 3):
        assert writer.save(step, state, {"step": step})
    assert not writer.save(3, state, {"step": 3})
    writer.close()
    assert sorted(int(d) for d in os.listdir(tmp_path) if d.isdigit()) == [2, 3]
    assert checkpoint.Checkpointer(str(tmp_path)).restore_meta() == {"step": 3}


def test_resume_order(tmp_path):
    config = ml_collections.ConfigDict({"resume": "", "init_from": ""})
    workdir = tmp_path / "run"
    assert checkpoint.resume_source(str(workdir), config).kind == "scratch"
    config.init_from = "some/model_base.pth"
    assert checkpoint.resume_source(str(workdir), config).kind == "init_from"
    other = tmp_path / "other"
    mesh = sharding.make_mesh()
    state, _ = _state(mesh, sharding.DEFAULT_RULES)
    writer = checkpoint.Checkpointer(checkpoint.checkpoint_dir(str(other)))
    writer.save(5, state, {"step": 5})
    writer.close()
    config.resume = str(other)
    source = checkpoint.resume_source(str(workdir), config)
    assert (source.kind, source.path) == ("resume", checkpoint.checkpoint_dir(str(other)))
    config.resume = os.path.join(checkpoint.checkpoint_dir(str(other)), "5")
    source = checkpoint.resume_source(str(workdir), config)
    assert (source.kind, source.step) == ("resume", 5)
    writer = checkpoint.Checkpointer(checkpoint.checkpoint_dir(str(workdir)))
    writer.save(1, state, {"step": 1})
    writer.close()
    assert checkpoint.resume_source(str(workdir), config).kind == "workdir"  # own checkpoints win
    config.resume = str(tmp_path / "missing")
    with pytest.raises(FileNotFoundError, match="config.resume"):
        checkpoint.resume_source(str(tmp_path / "fresh"), config)
