"""Resumable batch sampling jobs that fill every device of every host.

`run_job` splits the work items into global batches on a device mesh, calls a model-agnostic
`Generator` on each, and writes one PNG per sample (see outputs.py for the folder layout).

- Per-sample noise keys are `fold_in(key(seed), global_index)`, and items are batched only with
  items that share their static options (the step count), so a sample does not depend on device
  count, batch size, batch neighbours or restarts.
- The last partial batch of each group is padded with copies of its last item; their outputs are
  dropped.
- Multi-host: every host runs the same batches (SPMD). Process 0 alone reads and writes the output
  folder: it decides what is left to do and broadcasts that, and it writes the images after
  `process_allgather`. This needs no shared filesystem and no cross-host file locking; the gather
  costs one copy of the (small, uint8) images per batch.
- Rerunning a killed job generates only the samples whose PNG is missing or torn.
"""
from __future__ import annotations

import concurrent.futures
import dataclasses
import os
import time
from typing import Callable, Protocol, Sequence

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from latent_diffusion.sampling import outputs
from latent_diffusion.sampling.requests import WorkItem, sample_key


class Generator(Protocol):
    """What `run_job` needs from a model: host-side batch preparation and the sampling call."""

    def prepare(self, items: Sequence[WorkItem]) -> dict[str, np.ndarray]:
        """Numeric arrays with leading dimension len(items) (labels, token ids, guidance scales...)."""

    def __call__(self, arrays: dict[str, jax.Array], keys: jax.Array, *, steps: int | None) -> jax.Array:
        """uint8 images (B, H, W, 3) for the batch; keys are typed PRNG keys (B,), one per sample.

        `steps` is the step count shared by the whole batch (an item's own, else job_spec['steps']);
        it is a Python int, so a jitted sampler can take it as a static argument.
        """


@dataclasses.dataclass(frozen=True)
class JobResult:
    outdir: str
    num_items: int
    num_generated: int  # samples made by this run; the rest were already on disk
    seconds: float
    images_per_second: float
    npz_path: str | None


def _check_items(items: Sequence[WorkItem]) -> None:
    if not items:
        raise ValueError("run_job: no work items; build them with sampling.requests.build_requests")
    indices = [it.index for it in items]
    if sorted(indices) != list(range(len(items))):
        raise ValueError("run_job: item indices must be 0..N-1, each once (use the lists that "
                         "sampling.requests builds, unedited)")


def batch_spec(mesh: Mesh) -> NamedSharding:
    """Leading dimension split over every mesh axis, so every device gets samples."""
    return NamedSharding(mesh, P(tuple(mesh.axis_names)))


def _default_mesh() -> Mesh:
    return Mesh(np.asarray(jax.devices()), ("data",))


def plan_batches(items: Sequence[WorkItem], global_batch_size: int,
                 default_steps: int | None) -> list[tuple[int | None, list[WorkItem], int]]:
    """(steps, padded batch, number of real items) per global batch, groups in first-index order."""
    groups: dict[int | None, list[WorkItem]] = {}
    for item in sorted(items, key=lambda it: it.index):
        groups.setdefault(item.steps if item.steps is not None else default_steps, []).append(item)
    plan = []
    for steps, group in groups.items():
        for start in range(0, len(group), global_batch_size):
            real = group[start:start + global_batch_size]
            plan.append((steps, real + [real[-1]] * (global_batch_size - len(real)), len(real)))
    return plan


def _to_global(value, sharding: NamedSharding, name: str, batch: int) -> jax.Array:
    arr = np.asarray(value)
    if arr.dtype.kind not in "biuf" or arr.ndim == 0 or arr.shape[0] != batch:
        raise ValueError(f"Generator.prepare returned {name!r} with dtype {arr.dtype} and shape {arr.shape}; "
                         f"every entry must be a numeric array with leading dimension {batch} (the batch)")
    # Every host holds the whole (small) global batch, so each device can take its slice directly.
    return jax.make_array_from_callback(arr.shape, sharding, lambda idx: arr[idx])


@jax.jit
def _keys(seeds, indices):
    return jax.vmap(sample_key)(seeds, indices)


def _gather(images) -> np.ndarray:
    if isinstance(images, jax.Array) and not images.is_fully_addressable:
        return np.asarray(multihost_utils.process_allgather(images))
    return np.asarray(images)


def _agree_on_todo(outdir, items, job_spec, force, digits) -> np.ndarray:
    """Process 0 claims the folder and finds the finished samples; every host gets the same answer."""
    done, failure = np.zeros(len(items), bool), None
    if jax.process_index() == 0:
        try:
            outputs.claim_outdir(outdir, outputs.job_record(job_spec, items), force)
            outputs.remove_stale_tmp(outdir)
            done = np.array([outputs.png_complete(os.path.join(outdir, outputs.sample_name(it.index, digits)))
                             for it in items])
            outputs.rebuild_manifest(outdir, [it for it, d in zip(items, done) if d], job_spec, digits)
        except Exception as e:  # noqa: BLE001 - re-raised below once the other hosts know
            failure = e
    if jax.process_count() > 1:
        ok, done = multihost_utils.broadcast_one_to_all((np.array(failure is None), done))
        if not ok and failure is None:
            raise RuntimeError("run_job: process 0 refused the job or could not use the output folder; "
                               "see its log")
    if failure is not None:
        raise failure
    return np.asarray(done, bool)


