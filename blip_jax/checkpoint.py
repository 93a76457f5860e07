"""Orbax checkpoints of the train state plus a JSON item (config, step, data position).

`Checkpointer` wraps `ocp.CheckpointManager`: asynchronous saves, keep the latest K, restore
onto the *current* mesh through `jax.ShapeDtypeStruct` targets that carry the wanted
shardings (so a checkpoint written on 8 devices restores on 1 and the reverse).
Every process must call save/restore (they are collective).

`resume_source(workdir, config)` implements the resume order
workdir's latest checkpoint -> config.resume -> config.init_from -> scratch.
"""
from __future__ import annotations

import dataclasses
import os
from typing import Any, Optional

import jax
import orbax.checkpoint as ocp

STATE_DIRNAME = "checkpoints"


def abstract_target(tree, shardings):
    """ShapeDtypeStruct targets (shape/dtype of `tree`, sharding from `shardings`)."""
    return jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)


class Checkpointer:
    """Train-state checkpoints in `directory` (state item + JSON meta item)."""

    def __init__(self, directory: str, *, keep: int = 3, async_save: bool = True):
        self.directory = os.path.abspath(directory)
        options = ocp.CheckpointManagerOptions(
            preservation_policy=ocp.checkpoint_managers.LatestN(max(1, int(keep))),
            enable_async_checkpointing=async_save,
            create=True)
        self.manager = ocp.CheckpointManager(self.directory, options=options,
                                             item_names=("state", "meta"))

    def latest_step(self) -> Optional[int]:
        return self.manager.latest_step()

    def all_steps(self):
        return list(self.manager.all_steps())

    def save(self, step: int, state, meta: dict) -> bool:
        """Start an (async) save of `state` and `meta` at `step`; a no-op if it already exists."""
        if step in self.manager.all_steps():
            return False
        return self.manager.save(int(step), args=ocp.args.Composite(
            state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)), force=True)

    def restore(self, target, step: Optional[int] = None):
        """Restore (state, meta) at `step` (default latest) onto `target` (ShapeDtypeStructs with
        shardings, e.g. from `abstract_target`)."""
        step = self.latest_step() if step is None else int(step)
        if step is None:
            raise FileNotFoundError(f"no checkpoint in {self.directory}")
        restored = self.manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(target), meta=ocp.args.JsonRestore()))
        return restored["state"], restored["meta"]

    def restore_meta(self, step: Optional[int] = None) -> dict:
        step = self.latest_step() if step is None else int(step)
        return self.manager.restore(step, args=ocp.args.Composite(
            meta=ocp.args.JsonRestore()))["meta"]

    def wait(self):
        self.manager.wait_until_finished()

    def close(self):
        self.manager.wait_until_finished()
        self.manager.close()


def checkpoint_dir(workdir: str) -> str:
    return os.path.join(os.path.abspath(workdir), STATE_DIRNAME)


def _has_checkpoint(directory: str) -> bool:
    if not os.path.isdir(directory):
        return False
    return any(name.isdigit() for name in os.listdir(directory))


@dataclasses.dataclass
class ResumeSource:
    """Where training starts from: kind in workdir|resume|init_from|scratch."""
    kind: str
    path: Optional[str] = None
    step: Optional[int] = None


def resume_source(workdir: str, config: Any) -> ResumeSource:
    """The resume order: the workdir's latest checkpoint, then config.resume (another run's
    workdir or checkpoints dir, optionally a step dir), then config.init_from (any
    `blip_jax.load` source, params only), else scratch."""
    own = checkpoint_dir(workdir)
    if _has_checkpoint(own):
        return ResumeSource("workdir", own)
    resume = config.get("resume", None)
    if resume:
        resume = os.path.abspath(os.path.expanduser(resume))
        name = os.path.basename(resume.rstrip("/"))
        if name.isdigit() and os.path.isdir(resume):
            return ResumeSource("resume", os.path.dirname(resume.rstrip("/")), int(name))
        for candidate in (resume, os.path.join(resume, STATE_DIRNAME)):
            if _has_checkpoint(candidate):
                return ResumeSource("resume", candidate)
        raise FileNotFoundError(f"config.resume={config.resume!r} holds no checkpoint: point it "
                                "at a workdir, its checkpoints/ dir or a step dir")
    init_from = config.get("init_from", None)
    if init_from:
        return ResumeSource("init_from", init_from)
    return ResumeSource("scratch")
