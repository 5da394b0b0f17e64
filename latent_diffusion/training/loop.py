"""The one training loop, for both stages.

config -> loader -> global batch on the mesh -> jitted step -> metrics / checkpoint.
The loop knows nothing of a model's insides: a task (see `tasks.py`) supplies the pure
functions `init`, `train_step` and `eval_step`, plus the frozen inputs they need.
"""
from __future__ import annotations

import dataclasses
import logging
import os
import time
import warnings
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from latent_diffusion.training import checkpointing, init_from, partitioning, tasks
from latent_diffusion.training.state import tree_all_finite

log = logging.getLogger(__name__)


class NonFiniteError(FloatingPointError):
    """Raised when the loss or gradients become NaN/Inf; the last checkpoint is left intact."""


@dataclasses.dataclass
class RunResult:
    state: Any
    step: int
    train_metrics: dict
    eval_metrics: dict
    steps_per_sec: float
    resumed_from: int | None


def _guard(train_step):
    """Skip the update of a step whose loss or gradients are not finite, and say so in metrics."""
    def step(state, batch, rng, frozen):
        new_state, metrics = train_step(state, batch, rng, frozen)
        checked = {k: metrics[k] for k in ("loss", "grad_norm", "d_loss", "d_grad_norm") if k in metrics}
        finite = tree_all_finite((checked, new_state.params))
        new_state = jax.tree.map(lambda n, o: jnp.where(finite, n, o), new_state, state)
        return new_state, dict(metrics, finite=finite)
    return step


