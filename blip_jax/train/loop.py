"""The pre-training loop, in the order it runs (big_vision's train.py spirit):

  validate config -> workdir + config.json -> tokenizer ids -> mesh -> model, optimizer ->
  abstract state -> shardings -> state (restored | init_from | scratch + ImageNet/BERT init) ->
  data from the restored step -> steps (log, checkpoint, eval, SIGTERM, NaN policy) ->
  final checkpoint -> eval.json (zero-shot retrieval) -> sample captions.

Outputs in the workdir: config.json, metrics.jsonl, tb/ (TensorBoard), checkpoints/, eval.json,
eval_<step>.json for periodic evals, captions.json.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import sys
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from blip_jax import checkpoint as ckpt_lib
from blip_jax import optim, sharding
from blip_jax.models import build_model
from blip_jax.train import state as state_lib
from blip_jax.train import step as step_lib
from blip_jax.train.validate import validate_config

log = logging.getLogger("blip_jax.train")

EXIT_OK, EXIT_NAN, EXIT_PREEMPTED = 0, 3, 0


class _StopRequest:
    """SIGTERM/SIGINT set a flag; the loop saves a checkpoint at the next step boundary and exits."""

    def __init__(self):
        self.signal = None
        self._previous = {}

    def __enter__(self):
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread: no handler (tests calling run() in a thread)
                pass
        return self

    def _handle(self, signum, frame):
        del frame
        if self.signal is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl-C means now
        self.signal = signum

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def requested(self) -> bool:
        flag = self.signal is not None
        if jax.process_count() > 1:  # every process must stop at the same step
            from jax.experimental import multihost_utils
            flag = bool(np.asarray(multihost_utils.process_allgather(np.int32(flag))).any())
        return flag


class _Writer:
    """metrics.jsonl + TensorBoard (process 0 only)."""

    def __init__(self, workdir: str):
        self.enabled = jax.process_index() == 0
        self.jsonl = self.tb = None
        if self.enabled:
            self.jsonl = open(os.path.join(workdir, "metrics.jsonl"), "a")
            try:
                from tensorboardX import SummaryWriter
                self.tb = SummaryWriter(os.path.join(workdir, "tb"))
            except ImportError:  # pragma: no cover - tensorboardX is a dependency
                log.warning("tensorboardX is not installed: no TensorBoard events")

    def write(self, step: int, scalars: dict, jsonl: bool = True):
        """One log step: a line of metrics.jsonl (train metrics) and TensorBoard scalars."""
        if not self.enabled:
            return
        if jsonl:
            self.jsonl.write(json.dumps({"step": step, **scalars}) + "\n")
            self.jsonl.flush()
        if self.tb is not None:
            for key, value in scalars.items():
                if isinstance(value, (int, float)):
                    self.tb.add_scalar(key, value, step)
            self.tb.flush()

    def close(self):
        if self.jsonl:
            self.jsonl.close()
        if self.tb is not None:
            self.tb.close()


def _print(*args):
    if jax.process_index() == 0:
        print(*args, flush=True)


def _write_json(path, obj):
    if jax.process_index() == 0:
        with open(path, "w") as f:
            json.dump(obj, f, indent=2, sort_keys=True)


def apply_tokenizer(config):
    """Model vocab size and special ids follow the tokenizer of config.input (e.g. the tiny vocab)."""
    from blip_jax.data import text
    ids = text.token_ids(text.tokenizer(config.input.tokenizer))
    with config.unlocked() if hasattr(config, "unlocked") else contextlib.nullcontext():
        config.model.text.vocab_size = int(ids["vocab_size"])
        config.model.tokens.update({k: int(ids[k]) for k in ("pad", "cls", "sep", "dec", "enc")})


def build(config, mesh):
    """Model, optimizer, schedule, abstract state, shardings and the jitted init / train step."""
    model = build_model(config.model, "pretrain")
    tx, schedule = optim.make_optimizer(config.optim, config.total_steps)

    def init(key, params=None):
        return state_lib.create_state(model, config.model, tx, config.itc.queue_size, key, params)

    abstract = jax.eval_shape(init, jax.random.key(0))
    shardings = sharding.tree_shardings(abstract, mesh, sharding.rules_from_config(config.sharding))
    train_step = step_lib.make_train_step(model, config, tx, schedule, sharding.num_batch_shards(mesh))
    return dict(model=model, tx=tx, schedule=schedule, init=init, abstract=abstract, shardings=shardings,
                train_step=step_lib.jit_train_step(train_step, shardings, mesh))


def initial_state(config, workdir, parts):
    """(state, source): the resume order workdir -> config.resume -> init_from -> scratch."""
    source = ckpt_lib.resume_source(workdir, config)
    key = jax.random.key(config.seed)
    if source.kind in ("workdir", "resume"):
        reader = ckpt_lib.Checkpointer(source.path, keep=config.keep_checkpoints)
        target = ckpt_lib.abstract_target(parts["abstract"], parts["shardings"])
        state, _ = reader.restore(target, source.step)
        reader.close()
        return state, source
    params = None  # None: create_state initialises them
    pretrained = config.init_vision_from or config.init_text_from
    if source.kind == "init_from" or pretrained:  # fresh params on the host, partly overwritten
        params = jax.device_get(jax.jit(lambda k: parts["init"](k)["params"])(key))
    if source.kind == "init_from":
        params = params_from_bundle(config.init_from, params)
    if pretrained:
        from blip_jax.train.pretrained_init import apply_pretrained
        params, lines = apply_pretrained(params, config)
        for line in lines:
            _print(f"init: {line}")
    return jax.jit(parts["init"], out_shardings=parts["shardings"])(key, params), source


def params_from_bundle(src: str, fresh: dict) -> dict:
    """Params of any `blip_jax.load` source fitted onto the pre-training tree `fresh` (host arrays):
    leaves present in the source are taken (pos_embed resampled to the grid), the others (e.g. the
    decoder's self-attention when starting from a retrieval checkpoint) keep their fresh init."""
    import blip_jax
    from blip_jax.models.vit import resample_pos_embed
    try:  # the loader maps other tasks' weights onto the pre-training tree where it can
        loaded = blip_jax.load(src, task="pretrain").params
    except (ValueError, KeyError, NotImplementedError):
        loaded = blip_jax.load(src).params
    taken, kept = [], []

    def merge(path, leaf):
        name = optim.path_str(path)
        node = loaded
        for entry in path:
            node = node.get(entry.key) if isinstance(node, dict) else None
            if node is None:
                kept.append(name)
                return leaf
        node = np.asarray(node)
        if node.shape != leaf.shape and name.endswith("pos_embed"):
            grid = int(round((leaf.shape[1] - 1) ** 0.5))
            node = np.asarray(resample_pos_embed(node, (grid, grid)))
        if node.shape != leaf.shape:
            raise ValueError(f"config.init_from {src}: {name} has shape {node.shape} but the model "
                             f"{leaf.shape}: make config.model match the checkpoint")
        taken.append(name)
        return node.astype(leaf.dtype)

    params = jax.tree_util.tree_map_with_path(merge, fresh)
    _print(f"init_from {src}: {len(taken)} tensors loaded, {len(kept)} newly initialised")
    return params


def _scalars(metrics) -> dict:
    return {k: float(v) for k, v in jax.device_get(metrics).items()}


def run(config: ml_collections.ConfigDict, workdir: str) -> int:
    """Pre-train with `config` in `workdir`; returns the process exit code."""
    validate_config(config)                       # one clear line, before anything compiles
    workdir = os.path.abspath(os.path.expanduser(workdir))
    os.makedirs(workdir, exist_ok=True)
    config = ml_collections.ConfigDict(config.to_dict())  # a private, unlocked copy
    config.input.batch_size = config.batch_size
    apply_tokenizer(config)
    config_json = json.loads(config.to_json_best_effort())
    _write_json(os.path.join(workdir, "config.json"), config_json)

    mesh = sharding.make_mesh(fsdp=config.sharding.fsdp)
    jax.set_mesh(mesh)
    _print(f"mesh {dict(mesh.shape)} over {jax.device_count()} {jax.devices()[0].platform} devices, "
           f"{jax.process_count()} process(es); global batch {config.batch_size}")
    parts = build(config, mesh)
    state, source = initial_state(config, workdir, parts)
    start_step = int(jax.device_get(state["step"]))
    _print(f"start: {source.kind}{' ' + str(source.path) if source.path else ''} at step {start_step}")

    checkpointer = ckpt_lib.Checkpointer(ckpt_lib.checkpoint_dir(workdir), keep=config.keep_checkpoints)
    writer = _Writer(workdir)

    def save(step):
        meta = {"step": int(step), "data_position": {"start_step": int(step), "examples_seen":
                                                     int(step) * int(config.batch_size)},
                "config": config_json}
        checkpointer.save(int(step), state, meta)

    from blip_jax.data import pipeline
    exit_code, message = EXIT_OK, None
    stop = _StopRequest()
    progress = None
    if config.progress_bar and jax.process_index() == 0:
        from tqdm import tqdm
        progress = tqdm(total=config.total_steps, initial=start_step, desc="pretrain", unit="step",
                        dynamic_ncols=True, file=sys.stdout)
    train_data = iter(pipeline.train_iterator(config.input, mesh, start_step=start_step))
    step = start_step
    window_start, window_steps = time.time(), 0
    pending = None           # (step, metrics) of the previous step, read one step late (no stall)
    consecutive_nan = 0
    with stop:
        while step < config.total_steps:
            batch = next(train_data)
            batch = {"image": batch["image"], "input_ids": batch["input_ids"],
                     "attention_mask": batch["attention_mask"], "image_id": batch["image_id"]}
            if step == config.debug.nan_at_step:
                batch["image"] = batch["image"] * jnp.nan
            state, metrics = parts["train_step"](state, batch)
            step += 1
            window_steps += 1
            if progress is not None:
                progress.update(1)
            if pending is not None:
                done_step, done_metrics = pending
                finite = bool(jax.device_get(done_metrics["finite"]))
                if not finite:
                    consecutive_nan += 1
                    _print(f"step {done_step}: non-finite loss or gradient, update skipped "
                           f"({int(jax.device_get(done_metrics['num_skipped']))} so far)")
                    if config.nan_policy == "stop" or consecutive_nan >= config.max_consecutive_nan:
                        exit_code = EXIT_NAN
                        message = (f"stopped: non-finite loss at step {done_step} (nan_policy="
                                   f"{config.nan_policy}); the checkpoint at step {step} holds the last "
                                   "finite parameters")
                        break
                else:
                    consecutive_nan = 0
            pending = (step, metrics)
            if step % config.log_every_steps == 0 or step == config.total_steps:
                scalars = _scalars(metrics)
                elapsed = time.time() - window_start
                scalars["step_time"] = elapsed / max(window_steps, 1)
                scalars["img_per_s"] = config.batch_size * window_steps / max(elapsed, 1e-9)
                window_start, window_steps = time.time(), 0
                writer.write(step, scalars)
                if progress is not None:
                    progress.set_postfix(loss=f"{scalars['loss']:.3f}", itc=f"{scalars['loss_itc']:.2f}",
                                         itm=f"{scalars['loss_itm']:.2f}", lm=f"{scalars['loss_lm']:.2f}")
                else:
                    _print(f"step {step}: " + " ".join(f"{k}={v:.4g}" for k, v in scalars.items()))
            if config.checkpoint_every_steps and step % config.checkpoint_every_steps == 0:
                save(step)
            if config.eval_every_steps and step % config.eval_every_steps == 0 and step < config.total_steps:
                result = evaluate(config, parts["model"], state["params"], mesh)
                _write_json(os.path.join(workdir, f"eval_{step}.json"), result)
                writer.write(step, {f"eval/{k}": v for k, v in result.items() if isinstance(v, float)},
                             jsonl=False)
            if step == config.debug.get("stop_at_step", -1):
                stop.signal = signal.SIGTERM  # a simulated preemption (tests)
            if stop.requested():
                exit_code = EXIT_PREEMPTED
                message = (f"stopped by {signal.Signals(stop.signal).name if stop.signal else 'a peer'} "
                           f"at step {step}: checkpoint saved; run the same command to resume")
                break
    if progress is not None:
        progress.close()
    save(step)
    checkpointer.wait()
    if message:
        _print(message)
    if step >= config.total_steps and exit_code == EXIT_OK:
        result = evaluate(config, parts["model"], state["params"], mesh)
        result["step"] = step
        _write_json(os.path.join(workdir, "eval.json"), result)
        writer.write(step, {f"eval/{k}": v for k, v in result.items() if isinstance(v, float)},
                             jsonl=False)
        _print("zero-shot retrieval on {split} ({ranking}): ".format(**result) + ", ".join(
            f"{k}={result[k]:.1f}" for k in ("i2t_r1", "i2t_r5", "i2t_r10", "t2i_r1", "t2i_r5", "t2i_r10")))
        if config.eval.num_captions > 0:
            captions = sample_captions(config, parts["model"], state["params"], mesh)
            _write_json(os.path.join(workdir, "captions.json"), captions)
            for item in captions:
                _print(f"  [{item['image_id']}] {item['caption']}   (reference: {item['reference']})")
    writer.close()
    checkpointer.close()
    return exit_code


def evaluate(config, model, params, mesh) -> dict:
    """Zero-shot retrieval on config.input.eval_split (ITC, + ITM re-ranking when eval.k_test > 0)."""
    from blip_jax.evaluators import get_evaluator
    evaluator = get_evaluator(config.eval.get("kind", "retrieval"))
    return evaluator(model, params, config, mesh)


def sample_captions(config, model, params, mesh) -> list:
    """Greedy captions for the first eval.num_captions held-out images."""
    from blip_jax.evaluators.captions import greedy_captions
    return greedy_captions(model, params, config, mesh, config.eval.num_captions)
