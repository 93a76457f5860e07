"""Zero-shot image-text retrieval: ITC ranking, optional ITM re-ranking of the top k, recalls in percent.

As the original `evaluation()` in train_retrieval.py: ITC scores are cosine similarities; with
k_test > 0 the top-k candidates of each query are re-scored with ITM positive logit + cosine and
everything else gets -100. Recalls follow `itm_eval` (an image counts as retrieved-correctly at k
when any of its captions ranks within k).

`evaluate_split(model, params, config, mesh)` reads the held-out split through the data pipeline
(`eval_batches`, `eval_texts`, `text_batches`); `evaluate(model, params, data, ...)` takes host
arrays:
    images     (N, H, W, 3) float32, normalised
    text_ids   (M, T) int32 with [CLS] first;  text_mask (M, T)
    txt2img    (M,) int: index of each caption's image
"""
from __future__ import annotations

import functools

import jax
import numpy as np

from blip_jax import sharding


def recalls(scores_i2t: np.ndarray, scores_t2i: np.ndarray, txt2img: np.ndarray) -> dict:
    """i2t/t2i R@1/5/10 (percent) and their mean (`itm_eval` in the original).

    scores_i2t: (N images, M texts); scores_t2i: (M, N); txt2img: (M,) image index of each text.
    Ties count against the query (a correct item ranks below every equal-scored other item)."""
    scores_i2t, scores_t2i = np.asarray(scores_i2t), np.asarray(scores_t2i)
    txt2img = np.asarray(txt2img)
    num_images, num_texts = scores_i2t.shape
    own = txt2img[None, :] == np.arange(num_images)[:, None]            # (N, M)
    # i2t: the best rank among the image's captions = #texts scoring above its best caption.
    best_own = np.where(own, scores_i2t, -np.inf).max(axis=1)
    i2t_rank = (np.where(own, -np.inf, scores_i2t) >= best_own[:, None]).sum(axis=1)
    # t2i: #other images scoring at least as high as the caption's image.
    own_score = scores_t2i[np.arange(num_texts), txt2img]
    others = np.ones_like(scores_t2i, bool)
    others[np.arange(num_texts), txt2img] = False
    t2i_rank = ((scores_t2i >= own_score[:, None]) & others).sum(axis=1)
    result = {}
    for name, ranks in (("i2t", i2t_rank), ("t2i", t2i_rank)):
        for k in (1, 5, 10):
            result[f"{name}_r{k}"] = float(100.0 * np.mean(ranks < k))
    result["r_mean"] = float(np.mean([result[f"{n}_r{k}"] for n in ("i2t", "t2i") for k in (1, 5, 10)]))
    return result


_COMPILED = {}


def _compiled(model) -> dict:
    """Jitted feature / ITM functions of `model`, params as an argument (compiled once per shape)."""
    key = id(model)
    if key not in _COMPILED:
        def image(params, images):
            def run(module):
                embeds = module.image_embeds(images)
                return embeds, module.image_features(embeds)
            return model.apply({"params": params}, method=run)

        def text(params, ids, mask):
            return model.apply({"params": params}, ids, mask, method="text_features")

        def itm(params, embeds, ids, mask):
            return model.apply({"params": params}, ids, mask, embeds, method="itm_logits")[:, 1]

        _COMPILED[key] = {"model": model, "image": jax.jit(image), "text": jax.jit(text), "itm": jax.jit(itm)}
    return _COMPILED[key]


def _batched(fn, arrays, batch_size, mesh):
    """Apply a jitted fn over host arrays in fixed-size, batch-sharded chunks (last one padded)."""
    total = len(arrays[0])
    outputs = []
    for start in range(0, total, batch_size):
        chunk = [a[start:start + batch_size] for a in arrays]
        n = len(chunk[0])
        if n < batch_size:
            chunk = [np.concatenate([c, np.repeat(c[-1:], batch_size - n, axis=0)]) for c in chunk]
        out = fn(*[sharding.global_from_host(c, mesh) for c in chunk])
        outputs.append(jax.tree.map(lambda x: to_host(x)[:n], out))
    return jax.tree.map(lambda *xs: np.concatenate(xs), *outputs)


