"""First-stage autoencoders: shapes, the Gaussian posterior, the quantiser, attention placement, remat."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from latent_diffusion.models.autoencoder import AutoencoderKL, DiagonalGaussian, VQModel
from latent_diffusion.models.quantizer import VectorQuantizer

TINY = dict(ch=8, num_res_blocks=1, num_groups=4, resolution=16)
RNGS = {"params": jax.random.key(0), "sample": jax.random.key(1), "dropout": jax.random.key(2)}


def _x(b=2, size=16, seed=0):
    return jnp.asarray(np.random.default_rng(seed).uniform(-1, 1, (b, size, size, 3)), jnp.float32)


def _init(model, x, seed=0):
    """Random params from numpy: module.init compiles every initializer, which is slow on CPU."""
    rng = np.random.default_rng(seed)

    def fill(path, spec):
        name, shape = path[-1].key, spec.shape
        if name == "kernel":
            return rng.normal(size=shape) / np.sqrt(np.prod(shape[:-1]))
        if name == "scale":
            return 1 + 0.1 * rng.normal(size=shape)
        return 0.1 * rng.normal(size=shape)

    shapes = jax.eval_shape(model.init, RNGS, x)
    return jax.tree.map(lambda a: jnp.asarray(a, jnp.float32),
                        jax.tree_util.tree_map_with_path(fill, shapes))


@pytest.mark.parametrize("ch_mult,f", [((1, 2, 2), 4), ((1, 2, 2, 4), 8)])
def test_kl_shapes(ch_mult, f):
    model = AutoencoderKL(**TINY, ch_mult=ch_mult, z_channels=3, embed_dim=3)
    x = _x()
    params = jax.eval_shape(model.init, RNGS, x)["params"]
    out = jax.eval_shape(lambda p: model.apply({"params": p}, x, rngs=RNGS), params)
    xrec, aux = out
    assert model.downsample_factor == f
    assert xrec.shape == x.shape
    assert aux["posterior"].mean.shape == (2, 16 // f, 16 // f, 3)
    assert aux["posterior"].logvar.shape == (2, 16 // f, 16 // f, 3)
    assert aux["decoder_features"].shape == (2, 16, 16, 8)
    assert params["decoder"]["conv_out"]["kernel"].shape == (3, 3, 8, 3)
    assert params["quant_conv"]["kernel"].shape == (1, 1, 6, 6)


def test_vq_shapes_f4():
    model = VQModel(**TINY, ch_mult=(1, 2, 2), z_channels=3, embed_dim=5, n_embed=16)
    x = _x()
    params = jax.eval_shape(model.init, RNGS, x)["params"]
    xrec, aux = jax.eval_shape(lambda p: model.apply({"params": p}, x), params)
    assert xrec.shape == x.shape and aux["indices"].shape == (2, 4, 4)
    assert params["quantize"]["embedding"].shape == (16, 5)
    assert params["quant_conv"]["kernel"].shape == (1, 1, 3, 5)
    for k in ("codebook_loss", "perplexity", "codebook_usage"):
        assert aux[k].shape == ()


def test_decoder_features_reproduce_output_with_conv_out():
    model = AutoencoderKL(**TINY, ch_mult=(1, 2))
    x = _x()
    variables = _init(model, x)
    xrec, aux = model.apply(variables, x, rngs=RNGS)
    # The adaptive GAN weight re-applies the last layer to these features.
    again = nn.Conv(3, (3, 3), padding=1).apply(
        {"params": variables["params"]["decoder"]["conv_out"]}, aux["decoder_features"])
    np.testing.assert_allclose(again, xrec, atol=1e-5)
    # sample_posterior=False decodes the mean, which encode/decode reproduce.
    mean_rec, _ = model.apply(variables, x, sample_posterior=False)
    post = model.apply(variables, x, method="encode")
    np.testing.assert_allclose(model.apply(variables, post.mode(), method="decode"), mean_rec, atol=1e-5)
    assert not np.allclose(mean_rec, xrec)


def test_kl_matches_closed_form():
    torch = pytest.importorskip("torch")
    k1, k2 = jax.random.split(jax.random.key(3))
    mean = jax.random.normal(k1, (2, 3, 3, 4))
    logvar = jax.random.normal(k2, (2, 3, 3, 4))
    post = DiagonalGaussian.from_moments(jnp.concatenate([mean, logvar], -1))
    ref = torch.distributions.kl_divergence(
        torch.distributions.Normal(torch.tensor(np.asarray(mean)), torch.tensor(np.exp(0.5 * np.asarray(logvar)))),
        torch.distributions.Normal(0.0, 1.0)).sum(dim=(1, 2, 3)).numpy()
    np.testing.assert_allclose(post.kl(), ref, rtol=1e-5)
    assert post.kl().shape == (2,)
    eps = jax.random.normal(jax.random.key(9), mean.shape)
    np.testing.assert_allclose(post.sample(jax.random.key(9)), mean + jnp.exp(0.5 * logvar) * eps, rtol=1e-5)
    np.testing.assert_allclose(post.var, post.std ** 2, rtol=1e-5)


def test_logvar_is_clamped():
    moments = jnp.concatenate([jnp.zeros((1, 1, 1, 2)), jnp.array([[[[-100.0, 100.0]]]])], -1)
    post = DiagonalGaussian.from_moments(moments)
    np.testing.assert_array_equal(post.logvar, [[[[-30.0, 20.0]]]])
    assert np.all(np.isfinite(post.var)) and np.all(np.isfinite(post.kl()))


@pytest.mark.parametrize("legacy", [True, False])
def test_quantizer_straight_through_and_loss(legacy):
    beta = 0.25
    vq = VectorQuantizer(n_embed=8, embed_dim=3, beta=beta, legacy=legacy)
    z = jax.random.normal(jax.random.key(4), (2, 4, 4, 3))
    params = vq.init(jax.random.key(5), z)["params"]
    book = params["embedding"]
    assert np.all(np.abs(book) <= 1 / 8)  # taming's uniform(-1/n, 1/n) init
    z_q, aux = vq.apply({"params": params}, z)
    # Forward value: the nearest code, found by brute force.
    d = np.sum((np.asarray(z)[..., None, :] - np.asarray(book)) ** 2, -1)
    np.testing.assert_array_equal(aux["indices"], d.argmin(-1))
    np.testing.assert_allclose(z_q, np.asarray(book)[d.argmin(-1)], atol=1e-6)
    # Backward: identity through the quantiser.
    g = jax.random.normal(jax.random.key(6), z.shape)
    grad = jax.grad(lambda z: jnp.sum(vq.apply({"params": params}, z)[0] * g))(z)
    np.testing.assert_allclose(grad, g, rtol=1e-6)
    # Loss value is (1 + beta) * mse either way; legacy puts weight 1 on the commitment term.
    mse = np.mean((np.asarray(z_q) - np.asarray(z)) ** 2)
    np.testing.assert_allclose(aux["codebook_loss"], (1 + beta) * mse, rtol=1e-5)
    loss_grad = jax.grad(lambda z: vq.apply({"params": params}, z)[1]["codebook_loss"])(z)
    weight = 1.0 if legacy else beta
    np.testing.assert_allclose(loss_grad, weight * 2 * (z - z_q) / z.size, rtol=1e-4, atol=1e-9)
    book_grad = jax.grad(lambda p: vq.apply({"params": p}, z)[1]["codebook_loss"])(params)["embedding"]
    assert np.any(book_grad != 0)


def test_perplexity_and_usage():
    vq = VectorQuantizer(n_embed=4, embed_dim=2)
    book = jnp.array([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0], [0.0, -1.0]])
    params = {"embedding": book}
    all_codes = jnp.tile(book, (3, 1)).reshape(1, 3, 4, 2)  # each code used 3 times
    _, aux = vq.apply({"params": params}, all_codes * 1.1)
    np.testing.assert_allclose(aux["perplexity"], 4.0, rtol=1e-5)
    np.testing.assert_allclose(aux["codebook_usage"], 1.0)
    np.testing.assert_allclose(aux["codebook_loss"], 0.01 / 2 * 1.25, rtol=1e-4)  # one of 2 dims off by 0.1
    one_code = jnp.broadcast_to(book[1], (1, 3, 4, 2))
    _, aux = vq.apply({"params": params}, one_code)
    np.testing.assert_allclose(aux["perplexity"], 1.0, rtol=1e-5)
    np.testing.assert_allclose(aux["codebook_usage"], 0.25)
    np.testing.assert_array_equal(aux["indices"], 1)


def test_vq_decode_paths():
    model = VQModel(**TINY, ch_mult=(1, 2), z_channels=3, embed_dim=3, n_embed=8)
    x = _x()
    v = _init(model, x)
    h = model.apply(v, x, method="encode")
    z_q, aux = model.apply(v, h, method="quantize")
    xrec, full_aux = model.apply(v, x)
    np.testing.assert_allclose(model.apply(v, h, method="decode"), xrec, atol=1e-5)
    np.testing.assert_allclose(model.apply(v, aux["indices"], method="decode_code"), xrec, atol=1e-5)
    np.testing.assert_allclose(model.apply(v, z_q, force_not_quantize=True, method="decode"), xrec, atol=1e-5)
    assert not np.allclose(model.apply(v, h, force_not_quantize=True, method="decode"), xrec)
    assert set(full_aux) == {"codebook_loss", "perplexity", "codebook_usage", "indices", "decoder_features"}


def test_attention_params_at_attn_resolutions():
    def names(**kw):
        model = AutoencoderKL(**{**TINY, "ch_mult": (1, 2), **kw})
        p = jax.eval_shape(model.init, RNGS, _x())["params"]
        return set(p["encoder"]), set(p["decoder"])

    enc, dec = names(attn_resolutions=(8,))
    assert {"down_1_attn_0", "mid_attn_1"} <= enc and not any(n.startswith("down_0_attn") for n in enc)
    assert {"up_1_attn_0", "up_1_attn_1", "mid_attn_1"} <= dec
    assert not any(n.startswith("up_0_attn") for n in dec)
    enc, dec = names(attn_resolutions=(16,), mid_attention=False)
    assert "down_0_attn_0" in enc and "mid_attn_1" not in enc | dec and "up_0_attn_1" in dec
    enc, dec = names()
    assert not any("_attn_" in n and not n.startswith("mid") for n in enc | dec)


def test_remat_same_output_and_grads():
    base = AutoencoderKL(**TINY, ch_mult=(1, 2), attn_resolutions=(8,))
    x = _x()
    params = _init(base, x)["params"]

    def loss(model, p):
        xrec, aux = model.apply({"params": p}, x, rngs=RNGS)
        return jnp.mean(xrec ** 2) + jnp.mean(aux["posterior"].kl())

    l0, g0 = jax.jit(jax.value_and_grad(lambda p: loss(base, p)))(params)
    l1, g1 = jax.jit(jax.value_and_grad(lambda p: loss(base.clone(remat=True), p)))(params)
    np.testing.assert_allclose(l0, l1, rtol=1e-6)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6), g0, g1)


def test_dropout_and_bf16():
    model = AutoencoderKL(**TINY, ch_mult=(1, 2), dropout=0.5)
    x = _x()
    v = _init(model, x)
    a = model.apply(v, x, sample_posterior=False)[0]
    b = model.apply(v, x, sample_posterior=False, deterministic=False, rngs={"dropout": jax.random.key(7)})[0]
    assert not np.allclose(a, b)
    half = model.clone(dtype=jnp.bfloat16, dropout=0.0)
    xrec, aux = half.apply(v, x, sample_posterior=False)
    assert xrec.dtype == jnp.bfloat16 and aux["posterior"].mean.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(xrec, np.float32), a, atol=0.1)


def test_bad_group_count_is_explained():
    with pytest.raises(ValueError, match="divisible by num_groups"):
        jax.eval_shape(AutoencoderKL(**{**TINY, "ch": 6}, ch_mult=(1, 2)).init, RNGS, _x())
