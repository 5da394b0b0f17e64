"""FID, KID, Inception Score, precision/recall and CLIP score from features, in float64 numpy on the host.

Each follows its reference implementation step for step so the numbers agree:
FID: pytorch-fid `calculate_frechet_distance`; KID and IS: torch-fidelity (same RNG draws);
precision/recall: Kynkaanniemi et al. 2019 as torch-fidelity computes it.
"""
from __future__ import annotations

import logging
import math

import numpy as np
from scipy import linalg, special

log = logging.getLogger(__name__)


def gaussian_stats(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean and (unbiased) covariance of the features, float64."""
    features = np.asarray(features, np.float64)
    if features.ndim != 2 or features.shape[0] < 2:
        raise ValueError(f"need at least 2 feature vectors (N, D) for a covariance, got shape {features.shape}")
    return features.mean(axis=0), np.cov(features, rowvar=False)


def frechet_distance(mu1, sigma1, mu2, sigma2, eps: float = 1e-6) -> float:
    """||mu1 - mu2||^2 + Tr(S1 + S2 - 2 sqrt(S1 S2)), with pytorch-fid's fallbacks."""
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    sigma1, sigma2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape:
        raise ValueError(f"statistics of different feature sizes: mu {mu1.shape} vs {mu2.shape}, "
                         f"sigma {sigma1.shape} vs {sigma2.shape}")
    diff = mu1 - mu2
    covmean = linalg.sqrtm(sigma1.dot(sigma2))
    if not np.isfinite(covmean).all():
        # A near-singular product (e.g. fewer samples than dimensions): regularise and retry.
        log.warning("FID: singular covariance product; adding %g to the diagonal of both covariances", eps)
        offset = np.eye(sigma1.shape[0]) * eps
        covmean = linalg.sqrtm((sigma1 + offset).dot(sigma2 + offset))
    if np.iscomplexobj(covmean):
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
            raise ValueError(f"FID: sqrtm has a large imaginary component ({np.max(np.abs(covmean.imag))}); "
                             "the covariances are badly conditioned (too few samples?)")
        covmean = covmean.real
    return float(diff.dot(diff) + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean))


def _poly_kernel(x, y, degree, gamma, coef0):
    return (x @ y.T * gamma + coef0) ** degree


def _mmd2_unbiased(k_xx, k_xy, k_yy) -> float:
    m = k_xx.shape[0]
    off_xx = k_xx.sum() - np.trace(k_xx)
    off_yy = k_yy.sum() - np.trace(k_yy)
    return float((off_xx + off_yy) / (m * (m - 1)) - 2 * k_xy.sum() / (m * m))


def kernel_inception_distance(features_1, features_2, subsets: int = 100, subset_size: int = 1000,
                              degree: int = 3, gamma: float | None = None, coef0: float = 1.0,
                              seed: int = 2020) -> dict:
    """KID: unbiased MMD^2 with a polynomial kernel, averaged over random subsets (torch-fidelity)."""
    f1, f2 = np.asarray(features_1, np.float64), np.asarray(features_2, np.float64)
    if f1.shape[1] != f2.shape[1]:
        raise ValueError(f"KID: feature sizes differ ({f1.shape[1]} vs {f2.shape[1]})")
    n = min(len(f1), len(f2))
    if subset_size > n:
        if n < 2:
            raise ValueError(f"KID needs at least 2 samples on each side, got {len(f1)} and {len(f2)}")
        log.warning("KID: subset size %d is larger than the smallest set (%d); using %d", subset_size, n, n)
        subset_size = n
    gamma = 1.0 / f1.shape[1] if gamma is None else gamma
    rng = np.random.RandomState(seed)
    mmds = np.zeros(subsets)
    for i in range(subsets):
        x = f1[rng.choice(len(f1), subset_size, replace=False)]
        y = f2[rng.choice(len(f2), subset_size, replace=False)]
        mmds[i] = _mmd2_unbiased(_poly_kernel(x, x, degree, gamma, coef0),
                                 _poly_kernel(x, y, degree, gamma, coef0),
                                 _poly_kernel(y, y, degree, gamma, coef0))
    return {"kid_mean": float(mmds.mean()), "kid_std": float(mmds.std()), "kid_subset_size": subset_size}