def run_job(generate: Generator | Callable, items: Sequence[WorkItem], outdir: str, *, global_batch_size: int,
            job_spec: dict, mesh: Mesh | None = None, prepare: Callable | None = None, force: bool = False,
            write_npz: bool = False, progress: bool = True, num_writers: int = 8) -> JobResult:
    """Generate every item not yet on disk in `outdir`; see the module docstring.

    `generate` follows `Generator`; a plain callable needs `prepare`. `job_spec` (JSON values: model,
    sampler, steps, guidance, seed, image size, ...) is stored in job.json; a folder holding another
    job is refused unless `force`, which deletes that job's files first. Its 'sampler', 'steps',
    'guidance' and 'negative_prompt' are the defaults the manifest records for items without their own.
    """
    _check_items(items)
    items = sorted(items, key=lambda it: it.index)
    mesh = _default_mesh() if mesh is None else mesh
    _check_batch_size(global_batch_size, mesh)
    prepare = prepare if prepare is not None else getattr(generate, "prepare", None)
    if prepare is None:
        raise TypeError("run_job: pass prepare=, or a generate object with a prepare(items) method")
    job_spec = outputs.canonical_spec(job_spec)
    digits = outputs.num_digits(len(items))
    writer = jax.process_index() == 0
    done = _agree_on_todo(outdir, items, job_spec, force, digits)
    todo = [it for it, d in zip(items, done) if not d]
    sharding = batch_spec(mesh)

    def dispatch(steps, batch):
        arrays = {k: _to_global(v, sharding, k, len(batch)) for k, v in prepare(batch).items()}
        seeds = _to_global(np.array([it.seed for it in batch], np.uint32), sharding, "seeds", len(batch))
        index = _to_global(np.array([it.index for it in batch], np.int32), sharding, "indices", len(batch))
        return generate(arrays, _keys(seeds, index), steps=steps)

    bar = None
    if progress and writer:
        from tqdm.auto import tqdm
        bar = tqdm(total=len(items), initial=int(done.sum()), unit="img", desc="sampling", dynamic_ncols=True)
    start = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(max(1, num_writers)) as pool:
        finish = _BatchWriter(outdir, job_spec, digits, pool, bar) if writer else _check_images
        try:
            _pipelined(plan_batches(todo, global_batch_size, job_spec.get("steps")), dispatch, finish)
        finally:
            if bar is not None:
                bar.close()
    seconds = time.perf_counter() - start

    npz_path = None
    if writer:
        outputs.rebuild_manifest(outdir, items, job_spec, digits)
        if write_npz:
            npz_path = outputs.write_npz(outdir, items, digits)
    return JobResult(outdir=outdir, num_items=len(items), num_generated=len(todo), seconds=seconds,
                     images_per_second=len(todo) / seconds if seconds > 0 else 0.0, npz_path=npz_path)


def _check_batch_size(global_batch_size, mesh: Mesh) -> None:
    if isinstance(global_batch_size, bool) or not isinstance(global_batch_size, int) or global_batch_size < 1 \
            or global_batch_size % mesh.size:
        raise ValueError(f"global_batch_size must be a positive multiple of the {mesh.size} devices in the mesh, "
                         f"got {global_batch_size!r}; try {max(1, round(global_batch_size / mesh.size)) * mesh.size}")


def _check_images(batch, n_real, images) -> np.ndarray:
    """The batch's images gathered to this host, checked to be what a Generator returns."""
    images = _gather(images)
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[0] != len(batch) or images.shape[-1] != 3:
        raise ValueError(f"generate must return uint8 images of shape ({len(batch)}, H, W, 3), got "
                         f"{images.dtype} {images.shape}")
    return images


class _BatchWriter:
    """Process 0's end of a batch: its real samples' PNGs (written in parallel) and manifest lines."""

    def __init__(self, outdir, job_spec, digits, pool, bar):
        self.outdir, self.job_spec, self.digits, self.pool, self.bar = outdir, job_spec, digits, pool, bar

    def __call__(self, batch, n_real, images):
        images = _check_images(batch, n_real, images)
        real = batch[:n_real]
        paths = [os.path.join(self.outdir, outputs.sample_name(it.index, self.digits)) for it in real]
        list(self.pool.map(lambda a: outputs.atomic_write(a[0], outputs.encode_png(a[1])), zip(paths, images)))
        outputs.append_manifest(self.outdir, outputs.manifest_lines(real, self.job_spec, self.digits))
        if self.bar is not None:
            self.bar.update(n_real)


def _pipelined(plan, dispatch, finish) -> None:
    """`dispatch(steps, batch)` for every planned batch, each finished while the device samples the next."""
    pending = None  # one batch in flight: the device samples the next while the host encodes PNGs
    try:
        for steps, batch, n_real in plan:
            out = dispatch(steps, batch)
            previous, pending = pending, (batch, n_real, out)
            if previous is not None:
                finish(*previous)
        previous, pending = pending, None
        if previous is not None:
            finish(*previous)
    except BaseException:
        # Keep the batch already sampled before reporting; with several hosts the gather is a
        # collective the others may never join, so there it is recomputed on the rerun instead.
        if pending is not None and jax.process_count() == 1:
            try:
                finish(*pending)
            except Exception:  # noqa: BLE001 - the first error is the one to report
                pass
        raise
