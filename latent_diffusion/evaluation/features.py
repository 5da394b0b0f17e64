"""Inception features of an image set, jitted and split over every local device.

The batch is sharded along a 1-d mesh ('data',); the last partial batch is padded to the full
batch and the padding dropped, and every image goes through the network on its own, so the
features do not depend on the batch size or the device count.
"""
from __future__ import annotations

import logging
import math
from typing import Any, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from latent_diffusion.evaluation.images import ImageSet, SetInfo

log = logging.getLogger(__name__)
MIN_IMAGES = 2
RECOMMENDED_IMAGES = 2048  # below the feature dimension the covariance is rank-deficient


class FeatureExtractor:
    """Runs `module.apply` (InceptionV3 returning a dict of arrays) over image sets."""

    def __init__(self, module, params: Any, batch_size: int = 64, devices: Sequence[Any] | None = None,
                 progress: bool = True):
        # Local devices: every host would read the whole set itself, so keep the mesh host-local.
        devices = list(devices) if devices is not None else jax.local_devices()
        self.mesh = Mesh(np.array(devices), ("data",))
        n = len(devices)
        self.batch_size = max(n, math.ceil(batch_size / n) * n)  # the batch must split evenly
        if self.batch_size != batch_size:
            log.info("batch size %d rounded up to %d (a multiple of %d devices)", batch_size, self.batch_size, n)
        self.progress = progress
        self._data = NamedSharding(self.mesh, P("data"))
        replicated = NamedSharding(self.mesh, P())
        self.params = jax.device_put(params, replicated)
        self._apply = jax.jit(lambda p, x: module.apply({"params": p}, x),
                              in_shardings=(replicated, self._data), out_shardings=self._data)

    def __call__(self, images: ImageSet, desc: str = "features") -> dict[str, np.ndarray]:
        """{'pool3': (N, 2048), 'logits_unbiased': ..., 'logits': ...} as float32 numpy."""
        n = len(images)
        check_count(images.info)
        outputs: dict[str, list[np.ndarray]] = {}
        in_flight = None  # (device outputs, valid rows): fetch one batch while the next runs
        seen = 0

        def collect(result):
            out, valid = result
            for k, v in out.items():
                outputs.setdefault(k, []).append(np.asarray(v)[:valid])

        from tqdm import tqdm
        batches = tqdm(images.batches(self.batch_size), total=math.ceil(n / self.batch_size), desc=desc,
                       unit="batch", disable=not self.progress)
        for batch in batches:
            valid = len(batch)
            seen += valid
            if valid < self.batch_size:
                pad = np.zeros((self.batch_size - valid,) + batch.shape[1:], batch.dtype)
                batch = np.concatenate([batch, pad])
            x = jax.device_put(batch, self._data)
            result = (self._apply(self.params, x), valid)
            if in_flight is not None:
                collect(in_flight)
            in_flight = result
        if in_flight is not None:
            collect(in_flight)
        if seen != n:
            raise RuntimeError(f"{images.info.description}: expected {n} images, read {seen}")
        return {k: np.concatenate(v) for k, v in outputs.items()}


def check_count(info: SetInfo) -> None:
    n, what = info.num_images, info.description
    if n < MIN_IMAGES:
        raise ValueError(f"{what}: {n} image(s); FID/KID/IS need at least {MIN_IMAGES} (use thousands)")
    if n < RECOMMENDED_IMAGES:
        info.warn(f"{what}: only {n} images; with fewer than {RECOMMENDED_IMAGES} the 2048-d covariance is "
                  "rank-deficient and FID is strongly biased (use 10k-50k images for reported numbers)")
