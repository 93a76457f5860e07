"""A real 2-process x 2-CPU-device jax.distributed run on localhost: one train step + a checkpoint;
restoring it in this (single) process gives the params of the same step computed here."""
import json
import os
import socket
import subprocess
import sys

import jax
import numpy as np
from pretrain_helpers import REPO, random_batch

from blip_jax import checkpoint, sharding
from blip_jax.train import loop


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_train_save_and_restore_in_one(small_config, tmp_path):
    config_path = tmp_path / "config.json"
    config_path.write_text(small_config.to_json())
    port = _free_port()
    worker = os.path.join(os.path.dirname(os.path.abspath(__file__)), "mp_worker.py")
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.pop("JAX_NUM_CPU_DEVICES", None)
    procs = [subprocess.Popen([sys.executable, worker, str(i), "2", str(port), str(tmp_path), str(config_path)],
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for i in range(2)]
    outputs = []
    try:
        for proc in procs:
            outputs.append(proc.communicate(timeout=540)[0])
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
    for proc, out in zip(procs, outputs):
        assert proc.returncode == 0, out[-4000:]
    worker_loss = json.loads((tmp_path / "loss.json").read_text())["loss"]

    # The same step in this process (8 devices) ...
    mesh = sharding.make_mesh()
    with jax.set_mesh(mesh):
        parts = loop.build(small_config, mesh)
        state = jax.jit(parts["init"], out_shardings=parts["shardings"])(jax.random.key(0))
        state, metrics = parts["train_step"](state, sharding.shard_batch(random_batch(small_config), mesh))
        # ... and the 2-process checkpoint restored onto this mesh.
        reader = checkpoint.Checkpointer(str(tmp_path / "checkpoints"))
        restored, meta = reader.restore(checkpoint.abstract_target(parts["abstract"], parts["shardings"]))
        reader.close()
    assert meta["processes"] == 2 and int(restored["step"]) == 1
    assert abs(float(metrics["loss"]) - worker_loss) <= 1e-5
    for key in ("params", "momentum_params", "image_queue", "text_queue"):
        for a, b in zip(jax.tree.leaves(jax.device_get(state[key])), jax.tree.leaves(jax.device_get(restored[key]))):
            np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-5)
