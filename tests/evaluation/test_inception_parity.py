"""Flax FID Inception vs torch-fidelity / pytorch-fid with random weights, through our converter."""
import jax
import numpy as np
import pytest
import torch

from latent_diffusion.convert import inception as conv
from latent_diffusion.models.inception import resize_bilinear_tf1
from tests.evaluation.reference_nets import (pytorch_fid_inception, random_inception_state_dict,
                                             to_torch_nchw, torch_fidelity_extractor)


@pytest.fixture(scope="module")
def state_dict():
    return random_inception_state_dict(seed=0)


@pytest.fixture(scope="module")
def converted(state_dict):
    module, params = conv.from_pytorch(state_dict)
    return module, params, jax.jit(lambda p, x: module.apply({"params": p}, x))


def _rel_err(ours, ref):
    ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
    return np.abs(ours - ref).max() / np.abs(ref).max()


@pytest.mark.parametrize("shape", [(64, 64), (128, 96), (32, 47), (301, 350), (299, 299)])
def test_tf1_resize_matches_torch_fidelity(shape):
    from torch_fidelity.interpolate_compat_tensorflow import interpolate_bilinear_2d_like_tensorflow1x
    x = np.random.RandomState(1).randint(0, 256, (2, *shape, 3)).astype(np.float32)
    ref = interpolate_bilinear_2d_like_tensorflow1x(to_torch_nchw(x), size=(299, 299), align_corners=False)
    ours = np.asarray(jax.jit(lambda v: resize_bilinear_tf1(v, (299, 299)))(x))
    # Same float32 positions and association order; only FMA contraction may change the last bit.
    np.testing.assert_allclose(ours, ref.permute(0, 2, 3, 1).numpy(), rtol=0, atol=255 * 2e-7)


@pytest.mark.parametrize("shape", [(64, 64), (128, 96)])
def test_features_match_torch_fidelity(shape, state_dict, converted, tmp_path, monkeypatch):
    module, params, apply = converted
    images = np.random.RandomState(shape[0]).randint(0, 256, (2, *shape, 3), dtype=np.uint8)
    ours = apply(params, images)
    with torch.no_grad():
        ref = torch_fidelity_extractor(state_dict, tmp_path)(to_torch_nchw(images))
    for name, r in zip(("pool3", "logits_unbiased", "logits"), ref):
        assert ours[name].shape == tuple(r.shape)
        assert _rel_err(ours[name], r.numpy()) < 1e-4, name
    assert np.abs(ref[0].numpy()).max() > 1e-2  # the random net does not collapse to zero

    if shape == (64, 64):  # pytorch-fid's FID blocks on the same resized, normalised input
        from torch_fidelity.interpolate_compat_tensorflow import interpolate_bilinear_2d_like_tensorflow1x
        x = interpolate_bilinear_2d_like_tensorflow1x(to_torch_nchw(images).float(), size=(299, 299),
                                                      align_corners=False)
        with torch.no_grad():
            pool3 = pytorch_fid_inception(state_dict, monkeypatch)((x - 128) / 128)[0][:, :, 0, 0]
        assert _rel_err(ours["pool3"], pool3.numpy()) < 1e-4


def test_converter_key_variants_and_npz_roundtrip(state_dict, converted, tmp_path):
    _, params, _ = converted
    # pytorch-fid's InceptionV3 wrapper (blocks.i.j.*, no fc) and a DataParallel prefix.
    blocks = [["Conv2d_1a_3x3", "Conv2d_2a_3x3", "Conv2d_2b_3x3"], ["Conv2d_3b_1x1", "Conv2d_4a_3x3"],
              ["Mixed_5b", "Mixed_5c", "Mixed_5d", "Mixed_6a", "Mixed_6b", "Mixed_6c", "Mixed_6d", "Mixed_6e"],
              ["Mixed_7a", "Mixed_7b", "Mixed_7c"]]
    rename = {name: f"blocks.{i}.{j}" for i, names in enumerate(blocks) for j, name in enumerate(names)}
    wrapper = {}
    for key, v in state_dict.items():
        head, _, rest = key.partition(".")
        if head != "fc":
            wrapper[f"module.{rename[head]}.{rest}"] = v
    module2, params2 = conv.from_pytorch(wrapper)
    assert module2.num_classes == 0 and "fc" not in params2
    for path, leaf in jax.tree_util.tree_leaves_with_path(params2):
        ref = params
        for k in path:
            ref = ref[k.key]
        np.testing.assert_array_equal(leaf, ref)

    with pytest.raises(ValueError, match="unexpected key"):
        conv.from_pytorch({**state_dict, "Mixed_5b.extra.weight": torch.zeros(1)})
    with pytest.raises(KeyError, match="missing key"):
        conv.from_pytorch({k: v for k, v in state_dict.items() if not k.startswith("Mixed_6b.branch1x1.conv")})

    path = str(tmp_path / "inception.npz")
    conv.save_params(path, params)
    module3, params3 = conv.load_params(path)
    assert module3.num_classes == 1008
    jax.tree_util.tree_map(np.testing.assert_array_equal, params3, jax.tree_util.tree_map(np.asarray, params))


def test_missing_weights_says_what_to_do(tmp_path, monkeypatch):
    monkeypatch.delenv(conv.ENV_VAR, raising=False)
    with pytest.raises(FileNotFoundError, match="python -m latent_diffusion.convert.inception"):
        conv.load_params(str(tmp_path / "nope.npz"))
