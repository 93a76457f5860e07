"""Sample captions for held-out images: greedy decoding with the pre-training decoder (decode.py)."""
from __future__ import annotations

import numpy as np

from blip_jax.evaluators.retrieval import to_host


def greedy_captions(model, params, config, mesh, num_images: int, split=None) -> list:
    """[{'image_id', 'caption', 'reference'}] for the first `num_images` images of the eval split."""
    from blip_jax import decode
    from blip_jax.data import pipeline, text

    split = split or config.input.eval_split
    tokens = {k: int(config.model.tokens[k]) for k in ("pad", "cls", "sep", "dec", "enc")}
    tok = text.tokenizer(config.input.tokenizer)
    texts = pipeline.eval_texts(config.input, split)
    pixels, image_ids, indices = [], [], []
    for batch in pipeline.eval_batches(config.input, mesh, split):
        mask = to_host(batch["mask"]).astype(bool)
        pixels.append(to_host(batch["image"])[mask])
        image_ids.append(to_host(batch["image_id"])[mask])
        indices.append(to_host(batch["index"])[mask])
        if sum(len(p) for p in pixels) >= num_images:
            break
    pixels = np.concatenate(pixels)[:num_images]
    image_ids = np.concatenate(image_ids)[:num_images]
    indices = np.concatenate(indices)[:num_images]
    max_length = min(int(config.eval.caption_max_len), int(config.model.text.max_position_embeddings))
    ids = decode.generate(model, params, pixels, tokens=tokens, max_length=max_length)
    captions = decode.ids_to_text(tok, ids)
    references = texts["image_text_indices"]
    return [{"image_id": int(i), "caption": c, "reference": texts["texts"][references[int(r)][0]]}
            for i, c, r in zip(image_ids, captions, indices)]
