"""Train state and step: EMA, queue ring buffer, sharding invariance (1 vs 8 devices, FSDP), NaN policy."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from pretrain_helpers import random_batch

from blip_jax import sharding
from blip_jax.train import loop
from blip_jax.train import state as state_lib
from blip_jax.train import step as step_lib


def test_momentum_update_is_ema_of_the_used_subtree():
    params = {"visual_encoder": {"w": jnp.full((2,), 1.0)}, "vision_proj": {"w": jnp.full((2,), 2.0)},
              "text_encoder": {"layer_0": {"attention": {"w": jnp.full((2,), 3.0)},
                                           "decoder_attention": {"w": jnp.zeros(2)}},
                               "lm_head": {"bias": jnp.zeros(3)}},
              "text_proj": {"w": jnp.full((2,), 4.0)}, "itm_head": {"w": jnp.ones(2)}, "temp": jnp.asarray(0.07)}
    momentum = state_lib.momentum_subset(params)
    assert "itm_head" not in momentum and "lm_head" not in momentum["text_encoder"]
    assert "decoder_attention" not in momentum["text_encoder"]["layer_0"]
    momentum = jax.tree.map(jnp.zeros_like, momentum)
    updated = state_lib.momentum_update(momentum, params, 0.995)
    np.testing.assert_allclose(np.asarray(updated["vision_proj"]["w"]), 0.005 * 2.0, rtol=1e-6)
    twice = state_lib.momentum_update(updated, params, 0.995)
    np.testing.assert_allclose(np.asarray(twice["text_proj"]["w"]), 4.0 * (1 - 0.995 ** 2), rtol=1e-5)


def test_enqueue_wraps_around():
    queue = jnp.zeros((6, 2))
    ptr = jnp.int32(0)
    written = []
    for step in range(5):
        values = jnp.full((2, 2), float(step + 1))
        queue = state_lib.enqueue(queue, values, ptr)
        ptr = state_lib.advance_ptr(ptr, 2, 6)
        written.append(step + 1)
    # 5 writes of 2 rows into 6 rows: rows 0-1 <- 4, 2-3 <- 5, 4-5 <- 3; the pointer is back at 4.
    np.testing.assert_array_equal(np.asarray(queue[:, 0]), [4, 4, 5, 5, 3, 3])
    assert int(ptr) == 4


def _build(config, devices, fsdp=1, rules="replicate"):
    config.sharding.fsdp = fsdp
    config.sharding.rules = rules
    mesh = sharding.make_mesh(fsdp=fsdp, devices=devices)
    with jax.set_mesh(mesh):
        parts = loop.build(config, mesh)
        state = jax.jit(parts["init"], out_shardings=parts["shardings"])(jax.random.key(0))
    return mesh, parts, state


def _loss_and_grads(config, mesh, parts, state, batch):
    fn = jax.jit(jax.value_and_grad(
        lambda params, batch: step_lib.pretrain_losses(
            parts["model"], params, state["momentum_params"],
            (state["image_queue"], state["text_queue"], state["idx_queue"]), batch,
            {"dropout": jax.random.key(1), "momentum_dropout": jax.random.key(2),
             "negatives": jax.random.key(3)},
            config=config, alpha=0.4, num_shards=sharding.num_batch_shards(mesh)), has_aux=True))
    with jax.set_mesh(mesh):
        (loss, aux), grads = fn(state["params"], sharding.shard_batch(batch, mesh))
    return float(loss), jax.device_get(aux), jax.device_get(grads)


def test_one_vs_eight_devices_same_loss_and_grads(small_config):
    small_config.model.text.update(hidden_dropout=0.1, attention_dropout=0.1)  # dropout bits must match too
    batch = random_batch(small_config)
    results = []
    for devices in (jax.devices()[:1], jax.devices()):
        mesh, parts, state = _build(small_config, devices)
        results.append(_loss_and_grads(small_config, mesh, parts, state, batch))
    (loss1, aux1, grads1), (loss8, aux8, grads8) = results
    assert abs(loss1 - loss8) <= 1e-5
    for key in ("loss_itc", "loss_itm", "loss_lm"):
        assert abs(float(aux1[key]) - float(aux8[key])) <= 1e-5
    for g1, g8 in zip(jax.tree.leaves(grads1), jax.tree.leaves(grads8)):
        np.testing.assert_allclose(g1, g8, atol=1e-5, rtol=1e-5)
    assert max(float(np.abs(g).max()) for g in jax.tree.leaves(grads1)) > 0


def test_fsdp_equals_replicated_over_steps(small_config):
    batches = [random_batch(small_config, seed=s) for s in range(3)]
    finals = []
    for fsdp, rules in ((1, "replicate"), (4, "fsdp")):
        mesh, parts, state = _build(small_config, jax.devices(), fsdp=fsdp, rules=rules)
        losses = []
        with jax.set_mesh(mesh):
            for batch in batches:
                state, metrics = parts["train_step"](state, sharding.shard_batch(batch, mesh))
                losses.append(float(metrics["loss"]))
        specs = {tuple(s.spec) for s in jax.tree.leaves(parts["shardings"])}
        specs = {tuple(axis for axis in spec if axis is not None) for spec in specs}
        finals.append((losses, jax.device_get(state["params"]), specs))
    (loss_r, params_r, specs_r), (loss_f, params_f, specs_f) = finals
    assert specs_r == {()}
    assert ("fsdp",) in specs_f  # FSDP really shards something
    np.testing.assert_allclose(loss_r, loss_f, rtol=1e-5)
    # Adam divides by sqrt(v): for a weight whose gradient is ~0, a 1e-9 reduction-order difference
    # becomes a lr-sized step, so parameters after 3 updates agree to lr-scale, not 1e-5.
    for a, b in zip(jax.tree.leaves(params_r), jax.tree.leaves(params_f)):
        np.testing.assert_allclose(a, b, atol=2e-4, rtol=1e-4)


def test_step_updates_queue_momentum_and_clamps_temp(small_config):
    small_config.itc.duplicate_aware = True
    small_config.optim.update(schedule="constant", lr=10.0)  # a huge step: temp must still be clamped
    mesh, parts, state = _build(small_config, jax.devices())
    before = jax.device_get(state)
    batch = random_batch(small_config)
    with jax.set_mesh(mesh):
        state, metrics = parts["train_step"](state, sharding.shard_batch(batch, mesh))
    after = jax.device_get(state)
    assert int(after["step"]) == 1 and int(after["queue_ptr"]) == 8 and bool(metrics["finite"])
    np.testing.assert_array_equal(after["idx_queue"][:8], batch["image_id"])
    assert (after["idx_queue"][8:] == -100).all()
    np.testing.assert_allclose(np.linalg.norm(after["image_queue"][:8], axis=-1), 1.0, rtol=1e-5)
    assert not np.allclose(after["image_queue"][:8], before["image_queue"][:8])
    np.testing.assert_array_equal(after["image_queue"][8:], before["image_queue"][8:])
    # momentum after one step = m * init + (1 - m) * (params before the update) = init
    for m, p in zip(jax.tree.leaves(after["momentum_params"]["vision_proj"]),
                    jax.tree.leaves(before["params"]["vision_proj"])):
        np.testing.assert_allclose(m, p, rtol=1e-6)
    with jax.set_mesh(mesh):
        for seed in range(1, 3):
            state, _ = parts["train_step"](state, sharding.shard_batch(random_batch(small_config, seed), mesh))
    assert 0.001 <= float(state["params"]["temp"]) <= 0.5
    assert int(state["queue_ptr"]) == 24


def test_nan_batch_skips_the_update_and_counts_it(small_config):
    mesh, parts, state = _build(small_config, jax.devices())
    before = jax.device_get(state)
    batch = random_batch(small_config)
    batch["image"][0, 0, 0, 0] = np.nan
    with jax.set_mesh(mesh):
        state, metrics = parts["train_step"](state, sharding.shard_batch(batch, mesh))
    after = jax.device_get(state)
    assert not bool(metrics["finite"]) and int(after["num_skipped"]) == 1 and int(after["step"]) == 1
    for key in ("params", "momentum_params", "opt_state", "image_queue", "text_queue", "queue_ptr"):
        for a, b in zip(jax.tree.leaves(before[key]), jax.tree.leaves(after[key])):
            np.testing.assert_array_equal(a, b)
    with jax.set_mesh(mesh):
        state, metrics = parts["train_step"](state, sharding.shard_batch(random_batch(small_config), mesh))
    assert bool(metrics["finite"]) and int(state["num_skipped"]) == 1


@pytest.mark.parametrize("negatives", ["local"])
def test_local_negatives_run_on_eight_shards(small_config, negatives):
    small_config.itc.negatives = negatives
    small_config.itm.negatives = negatives
    small_config.batch_size = 16
    small_config.input.batch_size = 16
    mesh, parts, state = _build(small_config, jax.devices())
    with jax.set_mesh(mesh):
        state, metrics = parts["train_step"](state, sharding.shard_batch(random_batch(small_config, 0, 16), mesh))
    assert bool(metrics["finite"])
