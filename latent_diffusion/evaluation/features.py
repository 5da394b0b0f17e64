"""Network outputs over a data set, jitted and split over every device of every host.

The global batch is sharded along a 1-d mesh ('data',) of all devices. On several hosts each one
reads only its own contiguous slice of the set, feeds its rows with
`make_array_from_process_local_data`, and every host gathers the outputs of the whole batch.
Each row carries its global index, so outputs land in set order whatever the device layout.
Partial batches are padded and the padding dropped; every row goes through the network on its
own (a batch-1 computation), so the outputs are bit-identical for any batch size, device count
or host count.
"""
from __future__ import annotations

import logging
import math
from typing import Any, Callable, Iterator, Optional, Sequence

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from latent_diffusion.evaluation.images import ImageSet, SetInfo

log = logging.getLogger(__name__)
MIN_IMAGES = 2
RECOMMENDED_IMAGES = 2048  # below the feature dimension the covariance is rank-deficient


class ArrayRows:
    """Rows of an in-memory array (e.g. token ids) with the slicing / batching an ImageSet has."""

    def __init__(self, rows: np.ndarray):
        self.rows = np.asarray(rows)

    def __len__(self) -> int:
        return len(self.rows)

    def slice(self, start: int, stop: int) -> "ArrayRows":
        return ArrayRows(self.rows[start:stop])

    def batches(self, batch_size: int) -> Iterator[np.ndarray]:
        for start in range(0, len(self.rows), batch_size):
            yield self.rows[start:start + batch_size]


