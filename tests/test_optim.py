"""Optimiser: schedules match the original formulas, weight-decay mask, freezing, clipping, accumulation."""
import math

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from blip_jax import optim


def _config(**kw):
    base = dict(schedule="warmup_cosine", lr=3e-4, warmup_steps=10, warmup_lr=1e-6, min_lr=1e-6,
                decay_rate=0.9, steps_per_epoch=0, weight_decay=0.05, weight_decay_mask="all",
                clip_grad_norm=0.0, grad_accum_steps=1, freeze=())
    base.update(kw)
    return ml_collections.ConfigDict(base)


def _params():
    return {"visual_encoder": {"pos_embed": jnp.ones((1, 5, 4)), "blocks_0": {
        "fc": {"kernel": jnp.ones((4, 4)), "bias": jnp.ones((4,))}, "norm1": {"scale": jnp.ones((4,))}}},
        "text_encoder": {"kernel": jnp.ones((4, 4))}, "temp": jnp.asarray(0.07)}


def test_blip_pretrain_schedule_matches_original():
    """Epoch 0: min(init, warmup_lr + (init - warmup_lr) * i / warmup); epoch e: max(min_lr, init * 0.9**e)."""
    config = _config(schedule="blip_pretrain", warmup_steps=30, steps_per_epoch=50)
    schedule = optim.make_schedule(config, total_steps=500)
    for step in [0, 1, 15, 30, 31, 49, 50, 99, 100, 260, 499]:
        epoch = step // 50
        if epoch == 0:
            expected = min(3e-4, 1e-6 + (3e-4 - 1e-6) * step / 30)
        else:
            expected = max(1e-6, 3e-4 * 0.9 ** epoch)
        np.testing.assert_allclose(float(schedule(step)), expected, rtol=1e-5)


def test_cosine_per_epoch_and_warmup_cosine():
    config = _config(schedule="cosine_per_epoch", steps_per_epoch=10, min_lr=0.0)
    schedule = optim.make_schedule(config, total_steps=60)
    for step in [0, 9, 10, 35, 59]:
        expected = 3e-4 * 0.5 * (1 + math.cos(math.pi * (step // 10) / 6))
        np.testing.assert_allclose(float(schedule(step)), expected, rtol=1e-5, atol=1e-12)
    warm = optim.make_schedule(_config(), total_steps=100)
    assert float(warm(0)) == pytest.approx(1e-6, rel=1e-4)
    assert float(warm(10)) == pytest.approx(3e-4, rel=1e-5)
    assert float(warm(100)) == pytest.approx(1e-6, rel=1e-3)


def test_bad_schedule_is_one_line():
    with pytest.raises(ValueError, match="optim.steps_per_epoch") as e:
        optim.make_schedule(_config(schedule="blip_pretrain"), 10)
    assert "\n" not in str(e.value)
    with pytest.raises(ValueError, match="unknown"):
        optim.make_schedule(_config(schedule="linear-ish"), 10)


def _one_update(config, grads=None):
    params = _params()
    tx, _ = optim.make_optimizer(config, total_steps=100)
    grads = grads or jax.tree.map(jnp.zeros_like, params)
    updates, _ = tx.update(grads, tx.init(params), params)
    return updates


def test_weight_decay_all_vs_mask():
    config = _config(schedule="constant", lr=1.0)
    decay_all = _one_update(config)  # zero grads: the update is pure weight decay -lr*wd*p
    for leaf, param in zip(jax.tree.leaves(decay_all), jax.tree.leaves(_params())):
        np.testing.assert_allclose(np.asarray(leaf), -0.05 * np.asarray(param), rtol=1e-6)
    masked = _one_update(_config(schedule="constant", lr=1.0, weight_decay_mask="no_bias_norm"))
    assert float(masked["text_encoder"]["kernel"][0, 0]) == pytest.approx(-0.05)
    assert float(masked["visual_encoder"]["blocks_0"]["fc"]["kernel"][0, 0]) == pytest.approx(-0.05)
    for leaf in (masked["temp"], masked["visual_encoder"]["pos_embed"],
                 masked["visual_encoder"]["blocks_0"]["fc"]["bias"],
                 masked["visual_encoder"]["blocks_0"]["norm1"]["scale"]):
        assert float(jnp.abs(leaf).max()) == 0.0


def test_freeze_by_regex():
    grads = jax.tree.map(jnp.ones_like, _params())
    updates = _one_update(_config(schedule="constant", freeze="^visual_encoder/"), grads)
    for leaf in jax.tree.leaves(updates["visual_encoder"]):
        assert float(jnp.abs(leaf).max()) == 0.0
    assert float(jnp.abs(updates["text_encoder"]["kernel"]).max()) > 0


def test_clipping_bounds_the_adam_input():
    params = {"w": jnp.ones((3,))}
    tx, _ = optim.make_optimizer(_config(schedule="constant", lr=1.0, weight_decay=0.0,
                                         clip_grad_norm=1.0), 10)
    state = tx.init(params)
    big = {"w": jnp.array([300.0, 400.0, 0.0])}
    updates, state = tx.update(big, state, params)
    mu = jax.tree.leaves(state[0])  # clip has no state; mu of adam = (1 - b1) * clipped grad
    clipped = np.asarray(state[1][0].mu["w"]) / 0.1
    np.testing.assert_allclose(clipped, [0.6, 0.8, 0.0], rtol=1e-5)
    del mu, updates


def test_grad_accumulation_averages_micro_batches():
    params = {"w": jnp.zeros((2,))}
    config = _config(schedule="constant", lr=0.1, weight_decay=0.0, grad_accum_steps=2)
    tx, _ = optim.make_optimizer(config, 10)
    plain, _ = optim.make_optimizer(_config(schedule="constant", lr=0.1, weight_decay=0.0), 10)
    state = tx.init(params)
    u1, state = tx.update({"w": jnp.array([1.0, 0.0])}, state, params)
    assert float(jnp.abs(u1["w"]).max()) == 0.0  # no update on the first micro-batch
    u2, state = tx.update({"w": jnp.array([3.0, 2.0])}, state, params)
    expected, _ = plain.update({"w": jnp.array([2.0, 1.0])}, plain.init(params), params)
    np.testing.assert_allclose(np.asarray(u2["w"]), np.asarray(expected["w"]), rtol=1e-6)
