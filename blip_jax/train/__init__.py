"""BLIP pre-training: state (state.py), step (step.py), loop (loop.py), CLI (cli.py)."""
