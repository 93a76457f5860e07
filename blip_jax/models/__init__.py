"""Pure functional Flax modules: ViT, MED and the BLIP task models."""
from blip_jax.models.blip import (Captioner, Pretrainer, Retriever, VqaModel, build_model, init_decode_cache,
                                  init_params)
from blip_jax.models.config import model_config
from blip_jax.models.vit import resample_pos_embed

__all__ = ["Captioner", "Pretrainer", "Retriever", "VqaModel", "build_model", "init_decode_cache", "init_params",
           "model_config", "resample_pos_embed"]