class ShardedMap:
    """Runs `fn(params, batch) -> dict of arrays` over a data set, batch-sharded over `devices`.

    `devices` defaults to every device of every process; all processes must then call it with
    the same set, in the same order.
    """

    def __init__(self, fn: Callable[[Any, jax.Array], dict], params: Any, batch_size: int = 64,
                 devices: Sequence[Any] | None = None, progress: bool = True):
        devices = list(devices) if devices is not None else jax.devices()
        self.mesh = Mesh(np.array(devices), ("data",))
        n = len(devices)
        self.batch_size = max(n, math.ceil(batch_size / n) * n)  # the batch must split evenly
        if self.batch_size != batch_size:
            log.info("batch size %d rounded up to %d (a multiple of %d devices)", batch_size, self.batch_size, n)
        processes = sorted({d.process_index for d in devices})
        per_process = {p: sum(d.process_index == p for d in devices) for p in processes}
        if len(set(per_process.values())) != 1:
            raise ValueError(f"every process needs the same number of devices in the mesh, got {per_process}")
        me = jax.process_index()
        if me not in per_process:
            raise ValueError(f"process {me} has no device among the {n} given; give devices of every process")
        self.num_processes, self.rank = len(processes), processes.index(me)
        self.local_batch = self.batch_size // self.num_processes
        self.progress = progress
        self._data = NamedSharding(self.mesh, P("data"))
        replicated = NamedSharding(self.mesh, P())
        self.params = jax.device_put(params, replicated)
        # Each device maps its own rows one at a time through the network (shard_map + lax.map), so
        # every row runs the same batch-1 program whatever the batch size, device count or host
        # count, and the outputs are bit-identical across layouts. (XLA picks other kernels for other
        # batch shapes, and a GSPMD-partitioned loop over the rows is split differently per layout.)
        def rows(p, x, idx):
            out = jax.lax.map(lambda xi: fn(p, xi[None]), x)
            return jax.tree.map(lambda a: a.reshape((a.shape[0],) + a.shape[2:]), out), idx
        per_device = jax.shard_map(rows, mesh=self.mesh, in_specs=(P(), P("data"), P("data")),
                                   out_specs=P("data"), check_vma=False)
        self._apply = jax.jit(per_device, in_shardings=(replicated, self._data, self._data),
                              out_shardings=self._data)

    def host_range(self, n: int) -> tuple[int, int]:
        """This process's contiguous slice [start, stop) of a set of n rows."""
        per = math.ceil(n / self.num_processes)
        return min(n, self.rank * per), min(n, (self.rank + 1) * per)

    def __call__(self, data, desc: str = "features", row_shape: Optional[tuple] = None,
                 row_dtype: Any = None, host_fn: Optional[Callable[[np.ndarray], np.ndarray]] = None
                 ) -> dict[str, np.ndarray]:
        """Outputs for every row of `data` (len, slice, batches), as float numpy arrays in set order.

        `host_fn` maps each host batch before it goes to the devices (e.g. a PIL resize);
        `row_shape` / `row_dtype` (after `host_fn`) are needed only when a process may get no rows.
        """
        n = len(data)
        start, stop = self.host_range(n)
        per = math.ceil(n / self.num_processes)
        steps = math.ceil(per / self.local_batch)  # the same on every process
        local = data.slice(start, stop) if (start, stop) != (0, n) else data
        batches = local.batches(self.local_batch) if stop > start else iter(())
        outputs: dict[str, np.ndarray] = {}
        filled = np.zeros(n, bool)
        template = None if row_shape is None else np.zeros((self.local_batch,) + tuple(row_shape), row_dtype)

        def collect(result):
            out, idx = multihost_utils.process_allgather(result, tiled=True)
            keep = idx >= 0
            for k, v in out.items():
                v = np.asarray(v)
                if k not in outputs:
                    outputs[k] = np.zeros((n,) + v.shape[1:], v.dtype)
                outputs[k][idx[keep]] = v[keep]
            filled[idx[keep]] = True

        from tqdm import tqdm
        bar = tqdm(total=steps, desc=desc, unit="batch", disable=not self.progress or self.rank != 0)
        in_flight = None  # fetch one batch's outputs while the next one runs
        offset = start
        for _ in range(steps):
            batch = next(batches, None)
            valid = 0 if batch is None else len(batch)
            if batch is not None and host_fn is not None:
                batch = host_fn(batch)
            if batch is None:
                if template is None:
                    raise ValueError(f"{desc}: process {self.rank} has no rows left; pass row_shape/row_dtype")
                batch = template
            elif valid < self.local_batch:
                pad = np.zeros((self.local_batch - valid,) + batch.shape[1:], batch.dtype)
                batch = np.concatenate([batch, pad])
            if template is None:
                template = np.zeros_like(batch)
            idx = np.full(self.local_batch, -1, np.int32)
            idx[:valid] = np.arange(offset, offset + valid)
            offset += valid
            x = self._global(batch)
            result = self._apply(self.params, x, self._global(idx))
            if in_flight is not None:
                collect(in_flight)
            in_flight = result
            bar.update(1)
        if in_flight is not None:
            collect(in_flight)
        bar.close()
        if offset != stop or not filled.all():
            raise RuntimeError(f"{desc}: expected {n} rows, got outputs for {int(filled.sum())} "
                               f"(this process read {offset - start} of its {stop - start})")
        return outputs

    def _global(self, local: np.ndarray) -> jax.Array:
        shape = (self.batch_size,) + local.shape[1:]
        return jax.make_array_from_process_local_data(self._data, local, shape)


class FeatureExtractor(ShardedMap):
    """Runs `module.apply` (InceptionV3 returning a dict of arrays) over image sets."""

    def __init__(self, module, params: Any, batch_size: int = 64, devices: Sequence[Any] | None = None,
                 progress: bool = True):
        super().__init__(lambda p, x: module.apply({"params": p}, x), params, batch_size, devices, progress)

    def __call__(self, images: ImageSet, desc: str = "features") -> dict[str, np.ndarray]:
        """{'pool3': (N, 2048), 'logits_unbiased': ..., 'logits': ...} as float32 numpy."""
        check_count(images.info)
        res = images.info.resolution
        return super().__call__(images, desc, row_shape=(*res, 3) if res else None, row_dtype=np.uint8)


def check_count(info: SetInfo) -> None:
    n, what = info.num_images, info.description
    if n < MIN_IMAGES:
        raise ValueError(f"{what}: {n} image(s); FID/KID/IS need at least {MIN_IMAGES} (use thousands)")
    if n < RECOMMENDED_IMAGES:
        info.warn(f"{what}: only {n} images; with fewer than {RECOMMENDED_IMAGES} the 2048-d covariance is "
                  "rank-deficient and FID is strongly biased (use 10k-50k images for reported numbers)")
