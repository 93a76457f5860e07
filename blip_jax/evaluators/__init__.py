"""Evaluators, pluggable by name (config.eval.kind): each is fn(model, params, config, mesh) -> dict."""
from __future__ import annotations


def _retrieval(model, params, config, mesh):
    from blip_jax.evaluators.retrieval import evaluate_split
    return evaluate_split(model, params, config, mesh)


EVALUATORS = {"retrieval": _retrieval}


def get_evaluator(kind: str):
    """The evaluator registered under `kind` (see EVALUATORS)."""
    if kind not in EVALUATORS:
        raise ValueError(f"config.eval.kind={kind!r} is unknown: use one of {sorted(EVALUATORS)}")
    return EVALUATORS[kind]


def register(kind: str, fn) -> None:
    """Add an evaluator (e.g. captioning CIDEr) under `kind`."""
    EVALUATORS[kind] = fn
