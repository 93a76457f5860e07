"""BLIP task models built from the ViT and MED (blip.md §2.3–2.7).

Every model takes token ids literally: callers put [ENC] / [DEC] in position 0 (ModelBundle does).
Methods are pure and called with `model.apply(variables, ..., method=...)`.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import flax.linen as nn
import ml_collections

from blip_jax.models.config import BlipConfig, frozen
from blip_jax.models.layers import dense
from blip_jax.models.med import Med
from blip_jax.models.vit import VisionTransformer, encode_in_passes

TASKS = ("caption", "retrieval", "vqa", "pretrain")
TEMP_MIN, TEMP_MAX = 0.001, 0.5


def l2_normalize(x, eps=1e-12):
    """F.normalize semantics: x / max(||x||, eps), in float32."""
    x = x.astype(jnp.float32)
    return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), eps)


def _head(features, config: BlipConfig, name):
    # flax's default (LeCun normal) init, not the encoders' truncated normal.
    return dense(features, config.options, name, kernel_init=nn.linear.default_kernel_init)


class _ImageEncoding:
    """Shared `image_embeds` method for models with a `visual_encoder`."""

    def image_embeds(self, pixels, deterministic=True):
        """pixels (B, H, W, 3) normalised NHWC -> (B, 1 + N, D)."""
        return encode_in_passes(self.visual_encoder, pixels, deterministic)


class _Decoding:
    """Shared `lm_logits` method for models with an image- (or question-) grounded MED decoder."""

    def lm_logits(self, input_ids, attention_mask, encoder_hidden_states, encoder_attention_mask=None,
                  deterministic=True, decode=False):
        """Decoder logits (B, T, V) float32; ids start with [DEC]. `decode=True` uses the KV cache."""
        decoder = self._decoder()
        hidden = decoder(input_ids, attention_mask, encoder_hidden_states, encoder_attention_mask,
                         mode="decoder", deterministic=deterministic, decode=decode)
        return decoder.lm_logits(hidden)


class Captioner(_ImageEncoding, _Decoding, nn.Module):
    """ViT + MED decoder (BLIP_Decoder, blip.md §2.6)."""

    config: BlipConfig

    def setup(self):
        self.visual_encoder = VisionTransformer(self.config.vision, self.config.options)
        self.text_decoder = Med(self.config.text, self.config.options, with_lm_head=True)

    def _decoder(self):
        return self.text_decoder

    def __call__(self, pixels, input_ids, attention_mask, deterministic=True):
        return self.lm_logits(input_ids, attention_mask, self.image_embeds(pixels, deterministic),
                              deterministic=deterministic)


class Retriever(_ImageEncoding, nn.Module):
    """ViT + MED encoder + ITC projections + ITM head (BLIP_Retrieval / BLIP_ITM, blip.md §2.4)."""

    config: BlipConfig

    def setup(self):
        config = self.config
        self.visual_encoder = VisionTransformer(config.vision, config.options)
        self.text_encoder = self._make_text_encoder()
        self.vision_proj = _head(config.embed_dim, config, "vision_proj")
        self.text_proj = _head(config.embed_dim, config, "text_proj")
        self.itm_head = _head(2, config, "itm_head")
        self.temp = self.param("temp", lambda key: jnp.asarray(0.07, config.options.storage_dtype))

    def _make_text_encoder(self):
        return Med(self.config.text, self.config.options)

    def temperature(self):
        """The learnable ITC temperature, clamped to [0.001, 0.5] as the reference does every forward."""
        return jnp.clip(self.temp.astype(jnp.float32), TEMP_MIN, TEMP_MAX)

    def image_features(self, image_embeds):
        """(B, 1 + N, D) -> (B, E) L2-normalised projection of [CLS]."""
        return l2_normalize(self.vision_proj(image_embeds[:, 0]))

    def text_features(self, input_ids, attention_mask, deterministic=True):
        """Unimodal text ([CLS] first) -> (B, E) L2-normalised."""
        hidden = self.text_encoder(input_ids, attention_mask, mode="text", deterministic=deterministic)
        return l2_normalize(self.text_proj(hidden[:, 0]))

    def multimodal_states(self, input_ids, attention_mask, image_embeds, image_mask=None, deterministic=True):
        """Image-grounded encoder states (B, T, H); ids start with [ENC]."""
        return self.text_encoder(input_ids, attention_mask, image_embeds, image_mask, mode="multimodal",
                                 deterministic=deterministic)

    def itm_logits(self, input_ids, attention_mask, image_embeds, image_mask=None, deterministic=True):
        """(B, 2) float32 match / no-match logits from the [ENC] token."""
        hidden = self.multimodal_states(input_ids, attention_mask, image_embeds, image_mask, deterministic)
        return self.itm_head(hidden[:, 0]).astype(jnp.float32)

    def __call__(self, pixels, input_ids, attention_mask, deterministic=True):
        image_embeds = self.image_embeds(pixels, deterministic)
        image_feat = self.image_features(image_embeds)
        text_feat = self.text_features(input_ids, attention_mask, deterministic)
        itm = self.itm_logits(input_ids, attention_mask, image_embeds, deterministic=deterministic)
        return image_feat @ text_feat.T / self.temperature(), itm


class Pretrainer(_Decoding, Retriever):
    """BLIP_Pretrain (blip.md §2.3): one MED serves as text encoder, image-grounded encoder and decoder.

    Sharing is structural: `text_encoder` owns an extra `decoder_attention` per layer and an `lm_head`;
    embeddings, cross-attention, FFN and the LM output matrix are the very same parameters in every mode,
    so a gradient through the encoder and the decoder accumulates in one leaf.
    """

    def _make_text_encoder(self):
        return Med(self.config.text, self.config.options, with_lm_head=True, decoder_self_attention=True)

    def _decoder(self):
        return self.text_encoder  # the shared MED, in decoder mode

    def __call__(self, pixels, input_ids, attention_mask, deterministic=True):
        """Every path at once (used to initialise): ITC logits, ITM logits, LM logits, one ViT pass."""
        image_embeds = self.image_embeds(pixels, deterministic)
        image_feat = self.image_features(image_embeds)
        text_feat = self.text_features(input_ids, attention_mask, deterministic)
        itm = self.itm_logits(input_ids, attention_mask, image_embeds, deterministic=deterministic)
        lm = self.lm_logits(input_ids, attention_mask, image_embeds, deterministic=deterministic)
        return image_feat @ text_feat.T / self.temperature(), itm, lm


class VqaModel(_ImageEncoding, _Decoding, nn.Module):
    """BLIP_VQA (blip.md §2.7): image-grounded question encoder + an answer decoder that cross-attends
    to the question states (so its cross-attention K/V width is the text width). Not tied."""

    config: BlipConfig

    def setup(self):
        config = self.config
        self.visual_encoder = VisionTransformer(config.vision, config.options)
        self.text_encoder = Med(config.text, config.options)
        self.text_decoder = Med(config.text, config.options, with_lm_head=True)

    def encode_question(self, input_ids, attention_mask, image_embeds, deterministic=True):
        """Question ids ([ENC] first) + image tokens -> question states (B, T, H)."""
        return self.text_encoder(input_ids, attention_mask, image_embeds, mode="multimodal",
                                 deterministic=deterministic)

    def _decoder(self):
        return self.text_decoder  # attends to the question states, not to the image

    def __call__(self, pixels, question_ids, question_mask, answer_ids, answer_mask, deterministic=True):
        question_states = self.encode_question(question_ids, question_mask, self.image_embeds(pixels, deterministic),
                                               deterministic)
        return self.lm_logits(answer_ids, answer_mask, question_states, question_mask, deterministic)


MODEL_CLASSES = {"caption": Captioner, "retrieval": Retriever, "vqa": VqaModel, "pretrain": Pretrainer}


def build_model(config: ml_collections.ConfigDict, task: str) -> nn.Module:
    """The flax module for `task` from a model ConfigDict (see models/config.py)."""
    if task not in MODEL_CLASSES:
        raise ValueError(f"unknown task {task!r}: choose one of {TASKS}")
    return MODEL_CLASSES[task](frozen(config))


def dummy_inputs(config: ml_collections.ConfigDict, task: str, batch: int = 1, length: int = 8):
    """Example inputs whose shapes initialise every parameter of `task`'s model."""
    size = config.vision.image_size
    pixels = jnp.zeros((batch, size, size, 3), jnp.float32)
    ids = jnp.ones((batch, length), jnp.int32)
    mask = jnp.ones((batch, length), jnp.int32)
    return (pixels, ids, mask, ids, mask) if task == "vqa" else (pixels, ids, mask)


def init_params(config: ml_collections.ConfigDict, task: str, rng):
    """Randomly initialised parameters of `task`'s model (plain nested dicts)."""
    model = build_model(config, task)
    return model.init({"params": rng}, *dummy_inputs(config, task))["params"]


def init_decode_cache(model: nn.Module, params, batch_size: int, max_length: int, encoder_hidden_states,
                      encoder_attention_mask=None):
    """The zero KV cache for decoding up to `max_length` tokens (docs/DESIGN.md, decoding contract)."""
    ids = jnp.zeros((batch_size, max_length), jnp.int32)

    def create():
        return model.apply({"params": params}, ids, jnp.ones_like(ids), encoder_hidden_states, encoder_attention_mask,
                           decode=True, method="lm_logits", mutable=["cache"])[1]["cache"]

    shapes = jax.eval_shape(create)
    return jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)
