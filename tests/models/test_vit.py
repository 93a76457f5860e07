"""ViT: torch-exact pos-embed resampling, drop-path, remat and dtype behaviour."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from blip_jax.models import build_model, init_params, model_config
from blip_jax.models.config import Options, VisionConfig
from blip_jax.models.vit import bicubic_matrix, images_per_pass, resample_pos_embed


def tiny_config(**vision):
    config = model_config("tiny", "tiny")
    config.text.vocab_size = 64
    config.vision.update(vision)
    return config


@pytest.mark.parametrize("old,new", [(14, 24), (14, 7), (4, 6), (24, 30)])
def test_resample_pos_embed_matches_torch_bicubic(old, new):
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(old * 100 + new)
    pos_embed = rng.normal(size=(1, 1 + old * old, 8)).astype(np.float32)
    ours = resample_pos_embed(pos_embed, new)
    grid = torch.from_numpy(pos_embed[:, 1:]).reshape(1, old, old, 8).permute(0, 3, 1, 2)
    ref = torch.nn.functional.interpolate(grid, size=(new, new), mode="bicubic", align_corners=False)
    ref = ref.permute(0, 2, 3, 1).reshape(1, -1, 8).numpy()
    assert ours.shape == (1, 1 + new * new, 8)
    np.testing.assert_array_equal(ours[:, 0], pos_embed[:, 0])
    np.testing.assert_allclose(ours[:, 1:], ref, atol=1e-5)
    # The traced (jax) path gives the same numbers as the numpy path.
    np.testing.assert_allclose(np.asarray(resample_pos_embed(jnp.asarray(pos_embed), new)), ours, atol=1e-5)


def test_bicubic_rows_sum_to_one_and_differ_from_keys_kernel():
    matrix = bicubic_matrix(5, 9)
    np.testing.assert_allclose(matrix.sum(1), 1.0, atol=1e-12)
    # jax.image.resize uses Keys a=-0.5; torch uses a=-0.75: the results must differ.
    signal = np.sin(np.arange(5.0) * 1.3)
    keys = np.asarray(jax.image.resize(jnp.asarray(signal), (9,), "cubic"))
    assert np.abs(matrix @ signal - keys).max() > 1e-3


def test_vit_runs_at_another_resolution_with_resampled_pos_embed():
    config = tiny_config()
    model = build_model(config, "caption")
    params = init_params(config, "caption", jax.random.key(0))
    pixels = jax.random.normal(jax.random.key(1), (2, 48, 48, 3))
    tokens = model.apply({"params": params}, pixels, method="image_embeds")
    assert tokens.shape == (2, 1 + 36, 32)
    assert np.isfinite(np.asarray(tokens)).all()


def test_drop_path_is_random_in_training_and_off_in_eval():
    config = tiny_config(drop_path_rate=0.5)
    model = build_model(config, "caption")
    params = init_params(config, "caption", jax.random.key(0))
    pixels = jax.random.normal(jax.random.key(1), (4, 32, 32, 3))
    apply = lambda det, key: model.apply(  # noqa: E731
        {"params": params}, pixels, det, method="image_embeds", rngs={"dropout": key})
    np.testing.assert_array_equal(apply(True, jax.random.key(1)), apply(True, jax.random.key(2)))
    assert not np.allclose(apply(False, jax.random.key(1)), apply(False, jax.random.key(2)))


def test_remat_gives_identical_outputs_and_gradients():
    config = tiny_config()
    params = init_params(config, "caption", jax.random.key(0))
    pixels = jax.random.normal(jax.random.key(1), (2, 32, 32, 3))

    def loss(p, cfg):
        return jnp.sum(build_model(cfg, "caption").apply({"params": p}, pixels, method="image_embeds") ** 2)

    remat_config = tiny_config()
    remat_config.remat.vision_layers = 2
    remat_config.remat.policy = "dots_saveable"
    np.testing.assert_allclose(loss(params, config), loss(params, remat_config), rtol=1e-6)
    grads, remat_grads = jax.grad(loss)(params, config), jax.grad(loss)(params, remat_config)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7), grads, remat_grads)


def test_bf16_compute_keeps_f32_params_and_f32_layernorm_output():
    config = tiny_config()
    config.dtype = "bfloat16"
    params = init_params(config, "caption", jax.random.key(0))
    assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(params))
    tokens = build_model(config, "caption").apply(
        {"params": params}, jnp.ones((1, 32, 32, 3)), method="image_embeds")
    assert tokens.dtype == jnp.float32  # final LayerNorm runs in f32
    f32_tokens = build_model(tiny_config(), "caption").apply(
        {"params": params}, jnp.ones((1, 32, 32, 3)), method="image_embeds")
    np.testing.assert_allclose(tokens, f32_tokens, atol=0.1)


def test_bad_image_size_is_one_clear_error():
    config = tiny_config(image_size=30)
    with pytest.raises(ValueError, match="not a multiple of patch_size"):
        build_model(config, "caption")


def _embeds_and_grads(config, params, pixels):
    model = build_model(config, "caption")

    def loss(p):
        tokens = model.apply({"params": p}, pixels, method="image_embeds")
        return jnp.sum(tokens ** 2), tokens

    (_, tokens), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(params)
    return tokens, grads


@pytest.mark.parametrize("per_pass", [1, 2, 3])
def test_encoding_in_passes_gives_the_one_pass_results_and_gradients(per_pass):
    config = tiny_config()
    params = init_params(config, "caption", jax.random.key(0))
    pixels = jax.random.normal(jax.random.key(1), (4, 32, 32, 3))
    tokens, grads = _embeds_and_grads(config, params, pixels)
    passes_config = tiny_config()
    passes_config.images_per_pass = per_pass  # 3 does not divide 4: it falls back to 2
    passes_tokens, passes_grads = _embeds_and_grads(passes_config, params, pixels)
    np.testing.assert_allclose(passes_tokens, tokens, rtol=1e-5, atol=1e-6)
    # Gradients are summed over passes instead of inside one GEMM: float32 reordering only.
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4), passes_grads, grads)
    # Initialising through the loop gives the same parameter tree.
    passes_params = init_params(passes_config, "caption", jax.random.key(0))
    assert jax.tree.structure(passes_params) == jax.tree.structure(params)


def test_encoding_in_passes_on_a_sharded_batch():
    config = tiny_config()
    config.images_per_pass = 8
    params = init_params(config, "caption", jax.random.key(0))
    mesh = jax.make_mesh((8,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
    pixels = jax.random.normal(jax.random.key(1), (16, 32, 32, 3))
    with jax.set_mesh(mesh):
        sharded = jax.device_put(pixels, jax.NamedSharding(mesh, jax.P("data")))
        tokens = jax.jit(lambda p, x: build_model(config, "caption").apply(
            {"params": p}, x, method="image_embeds"))(params, sharded)
    whole = build_model(tiny_config(), "caption").apply({"params": params}, pixels, method="image_embeds")
    np.testing.assert_allclose(tokens, whole, rtol=1e-5, atol=1e-6)


def test_images_per_pass_policy():
    vision = VisionConfig(image_size=384, patch_size=16, width=768, depth=12, num_heads=12, mlp_dim=3072)
    # ViT-B/16 at 384 px: 12 x 577 x 577 float32 attention scores (16 MB) per image; 32 MiB fit two.
    assert images_per_pass(8, vision, Options(), 384) == 2
    assert images_per_pass(8, vision, Options(dtype="bfloat16"), 384) == 2  # the scores stay float32
    # At 224 px an image needs 2.4 MB (197 x 3072 MLP activations): a batch of 8 fits in one pass.
    assert images_per_pass(8, vision, Options(), 224) == 8
    assert images_per_pass(32, vision, Options(), 224) == 8  # 13 fit; the largest divisor of 32 <= 13
    assert images_per_pass(8, vision, Options(images_per_pass=3), 384) == 2  # largest divisor <= 3
    assert images_per_pass(7, vision, Options(), 384) == 1
    mesh = jax.make_mesh((8,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
    with jax.set_mesh(mesh):  # a pass holds a multiple of the device count
        assert images_per_pass(32, vision, Options(), 384) == 16
        assert images_per_pass(8, vision, Options(), 384) == 8
        assert images_per_pass(12, vision, Options(), 384) == 12  # not divisible by 8: one pass
