"""NLayerDiscriminator against a PyTorch transcription of taming's layer stack."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
from torch import nn  # noqa: E402

from latent_diffusion.convert.common import check_tree_shapes  # noqa: E402
from latent_diffusion.convert.discriminator import discriminator_params_from_torch  # noqa: E402
from latent_diffusion.models.discriminator import NLayerDiscriminator  # noqa: E402


def torch_nlayer(ndf, n_layers, in_ch=3):
    """taming.modules.discriminator.model.NLayerDiscriminator's `main` (BatchNorm variant)."""
    layers = [nn.Conv2d(in_ch, ndf, 4, 2, 1), nn.LeakyReLU(0.2, True)]
    mult = 1
    for n in range(1, n_layers + 1):
        prev, mult = mult, min(2 ** n, 8)
        stride = 2 if n < n_layers else 1
        layers += [nn.Conv2d(ndf * prev, ndf * mult, 4, stride, 1, bias=False),
                   nn.BatchNorm2d(ndf * mult), nn.LeakyReLU(0.2, True)]
    layers += [nn.Conv2d(ndf * mult, 1, 4, 1, 1)]
    model = nn.Module()
    model.main = nn.Sequential(*layers)
    model.forward = model.main.forward
    with torch.no_grad():  # the reference's weights_init, plus non-trivial running stats
        for m in model.modules():
            if isinstance(m, nn.Conv2d):
                m.weight.normal_(0.0, 0.02)
            elif isinstance(m, nn.BatchNorm2d):
                m.weight.normal_(1.0, 0.02)
                m.bias.normal_(0.0, 0.1)
                m.running_mean.normal_(0.0, 0.1)
                m.running_var.uniform_(0.5, 2.0)
    return model


def _nchw(a):
    return torch.from_numpy(np.ascontiguousarray(np.asarray(a).transpose(0, 3, 1, 2)))


def _nhwc(t):
    return t.detach().numpy().transpose(0, 2, 3, 1)


@pytest.mark.parametrize("n_layers", [1, 3])
def test_matches_torch_train_and_eval(n_layers):
    torch.manual_seed(n_layers)
    ref = torch_nlayer(ndf=8, n_layers=n_layers)
    variables = discriminator_params_from_torch(ref.state_dict())
    model = NLayerDiscriminator(ndf=8, n_layers=n_layers)
    x = np.random.default_rng(0).uniform(-1, 1, (4, 32, 32, 3)).astype(np.float32)
    init = model.init(jax.random.PRNGKey(0), x, train=False)
    check_tree_shapes(init["params"], variables["params"])
    check_tree_shapes(init["batch_stats"], variables["batch_stats"], "batch_stats")

    ref.eval()
    with torch.no_grad():
        want = _nhwc(ref(_nchw(x)))
    got = np.asarray(jax.jit(lambda v, a: model.apply(v, a, train=False))(variables, x))
    assert got.shape == want.shape
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-4 * np.abs(want).max())

    # Ours first: converted arrays may share memory with the torch buffers updated in place below.
    got, updates = jax.jit(lambda v, a: model.apply(v, a, train=True, mutable=["batch_stats"]))(variables, x)
    ref.train()
    with torch.no_grad():
        want = _nhwc(ref(_nchw(x)))
    np.testing.assert_allclose(np.asarray(got), want, rtol=0, atol=1e-4 * np.abs(want).max())
    # Running statistics move as torch's do (momentum 0.1, unbiased variance).
    new = discriminator_params_from_torch(ref.state_dict())["batch_stats"]
    for name, stats in new.items():
        for k in ("mean", "var"):
            np.testing.assert_allclose(np.asarray(updates["batch_stats"][name][k]), stats[k], atol=1e-5)


def test_init_and_converter_details():
    model = NLayerDiscriminator(ndf=16, n_layers=3)
    x = jnp.zeros((2, 32, 32, 3))
    variables = model.init(jax.random.PRNGKey(0), x, train=True)
    assert float(jnp.abs(variables["batch_stats"]["norm1"]["mean"]).max()) == 0.0  # init does not update
    kernel = np.asarray(variables["params"]["conv2"]["kernel"])
    assert abs(kernel.std() - 0.02) < 0.002 and abs(kernel.mean()) < 0.002
    scale = np.asarray(variables["params"]["norm3"]["scale"])
    assert abs(scale.mean() - 1.0) < 0.01 and 0.01 < scale.std() < 0.03
    assert "bias" not in variables["params"]["conv1"]
    with pytest.raises(NotImplementedError, match="use_actnorm"):
        NLayerDiscriminator(use_actnorm=True).init(jax.random.PRNGKey(0), x, train=False)

    # Inside a full LDM checkpoint the discriminator sits under `loss.discriminator.`.
    ref = torch_nlayer(ndf=4, n_layers=2)
    sd = {"loss.discriminator." + k: v for k, v in ref.state_dict().items()}
    sd["encoder.conv_in.weight"] = torch.zeros(1)
    variables = discriminator_params_from_torch(sd)
    assert sorted(variables["params"]) == ["conv0", "conv1", "conv2", "conv_out", "norm1", "norm2"]
    with pytest.raises(ValueError, match="main.0.weight"):
        discriminator_params_from_torch({"encoder.conv_in.weight": torch.zeros(1)})
    extra = dict(ref.state_dict(), **{"main.99.weight": torch.zeros(1)})
    with pytest.raises(ValueError, match="unexpected"):
        discriminator_params_from_torch(extra)
