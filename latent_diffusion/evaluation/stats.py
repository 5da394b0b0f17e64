"""Reference statistics files: `mu`, `sigma` (pytorch-fid and ADM-evaluator compatible) plus metadata.

ADM reference batches (`VIRTUAL_imagenet256_labeled.npz`) hold `mu`, `sigma` and the images as
`arr_0`; pytorch-fid `--save-stats` files hold `mu` and `sigma` only. Ours add `feature_dim`,
`resolution` (H, W of the source images), `num_images`, optionally the pool3 `features`
(needed for KID and precision/recall) and `logits_unbiased`.
"""
from __future__ import annotations

import dataclasses
import logging
import os

import numpy as np

log = logging.getLogger(__name__)
FORMAT = "latent_diffusion.fid_stats.v1"


@dataclasses.dataclass
class Stats:
    mu: np.ndarray
    sigma: np.ndarray
    num_images: int | None = None
    resolution: tuple[int, int] | None = None
    features: np.ndarray | None = None  # pool3 features, when stored
    images: np.ndarray | None = None  # ADM batches: the images themselves (arr_0)

    @property
    def feature_dim(self) -> int:
        return int(self.mu.shape[0])


def save_stats(path: str, mu, sigma, num_images: int, resolution: tuple[int, int] | None,
               features: np.ndarray | None = None) -> None:
    """Write a stats .npz atomically (tmp file, then rename)."""
    mu, sigma = np.asarray(mu, np.float64), np.asarray(sigma, np.float64)
    extra = {} if features is None else {"features": np.asarray(features, np.float32)}
    os.makedirs(os.path.dirname(os.path.abspath(path)) or ".", exist_ok=True)
    tmp = path + ".tmp.npz"
    np.savez(tmp, mu=mu, sigma=sigma, feature_dim=np.int64(mu.shape[0]), num_images=np.int64(num_images),
             resolution=np.asarray(resolution if resolution else (0, 0), np.int64), format=np.str_(FORMAT),
             **extra)
    os.replace(tmp, path)


def is_stats_file(path: str) -> bool:
    if not (path.endswith(".npz") and os.path.isfile(path)):
        return False
    with np.load(path, allow_pickle=False) as data:
        return "mu" in data.files and "sigma" in data.files


def load_stats(path: str, feature_dim: int | None = None) -> Stats:
    """Read ours, pytorch-fid's or an ADM reference batch; refuse a file of another feature size."""
    with np.load(path, allow_pickle=False) as data:
        files = set(data.files)
        if not {"mu", "sigma"} <= files:
            raise ValueError(f"{path} is not an FID statistics file: expected arrays 'mu' and 'sigma', "
                             f"found {sorted(files)}")
        mu, sigma = np.asarray(data["mu"], np.float64), np.asarray(data["sigma"], np.float64)
        stats = Stats(mu=mu, sigma=sigma)
        if "num_images" in files:
            stats.num_images = int(data["num_images"])
        if "resolution" in files and int(np.prod(data["resolution"])) > 0:
            stats.resolution = tuple(int(v) for v in data["resolution"])
        if "features" in files:
            stats.features = data["features"]
        if "arr_0" in files:
            stats.images = data["arr_0"]
            stats.num_images = stats.num_images or len(stats.images)
            stats.resolution = stats.resolution or tuple(stats.images.shape[1:3])
        stored_dim = int(data["feature_dim"]) if "feature_dim" in files else None
    if mu.ndim != 1 or sigma.shape != (mu.shape[0], mu.shape[0]) or (stored_dim not in (None, mu.shape[0])):
        raise ValueError(f"{path}: inconsistent statistics (mu {mu.shape}, sigma {sigma.shape}, "
                         f"feature_dim {stored_dim}); the file is corrupt")
    if feature_dim is not None and mu.shape[0] != feature_dim:
        raise ValueError(f"{path} holds statistics of {mu.shape[0]}-d features, but this evaluation uses "
                         f"{feature_dim}-d Inception pool3 features. Recompute the reference statistics "
                         "with evaluate.py --save_stats.")
    return stats


def check_resolution(stats: Stats, resolution: tuple[int, int] | None, path: str, allow: bool) -> None:
    """Refuse stats computed from images of another size (FID depends on the resolution)."""
    if stats.resolution is None or resolution is None or tuple(stats.resolution) == tuple(resolution):
        if stats.resolution is None:
            log.info("%s does not record the image resolution; cannot check it", path)
        return
    msg = (f"{path} was computed from {stats.resolution[0]}x{stats.resolution[1]} images but the samples are "
           f"{resolution[0]}x{resolution[1]}; FID across resolutions is not comparable.")
    if not allow:
        raise ValueError(msg + " Use reference statistics of the same resolution, or pass "
                         "--allow_resolution_mismatch to compute it anyway.")
    log.warning(msg)
