"""Orbax checkpoints: train state, data iterator position and run metadata, restorable into any mesh."""
from __future__ import annotations

import json
import os
from typing import Any

import jax
import orbax.checkpoint as ocp


def _abs(path: str) -> str:
    return path if "://" in path else os.path.abspath(path)


def make_manager(workdir: str, *, max_to_keep: int = 3, async_save: bool = True,
                 with_data: bool = True) -> ocp.CheckpointManager:
    items = ["state", "meta"] + (["data"] if with_data else [])
    handlers = {"state": ocp.StandardCheckpointHandler(), "meta": ocp.JsonCheckpointHandler()}
    if with_data:
        import grain
        handlers["data"] = grain.checkpoint.CheckpointHandler()
    return ocp.CheckpointManager(
        _abs(os.path.join(workdir, "checkpoints")),
        item_names=tuple(items),
        item_handlers=handlers,
        options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep,
                                             enable_async_checkpointing=async_save,
                                             create=True))


def save(manager: ocp.CheckpointManager, step: int, state: Any, meta: dict,
         data_iterator: Any = None) -> None:
    args = {"state": ocp.args.StandardSave(state), "meta": ocp.args.JsonSave(meta)}
    if data_iterator is not None:
        import grain
        args["data"] = grain.checkpoint.CheckpointSave(data_iterator)
    manager.save(step, args=ocp.args.Composite(**args), force=True)


def abstract_like(state: Any, shardings: Any) -> Any:
    """ShapeDtypeStructs carrying the target shardings: restore lays arrays out on the new mesh."""
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), state, shardings)


def restore(manager: ocp.CheckpointManager, abstract_state: Any, step: int | None = None,
            data_iterator: Any = None) -> tuple[Any, dict, int]:
    """(state, meta, step) of `step` (default: the latest); the data iterator is restored in place."""
    step = manager.latest_step() if step is None else step
    if step is None:
        raise FileNotFoundError(f"no checkpoint in {manager.directory}")
    args = {"state": ocp.args.StandardRestore(abstract_state), "meta": ocp.args.JsonRestore()}
    if data_iterator is not None:
        import grain
        args["data"] = grain.checkpoint.CheckpointRestore(data_iterator)
    try:
        restored = manager.restore(step, args=ocp.args.Composite(**args))
    except (ValueError, KeyError, TypeError) as e:
        raise ValueError(
            f"checkpoint {manager.directory}/{step} does not match the model built from this config "
            f"({type(e).__name__}: {str(e)[:600]}). Use the config the run was trained with, or a "
            "fresh --workdir.") from e
    return restored["state"], dict(restored["meta"] or {}), int(step)


def read_meta(workdir: str, step: int | None = None) -> dict:
    """The JSON metadata of a run's checkpoint (e.g. the latent scale factor), without restoring arrays."""
    root = os.path.join(_abs(workdir), "checkpoints")
    if not os.path.isdir(root):
        raise FileNotFoundError(f"no checkpoints under {workdir}: train stage 1 there first, "
                                "or point the config at a converted checkpoint")
    steps = sorted(int(d) for d in os.listdir(root) if d.isdigit())
    if not steps:
        raise FileNotFoundError(f"no finished checkpoint under {root}")
    step = steps[-1] if step is None else step
    with open(os.path.join(root, str(step), "meta", "metadata")) as f:
        return json.load(f)


def restore_state_tree(workdir: str, shardings_fn, step: int | None = None) -> tuple[dict, dict]:
    """Restore a run's whole state as a nested dict, laid out by `shardings_fn(abstract_tree)`.

    The tree's shapes come from the checkpoint's own metadata, so this needs neither the
    run's config nor its mesh: it is how a later stage reads a finished first stage.
    """
    mngr = make_manager(workdir, async_save=False, with_data=False)
    try:
        step = mngr.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"no checkpoint in {workdir}/checkpoints: train that stage first")
        tree = mngr.item_metadata(step)["state"]
        abstract = jax.tree.map(lambda m: jax.ShapeDtypeStruct(tuple(m.shape), m.dtype), dict(tree))
        shardings = shardings_fn(abstract)
        target = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                              abstract, shardings)
        restored = mngr.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(target), meta=ocp.args.JsonRestore()))
    finally:
        mngr.close()
    return restored["state"], dict(restored["meta"] or {})
