"""Device mesh and parameter sharding.

The mesh has axes ('data', 'fsdp'). Batches are split over both axes; parameters are
replicated over 'data' and sharded over 'fsdp'. Which dimension of a parameter is
sharded comes from rules in the config: a list of (path regex, spec) pairs, where spec
names a mesh axis (or None) per dimension; the first matching rule wins. Parameters
that no rule matches get the default: the largest dimension that divides evenly by the
'fsdp' size is sharded, and small tensors stay replicated.
"""
from __future__ import annotations

import re
from typing import Any, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

DATA_AXES = ("data", "fsdp")


def make_mesh(data: int = -1, fsdp: int = 1, devices: Sequence[Any] | None = None) -> Mesh:
    """A ('data', 'fsdp') mesh over all devices; -1 takes what is left."""
    devices = list(jax.devices() if devices is None else devices)
    n = len(devices)
    if data == -1 and fsdp == -1:
        raise ValueError("mesh: at most one of mesh.data and mesh.fsdp may be -1")
    if data == -1:
        data = n // fsdp if fsdp > 0 and n % fsdp == 0 else 0
    if fsdp == -1:
        fsdp = n // data if data > 0 and n % data == 0 else 0
    if data * fsdp != n or data <= 0:
        raise ValueError(f"mesh: data={data} x fsdp={fsdp} does not cover the {n} devices; "
                         "set --config.mesh.data / --config.mesh.fsdp so their product is the device count")
    try:
        from jax.experimental import mesh_utils
        grid = mesh_utils.create_device_mesh((data, fsdp), devices)
    except Exception:  # CPU / fake devices have no topology to exploit
        grid = np.asarray(devices).reshape(data, fsdp)
    return Mesh(grid, DATA_AXES)


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Leading (batch) dimension split over every device."""
    return NamedSharding(mesh, P(DATA_AXES))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def _default_spec(shape: tuple[int, ...], fsdp_size: int, min_size: int) -> P:
    if fsdp_size <= 1 or int(np.prod(shape, dtype=np.int64)) < min_size:
        return P()
    # Shard the largest evenly divisible dimension: it spreads the memory the most.
    order = sorted(range(len(shape)), key=lambda i: -shape[i])
    for i in order:
        if shape[i] % fsdp_size == 0:
            spec = [None] * len(shape)
            spec[i] = "fsdp"
            return P(*spec)
    return P()


def param_specs(tree: Any, mesh: Mesh, rules: Sequence[tuple[str, Sequence[str | None]]] = (),
                min_shard_size: int = 2 ** 14) -> Any:
    """A PartitionSpec for every leaf of a param-like tree (arrays or ShapeDtypeStructs)."""
    fsdp_size = mesh.shape["fsdp"]
    compiled = [(re.compile(pat), tuple(spec)) for pat, spec in rules]

    def spec_for(path, leaf):
        shape = tuple(getattr(leaf, "shape", ()))
        name = "/".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path)
        for pat, spec in compiled:
            if pat.search(name):
                if len(spec) != len(shape):
                    raise ValueError(f"partitioning rule {pat.pattern!r} gives {len(spec)} axes for "
                                     f"'{name}' of shape {shape}")
                for dim, axis in zip(shape, spec):
                    if axis is not None and dim % mesh.shape[axis] != 0:
                        raise ValueError(f"partitioning rule {pat.pattern!r}: dimension {dim} of "
                                         f"'{name}' does not divide by mesh axis {axis!r} "
                                         f"({mesh.shape[axis]})")
                return P(*spec)
        return _default_spec(shape, fsdp_size, min_shard_size)

    return jax.tree_util.tree_map_with_path(spec_for, tree)


def tree_shardings(tree: Any, mesh: Mesh, rules=(), min_shard_size: int = 2 ** 14) -> Any:
    return jax.tree.map(lambda s: NamedSharding(mesh, s),
                        param_specs(tree, mesh, rules, min_shard_size),
                        is_leaf=lambda x: isinstance(x, P))


def global_batch(local_batch: dict, mesh: Mesh) -> dict:
    """Assemble host-local numpy batches into global arrays split over the mesh's devices.

    Non-numeric leaves (captions as strings) stay on the host and are dropped here.
    """
    sharding = batch_sharding(mesh)
    out = {}
    for key, value in local_batch.items():
        arr = np.asarray(value)
        if arr.dtype.kind in "OSU":
            continue
        out[key] = jax.make_array_from_process_local_data(sharding, arr)
    return out
