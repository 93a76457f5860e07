"""Device mesh, parameter/state sharding rules and global batches.

One mesh with two Auto axes ('data', 'fsdp'): the batch is split over both; parameters are
replicated (default) or sharded over 'fsdp' along their largest divisible dimension (FSDP /
ZeRO-3 style) by regex rules on the '/'-joined state path. Shardings are `NamedSharding`s and
everything runs under `jax.jit` on global arrays (no pmap). Enter the mesh with
`jax.set_mesh(mesh)`; never `with mesh:`.
"""
from __future__ import annotations

import re
from typing import Sequence

import jax
import numpy as np
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

from blip_jax.optim import path_str

BATCH_AXES = ("data", "fsdp")
DEFAULT_RULES = ((".*", "replicate"),)
FSDP_RULES = ((".*", "fsdp"),)


def make_mesh(fsdp: int = 1, data: int = -1, devices=None) -> jax.sharding.Mesh:
    """A ('data', 'fsdp') mesh with Auto axes over `devices` (default: all devices).

    data=-1 uses every device not taken by fsdp.
    """
    devices = list(jax.devices() if devices is None else devices)
    n = len(devices)
    fsdp = int(fsdp)
    if fsdp < 1 or n % fsdp:
        raise ValueError(f"sharding.fsdp={fsdp} does not divide the {n} devices: set it to a "
                         f"divisor of {n}")
    data = n // fsdp if data in (-1, None) else int(data)
    if data * fsdp != n:
        raise ValueError(f"mesh data={data} x fsdp={fsdp} != {n} devices: set sharding.data=-1")
    return jax.make_mesh((data, fsdp), BATCH_AXES, axis_types=(AxisType.Auto, AxisType.Auto),
                         devices=devices)


def num_batch_shards(mesh) -> int:
    """How many shards the batch axis is split into."""
    return int(np.prod([mesh.shape[a] for a in BATCH_AXES]))


def batch_sharding(mesh) -> NamedSharding:
    """Leading (batch) axis over ('data', 'fsdp')."""
    return NamedSharding(mesh, P(BATCH_AXES))


def replicated(mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def fsdp_spec(shape: Sequence[int], fsdp_size: int, min_size: int = 2 ** 12) -> P:
    """Shard the largest dimension divisible by fsdp_size; small or indivisible arrays replicate."""
    if fsdp_size <= 1 or int(np.prod(shape, dtype=np.int64)) < min_size:
        return P()
    for dim in np.argsort(shape)[::-1]:
        if shape[dim] % fsdp_size == 0:
            spec = [None] * len(shape)
            spec[dim] = "fsdp"
            return P(*spec)
    return P()


def tree_shardings(tree, mesh, rules=DEFAULT_RULES, min_size: int = 2 ** 12):
    """NamedSharding per leaf of `tree` (arrays or ShapeDtypeStructs), chosen by the first rule
    whose regex searches the leaf's '/'-joined path: 'replicate' or 'fsdp'."""
    compiled = [(re.compile(pattern), kind) for pattern, kind in rules]
    for _, kind in compiled:
        if kind not in ("replicate", "fsdp"):
            raise ValueError(f"sharding rule kind {kind!r} is unknown: use 'replicate' or 'fsdp'")
    fsdp_size = mesh.shape["fsdp"]

    def choose(path, leaf):
        name = path_str(path)
        shape = tuple(getattr(leaf, "shape", ()))
        for pattern, kind in compiled:
            if pattern.search(name):
                if kind == "fsdp":
                    return NamedSharding(mesh, fsdp_spec(shape, fsdp_size, min_size))
                return NamedSharding(mesh, P())
        return NamedSharding(mesh, P())

    return jax.tree_util.tree_map_with_path(choose, tree)


def rules_from_config(sharding_config) -> tuple:
    """config.sharding.rules (list of [regex, kind]) or a preset name 'replicate'|'fsdp'."""
    rules = sharding_config.get("rules", "replicate")
    if rules == "replicate":
        return DEFAULT_RULES
    if rules == "fsdp":
        return FSDP_RULES
    if isinstance(rules, str):
        raise ValueError(f"sharding.rules={rules!r} is unknown: use 'replicate', 'fsdp' or a list "
                         "of (regex, 'replicate'|'fsdp') pairs")
    return tuple((str(p), str(k)) for p, k in rules)


def shard_batch(batch, mesh):
    """Process-local numpy batch (leading axis = this process's share) -> global jax arrays
    sharded over ('data', 'fsdp')."""
    sharding = batch_sharding(mesh)
    return jax.tree.map(
        lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)), batch)


def global_from_host(array, mesh):
    """A host array that every process holds in full -> a global array, batch axis sharded."""
    array = np.asarray(array)
    return jax.make_array_from_callback(array.shape, batch_sharding(mesh), lambda index: array[index])
