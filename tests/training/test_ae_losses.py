"""Autoencoder loss pieces against PyTorch transcriptions of the CompVis formulas."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
F = torch.nn.functional

from latent_diffusion.training import ae_losses as L  # noqa: E402

RNG = np.random.default_rng(0)


def _t(a):
    return torch.from_numpy(np.asarray(a, np.float32))


def _close(got, want, tol=1e-5):
    got, want = np.asarray(got, np.float64), np.asarray(want.detach().numpy() if hasattr(want, "detach")
                                                          else want, np.float64)
    np.testing.assert_allclose(got, want, rtol=0, atol=tol * max(1.0, np.abs(want).max()))


def test_disc_losses():
    real, fake = RNG.standard_normal((2, 6, 6, 1)) * 2, RNG.standard_normal((2, 6, 6, 1)) * 2
    tr, tf = _t(real), _t(fake)
    _close(L.hinge_d_loss(real, fake), 0.5 * (torch.mean(F.relu(1.0 - tr)) + torch.mean(F.relu(1.0 + tf))))
    _close(L.vanilla_d_loss(real, fake), 0.5 * (torch.mean(F.softplus(-tr)) + torch.mean(F.softplus(tf))))
    _close(L.generator_loss(fake), -torch.mean(tf))


def test_adopt_weight_traced():
    f = jax.jit(lambda s: L.adopt_weight(0.5, s, threshold=10))
    assert float(f(jnp.int32(9))) == 0.0 and float(f(jnp.int32(10))) == 0.5
    assert float(L.adopt_weight(0.5, 3, threshold=10, value=0.25)) == 0.25


def _jconv(x, w):
    k, b = w["kernel"], w["bias"]
    return jax.lax.conv_general_dilated(x, k, (1, 1), ((1, 1), (1, 1)),
                                        dimension_numbers=("NHWC", "HWIO", "NHWC")) + b


def test_adaptive_disc_weight_matches_autograd():
    torch.manual_seed(0)
    conv_out = torch.nn.Conv2d(4, 3, 3, padding=1)  # the decoder's last layer
    disc = torch.nn.Conv2d(3, 1, 4, stride=2, padding=1)
    h = RNG.standard_normal((2, 8, 8, 4)).astype(np.float32)
    x = RNG.uniform(-1, 1, (2, 8, 8, 3)).astype(np.float32)
    logvar = 0.3

    rec = conv_out(_t(h).permute(0, 3, 1, 2))
    nll = torch.abs(_t(x).permute(0, 3, 1, 2) - rec) / np.exp(logvar) + logvar
    nll = torch.sum(nll) / nll.shape[0]
    g = -torch.mean(disc(rec))
    nll_grads = torch.autograd.grad(nll, conv_out.weight, retain_graph=True)[0]
    g_grads = torch.autograd.grad(g, conv_out.weight, retain_graph=True)[0]
    want = torch.clamp(torch.norm(nll_grads) / (torch.norm(g_grads) + 1e-4), 0.0, 1e4).detach() * 0.5

    w = {"kernel": jnp.asarray(conv_out.weight.detach().numpy().transpose(2, 3, 1, 0)),
         "bias": jnp.asarray(conv_out.bias.detach().numpy())}
    dk = jnp.asarray(disc.weight.detach().numpy().transpose(2, 3, 1, 0))
    db = jnp.asarray(disc.bias.detach().numpy())

    def nll_fn(W):
        return L.kl_reconstruction_loss(x, _jconv(h, W), logvar)[1]

    def g_fn(W):
        logits = jax.lax.conv_general_dilated(_jconv(h, W), dk, (2, 2), ((1, 1), (1, 1)),
                                              dimension_numbers=("NHWC", "HWIO", "NHWC")) + db
        return L.generator_loss(logits)

    got = jax.jit(lambda W: L.adaptive_disc_weight(nll_fn, g_fn, W, 0.5))(w)
    _close(got, want)
    # No gradient flows through the weight, and a G loss that ignores W hits the clamp.
    assert float(jnp.abs(jax.grad(lambda W: L.adaptive_disc_weight(nll_fn, g_fn, W, 0.5))(w)["kernel"]).max()) == 0
    assert float(L.adaptive_disc_weight(nll_fn, lambda W: jnp.float32(1.0), w, 2.0)) == pytest.approx(2e4)
    with pytest.raises(ValueError, match="kernel"):
        L.adaptive_disc_weight(nll_fn, g_fn, {"weight": w["kernel"]}, 1.0)


def test_kl_reconstruction_loss():
    x, xrec = RNG.uniform(-1, 1, (3, 8, 8, 3)), RNG.uniform(-1, 1, (3, 8, 8, 3))
    p_loss, weights, logvar = RNG.uniform(0, 1, (3,)), RNG.uniform(0, 2, (3, 8, 8, 1)), -0.7
    tx, trec = _t(x).permute(0, 3, 1, 2), _t(xrec).permute(0, 3, 1, 2)
    tw = _t(weights).permute(0, 3, 1, 2)
    for perceptual in (None, p_loss):
        rec = torch.abs(tx - trec)
        if perceptual is not None:
            rec = rec + 0.7 * _t(perceptual).reshape(3, 1, 1, 1)  # lpips returns (B, 1, 1, 1)
        nll = rec / torch.exp(torch.tensor(logvar)) + logvar
        weighted = torch.sum(tw * nll) / nll.shape[0]
        got = L.kl_reconstruction_loss(x, xrec, logvar, perceptual, 0.7, weights=weights)
        _close(got[0], weighted)
        _close(got[1], torch.sum(nll) / nll.shape[0])
        _close(got[2], rec.mean())
        assert float(L.kl_reconstruction_loss(x, xrec, logvar, perceptual, 0.7)[0]) == pytest.approx(
            float(got[1]), rel=1e-6)
    with pytest.raises(ValueError, match="one value per sample"):
        L.kl_reconstruction_loss(x, xrec, 0.0, np.ones((2,)))


def test_vq_reconstruction_loss():
    x, xrec, p_loss = RNG.uniform(-1, 1, (2, 4, 4, 3)), RNG.uniform(-1, 1, (2, 4, 4, 3)), RNG.uniform(0, 1, (2,))
    tx, trec, tp = _t(x), _t(xrec), _t(p_loss).reshape(2, 1, 1, 1)
    got = L.vq_reconstruction_loss(x, xrec, p_loss, 1.5)
    assert len(got) == 3
    for value in got:
        _close(value, torch.mean(torch.abs(tx - trec) + 1.5 * tp))
    _close(L.vq_reconstruction_loss(x, xrec, None, pixel_loss="l2")[1], torch.mean((tx - trec) ** 2))
    with pytest.raises(ValueError, match="pixel_loss"):
        L.vq_reconstruction_loss(x, xrec, pixel_loss="l3")