def evaluate(model, params, data: dict, *, enc_token: int, k_test: int = 0, batch_size: int = 256,
             mesh=None) -> dict:
    """Zero-shot retrieval metrics on host arrays `data` (see module docstring)."""
    mesh = mesh or sharding.make_mesh()
    shards = sharding.num_batch_shards(mesh)
    batch_size = max(shards, (batch_size // shards) * shards)

    fns = _compiled(model)
    image_fn = functools.partial(fns["image"], params)
    text_fn = functools.partial(fns["text"], params)

    image_embeds, image_feat = _batched(image_fn, (data["images"],), batch_size, mesh)
    text_feat = _batched(text_fn, (data["text_ids"], data["text_mask"]), batch_size, mesh)
    features = {"image_embeds": image_embeds, "image_feat": image_feat, "text_feat": text_feat,
                "text_ids": data["text_ids"], "text_mask": data["text_mask"], "txt2img": data["txt2img"]}
    return rank_and_score(model, params, features, enc_token=enc_token, k_test=k_test,
                          batch_size=batch_size, mesh=mesh)


def rank_and_score(model, params, features: dict, *, enc_token: int, k_test: int, batch_size: int,
                   mesh) -> dict:
    """Recalls from extracted features: ITC cosine ranking, then ITM re-ranking of the top k."""
    shards = sharding.num_batch_shards(mesh)
    batch_size = max(shards, (batch_size // shards) * shards)
    sims = features["image_feat"] @ features["text_feat"].T
    result = {"itc": recalls(sims, sims.T, features["txt2img"])}
    if k_test > 0:
        scores_i2t, scores_t2i = itm_rerank(
            model, params, sims, features["image_embeds"], features["text_ids"], features["text_mask"],
            enc_token=enc_token, k=k_test, batch_size=batch_size, mesh=mesh)
        result["itm"] = recalls(scores_i2t, scores_t2i, features["txt2img"])
    final = dict(result["itm"] if k_test > 0 else result["itc"])
    final["ranking"] = "itm_rerank" if k_test > 0 else "itc"
    final["k_test"] = int(k_test)
    for key, value in result["itc"].items():
        final[f"itc_{key}"] = value
    return final


def itm_rerank(model, params, sims, image_embeds, text_ids, text_mask, *, enc_token: int, k: int,
               batch_size: int, mesh):
    """(scores_i2t (N, M), scores_t2i (M, N)): ITM positive logit + cosine on each query's ITC
    top k, -100 elsewhere (the original's score matrices). Pairs scored in both directions are
    run through the ITM head once."""
    num_images, num_texts = sims.shape
    k_i2t, k_t2i = min(k, num_texts), min(k, num_images)
    encoder_ids = np.array(text_ids, copy=True)
    encoder_ids[:, 0] = enc_token

    pair_scores = functools.partial(_compiled(model)["itm"], params)

    top_texts = np.argsort(-sims, axis=1, kind="stable")[:, :k_i2t]        # (N, k)
    top_images = np.argsort(-sims.T, axis=1, kind="stable")[:, :k_t2i]     # (M, k)
    i2t_pairs = np.stack([np.repeat(np.arange(num_images), k_i2t), top_texts.reshape(-1)], 1)
    t2i_pairs = np.stack([top_images.reshape(-1), np.repeat(np.arange(num_texts), k_t2i)], 1)
    pairs, inverse = np.unique(np.concatenate([i2t_pairs, t2i_pairs]), axis=0, return_inverse=True)
    inverse = inverse.reshape(-1)
    logits = []
    for start in range(0, len(pairs), batch_size):
        chunk = pairs[start:start + batch_size]
        n = len(chunk)
        if n < batch_size:
            chunk = np.concatenate([chunk, np.repeat(chunk[-1:], batch_size - n, axis=0)])
        arrays = (image_embeds[chunk[:, 0]], encoder_ids[chunk[:, 1]], text_mask[chunk[:, 1]])
        logits.append(to_host(pair_scores(*[sharding.global_from_host(a, mesh) for a in arrays]))[:n])
    scores = np.concatenate(logits) + sims[pairs[:, 0], pairs[:, 1]]
    scores_i2t = np.full(sims.shape, -100.0, np.float32)
    scores_t2i = np.full(sims.T.shape, -100.0, np.float32)
    first = inverse[:len(i2t_pairs)]
    scores_i2t[i2t_pairs[:, 0], i2t_pairs[:, 1]] = scores[first]
    second = inverse[len(i2t_pairs):]
    scores_t2i[t2i_pairs[:, 1], t2i_pairs[:, 0]] = scores[second]
    return scores_i2t, scores_t2i


def to_host(x) -> np.ndarray:
    """A global jax.Array (possibly spread over processes) -> the full numpy array on every host."""
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        from jax.experimental import multihost_utils
        return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(jax.device_get(x))


def _collect(batches, fn, keys):
    """Run fn on every global batch; keep unpadded rows, ordered by 'index'."""
    outputs, order = [], []
    for batch in batches:
        out = fn(*[batch[k] for k in keys])
        mask = to_host(batch["mask"]).astype(bool)
        order.append(to_host(batch["index"])[mask])
        outputs.append(jax.tree.map(lambda y: to_host(y)[mask], out))
    order = np.concatenate(order)
    merged = jax.tree.map(lambda *ys: np.concatenate(ys), *outputs)
    permutation = np.argsort(order, kind="stable")
    return jax.tree.map(lambda y: y[permutation], merged)


def evaluate_split(model, params, config, mesh, split=None) -> dict:
    """Zero-shot retrieval on config.input.eval_split (or `split`) through the data pipeline."""
    from blip_jax.data import pipeline
    input_config = config.input
    split = split or input_config.eval_split

    fns = _compiled(model)
    image_fn = functools.partial(fns["image"], params)
    text_fn = functools.partial(fns["text"], params)

    image_embeds, image_feat = _collect(pipeline.eval_batches(input_config, mesh, split), image_fn, ("image",))
    texts = pipeline.eval_texts(input_config, split)
    text_feat, text_ids, text_mask = _collect(  # one pass: features and the tokens ITM re-ranks
        pipeline.text_batches(input_config, mesh, texts["texts"]),
        lambda ids, mask: (text_fn(ids, mask), ids, mask), ("input_ids", "attention_mask"))
    data = {"image_embeds": image_embeds, "image_feat": image_feat, "text_feat": text_feat,
            "text_ids": text_ids, "text_mask": text_mask, "txt2img": np.asarray(texts["text_image_index"])}
    k_test = int(config.eval.get("k_test", 0))
    result = rank_and_score(model, params, data, enc_token=int(config.model.tokens.enc), k_test=k_test,
                            batch_size=int(config.eval.batch_size), mesh=mesh)
    result.update(split=split, num_images=int(len(image_feat)), num_texts=int(len(text_feat)))
    return result
