"""The pre-training loop end to end on the embedded dataset (very small model):
bitwise resume exactness, SIGTERM save-and-resume, NaN policy, config errors, CLI smoke run."""
import json
import os
import signal
import subprocess
import sys
import time
import types

import ml_collections
import pytest
from pretrain_helpers import REPO

from blip_jax.train import cli, loop

LOSS_KEYS = ("loss", "loss_itc", "loss_itm", "loss_lm", "lr", "alpha", "temp", "grad_norm")
SMALL_OVERRIDES = [
    "--config.model.vision.image_size=16", "--config.input.image_size=16", "--config.model.vision.width=32",
    "--config.model.vision.depth=1", "--config.model.vision.mlp_dim=64", "--config.model.text.hidden_size=32",
    "--config.model.text.num_layers=1", "--config.model.text.intermediate_size=64",
    "--config.model.text.max_position_embeddings=16", "--config.input.max_length=8",
    "--config.model.text.hidden_dropout=0.0", "--config.model.text.attention_dropout=0.0",
    "--config.model.embed_dim=16", "--config.batch_size=8", "--config.itc.queue_size=32",
    "--config.itc.alpha_ramp_steps=4", "--config.optim.warmup_steps=2", "--config.log_every_steps=1",
    "--config.checkpoint_every_steps=0", "--config.eval.k_test=4", "--config.eval.num_captions=2",
    "--config.eval.caption_max_len=8", "--config.input.eval_split=val", "--config.progress_bar=False",
]


@pytest.fixture
def loop_config(small_config):
    return small_config


