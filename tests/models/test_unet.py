"""Unit tests of the Flax UNet: shapes, zero-init output, remat, bf16, parameter counts, errors."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from latent_diffusion.convert.unet import abstract_params, unet_config_from_diffusers
from latent_diffusion.models.unet import UNet, timestep_embedding

TINY = dict(in_channels=4, model_channels=32, out_channels=6, num_res_blocks=1, attention_resolutions=(2,),
            channel_mult=(1, 2), num_heads=4, context_dim=16)


def tiny_inputs(batch=2, size=8):
    k1, k2 = jax.random.split(jax.random.PRNGKey(1))
    x = jax.random.normal(k1, (batch, size, size, 4))
    ctx = jax.random.normal(k2, (batch, 5, 16))
    return x, jnp.array([1, 999])[:batch], ctx


def random_params(module, *args, seed=0):
    """Random values for every param (zero-initialised layers included), without compiling init."""
    shapes = jax.eval_shape(lambda: module.init(jax.random.PRNGKey(0), *args))["params"]
    rng = np.random.default_rng(seed)

    def fill(path, leaf):
        base = 1.0 if jax.tree_util.keystr(path).endswith("['scale']") else 0.0
        fan_in = int(np.prod(leaf.shape[:-1])) if leaf.ndim > 1 else 1
        return jnp.asarray(base + rng.standard_normal(leaf.shape) / np.sqrt(fan_in), jnp.float32)

    return jax.tree_util.tree_map_with_path(fill, shapes)


@pytest.fixture(scope="module")
def tiny():
    module = UNet(**TINY)
    x, t, ctx = tiny_inputs()
    # The RBG generator compiles far faster on CPU than threefry for a model with many params.
    params = jax.jit(module.init)(jax.random.key(0, impl="rbg"), x, t, ctx)["params"]
    return module, params


def test_shape_and_zero_output_at_init(tiny):
    module, params = tiny
    x, t, ctx = tiny_inputs()
    apply = jax.jit(module.apply)
    out = apply({"params": params}, x, t, ctx)
    assert out.shape == (2, 8, 8, 6) and out.dtype == jnp.float32
    assert np.all(np.asarray(out) == 0)  # zero-initialised output conv
    out = apply({"params": random_params(module, x, t, ctx)}, x, t, ctx)
    assert np.abs(np.asarray(out)).max() > 1e-3


def test_timestep_embedding_order():
    emb = np.asarray(timestep_embedding(jnp.array([0.0, 5.0]), 8))
    np.testing.assert_allclose(emb[0], [1, 1, 1, 1, 0, 0, 0, 0])  # cos half first
    freqs = np.exp(-np.log(10000.0) * np.arange(4) / 4)
    np.testing.assert_allclose(emb[1], np.concatenate([np.cos(5 * freqs), np.sin(5 * freqs)]), rtol=1e-6)


def test_remat_gives_same_output_and_grads():
    one_level = dict(TINY, channel_mult=(1,), attention_resolutions=(1,))  # halves the compile time
    module, remat = UNet(**one_level), UNet(**one_level, remat=True)
    x, t, ctx = tiny_inputs()
    params = random_params(module, x, t, ctx)

    def loss(m, p):
        return jnp.mean(m.apply({"params": p}, x, t, context=ctx) ** 2)

    v0, g0 = jax.jit(jax.value_and_grad(lambda p: loss(module, p)))(params)
    for policy in (True, "dots"):  # full remat, and the policy that keeps the projections' outputs
        step = jax.jit(jax.value_and_grad(lambda p: loss(remat.clone(remat=policy), p)))
        v1, g1 = step(params)
        np.testing.assert_allclose(v0, v1, rtol=1e-5)
        for a, b in zip(jax.tree_util.tree_leaves(g0), jax.tree_util.tree_leaves(g1)):
            np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
    # The policies are real: full remat recomputes the forward inside the backward pass, more than 'dots'.
    hlo = {p: jax.jit(jax.grad(lambda q: loss(remat.clone(remat=p), q))).lower(params).compile().as_text()
           for p in ("none", "full", "dots")}
    convs = {p: h.count("convolution(") for p, h in hlo.items()}
    assert convs["none"] < convs["dots"] <= convs["full"], convs
    with pytest.raises(ValueError, match="remat must be one of"):
        UNet(**one_level, remat="some").init(jax.random.key(0), x, t, context=ctx)


def test_attention_implementation_reaches_every_attention():
    # attention_impl is passed to the jax.nn.dot_product_attention calls: 'xla' is the default's
    # computation, and an implementation this backend lacks fails (here on CPU: 'cudnn').
    one_level = dict(TINY, channel_mult=(1,), attention_resolutions=(1,))
    x, t, ctx = tiny_inputs()
    params = random_params(UNet(**one_level), x, t, ctx)
    run = lambda **kw: np.asarray(jax.jit(UNet(**one_level, **kw).apply)({"params": params}, x, t, ctx))
    np.testing.assert_array_equal(run(attention_impl="xla"), run())
    with pytest.raises(Exception):
        run(attention_impl="cudnn", dtype=jnp.bfloat16)


def test_bf16_compute_runs_close_to_float32(tiny):
    module = tiny[0]
    x, t, ctx = tiny_inputs()
    params = random_params(module, x, t, ctx)
    ref = np.asarray(jax.jit(module.apply)({"params": params}, x, t, ctx))
    bf16 = UNet(**TINY, dtype=jnp.bfloat16)
    out = np.asarray(jax.jit(bf16.apply)({"params": params}, x, t, ctx))
    assert out.dtype == np.float32 and np.all(np.isfinite(out))
    # bf16 keeps ~3 significant digits; many layers accumulate that to a few percent.
    assert np.abs(out - ref).max() <= 5e-2 * np.abs(ref).max()


def test_class_conditional_null_label_and_dropout():
    module = UNet(**TINY, num_classes=3, dropout=0.5)
    x, t, ctx = tiny_inputs()
    y = jnp.array([0, 3])  # 3 = the null label
    params = random_params(module, x, t, ctx, y)
    assert params["label_emb"]["embedding"].shape == (4, 128)
    apply = jax.jit(lambda p, key: module.apply({"params": p}, x, t, ctx, y, deterministic=False,
                                                rngs={"dropout": key}))
    a, b = apply(params, jax.random.PRNGKey(1)), apply(params, jax.random.PRNGKey(2))
    assert np.all(np.isfinite(np.asarray(a))) and np.abs(np.asarray(a - b)).max() > 1e-3


def test_scalar_timestep_and_no_context_model():
    module = UNet(**{**TINY, "context_dim": None})
    x, _, _ = tiny_inputs()
    shapes = jax.eval_shape(lambda: module.init(jax.random.PRNGKey(0), x, 10))["params"]
    assert shapes["down_1_attn_0"]["blocks_0"]["attn2"]["to_k"]["kernel"].shape == (64, 64)  # attends to itself
    out = jax.eval_shape(lambda p: module.apply({"params": p}, x, 10.5), shapes)
    assert out.shape == (2, 8, 8, 6)


@pytest.mark.parametrize("change, call, error", [
    (dict(num_head_channels=8), {}, ValueError),                  # both head options set
    (dict(use_spatial_transformer=False), {}, ValueError),         # AttentionBlock has no cross-attention
    (dict(use_spatial_transformer=False, context_dim=None), {}, ValueError),  # ... so no context either
    ({}, dict(context=None), ValueError),                          # context required
    ({}, dict(y=jnp.array([0, 1])), ValueError),                   # y for an unconditional model
])
def test_errors(change, call, error):
    x, t, ctx = tiny_inputs()
    module = UNet(**{**TINY, **change})
    kwargs = {"context": ctx, **call}
    with pytest.raises(error):
        jax.eval_shape(lambda: module.init(jax.random.PRNGKey(0), x, t, **kwargs))


def test_attention_block_and_resblock_resampling():
    """use_spatial_transformer=False / resblock_updown=True: param layout, zero output at init, shapes."""
    module = UNet(**{**TINY, "context_dim": None, "use_spatial_transformer": False, "resblock_updown": True,
                     "use_scale_shift_norm": True})
    x, t, _ = tiny_inputs()
    shapes = jax.eval_shape(lambda: module.init(jax.random.PRNGKey(0), x, t))["params"]
    assert set(shapes["mid_attn"]) == {"norm", "to_q", "to_k", "to_v", "to_out"}
    assert shapes["down_1_attn_0"]["to_q"]["kernel"].shape == (64, 64)
    for name in ("down_0_downsample", "up_1_upsample"):  # ResBlocks without a skip conv
        assert set(shapes[name]) == {"in_norm", "in_conv", "emb_proj", "out_norm", "out_conv"}
    params = jax.jit(module.init)(jax.random.key(0, impl="rbg"), x, t)["params"]
    assert not np.any(np.asarray(params["mid_attn"]["to_out"]["kernel"]))  # zero-initialised, as the reference
    apply = jax.jit(module.apply)
    assert np.all(np.asarray(apply({"params": params}, x, t)) == 0)
    out = apply({"params": random_params(module, x, t)}, x, t)
    assert out.shape == (2, 8, 8, 6) and np.abs(np.asarray(out)).max() > 1e-3


def test_sd15_parameter_count():
    """The SD v1.x UNet has 859,520,964 parameters (counted without allocating)."""
    direct = UNet(in_channels=4, model_channels=320, out_channels=4, num_res_blocks=2,
                  attention_resolutions=(4, 2, 1), channel_mult=(1, 2, 4, 4), num_heads=8, context_dim=768)
    sd15 = {"_class_name": "UNet2DConditionModel", "cross_attention_dim": 768, "sample_size": 64}
    mapped = unet_config_from_diffusers(sd15)
    assert sorted(mapped.pop("attention_resolutions")) == sorted(direct.attention_resolutions)
    assert mapped == {k: getattr(direct, k) for k in mapped}
    count = sum(int(np.prod(p.shape)) for p in jax.tree_util.tree_leaves(abstract_params(direct)))
    assert count == 859_520_964


def test_sd2_parameter_count_matches_diffusers():
    torch = pytest.importorskip("torch")
    diffusers = pytest.importorskip("diffusers")
    cfg = dict(cross_attention_dim=1024, attention_head_dim=[5, 10, 20, 20], use_linear_projection=True)
    with torch.device("meta"):
        ref = sum(p.numel() for p in diffusers.UNet2DConditionModel(**cfg).parameters())
    module = UNet(**unet_config_from_diffusers(cfg))
    assert module.num_head_channels == 64
    count = sum(int(np.prod(p.shape)) for p in jax.tree_util.tree_leaves(abstract_params(module)))
    assert count == ref == 865_910_724


@pytest.mark.parametrize("spec, paper", [
    ("ldm_celebahq", 274e6), ("ldm_lsun_bedrooms", 274e6), ("ldm_lsun_churches", 294e6),
    ("ldm_inpainting", 215e6), ("ldm_semantic", 215e6),
    ("ldm_sr", 169e6 - 55_322_782),  # Table 15's 169M includes the VQ-f4 first stage
])
def test_paper_configs_parameter_counts(spec, paper):
    """The AttentionBlock configs' UNets have the paper's sizes (Tables 12 and 15), counted without allocating."""
    import importlib
    from latent_diffusion.models import build
    module = build.unet(importlib.import_module(f"configs.{spec}").get_config(None).unet)
    assert not module.use_spatial_transformer
    count = sum(int(np.prod(p.shape)) for p in jax.tree_util.tree_leaves(abstract_params(module)))
    assert abs(count - paper) <= 0.005 * paper, count
