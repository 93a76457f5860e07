"""ITC / ITM / LM losses against plain numpy implementations; hard-negative sampler properties."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from blip_jax import losses


def _normalize(x):
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def _np_softmax(x):
    x = x - x.max(-1, keepdims=True)
    e = np.exp(x)
    return e / e.sum(-1, keepdims=True)


def _np_log_softmax(x):
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def np_itc(img, txt, img_m, txt_m, img_q, txt_q, temp, alpha, ids=None, idq=None, block=None):
    """The original BLIP ITC (blip_pretrain.py), with queues as (Q, E) rows, written plainly.

    block: None for global negatives, else the per-shard batch size (local negatives)."""
    temp = min(max(temp, 0.001), 0.5)
    b = img.shape[0]
    txt_all = np.concatenate([txt_m, txt_q])
    img_all = np.concatenate([img_m, img_q])
    if ids is None:
        gt = np.concatenate([np.eye(b), np.zeros((b, len(img_q)))], 1)
    else:
        all_ids = np.concatenate([ids, idq])
        gt = (ids[:, None] == all_ids[None, :]).astype(np.float64)
    valid = np.ones_like(gt, bool)
    if block is not None:
        for i in range(b):
            for j in range(b):
                valid[i, j] = (i // block) == (j // block)
    gt = gt * valid
    gt = gt / gt.sum(1, keepdims=True)
    total = 0.0
    for q, k_all, q_m in ((img, txt_all, img_m), (txt, img_all, txt_m)):
        sim_m = np.where(valid, q_m @ k_all.T / temp, -np.inf)
        target = alpha * _np_softmax(sim_m) + (1 - alpha) * gt
        sim = np.where(valid, q @ k_all.T / temp, -1e30)
        total += -(_np_log_softmax(sim) * target).sum(1).mean()
    return total / 2


@pytest.fixture
def itc_inputs():
    rng = np.random.default_rng(0)
    b, q, e = 8, 16, 12
    arrays = [_normalize(rng.normal(size=s)) for s in [(b, e)] * 4 + [(q, e)] * 2]
    return arrays


@pytest.mark.parametrize("alpha", [0.0, 0.4])
@pytest.mark.parametrize("temp", [0.07, 0.9, 1e-4])
def test_itc_matches_numpy(itc_inputs, alpha, temp):
    loss, aux = losses.itc_loss(*[jnp.asarray(a) for a in itc_inputs], temp, alpha)
    expected = np_itc(*itc_inputs, temp, alpha)
    np.testing.assert_allclose(float(loss), expected, rtol=2e-5)
    assert aux["sim_i2t"].shape == (8, 8)


def test_itc_duplicate_image_aware(itc_inputs):
    ids = np.array([0, 0, 1, 2, 2, 2, 3, 4])
    idq = np.array([-100] * 12 + [0, 2, 9, 9])
    loss, _ = losses.itc_loss(*[jnp.asarray(a) for a in itc_inputs], 0.1, 0.4,
                              image_ids=jnp.asarray(ids), idx_queue=jnp.asarray(idq))
    expected = np_itc(*itc_inputs, 0.1, 0.4, ids=ids, idq=idq)
    np.testing.assert_allclose(float(loss), expected, rtol=2e-5)
    plain, _ = losses.itc_loss(*[jnp.asarray(a) for a in itc_inputs], 0.1, 0.4)
    assert abs(float(plain) - float(loss)) > 1e-3  # the ids change the targets


def test_itc_local_negatives(itc_inputs):
    loss, _ = losses.itc_loss(*[jnp.asarray(a) for a in itc_inputs], 0.1, 0.4,
                              negatives="local", num_shards=4)
    expected = np_itc(*itc_inputs, 0.1, 0.4, block=2)
    np.testing.assert_allclose(float(loss), expected, rtol=2e-5)
    one_shard, _ = losses.itc_loss(*[jnp.asarray(a) for a in itc_inputs], 0.1, 0.4,
                                   negatives="local", num_shards=1)
    glob, _ = losses.itc_loss(*[jnp.asarray(a) for a in itc_inputs], 0.1, 0.4)
    np.testing.assert_allclose(float(one_shard), float(glob), rtol=1e-6)


def test_itc_gradient_only_through_online_features(itc_inputs):
    args = [jnp.asarray(a) for a in itc_inputs]
    grads = jax.grad(lambda *a: losses.itc_loss(*a, 0.07, 0.4)[0], argnums=(0, 1, 2, 3, 4, 5))(*args)
    assert float(jnp.abs(grads[0]).sum()) > 0 and float(jnp.abs(grads[1]).sum()) > 0
    for g in grads[2:]:
        assert float(jnp.abs(g).sum()) == 0.0


def test_itm_loss_matches_numpy():
    rng = np.random.default_rng(1)
    logits = rng.normal(size=(12, 2)).astype(np.float32)
    labels = np.asarray(losses.itm_labels(4))
    assert labels.tolist() == [1] * 4 + [0] * 8
    expected = -_np_log_softmax(logits.astype(np.float64))[np.arange(12), labels].mean()
    np.testing.assert_allclose(float(losses.itm_loss(jnp.asarray(logits), jnp.asarray(labels))),
                               expected, rtol=1e-5)


def np_lm(logits, ids, eps=0.1, pad=0):
    """torch CrossEntropyLoss(label_smoothing=eps, ignore_index) on shifted logits, written plainly."""
    total, count = 0.0, 0
    for b in range(ids.shape[0]):
        for t in range(ids.shape[1] - 1):
            target = ids[b, t + 1]
            if target == pad:
                continue
            logp = _np_log_softmax(logits[b, t].astype(np.float64))
            total += (1 - eps) * -logp[target] + eps * -logp.mean()
            count += 1
    return total / count


def test_lm_loss_matches_numpy():
    rng = np.random.default_rng(2)
    logits = rng.normal(size=(3, 6, 11)).astype(np.float32)
    ids = np.array([[5, 7, 2, 3, 0, 0], [5, 1, 1, 1, 1, 3], [5, 9, 0, 0, 0, 0]])
    got = losses.lm_loss(jnp.asarray(logits), jnp.asarray(ids), pad_id=0, label_smoothing=0.1)
    np.testing.assert_allclose(float(got), np_lm(logits, ids), rtol=1e-5)
    no_smooth = losses.lm_loss(jnp.asarray(logits), jnp.asarray(ids), label_smoothing=0.0)
    np.testing.assert_allclose(float(no_smooth), np_lm(logits, ids, eps=0.0), rtol=1e-5)


def test_lm_loss_ignores_pad_positions():
    rng = np.random.default_rng(3)
    logits = rng.normal(size=(2, 5, 7)).astype(np.float32)
    ids = np.array([[4, 2, 3, 0, 0], [4, 6, 0, 0, 0]])
    changed = logits.copy()
    changed[0, 3:] += 100.0  # logits that predict pad targets must not matter
    changed[1, 2:] -= 50.0
    a = losses.lm_loss(jnp.asarray(logits), jnp.asarray(ids))
    b = losses.lm_loss(jnp.asarray(changed), jnp.asarray(ids))
    np.testing.assert_allclose(float(a), float(b), rtol=1e-6)


def test_hard_negatives_never_positive_and_follow_weights():
    rng = np.random.default_rng(4)
    b = 6
    sim_i2t = rng.normal(size=(b, b)).astype(np.float32) * 2
    sim_t2i = rng.normal(size=(b, b)).astype(np.float32) * 2
    keys = jax.random.split(jax.random.key(0), 4000)
    sample = jax.jit(jax.vmap(lambda k: losses.hard_negative_indices(k, sim_i2t, sim_t2i)))
    neg_img, neg_txt = (np.asarray(x) for x in sample(keys))
    assert neg_img.shape == (4000, b)
    assert not (neg_img == np.arange(b)).any() and not (neg_txt == np.arange(b)).any()
    for sims, draws in ((sim_t2i, neg_img), (sim_i2t, neg_txt)):
        weights = _np_softmax(sims.astype(np.float64)) + 1e-4
        np.fill_diagonal(weights, 0)
        weights /= weights.sum(1, keepdims=True)
        freq = np.stack([np.bincount(draws[:, r], minlength=b) for r in range(b)]) / len(draws)
        np.testing.assert_allclose(freq, weights, atol=0.03)


def test_hard_negatives_respect_ids_and_local_shards():
    b = 8
    sims = jnp.zeros((b, b))
    ids = jnp.array([0, 0, 1, 1, 2, 2, 3, 4])
    keys = jax.random.split(jax.random.key(1), 500)
    neg_img, neg_txt = jax.vmap(lambda k: losses.hard_negative_indices(
        k, sims, sims, image_ids=ids))(keys)
    ids_np = np.asarray(ids)
    assert not (ids_np[np.asarray(neg_img)] == ids_np).any()
    assert not (ids_np[np.asarray(neg_txt)] == ids_np).any()
    neg_img, _ = jax.vmap(lambda k: losses.hard_negative_indices(
        k, sims, sims, negatives="local", num_shards=2))(keys)
    rows = np.arange(b)
    assert ((np.asarray(neg_img) // 4) == rows // 4).all()
    assert len(np.unique(np.asarray(neg_img)[:, 0])) == 3  # uniform over the 3 in-shard negatives


def test_alpha_ramp():
    assert float(losses.alpha_at(0, 0.4, 100)) == 0.0
    np.testing.assert_allclose(float(losses.alpha_at(50, 0.4, 100)), 0.2, rtol=1e-6)
    np.testing.assert_allclose(float(losses.alpha_at(500, 0.4, 100)), 0.4, rtol=1e-6)
    np.testing.assert_allclose(float(losses.alpha_at(0, 0.4, 0)), 0.4, rtol=1e-6)