def _metrics(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def _copy(config, **changes):
    config = ml_collections.ConfigDict(config.to_dict())
    for key, value in changes.items():
        node = config
        *parents, last = key.split(".")
        for parent in parents:
            node = node[parent]
        node[last] = value
    return config


def test_resume_is_bitwise_exact(loop_config, tmp_path):
    straight, resumed = str(tmp_path / "straight"), str(tmp_path / "resumed")
    assert loop.run(_copy(loop_config, **{"eval.num_captions": 0}), straight) == 0
    assert loop.run(_copy(loop_config, **{"debug.stop_at_step": 3}), resumed) == 0
    assert not os.path.exists(os.path.join(resumed, "eval.json"))  # stopped early: no final eval
    assert os.path.isdir(os.path.join(resumed, "checkpoints", "3"))
    assert loop.run(_copy(loop_config, **{"eval.num_captions": 0}), resumed) == 0
    a, b = _metrics(straight), _metrics(resumed)
    assert [m["step"] for m in a] == [m["step"] for m in b] == [1, 2, 3, 4, 5, 6]
    for x, y in zip(a, b):
        assert {k: x[k] for k in LOSS_KEYS} == {k: y[k] for k in LOSS_KEYS}, (x["step"], x, y)
    assert a[-1]["loss"] != a[0]["loss"]
    with open(os.path.join(straight, "eval.json")) as f:
        result = json.load(f)
    for key in ("i2t_r1", "i2t_r5", "i2t_r10", "t2i_r1", "t2i_r5", "t2i_r10"):
        assert 0.0 <= result[key] <= 100.0
    assert result["ranking"] == "itm_rerank" and result["num_images"] == 200 and result["num_texts"] == 1000


def test_nan_policy_skip_and_stop(loop_config, tmp_path, capsys):
    skip = _copy(loop_config, total_steps=3, nan_policy="skip", **{"debug.nan_at_step": 1,
                                                                   "eval.num_captions": 0, "eval.k_test": 0})
    assert loop.run(skip, str(tmp_path / "skip")) == 0
    lines = _metrics(str(tmp_path / "skip"))
    assert [m["num_skipped"] for m in lines] == [0, 1, 1]
    assert lines[1]["finite"] == 0.0 and all(m["loss"] == m["loss"] for m in (lines[0], lines[2]))
    stop = _copy(skip, nan_policy="stop")
    assert loop.run(stop, str(tmp_path / "stop")) == loop.EXIT_NAN
    out = capsys.readouterr().out
    assert "non-finite loss at step 2" in out
    assert os.path.isdir(os.path.join(tmp_path, "stop", "checkpoints", "3"))
    assert not os.path.exists(os.path.join(tmp_path, "stop", "eval.json"))


@pytest.mark.parametrize("override,needle", [
    ("--config.itc.queue_size=100", "queue_size 100 is not divisible by the global batch 8"),
    ("--config.model.vision.patch_size=5", "not a multiple of patch_size 5"),
    ("--config.input.name=no_such_dataset", "no_such_dataset"),
    ("--config.nan_policy=ignore", "nan_policy"),
])
def test_bad_config_is_one_line(tmp_path, capsys, override, needle):
    args = types.SimpleNamespace(config=os.path.join(REPO, "configs", "pretrain.py:tiny"),
                                 workdir=str(tmp_path / "bad"), distributed=False,
                                 unknown_args=SMALL_OVERRIDES + [override])
    assert cli.run(args) == 2
    err = capsys.readouterr().err.strip()
    assert needle in err and "\n" not in err
    assert not os.path.exists(tmp_path / "bad" / "checkpoints")


def _cli(workdir, *extra, env=None):
    command = [sys.executable, "-m", "blip_jax.cli", "pretrain",
               "--config", os.path.join(REPO, "configs", "pretrain.py:tiny"), "--workdir", workdir,
               *SMALL_OVERRIDES, *extra]
    environment = dict(os.environ, JAX_NUM_CPU_DEVICES="8", JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="3",
                       PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""), **(env or {}))
    return subprocess.Popen(command, cwd=REPO, env=environment, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def test_cli_smoke_three_steps(tmp_path):
    workdir = str(tmp_path / "smoke")
    proc = _cli(workdir, "--config.total_steps=3")
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, out[-3000:]
    assert "zero-shot retrieval on val" in out
    lines = _metrics(workdir)
    assert [m["step"] for m in lines] == [1, 2, 3]
    assert set(LOSS_KEYS) <= set(lines[0]) and {"img_per_s", "step_time"} <= set(lines[0])
    for name in ("config.json", "eval.json", "captions.json"):
        assert os.path.exists(os.path.join(workdir, name)), name
    assert any(f.startswith("events.out.tfevents") for f in os.listdir(os.path.join(workdir, "tb")))
    assert os.path.isdir(os.path.join(workdir, "checkpoints", "3"))
    with open(os.path.join(workdir, "captions.json")) as f:
        assert len(json.load(f)) == 2


def test_sigterm_saves_and_resumes(tmp_path):
    workdir = str(tmp_path / "preempted")
    proc = _cli(workdir, "--config.total_steps=40", "--config.eval.k_test=0", "--config.eval.num_captions=0")
    metrics = os.path.join(workdir, "metrics.jsonl")
    deadline = time.time() + 600
    while time.time() < deadline and proc.poll() is None:
        if os.path.exists(metrics) and len(open(metrics).readlines()) >= 2:
            break
        time.sleep(0.2)
    assert proc.poll() is None, proc.communicate()[0][-3000:]
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out[-3000:]
    assert "stopped by SIGTERM" in out
    saved = sorted(int(d) for d in os.listdir(os.path.join(workdir, "checkpoints")) if d.isdigit())
    assert saved and 2 <= saved[-1] < 40
    proc = _cli(workdir, "--config.total_steps=40", "--config.eval.k_test=0", "--config.eval.num_captions=0")
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, out[-3000:]
    assert "start: workdir" in out and f"at step {saved[-1]}" in out
    steps = [m["step"] for m in _metrics(workdir)]
    assert steps == list(range(1, 41))
    assert os.path.exists(os.path.join(workdir, "eval.json"))
