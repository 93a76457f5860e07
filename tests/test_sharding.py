"""Mesh, sharding rules and global batches (no model: fast)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType, PartitionSpec as P

from blip_jax import sharding


def test_make_mesh_is_auto_data_fsdp():
    mesh = sharding.make_mesh(fsdp=2)
    assert mesh.axis_names == ("data", "fsdp") and dict(mesh.shape) == {"data": 4, "fsdp": 2}
    assert all(t == AxisType.Auto for t in mesh.axis_types)
    assert sharding.num_batch_shards(mesh) == 8
    one = sharding.make_mesh(devices=jax.devices()[:1])
    assert dict(one.shape) == {"data": 1, "fsdp": 1}


def test_bad_fsdp_is_one_line():
    with pytest.raises(ValueError, match="sharding.fsdp=3") as error:
        sharding.make_mesh(fsdp=3)
    assert "\n" not in str(error.value)


def test_rules_pick_fsdp_dimension_and_replicate_small():
    mesh = sharding.make_mesh(fsdp=4)
    tree = {"visual_encoder": {"kernel": jax.ShapeDtypeStruct((64, 256), jnp.float32),
                               "bias": jax.ShapeDtypeStruct((256,), jnp.float32)},
            "text_encoder": {"kernel": jax.ShapeDtypeStruct((96, 6), jnp.float32)},
            "image_queue": jax.ShapeDtypeStruct((1024, 64), jnp.float32)}
    rules = ((r"^text_encoder/", "replicate"), (".*", "fsdp"))
    shardings = sharding.tree_shardings(tree, mesh, rules)
    assert shardings["visual_encoder"]["kernel"].spec == P(None, "fsdp")   # the largest divisible dim
    assert shardings["visual_encoder"]["bias"].spec == P()                 # below min_size
    assert shardings["text_encoder"]["kernel"].spec == P()                 # first matching rule wins
    assert shardings["image_queue"].spec == P("fsdp", None)
    with pytest.raises(ValueError, match="unknown"):
        sharding.tree_shardings(tree, mesh, ((".*", "tp"),))


def test_rules_from_config():
    import ml_collections
    assert sharding.rules_from_config(ml_collections.ConfigDict({"rules": "fsdp"})) == sharding.FSDP_RULES
    custom = sharding.rules_from_config(ml_collections.ConfigDict({"rules": [["^params/", "fsdp"], [".*", "replicate"]]}))
    assert custom == (("^params/", "fsdp"), (".*", "replicate"))


def test_shard_batch_and_global_matmul():
    mesh = sharding.make_mesh(fsdp=2)
    x = np.arange(8 * 3, dtype=np.float32).reshape(8, 3)
    batch = sharding.shard_batch({"x": x}, mesh)
    assert batch["x"].sharding.spec == P(("data", "fsdp"))
    assert len(batch["x"].addressable_shards) == 8
    with jax.set_mesh(mesh):
        sims = jax.jit(lambda a: a @ a.T)(batch["x"])  # needs Auto axes (Explicit would raise)
    np.testing.assert_allclose(np.asarray(sims), x @ x.T)
    full = sharding.global_from_host(x, mesh)
    np.testing.assert_array_equal(np.asarray(full), x)
