"""Data: tfds builders (synthetic_shapes, blip_json), BLIP transforms and text cleaning, tokenizer,
and the input pipeline that yields global jax.Arrays. Entry points: pipeline.py, text.py, cli.py."""
