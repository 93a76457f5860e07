"""Weights in and out: transformers BLIP, original Salesforce checkpoints, one key-mapping table."""
