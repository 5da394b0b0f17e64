"""The PyTorch FID Inceptions (torch-fidelity, pytorch-fid) with random weights, built without downloads."""
from __future__ import annotations

import numpy as np
import torch
# Imported at collection time on purpose: torchvision pulls in triton, which segfaults when loaded
# after tensorflow (the TFDS tests import it), but not the other way round.
import torchvision


def random_inception_state_dict(seed: int = 0) -> dict:
    """A torchvision-layout FID Inception state dict (what both .pth files hold), random but well scaled.

    He-normal convs and random BatchNorm statistics near identity, so activations stay O(1).
    """
    torch.manual_seed(seed)
    net = torchvision.models.inception_v3(num_classes=1008, aux_logits=False, weights=None, init_weights=False)
    sd = net.state_dict()
    g = torch.Generator().manual_seed(seed)
    for key, v in sd.items():
        if key.endswith("conv.weight"):
            v.copy_(torch.randn(v.shape, generator=g) * (2.0 / v[0].numel()) ** 0.5)
        elif key.endswith(("running_var", "bn.weight")):
            v.copy_(torch.rand(v.shape, generator=g) + 0.5)
        elif key.endswith(("running_mean", "bn.bias", "fc.bias")):
            v.copy_(torch.randn(v.shape, generator=g) * 0.1)
        elif key.endswith("fc.weight"):
            v.copy_(torch.randn(v.shape, generator=g) / v.shape[1] ** 0.5)
    return sd


def torch_fidelity_extractor(state_dict: dict, tmp_path):
    """torch-fidelity's FeatureExtractorInceptionV3 loading `state_dict` from a file (no download)."""
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3
    path = str(tmp_path / "random-inception.pth")
    torch.save(state_dict, path)
    return FeatureExtractorInceptionV3("inception-v3-compat", ["2048", "logits_unbiased", "logits"],
                                       feature_extractor_weights_path=path)


def pytorch_fid_inception(state_dict: dict, monkeypatch):
    """pytorch-fid's InceptionV3(use_fid_inception=True) with `state_dict` instead of the download.

    Its own resize / normalisation are switched off: feed it the already resized, normalised input.
    """
    from pytorch_fid import inception
    monkeypatch.setattr(inception, "load_state_dict_from_url", lambda *a, **k: state_dict)
    net = inception.InceptionV3([3], resize_input=False, normalize_input=False, use_fid_inception=True)
    return net.eval()


def to_torch_nchw(images: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2)
