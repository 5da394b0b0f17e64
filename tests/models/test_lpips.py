"""LPIPS-VGG against the `lpips` package (random VGG trunk, the package's shipped linear heads)."""
import copy
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
lpips_pkg = pytest.importorskip("lpips")

from latent_diffusion.convert import lpips as convert_lpips  # noqa: E402
from latent_diffusion.convert.lpips import (  # noqa: E402
    bundled_lin_path, load_lpips_params, lpips_params_from_torch)
from latent_diffusion.models.lpips import LPIPS  # noqa: E402


def _no_download(*args, **kwargs):
    raise AssertionError("the reference LPIPS tried to download weights")


@pytest.fixture(scope="module")
def reference():
    """lpips.LPIPS with a random VGG trunk, built with downloads made to fail loudly."""
    mp = pytest.MonkeyPatch()
    mp.setattr(torch.hub, "load_state_dict_from_url", _no_download)
    mp.setattr(torch.hub, "download_url_to_file", _no_download)
    try:
        torch.manual_seed(0)
        model = lpips_pkg.LPIPS(net="vgg", pretrained=True, pnet_rand=True, verbose=False)
    finally:
        mp.undo()
    with torch.no_grad():  # torchvision zero-inits conv biases: make them matter
        for name, p in model.net.named_parameters():
            if name.endswith("bias"):
                p.normal_(0.0, 0.1)
    return model.eval()


@pytest.fixture(scope="module")
def params(reference):
    return lpips_params_from_torch(reference.state_dict())


def _torchvision_layout(reference):
    """The trunk as torchvision's vgg16-397923af.pth names it, with a stand-in classifier."""
    sd = {}
    for key, value in reference.state_dict().items():
        if key.startswith("net.slice"):
            idx_name = key.split(".", 3)[2:]  # ['<idx>', 'weight|bias']
            sd[f"features.{idx_name[0]}.{idx_name[1]}"] = value.clone()
    sd["classifier.0.weight"] = torch.zeros(4, 4)
    return sd


def _inputs(seed=0, b=2, hw=64):
    rng = np.random.default_rng(seed)
    x = rng.uniform(-1, 1, (b, hw, hw, 3)).astype(np.float32)
    y = np.clip(x + 0.3 * rng.standard_normal(x.shape), -1, 1).astype(np.float32)
    return x, y


def _nchw(a):
    return torch.from_numpy(np.ascontiguousarray(a.transpose(0, 3, 1, 2)))


def test_matches_lpips_package(reference, params):
    x, y = _inputs()
    with torch.no_grad():
        want = reference(_nchw(x), _nchw(y), normalize=False).numpy().reshape(-1)
    got = np.asarray(jax.jit(LPIPS().apply)({"params": params}, x, y))
    assert got.shape == (2,)
    assert np.all(want > 0)
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-4 * np.abs(want).max())
    # Identical images are at distance zero.
    same = np.asarray(LPIPS().apply({"params": params}, x, x))
    np.testing.assert_allclose(same, 0.0, atol=1e-7)


def test_input_gradient_matches(reference):
    # torchvision's zero biases here: random biases leave feature vectors of norm ~1e-8 that
    # unit-normalisation blows up, where float32 rounding alone moves the gradient by 1e-3
    # (torch float32 vs float64 differ as much there too).
    reference = copy.deepcopy(reference)
    with torch.no_grad():
        for name, p in reference.net.named_parameters():
            if name.endswith("bias"):
                p.zero_()
    params = lpips_params_from_torch(reference.state_dict())
    x, y = _inputs(seed=1, hw=32)
    yt = _nchw(y).requires_grad_(True)
    reference(_nchw(x), yt).sum().backward()
    want = yt.grad.numpy().transpose(0, 2, 3, 1)
    loss = lambda yy: jnp.sum(LPIPS().apply({"params": params}, x, yy))
    got = np.asarray(jax.jit(jax.grad(loss))(y))
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-4 * np.abs(want).max())
    # Frozen: no gradient reaches the params even if a caller differentiates them.
    gp = jax.jit(jax.grad(lambda p: jnp.sum(LPIPS().apply({"params": p}, x[:1, :16, :16], y[:1, :16, :16]))))(params)
    assert all(float(jnp.abs(g).max()) == 0.0 for g in jax.tree_util.tree_leaves(gp))


def test_layouts_convert_identically(reference, params):
    lin = torch.load(bundled_lin_path(), map_location="cpu", weights_only=True)
    from_tv = lpips_params_from_torch(_torchvision_layout(reference), lin)
    features = {k[len("features."):]: v for k, v in _torchvision_layout(reference).items()
                if k.startswith("features.")}
    from_features = lpips_params_from_torch(features, lin)
    prefixed = {"loss.perceptual_loss." + k: v for k, v in reference.state_dict().items()}
    from_prefixed = lpips_params_from_torch(prefixed)
    for other in (from_tv, from_features, from_prefixed):
        jax.tree_util.tree_map(np.testing.assert_array_equal, params, other)


def test_load_from_files(reference, params, tmp_path, monkeypatch):
    vgg_path, lin_path, full_path = (os.fspath(tmp_path / n) for n in ("vgg16.pth", "lin.pth", "lpips.pth"))
    torch.save(_torchvision_layout(reference), vgg_path)
    lin = {k: v for k, v in reference.state_dict().items() if k.startswith("lin")}
    torch.save(lin, lin_path)
    torch.save(reference.state_dict(), full_path)
    for loaded in (load_lpips_params(vgg_path, lin_path), load_lpips_params(full_path),
                   load_lpips_params(vgg_path)):  # the last takes the heads bundled with `lpips`
        jax.tree_util.tree_map(np.testing.assert_array_equal, params, loaded)

    monkeypatch.setattr(convert_lpips, "bundled_lin_path", lambda version="0.1": None)
    with pytest.raises(FileNotFoundError, match=r"weights/v0\.1/vgg\.pth"):
        load_lpips_params(vgg_path)


def test_wrong_weights_are_refused(reference):
    alex_lin = os.path.join(os.path.dirname(bundled_lin_path()), "alex.pth")
    with pytest.raises(ValueError, match="AlexNet"):
        lpips_params_from_torch(_torchvision_layout(reference), alex_lin)
    with pytest.raises(ValueError, match="no LPIPS linear heads"):
        lpips_params_from_torch(_torchvision_layout(reference))
    with pytest.raises(ValueError, match="VGG16 trunk"):
        lpips_params_from_torch({"foo.weight": torch.zeros(1)}, alex_lin)
