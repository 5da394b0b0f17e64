"""FID / KID / IS / precision-recall against pytorch-fid and torch-fidelity on the same features."""
import numpy as np
import pytest
import torch

from latent_diffusion.evaluation import metrics as M


def _features(n, d, seed, shift=0.0):
    rng = np.random.RandomState(seed)
    mix = rng.normal(size=(d, d)) / np.sqrt(d)  # correlated features, like pool3
    return (rng.normal(size=(n, d)) @ mix + shift).astype(np.float64)


def test_fid_matches_pytorch_fid():
    from pytorch_fid.fid_score import calculate_frechet_distance
    a, b = _features(600, 128, 0), _features(500, 128, 1, shift=0.3)
    mu1, s1 = M.gaussian_stats(a)
    mu2, s2 = M.gaussian_stats(b)
    np.testing.assert_allclose(mu1, a.mean(0), rtol=1e-12)
    np.testing.assert_allclose(s1, np.cov(a, rowvar=False), rtol=1e-12)
    ref = calculate_frechet_distance(mu1, s1, mu2, s2)
    assert abs(M.frechet_distance(mu1, s1, mu2, s2) - ref) <= 1e-6 * abs(ref)
    assert abs(M.frechet_distance(mu1, s1, mu1, s1)) < 1e-6


def test_fid_singular_covariances_match_pytorch_fid():
    from pytorch_fid.fid_score import calculate_frechet_distance
    # Fewer samples than dimensions: rank-deficient covariances (the eps-offset / imaginary-part path).
    a, b = _features(20, 64, 2), _features(20, 64, 3, shift=0.1)
    stats = (*M.gaussian_stats(a), *M.gaussian_stats(b))
    ref = calculate_frechet_distance(*stats)
    assert abs(M.frechet_distance(*stats) - ref) <= 1e-6 * abs(ref)


def test_fid_eps_retry_matches_pytorch_fid(monkeypatch):
    from pytorch_fid.fid_score import calculate_frechet_distance
    from scipy import linalg
    # Modern scipy rarely returns non-finite roots, so force the first sqrtm of each call to fail.
    real_sqrtm, calls = linalg.sqrtm, []

    def flaky_sqrtm(a, *args, **kwargs):
        calls.append(1)
        out = real_sqrtm(a)
        return out * np.nan if len(calls) % 2 == 1 else out

    monkeypatch.setattr(linalg, "sqrtm",
                        lambda a, disp=True, **k: (flaky_sqrtm(a), 0.0) if not disp else flaky_sqrtm(a))
    stats = (*M.gaussian_stats(_features(40, 16, 11)), *M.gaussian_stats(_features(40, 16, 12, shift=0.2)))
    ref = calculate_frechet_distance(*stats, eps=1e-3)
    ours = M.frechet_distance(*stats, eps=1e-3)
    assert len(calls) == 4 and np.isfinite(ours)
    assert abs(ours - ref) <= 1e-6 * abs(ref)
    monkeypatch.setattr(linalg, "sqrtm", real_sqrtm)
    assert abs(M.frechet_distance(*stats) - ours) > 1e-6 * abs(ours)  # the offset did change the value


def test_fid_rejects_mismatched_sizes():
    with pytest.raises(ValueError, match="different feature sizes"):
        M.frechet_distance(np.zeros(3), np.eye(3), np.zeros(4), np.eye(4))
    with pytest.raises(ValueError, match="at least 2"):
        M.gaussian_stats(np.zeros((1, 8)))


def test_kid_matches_torch_fidelity_defaults():
    from torch_fidelity.metric_kid import kid_features_to_metric
    a, b = _features(1100, 32, 4), _features(1050, 32, 5, shift=0.05)
    # float64 tensors: torch-fidelity then computes in float64 too (it keeps the input dtype).
    ref = kid_features_to_metric(torch.from_numpy(a), torch.from_numpy(b), verbose=False)
    ours = M.kernel_inception_distance(a, b)  # defaults: 100 subsets of 1000, degree 3, gamma 1/d, coef0 1
    for ours_key, ref_key in (("kid_mean", "kernel_inception_distance_mean"),
                              ("kid_std", "kernel_inception_distance_std")):
        assert abs(ours[ours_key] - ref[ref_key]) <= 1e-6 * abs(ref[ref_key])


def test_kid_small_sets_clamp_subset_size():
    from torch_fidelity.metric_kid import kid_features_to_metric
    a, b = _features(60, 16, 6), _features(50, 16, 7, shift=0.2)
    ours = M.kernel_inception_distance(a, b, subsets=5)
    assert ours["kid_subset_size"] == 50
    ref = kid_features_to_metric(torch.from_numpy(a), torch.from_numpy(b), kid_subsets=5, kid_subset_size=50,
                                 verbose=False)
    np.testing.assert_allclose(ours["kid_mean"], ref["kernel_inception_distance_mean"], rtol=1e-6)


def test_inception_score_matches_torch_fidelity():
    from torch_fidelity.metric_isc import isc_features_to_metric
    logits = np.random.RandomState(8).normal(size=(203, 1008)).astype(np.float32) * 3
    ref = isc_features_to_metric(torch.from_numpy(logits))  # splits=10, shuffle with seed 2020
    ours = M.inception_score(logits)
    np.testing.assert_allclose(ours["is_mean"], ref["inception_score_mean"], rtol=1e-10)
    np.testing.assert_allclose(ours["is_std"], ref["inception_score_std"], rtol=1e-10)
    with pytest.raises(ValueError, match="at least 10"):
        M.inception_score(logits[:5])


@pytest.mark.parametrize("batch_size", [7, 10000])
def test_precision_recall_matches_torch_fidelity(batch_size):
    from torch_fidelity.metric_prc import prc_features_to_metric
    gen, real = _features(150, 24, 9, shift=0.4), _features(170, 24, 10)
    ref = prc_features_to_metric(torch.from_numpy(gen), torch.from_numpy(real), prc_neighborhood=3,
                                 prc_batch_size=10000, save_cpu_ram=False, verbose=False)
    ours = M.precision_recall(gen, real, k=3, batch_size=batch_size)
    assert 0 < ours["precision"] < 1 and 0 < ours["recall"] < 1
    # torch-fidelity averages the 0/1 hits in float32; 1e-6 still pins the count (steps of 1/N).
    assert ours["precision"] == pytest.approx(ref["precision"], abs=1e-6)
    assert ours["recall"] == pytest.approx(ref["recall"], abs=1e-6)
    assert ours["f_score"] == pytest.approx(ref["f_score"], rel=1e-6)
