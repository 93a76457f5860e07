"""Retrieval evaluator: recalls match the original itm_eval; ITM re-ranking of the top k."""
import jax
import jax.numpy as jnp
import numpy as np

from blip_jax import sharding
from blip_jax.evaluators import get_evaluator, retrieval
from blip_jax.models import build_model, model_config
from blip_jax.models.blip import init_params


def itm_eval_reference(scores_i2t, scores_t2i, txt2img, img2txt):
    """BLIP's train_retrieval.itm_eval, written plainly (argsort ranks, best caption per image)."""
    ranks = np.zeros(scores_i2t.shape[0])
    for index, score in enumerate(scores_i2t):
        inds = np.argsort(score)[::-1]
        ranks[index] = min(np.where(inds == i)[0][0] for i in img2txt[index])
    tr = [100.0 * np.mean(ranks < k) for k in (1, 5, 10)]
    ranks = np.zeros(scores_t2i.shape[0])
    for index, score in enumerate(scores_t2i):
        inds = np.argsort(score)[::-1]
        ranks[index] = np.where(inds == txt2img[index])[0][0]
    ir = [100.0 * np.mean(ranks < k) for k in (1, 5, 10)]
    return tr, ir


def test_recalls_match_the_original():
    rng = np.random.default_rng(0)
    num_images, per_image = 12, 3
    txt2img = np.repeat(np.arange(num_images), per_image)
    img2txt = [list(np.where(txt2img == i)[0]) for i in range(num_images)]
    scores_i2t = rng.normal(size=(num_images, len(txt2img)))
    scores_t2i = rng.normal(size=(len(txt2img), num_images))
    scores_i2t[np.arange(num_images), [t[0] for t in img2txt]] += 1.5  # some signal
    result = retrieval.recalls(scores_i2t, scores_t2i, txt2img)
    tr, ir = itm_eval_reference(scores_i2t, scores_t2i, txt2img, img2txt)
    assert [result["i2t_r1"], result["i2t_r5"], result["i2t_r10"]] == tr
    assert [result["t2i_r1"], result["t2i_r5"], result["t2i_r10"]] == ir
    perfect = retrieval.recalls(np.eye(4)[:, np.arange(8) // 2], np.eye(4)[np.arange(8) // 2], np.arange(8) // 2)
    assert perfect["i2t_r1"] == perfect["t2i_r1"] == 100.0


def _tiny():
    config = model_config("tiny", "tiny", 16)
    config.vision.update(patch_size=8)
    config.text.update(vocab_size=40, max_position_embeddings=16, hidden_dropout=0.0, attention_dropout=0.0)
    config.tokens.update(pad=0, cls=1, sep=2, dec=38, enc=39)
    config.embed_dim = 16
    return config


def test_itm_rerank_of_all_candidates_equals_full_itm_ranking():
    config = _tiny()
    model = build_model(config, "pretrain")
    params = init_params(config, "pretrain", jax.random.key(0))
    rng = np.random.default_rng(1)
    num_images, num_texts = 5, 10
    data = {"images": rng.normal(size=(num_images, 16, 16, 3)).astype(np.float32),
            "text_ids": rng.integers(3, 38, (num_texts, 6)).astype(np.int32),
            "text_mask": np.ones((num_texts, 6), np.int32), "txt2img": np.arange(num_texts) // 2}
    data["text_ids"][:, 0] = 1
    mesh = sharding.make_mesh()
    with jax.set_mesh(mesh):
        itc_only = retrieval.evaluate(model, params, data, enc_token=39, k_test=0, batch_size=8, mesh=mesh)
        reranked = retrieval.evaluate(model, params, data, enc_token=39, k_test=num_images * num_texts,
                                      batch_size=8, mesh=mesh)
    # reference: every pair through the model directly
    embeds = model.apply({"params": params}, jnp.asarray(data["images"]), method="image_embeds")
    image_feat = np.asarray(model.apply({"params": params}, embeds, method="image_features"))
    text_feat = np.asarray(model.apply({"params": params}, jnp.asarray(data["text_ids"]),
                                       jnp.asarray(data["text_mask"]), method="text_features"))
    sims = image_feat @ text_feat.T
    expected_itc = retrieval.recalls(sims, sims.T, data["txt2img"])
    assert {k: itc_only[k] for k in expected_itc} == expected_itc and itc_only["ranking"] == "itc"
    enc_ids = data["text_ids"].copy()
    enc_ids[:, 0] = 39
    itm = np.zeros_like(sims)
    for i in range(num_images):
        logits = model.apply({"params": params}, jnp.asarray(enc_ids), jnp.asarray(data["text_mask"]),
                             jnp.repeat(embeds[i:i + 1], num_texts, axis=0), method="itm_logits")
        itm[i] = np.asarray(logits[:, 1])
    full = itm + sims
    expected = retrieval.recalls(full, full.T, data["txt2img"])
    for key, value in expected.items():
        assert abs(reranked[key] - value) < 1e-6, key
    assert reranked["ranking"] == "itm_rerank" and reranked["itc_t2i_r1"] == expected_itc["t2i_r1"]


def test_evaluator_registry():
    assert callable(get_evaluator("retrieval"))
    try:
        get_evaluator("bleu")
    except ValueError as error:
        assert "config.eval.kind" in str(error)
    else:
        raise AssertionError("unknown evaluator accepted")