def _mean_metrics(history: list[dict]) -> dict:
    host = jax.device_get(history)
    keys = [k for k in host[0] if k != "finite"]
    # nanmean: per-timestep-bucket losses are NaN in steps that drew no timestep in the bucket.
    with np.errstate(invalid="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return {k: float(np.nanmean([np.asarray(h[k], np.float64) for h in host])) for k in keys}


def compile_together(fn, *args, name: str) -> None:
    """On several processes, compile `fn` for `args` before its first run, then wait for all of them.

    A collective's first run creates its communicator, and CPU collectives (gloo) give the other
    processes 30 s to join; compile times on a busy host differ by more. Compiling ahead (the jit
    cache keeps the executable for the real call) and meeting at a barrier whose timeout is minutes
    makes every process start the collective together. One process: nothing to do.
    """
    if jax.process_count() == 1:
        return
    from orbax.checkpoint import multihost
    fn.lower(*args).compile()
    multihost.sync_global_processes(f"latent_diffusion:{name}", timeout=1800)


def _data_metrics(train_iter) -> dict:
    """This host's bad-record counts (the loader's), for TensorBoard: data/skipped and one per cause."""
    out = {"data/skipped": getattr(train_iter, "skipped", 0)}
    out.update({f"data/skipped_{cause}": n for cause, n in getattr(train_iter, "skipped_by_cause", {}).items()})
    return out


def _writer(workdir: str):
    from clu import metric_writers
    return metric_writers.create_default_writer(os.path.join(workdir, "logs"),
                                                just_logging=jax.process_index() > 0)


def evaluate(task: tasks.Task, state, frozen, config, mesh, eval_fn, rng) -> tuple[dict, dict]:
    """Average eval metrics over the held-out split (config.num_eval_batches batches); first batch images."""
    from latent_diffusion.data import loader
    it = loader.make_dataset(config.data, config.data.eval_split, global_batch_size=config.eval_batch_size,
                             seed=config.seed, shuffle=False, num_epochs=1,
                             extra_transforms=task.host_transforms())
    sums, count, images = {}, 0, {}
    for i, local in enumerate(_batches_every_host_has(it)):
        if config.num_eval_batches and i >= config.num_eval_batches:
            break
        batch = partitioning.global_batch(local, mesh)
        if i == 0:
            compile_together(eval_fn, state, batch, jax.random.fold_in(rng, i), frozen,
                             name=f"eval_step_compiled:{int(jax.device_get(state.step))}")
        metrics = jax.device_get(eval_fn(state, batch, jax.random.fold_in(rng, i), frozen))
        for k, v in metrics.items():
            sums[k] = sums.get(k, 0.0) + float(v)
        count += 1
        if i == 0:
            images = task.summary_images(state, batch, frozen, rng)
    if count == 0:
        raise ValueError(f"the eval split {config.data.eval_split!r} gave no batch of "
                         f"{config.eval_batch_size}; lower --config.eval_batch_size")
    scores, score_images = task.sample_scores(state, frozen)
    return dict({k: v / count for k, v in sums.items()}, **scores), dict(images, **score_images)


def _batches_every_host_has(it):
    """The batches of a finite iterator, while every process still has one.

    Bad records are dropped on the host that reads them, so one epoch can give hosts different batch
    counts; a host that stopped early would leave the others waiting in the eval step's collectives.
    """
    if jax.process_count() == 1:
        yield from it
        return
    from jax.experimental import multihost_utils
    for local in it:
        if not multihost_utils.process_allgather(np.int32(1)).all():
            return
        yield local
    multihost_utils.process_allgather(np.int32(0))  # tell the others this host has no more


def train_and_evaluate(config, workdir: str, devices=None) -> RunResult:
    """Train until config.num_train_steps, resuming from the latest checkpoint in workdir.

    `devices` restricts the mesh to some devices (default: all devices of all hosts).
    """
    from latent_diffusion.data import loader

    os.makedirs(workdir, exist_ok=True) if "://" not in workdir else None
    if config.data.get("source", "tfds") == "tfds" and not config.data.name:
        raise ValueError(
            "config.data.name is empty: this full-size config needs a dataset "
            f"({config.get('dataset_hint', 'see the config file')}). Pass "
            "--config.data.source=webdataset --config.data.shards='/data/{00000..00999}.tar' (img2dataset "
            "output; also parquet, tfrecord or folder), or --config.data.name=<TFDS name> "
            "--config.data.data_dir=<dir with the prepared dataset>, or use the config's ':tiny' variant, "
            "which trains on the built-in shapes dataset.")
    mesh = partitioning.make_mesh(config.mesh.data, config.mesh.fsdp, devices)
    if config.batch_size % mesh.size or config.eval_batch_size % mesh.size:
        raise ValueError(f"batch_size {config.batch_size} and eval_batch_size {config.eval_batch_size} "
                         f"must divide by the device count {mesh.size}; change --config.batch_size")
    task = tasks.build(config, mesh, workdir)
    root = jax.random.key(config.seed)
    init_rng, train_rng, eval_rng = (jax.random.fold_in(root, i) for i in range(3))

    train_iter = loader.make_dataset(config.data, config.data.train_split,
                                     global_batch_size=config.batch_size, seed=config.seed,
                                     shuffle=True, num_epochs=None,
                                     extra_transforms=task.host_transforms())
    peeked = next(train_iter)
    batch = partitioning.global_batch(peeked, mesh)
    frozen = task.frozen()

    abstract = jax.eval_shape(task.init, init_rng, batch, frozen)
    shardings = partitioning.tree_shardings(abstract, mesh, config.partitioning.rules,
                                            config.partitioning.min_shard_size)
    repl = partitioning.replicated(mesh)
    batch_shd = jax.tree.map(lambda _: partitioning.batch_sharding(mesh), batch)
    frozen_shd = partitioning.tree_shardings(frozen, mesh, config.partitioning.rules,
                                             config.partitioning.min_shard_size)
    # The step declares these layouts; place the frozen arrays (first stage, LPIPS, a frozen text
    # encoder) that way now, whatever layout they were loaded with.
    frozen = jax.device_put(frozen, frozen_shd)

    manager = checkpointing.make_manager(workdir, max_to_keep=config.checkpoint.max_to_keep,
                                         async_save=config.checkpoint.async_save)
    state, resumed_from = _restore_or_init(task, config, manager, abstract, shardings, train_iter,
                                           (init_rng, batch, frozen))
    if resumed_from is not None:
        peeked = None  # the restored iterator is positioned after the checkpointed step's batch

    step_fn = jax.jit(_guard(task.train_step),
                      in_shardings=(shardings, batch_shd, repl, frozen_shd),
                      out_shardings=(shardings, repl), donate_argnums=(0,))
    eval_fn = jax.jit(task.eval_step)

    writer = _writer(workdir)
    from clu import periodic_actions
    report = periodic_actions.ReportProgress(num_train_steps=config.num_train_steps, writer=writer,
                                             every_secs=None, every_steps=config.log_every)
    start = int(jax.device_get(state.step))
    if start == 0:
        writer.write_hparams({k: v for k, v in traverse_util.flatten_dict(config.to_dict(), sep=".").items()
                              if isinstance(v, (int, float, str, bool))})
    history, train_metrics, eval_metrics = [], {}, {}
    t0, steps_done, last_finite = time.perf_counter(), 0, None
    last_log = (start, t0)  # (step, time) of the previous console line, for its steps/s and ETA

    def checkpoint(step):
        meta = dict(task.checkpoint_meta(state, frozen), step=step, config=config.to_json_best_effort())
        checkpointing.save(manager, step, state, meta, data_iterator=train_iter)

    if start < config.num_train_steps:
        first = peeked if peeked is not None else next(train_iter)
        peeked = first
        compile_together(step_fn, state, partitioning.global_batch(first, mesh),
                         jax.random.fold_in(train_rng, start), frozen, name=f"train_step_compiled:{start}")
    for step in range(start, config.num_train_steps):
        local = peeked if peeked is not None else next(train_iter)
        peeked = None
        batch = partitioning.global_batch(local, mesh)
        state, metrics = step_fn(state, batch, jax.random.fold_in(train_rng, step), frozen)
        history.append(metrics)
        steps_done += 1
        # Check the previous step's flag: the check then costs no pipeline stall.
        if last_finite is not None and not bool(last_finite[1]):
            _fail(manager, last_finite[0], metrics_host=jax.device_get(history[-2]))
        last_finite = (step, metrics["finite"])
        done = step + 1
        report(done)
        if done % config.log_every == 0 or done == config.num_train_steps:
            if not bool(metrics["finite"]):
                _fail(manager, step, metrics_host=jax.device_get(metrics))
            train_metrics = _mean_metrics(history)
            history = []
            writer.write_scalars(done, {f"train/{k}": v for k, v in train_metrics.items()})
            writer.write_scalars(done, _data_metrics(train_iter))
            now = time.perf_counter()
            log.info("%s | %s", progress_line(done, config.num_train_steps, done - last_log[0], now - last_log[1]),
                     _fmt(train_metrics))
            last_log = (done, now)
        if done % config.eval_every == 0 or done == config.num_train_steps:
            eval_metrics, images = evaluate(task, state, frozen, config, mesh, eval_fn, eval_rng)
            writer.write_scalars(done, {f"eval/{k}": v for k, v in eval_metrics.items()})
            if images:
                writer.write_images(done, {k: np.asarray(v) for k, v in images.items()})
            log.info("eval at step %d: %s", done, _fmt(eval_metrics))
        if done % config.checkpoint.every == 0 or done == config.num_train_steps:
            checkpoint(done)
    if last_finite is not None and not bool(last_finite[1]):
        _fail(manager, last_finite[0], metrics_host=None)
    manager.wait_until_finished()
    manager.close()
    writer.flush()
    elapsed = time.perf_counter() - t0
    return RunResult(state=state, step=int(jax.device_get(state.step)), train_metrics=train_metrics,
                     eval_metrics=eval_metrics, steps_per_sec=steps_done / max(elapsed, 1e-9),
                     resumed_from=resumed_from)


def _restore_or_init(task: tasks.Task, config, manager, abstract, shardings, train_iter,
                     init_args) -> tuple[Any, int | None]:
    """(state, the step resumed from): the latest checkpoint with the data iterator's position, or else a fresh
    `task.init(*init_args)` laid out as `shardings`, with config.init's imported weights (fine-tuning)."""
    resumed_from = manager.latest_step()
    if resumed_from is not None:
        state, _, _ = checkpointing.restore(manager, checkpointing.abstract_like(abstract, shardings),
                                            data_iterator=train_iter)
        ignored = " (config.init is ignored: the run's own checkpoint wins)" if init_from.init_config(config)[1] else ""
        log.info("resumed from step %d in %s%s", resumed_from, manager.directory, ignored)
    else:
        state = jax.jit(task.init, out_shardings=shardings)(*init_args)
        state = init_from.apply(config, task, state)
    n_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(abstract.params))
    log.info("trainable parameters: %s", f"{n_params:,}")
    return state, resumed_from


