"""The pre-training step: ITC + ITM + LM on one global batch (blip.md §2.3), pure and jittable.

Batch (global arrays, batch axis sharded over ('data', 'fsdp')):
    image           (B, H, W, 3) float32, normalised
    input_ids       (B, T) int32, [CLS] first, right-padded with pad
    attention_mask  (B, T) int32, 1 = token
    image_id        (B,) int32, only read when config.itc.duplicate_aware

Order inside a step, as in the original: momentum update, momentum features, ITC against
[momentum batch ; queue], hard negatives from the in-batch similarities, ITM on 3B pairs, LM
on the decoder, then the optimizer update and the enqueue of the momentum features.
The NaN policy lives here too: a non-finite loss or gradient never reaches the parameters
(the update, momentum and queues are left untouched and `num_skipped` counts it); the loop
decides whether to go on ('skip') or to save and stop ('stop').
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import optax

from blip_jax import losses, sharding
from blip_jax.models.blip import TEMP_MAX, TEMP_MIN
from blip_jax.train import state as state_lib


def _with_token(ids, token: int):
    return ids.at[:, 0].set(token)


def pretrain_losses(model, params, momentum_params, queues, batch, rngs, *, config, alpha, num_shards):
    """(total, aux): the three BLIP losses for one batch; aux has each loss and the momentum features.

    rngs: dict with 'dropout', 'momentum_dropout', 'negatives' keys.
    queues: (image_queue, text_queue, idx_queue).
    """
    tokens = config.model.tokens
    itc, itm = config.itc, config.itm
    image_queue, text_queue, idx_queue = queues
    pixels, text_ids, text_mask = batch["image"], batch["input_ids"], batch["attention_mask"]
    image_ids = batch["image_id"] if itc.duplicate_aware else None
    batch_size = text_ids.shape[0]

    def forward(module):
        image_embeds = module.image_embeds(pixels, deterministic=False)
        image_feat = module.image_features(image_embeds)
        text_feat = module.text_features(text_ids, text_mask, deterministic=False)
        return image_embeds, image_feat, text_feat, module.temperature()

    def momentum_forward(module):
        deterministic = not itc.momentum_dropout
        image_feat_m = module.image_features(module.image_embeds(pixels, deterministic=deterministic))
        text_feat_m = module.text_features(text_ids, text_mask, deterministic=deterministic)
        return image_feat_m, text_feat_m

    image_feat_m, text_feat_m = model.apply({"params": momentum_params}, method=momentum_forward,
                                            rngs={"dropout": rngs["momentum_dropout"]})
    image_feat_m, text_feat_m = jax.lax.stop_gradient((image_feat_m, text_feat_m))

    key_dropout_1, key_dropout_2 = jax.random.split(rngs["dropout"])
    image_embeds, image_feat, text_feat, temp = model.apply(
        {"params": params}, method=forward, rngs={"dropout": key_dropout_1})
    loss_itc, sims = losses.itc_loss(
        image_feat, text_feat, image_feat_m, text_feat_m, image_queue, text_queue, temp, alpha,
        image_ids=image_ids, idx_queue=idx_queue, negatives=itc.negatives, num_shards=num_shards)

    hard_negative_image_idx, hard_negative_text_idx = losses.hard_negative_indices(
        rngs["negatives"], sims["sim_i2t"], sims["sim_t2i"], image_ids=image_ids,
        negatives=itm.negatives, num_shards=num_shards)
    encoder_ids = _with_token(text_ids, tokens.enc)
    itm_ids = jnp.concatenate([encoder_ids, encoder_ids, encoder_ids[hard_negative_text_idx]])
    itm_mask = jnp.concatenate([text_mask, text_mask, text_mask[hard_negative_text_idx]])
    itm_images = jnp.concatenate([image_embeds, image_embeds[hard_negative_image_idx], image_embeds])
    decoder_ids = _with_token(text_ids, tokens.dec)

    def grounded(module):
        itm_logits = module.itm_logits(itm_ids, itm_mask, itm_images, deterministic=False)
        lm_logits = module.lm_logits(decoder_ids, text_mask, image_embeds, deterministic=False)
        return itm_logits, lm_logits

    itm_logits, lm_logits = model.apply({"params": params}, method=grounded,
                                        rngs={"dropout": key_dropout_2})
    loss_itm = losses.itm_loss(itm_logits, losses.itm_labels(batch_size))
    loss_lm = losses.lm_loss(lm_logits, decoder_ids, pad_id=tokens.pad,
                             label_smoothing=config.lm.label_smoothing)
    total = loss_itc + loss_itm + loss_lm
    aux = {"loss_itc": loss_itc, "loss_itm": loss_itm, "loss_lm": loss_lm, "temp": temp,
           "image_feat_m": image_feat_m, "text_feat_m": text_feat_m}
    return total, aux


def _tree_select(pred, on_true, on_false):
    return jax.tree.map(lambda a, b: jnp.where(pred, a, b), on_true, on_false)


def make_train_step(model, config, tx, schedule, num_shards: int):
    """train_step(state, batch) -> (state, metrics); pure, to be jitted with donate_argnums=0.

    num_shards: how many shards the batch axis is split into (for 'local' negatives).
    """
    itc = config.itc
    accum = int(config.optim.get("grad_accum_steps", 1) or 1)
    queue_size = int(itc.queue_size)

    def train_step(state, batch):
        step = state["step"]
        base_key = jax.random.wrap_key_data(state["rng"])
        step_key = jax.random.fold_in(base_key, step)
        key_dropout, key_momentum, key_negatives = jax.random.split(step_key, 3)
        alpha = losses.alpha_at(step, itc.alpha, itc.alpha_ramp_steps)
        params = state["params"]
        momentum_params = state_lib.momentum_update(state["momentum_params"], params, itc.momentum)
        queues = (state["image_queue"], state["text_queue"], state["idx_queue"])
        loss_fn = functools.partial(
            pretrain_losses, model, momentum_params=momentum_params, queues=queues, batch=batch,
            rngs={"dropout": key_dropout, "momentum_dropout": key_momentum, "negatives": key_negatives},
            config=config, alpha=alpha, num_shards=num_shards)
        (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        grad_norm = optax.tree.norm(grads)
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)

        updates, new_opt_state = tx.update(grads, state["opt_state"], params)
        new_params = optax.apply_updates(params, updates)
        if "temp" in new_params:  # the original clamps the parameter itself, in place
            new_params = dict(new_params, temp=jnp.clip(new_params["temp"], TEMP_MIN, TEMP_MAX))

        batch_size = batch["input_ids"].shape[0]
        ptr = state["queue_ptr"]
        new_queues = {
            "image_queue": state_lib.enqueue(state["image_queue"], aux["image_feat_m"], ptr),
            "text_queue": state_lib.enqueue(state["text_queue"], aux["text_feat_m"], ptr),
            "idx_queue": (state_lib.enqueue(state["idx_queue"], batch["image_id"], ptr)
                          if itc.duplicate_aware else state["idx_queue"]),
            "queue_ptr": state_lib.advance_ptr(ptr, batch_size, queue_size),
        }
        updated = {"params": new_params, "momentum_params": momentum_params,
                   "opt_state": new_opt_state, **new_queues}
        kept = {k: state[k] for k in updated}
        new_state = dict(state)
        new_state.update(_tree_select(finite, updated, kept))
        new_state["step"] = step + 1
        new_state["num_skipped"] = state["num_skipped"] + (~finite).astype(jnp.int32)
        metrics = {
            "loss": loss, "loss_itc": aux["loss_itc"], "loss_itm": aux["loss_itm"],
            "loss_lm": aux["loss_lm"], "lr": schedule(step // accum), "alpha": alpha,
            "temp": aux["temp"], "grad_norm": grad_norm, "finite": finite,
            "num_skipped": new_state["num_skipped"],
        }
        return new_state, metrics

    return train_step


def jit_train_step(train_step, state_shardings, mesh):
    """jax.jit over the mesh: the state keeps its shardings and is donated; metrics replicate."""
    return jax.jit(train_step, donate_argnums=(0,),
                   out_shardings=(state_shardings, sharding.replicated(mesh)))