def inception_score(logits, splits: int = 10, shuffle: bool = True, seed: int = 2020) -> dict:
    """IS = exp(E_x KL(p(y|x) || p(y))) per split, from `logits_unbiased` as torch-fidelity does."""
    logits = np.asarray(logits, np.float64)
    n = len(logits)
    if n < splits:
        raise ValueError(f"Inception Score with {splits} splits needs at least {splits} images, got {n}")
    if shuffle:
        logits = logits[np.random.RandomState(seed).permutation(n)]
    log_p = special.log_softmax(logits, axis=1)
    p = np.exp(log_p)
    scores = []
    for i in range(splits):
        lo, hi = i * n // splits, (i + 1) * n // splits
        p_i, log_p_i = p[lo:hi], log_p[lo:hi]
        log_q = np.log(p_i.mean(axis=0, keepdims=True))
        scores.append(math.exp((p_i * (log_p_i - log_q)).sum(axis=1).mean()))
    return {"is_mean": float(np.mean(scores)), "is_std": float(np.std(scores))}


def _pairwise_dist(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    d2 = (a * a).sum(1)[:, None] + (b * b).sum(1)[None, :] - 2.0 * (a @ b.T)
    return np.sqrt(np.maximum(d2, 0.0))


def _knn_radii(features: np.ndarray, k: int, batch_size: int) -> np.ndarray:
    """Distance from each point to its k-th nearest neighbour (itself excluded)."""
    if len(features) <= k:
        raise ValueError(f"precision/recall with k={k} needs more than {k} samples per set, got {len(features)}")
    radii = []
    for start in range(0, len(features), batch_size):
        d = _pairwise_dist(features[start:start + batch_size], features)
        radii.append(np.partition(d, k, axis=1)[:, k])  # index 0 is the point itself (distance 0)
    return np.concatenate(radii)


def _coverage(queries: np.ndarray, support: np.ndarray, radii: np.ndarray, batch_size: int) -> float:
    """Fraction of queries inside at least one support point's k-NN ball."""
    inside = []
    for start in range(0, len(queries), batch_size):
        d = _pairwise_dist(queries[start:start + batch_size], support)
        inside.append((d <= radii[None, :]).any(axis=1))
    return float(np.concatenate(inside).mean())


def precision_recall(generated, real, k: int = 3, batch_size: int = 10000) -> dict:
    """Improved precision and recall (Kynkaanniemi et al. 2019) with k-NN balls in feature space."""
    gen, real = np.asarray(generated, np.float64), np.asarray(real, np.float64)
    if gen.shape[1] != real.shape[1]:
        raise ValueError(f"precision/recall: feature sizes differ ({gen.shape[1]} vs {real.shape[1]})")
    precision = _coverage(gen, real, _knn_radii(real, k, batch_size), batch_size)
    recall = _coverage(real, gen, _knn_radii(gen, k, batch_size), batch_size)
    f_score = 2 * precision * recall / max(1e-5, precision + recall)
    return {"precision": precision, "recall": recall, "f_score": f_score}


def clip_score(image_embeds: np.ndarray, text_embeds: np.ndarray) -> dict:
    """CLIP score of paired, L2-normalised embeddings as torchmetrics' CLIPScore computes it.

    max(mean(100 * cos), 0): torchmetrics clips the mean; Hessel et al. clip each sample, which
    differs only when some cosines are negative. Also the spread and count of the per-sample scores.
    """
    img, txt = np.asarray(image_embeds, np.float64), np.asarray(text_embeds, np.float64)
    if img.ndim != 2 or img.shape != txt.shape:
        raise ValueError(f"clip score: expected paired (N, D) embeddings, got {img.shape} and {txt.shape}")
    per_sample = 100.0 * np.sum(img * txt, axis=-1)
    return {"clip_score": float(max(per_sample.mean(), 0.0)), "clip_score_std": float(per_sample.std()),
            "clip_score_num": int(len(per_sample))}
