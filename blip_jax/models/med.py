"""MED: BLIP's BERT with cross-attention, used as text encoder, image-grounded encoder and decoder.

Post-norm BERT layers (blip.md §2.2). Modes:
  "text"        unimodal encoder: self-attention + FFN, cross-attention skipped;
  "multimodal"  image-grounded encoder: + cross-attention to `encoder_hidden_states`;
  "decoder"     causal self-attention + cross-attention (the captioner / answer decoder).
With `decoder_self_attention=True` (the pre-training model, blip.md §2.3) every layer owns a second
self-attention block, `decoder_attention`, that the decoder mode uses instead of `attention`; all other
parameters (embeddings, cross-attention, FFN, LM head) are the same modules in both modes.
"""
from __future__ import annotations

import jax.numpy as jnp
import flax.linen as nn

from blip_jax.models.attention import KeyValueCache, dot_product_attention
from blip_jax.models.config import Options, TextConfig
from blip_jax.models.layers import dense, layer_norm, rematerialised

MODES = ("text", "multimodal", "decoder")


class AttentionCore(nn.Module):
    """query/key/value projections and attention (the reference's `attention.self`)."""

    config: TextConfig
    options: Options
    cross: bool = False

    @nn.compact
    def __call__(self, hidden, kv_states, key_padding_mask, causal, deterministic, decode):
        config, options = self.config, self.options
        heads, width = config.num_heads, config.hidden_size

        def project(name, states):  # (B, T, W) -> (B, T, heads, head_dim)
            return dense(width, options, name)(states).reshape(states.shape[:2] + (heads, width // heads))

        query = project("query", hidden)
        extra_mask = None
        kv_heads_major = False
        if self.cross and decode:
            # Cross K/V: computed once at prefill (kv_states given), then read back every step. The cache
            # keeps them heads-major (B, H, S, Dh), the layout the attention products read.
            kv_heads_major = True
            initialized = self.has_variable("cache", "cross_key")
            if kv_states is not None:
                key, value = (project(name, kv_states).swapaxes(1, 2) for name in ("key", "value"))
                cross_key = self.variable("cache", "cross_key", jnp.zeros, key.shape, key.dtype)
                cross_value = self.variable("cache", "cross_value", jnp.zeros, value.shape, value.dtype)
                if initialized:
                    cross_key.value, cross_value.value = key, value
            else:
                key = self.get_variable("cache", "cross_key")
                value = self.get_variable("cache", "cross_value")
        else:
            source = kv_states if self.cross else hidden
            key, value = project("key", source), project("value", source)
            if decode and not self.cross:
                key, value, extra_mask, creating = KeyValueCache(name="cache")(key, value)
                if not creating:
                    key_padding_mask, causal = None, False  # the cache mask encodes causality
        dropout_rng = None
        if config.attention_dropout > 0.0 and not deterministic:
            dropout_rng = self.make_rng("dropout")
        if self.cross and decode and key.shape[0] != query.shape[0]:
            # Decoding n beams / samples per input from a cache whose cross K/V hold one row per input
            # (decode.py): rows b*n .. b*n+n-1 share input b's K/V, so fold them into the query length.
            per_input = query.shape[0] // key.shape[0]
            query = query.reshape(key.shape[0], per_input * query.shape[1], heads, width // heads)
        out = dot_product_attention(
            query, key, value, key_padding_mask=key_padding_mask, causal=causal, mask=extra_mask,
            dropout_rate=config.attention_dropout, dropout_rng=dropout_rng, deterministic=deterministic,
            impl=options.attention_impl, kv_heads_major=kv_heads_major)
        return out.reshape(hidden.shape[0], hidden.shape[1], width)


class AddNorm(nn.Module):
    """dense -> dropout -> LayerNorm(x + residual) (the reference's `*.output`)."""

    config: TextConfig
    options: Options

    @nn.compact
    def __call__(self, x, residual, deterministic):
        x = dense(self.config.hidden_size, self.options, "dense")(x)
        x = nn.Dropout(self.config.hidden_dropout)(x, deterministic=deterministic)
        x = layer_norm(self.config.layer_norm_eps, self.options, "LayerNorm")(x + residual)
        return x.astype(self.options.compute_dtype)


class Attention(nn.Module):
    """Self- or cross-attention block: `self` (projections + attention) and `output` (AddNorm)."""

    config: TextConfig
    options: Options
    cross: bool = False

    @nn.compact
    def __call__(self, hidden, kv_states, key_padding_mask, causal, deterministic, decode):
        context = AttentionCore(self.config, self.options, self.cross, name="self")(
            hidden, kv_states, key_padding_mask, causal, deterministic, decode)
        return AddNorm(self.config, self.options, name="output")(context, hidden, deterministic)


class Intermediate(nn.Module):
    config: TextConfig
    options: Options

    @nn.compact
    def __call__(self, x):
        return nn.gelu(dense(self.config.intermediate_size, self.options, "dense")(x), approximate=False)


class MedLayer(nn.Module):
    """Self-attention -> (cross-attention) -> FFN, each with Add & LayerNorm."""

    config: TextConfig
    options: Options
    decoder_self_attention: bool = False

    @nn.compact
    def __call__(self, hidden, text_mask, encoder_states, encoder_mask, mode, deterministic, decode):
        config, options = self.config, self.options
        self_attention = Attention(config, options, name="attention")
        decoder_attention = self_attention
        if self.decoder_self_attention:
            decoder_attention = Attention(config, options, name="decoder_attention")
        causal = mode == "decoder"
        out = (decoder_attention if causal else self_attention)(
            hidden, None, text_mask, causal, deterministic, decode)
        if self.decoder_self_attention and self.is_initializing():
            # Create both self-attention blocks whichever mode initialises the model.
            (self_attention if causal else decoder_attention)(hidden, None, text_mask, not causal, True, False)
        cross_attention = Attention(config, options, cross=True, name="crossattention")
        if mode != "text":
            out = cross_attention(out, encoder_states, encoder_mask, False, deterministic, decode)
        elif self.is_initializing() and encoder_states is not None:
            cross_attention(out, encoder_states, encoder_mask, False, deterministic, decode)
        ffn = Intermediate(config, options, name="intermediate")(out)
        return AddNorm(config, options, name="output")(ffn, out, deterministic)


class DecodePosition(nn.Module):
    """How many tokens the decoder has already consumed (the position offset while decoding)."""

    @nn.compact
    def __call__(self, new_tokens: int):
        initialized = self.has_variable("cache", "position_index")
        position_index = self.variable("cache", "position_index", lambda: jnp.array(0, jnp.int32))
        offset = position_index.value
        if initialized:
            position_index.value = offset + new_tokens
        return offset


class Embeddings(nn.Module):
    """word + absolute position embeddings -> LayerNorm -> dropout (no token types)."""

    config: TextConfig
    options: Options

    def setup(self):
        config, options = self.config, self.options
        embed_init = nn.initializers.normal(0.02)
        self.word_embeddings = nn.Embed(config.vocab_size, config.hidden_size, dtype=options.compute_dtype,
                                        param_dtype=options.storage_dtype, embedding_init=embed_init)
        self.position_embeddings = nn.Embed(config.max_position_embeddings, config.hidden_size,
                                            dtype=options.compute_dtype, param_dtype=options.storage_dtype,
                                            embedding_init=embed_init)
        self.LayerNorm = layer_norm(config.layer_norm_eps, options)
        self.dropout = nn.Dropout(config.hidden_dropout)
        self.decode_position = DecodePosition()

    def __call__(self, input_ids, deterministic, decode):
        length = input_ids.shape[1]
        positions = jnp.arange(length)
        if decode:
            positions = positions + self.decode_position(length)
        x = self.word_embeddings(input_ids) + self.position_embeddings(positions)[None]
        x = self.LayerNorm(x).astype(self.options.compute_dtype)
        return self.dropout(x, deterministic=deterministic)

    @property
    def word_embedding_matrix(self):
        return self.word_embeddings.embedding


class LmHead(nn.Module):
    """dense -> GELU -> LayerNorm -> tied vocab projection + own bias; logits in float32."""

    config: TextConfig
    options: Options

    @nn.compact
    def __call__(self, hidden, word_embeddings):
        """hidden (B, T, H), word_embeddings (V, H) -> (B, T, V) float32."""
        x = _Transform(self.config, self.options, name="transform")(hidden)
        bias = self.param("bias", nn.initializers.zeros, (self.config.vocab_size,), self.options.storage_dtype)
        logits = jnp.einsum("bth,vh->btv", x, word_embeddings.astype(x.dtype))
        return logits.astype(jnp.float32) + bias.astype(jnp.float32)


class _Transform(nn.Module):
    config: TextConfig
    options: Options

    @nn.compact
    def __call__(self, hidden):
        x = nn.gelu(dense(self.config.hidden_size, self.options, "dense")(hidden), approximate=False)
        return layer_norm(self.config.layer_norm_eps, self.options, "LayerNorm")(x).astype(self.options.compute_dtype)


class Med(nn.Module):
    """The MED text transformer. Returns hidden states (B, T, H); `lm_logits` adds the LM head."""

    config: TextConfig
    options: Options
    with_lm_head: bool = False
    decoder_self_attention: bool = False

    def setup(self):
        config, options = self.config, self.options
        self.embeddings = Embeddings(config, options)
        first_remat = config.num_layers - options.remat_text_layers
        for i in range(config.num_layers):
            layer_cls = MedLayer
            if i >= first_remat:
                layer_cls = rematerialised(MedLayer, options, static_argnums=(5, 6, 7))
            # setattr names the parameter subtree `layer_{i}`, as in the reference keys.
            setattr(self, f"layer_{i}", layer_cls(config, options, self.decoder_self_attention))
        if self.with_lm_head:
            self.lm_head = LmHead(config, options)

    def __call__(self, input_ids, attention_mask=None, encoder_hidden_states=None, encoder_attention_mask=None,
                  mode="text", deterministic=True, decode=False):
        """input_ids (B, T) int; attention_mask (B, T) 1 = token; encoder_hidden_states (B, S, W)."""
        if mode not in MODES:
            raise ValueError(f"MED mode {mode!r} must be one of {MODES}")
        if mode != "text" and encoder_hidden_states is None and not decode:
            raise ValueError(f"MED mode {mode!r} needs encoder_hidden_states (the image tokens)")
        text_mask = None if attention_mask is None else attention_mask.astype(bool)
        encoder_mask = None if encoder_attention_mask is None else encoder_attention_mask.astype(bool)
        if encoder_hidden_states is not None:
            encoder_hidden_states = encoder_hidden_states.astype(self.options.compute_dtype)
        hidden = self.embeddings(input_ids, deterministic, decode)
        for i in range(self.config.num_layers):
            hidden = getattr(self, f"layer_{i}")(hidden, text_mask, encoder_hidden_states, encoder_mask, mode, deterministic, decode)
        return hidden

    def lm_logits(self, hidden):
        """(B, T, H) decoder states -> (B, T, V) float32 logits."""
        return self.lm_head(hidden, self.embeddings.word_embedding_matrix)