def _fail(manager, step, metrics_host):
    manager.wait_until_finished()
    last = manager.latest_step()
    raise NonFiniteError(
        f"the loss or gradients became NaN/Inf at step {step + 1} (metrics: {metrics_host}); the update "
        f"was not applied. The last intact checkpoint is step {last} in {manager.directory}. "
        "Lower the learning rate, enable gradient clipping (--config.optim.grad_clip_norm) or check the data.")


def progress_line(step: int, total: int, steps: int, seconds: float) -> str:
    """'step 500/3000 (16.7%), 4.21 steps/s, 9m54s left' from the steps and seconds since the last line."""
    rate = steps / seconds if seconds > 0 and steps > 0 else float("nan")
    left = (total - step) / rate if rate == rate and rate > 0 else float("nan")
    return f"step {step}/{total} ({100 * step / max(total, 1):.1f}%), {rate:.2f} steps/s, {_duration(left)} left"


def _duration(seconds: float) -> str:
    if seconds != seconds:  # NaN: no rate yet
        return "?"
    s = int(round(seconds))
    h, rest = divmod(s, 3600)
    m, s = divmod(rest, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"


def _fmt(metrics: dict) -> str:
    return ", ".join(f"{k}={v:.4g}" for k, v in sorted(metrics.items()))
