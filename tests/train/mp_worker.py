"""One process of the 2-process x 2-CPU-device test (run by test_multiprocess.py, not by pytest).

argv: process_id num_processes port workdir config.json
Trains one step on the global batch (this process feeds its half), saves a checkpoint, and
(process 0) writes the loss to workdir/loss.json.
"""
import json
import os
import sys

os.environ.setdefault("JAX_PLATFORMS", "cpu")
import jax  # noqa: E402

jax.config.update("jax_num_cpu_devices", 2)
process_id, num_processes, port, workdir, config_path = sys.argv[1:6]
jax.distributed.initialize(f"localhost:{port}", int(num_processes), int(process_id),
                           initialization_timeout=120)

import ml_collections  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from pretrain_helpers import random_batch  # noqa: E402

from blip_jax import checkpoint, sharding  # noqa: E402
from blip_jax.train import loop  # noqa: E402

with open(config_path) as f:
    config = ml_collections.ConfigDict(json.load(f))
assert jax.device_count() == 4 and jax.local_device_count() == 2
mesh = sharding.make_mesh()
with jax.set_mesh(mesh):
    parts = loop.build(config, mesh)
    state = jax.jit(parts["init"], out_shardings=parts["shardings"])(jax.random.key(0))
    full = random_batch(config)
    share = config.batch_size // jax.process_count()
    rows = slice(jax.process_index() * share, (jax.process_index() + 1) * share)
    batch = sharding.shard_batch({k: v[rows] for k, v in full.items()}, mesh)
    state, metrics = parts["train_step"](state, batch)
    writer = checkpoint.Checkpointer(os.path.join(workdir, "checkpoints"))
    writer.save(1, state, {"step": 1, "processes": jax.process_count()})
    writer.close()
loss = float(jax.device_get(metrics["loss"]))
if jax.process_index() == 0:
    with open(os.path.join(workdir, "loss.json"), "w") as f:
        json.dump({"loss": loss}, f)
print(f"process {process_id}: loss {loss}", flush=True)
