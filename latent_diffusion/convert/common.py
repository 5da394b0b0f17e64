"""Shared pieces of every converter: reading checkpoint files, layout changes, key bookkeeping."""
from __future__ import annotations

import json
import os
from typing import Any, Iterable, Mapping

import numpy as np


def to_numpy(value: Any) -> np.ndarray:
    """A torch tensor or array-like as a float32 (or integer) numpy array, on the host."""
    if hasattr(value, "detach"):  # torch.Tensor, without importing torch
        value = value.detach().cpu()
        if value.is_floating_point():
            value = value.float()
        value = value.numpy()
    # A copy: arrays that share memory with torch tensors change when torch updates them in place.
    arr = np.array(value, copy=True)
    if arr.dtype.kind == "f" and arr.dtype != np.float32:
        arr = arr.astype(np.float32)
    return arr


def conv_kernel(w: np.ndarray) -> np.ndarray:
    """PyTorch conv weight (O, I, kH, kW) -> Flax (kH, kW, I, O)."""
    if w.ndim != 4:
        raise ValueError(f"expected a 4-d conv weight (O, I, kH, kW), got shape {w.shape}")
    return np.transpose(w, (2, 3, 1, 0))


def linear_kernel(w: np.ndarray) -> np.ndarray:
    """PyTorch linear weight (out, in) -> Flax (in, out); a 1x1 conv weight is accepted too."""
    if w.ndim == 4:
        if w.shape[2:] != (1, 1):
            raise ValueError(f"expected a 1x1 conv weight to use as a linear layer, got {w.shape}")
        w = w[:, :, 0, 0]
    if w.ndim != 2:
        raise ValueError(f"expected a 2-d linear weight (out, in), got shape {w.shape}")
    return np.transpose(w)


def flax_conv_kernel(w: np.ndarray) -> np.ndarray:
    """Flax (kH, kW, I, O) -> PyTorch (O, I, kH, kW), for converting back."""
    return np.transpose(np.asarray(w), (3, 2, 0, 1))


class StateDict:
    """A read-once view of a PyTorch state dict that remembers which keys were used.

    Converters `take` what they map; `finish` then reports keys nobody took (unexpected),
    so a checkpoint of another architecture fails loudly instead of loading half-way.
    """

    def __init__(self, state_dict: Mapping[str, Any], prefix: str = "", what: str = "checkpoint"):
        self._sd = dict(state_dict)
        self._used: set[str] = set()
        self._prefix = prefix
        self.what = what

    def sub(self, prefix: str) -> "StateDict":
        view = StateDict.__new__(StateDict)
        view._sd, view._used, view.what = self._sd, self._used, self.what
        view._prefix = self._prefix + prefix
        return view

    def has(self, name: str) -> bool:
        return self._prefix + name in self._sd

    def take(self, name: str) -> np.ndarray:
        key = self._prefix + name
        if key not in self._sd:
            near = sorted(k for k in self._sd if k.startswith(key.rsplit(".", 1)[0]))[:8]
            raise KeyError(
                f"{self.what}: missing key '{key}'. Keys under the same module: {near or 'none'}. "
                "Is the checkpoint for the same architecture as the config?")
        self._used.add(key)
        return to_numpy(self._sd[key])

    def conv(self, name: str) -> dict:
        """A conv module's params: {'kernel', 'bias'} (bias only if present)."""
        out = {"kernel": conv_kernel(self.take(name + ".weight"))}
        if self.has(name + ".bias"):
            out["bias"] = self.take(name + ".bias")
        return out

    def linear(self, name: str) -> dict:
        out = {"kernel": linear_kernel(self.take(name + ".weight"))}
        if self.has(name + ".bias"):
            out["bias"] = self.take(name + ".bias")
        return out

    def norm(self, name: str) -> dict:
        """GroupNorm / LayerNorm affine params: {'scale', 'bias'}."""
        return {"scale": self.take(name + ".weight"), "bias": self.take(name + ".bias")}

    def unused(self, ignore: Iterable[str] = ()) -> list[str]:
        ignore = tuple(ignore)
        return sorted(k for k in self._sd
                      if k.startswith(self._prefix) and k not in self._used
                      and not any(k.startswith(self._prefix + i) or k.endswith(i) for i in ignore))

    def finish(self, ignore: Iterable[str] = ()) -> None:
        """Raise if any key under this view's prefix was not converted."""
        left = self.unused(ignore)
        if left:
            raise ValueError(
                f"{self.what}: {len(left)} unexpected key(s) were not converted: {left[:20]}"
                f"{' ...' if len(left) > 20 else ''}. The checkpoint does not match the config.")


def check_tree_shapes(expected: Any, actual: Any, what: str = "params") -> None:
    """Compare two param trees (shapes only); raise naming every missing, extra or mismatched leaf."""
    import jax

    exp = {jax.tree_util.keystr(p): tuple(v.shape)
           for p, v in jax.tree_util.tree_leaves_with_path(expected)}
    act = {jax.tree_util.keystr(p): tuple(np.shape(v))
           for p, v in jax.tree_util.tree_leaves_with_path(actual)}
    problems = [f"missing {k} {s}" for k, s in exp.items() if k not in act]
    problems += [f"unexpected {k} {s}" for k, s in act.items() if k not in exp]
    problems += [f"shape of {k}: expected {exp[k]}, got {act[k]}"
                 for k in exp if k in act and exp[k] != act[k]]
    if problems:
        raise ValueError(f"{what} do not match the model ({len(problems)} problem(s)): "
                         + "; ".join(problems[:20]) + (" ..." if len(problems) > 20 else ""))


DIFFUSERS_WEIGHTS = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")
TRANSFORMERS_WEIGHTS = ("model.safetensors", "pytorch_model.bin")


def read_pretrained_folder(folder: str, weight_names: Iterable[str], what: str) -> tuple[dict, str]:
    """(config.json as a dict, the first of `weight_names` present) of a folder as save_pretrained writes it."""
    weight_names = list(weight_names)
    config_path = os.path.join(folder, "config.json")
    weights = next((os.path.join(folder, n) for n in weight_names if os.path.isfile(os.path.join(folder, n))), None)
    if not os.path.isfile(config_path) or weights is None:
        raise FileNotFoundError(f"{what}={folder!r} is not a model folder: expected config.json and one of "
                                f"{weight_names} (as save_pretrained writes them)")
    with open(config_path) as f:
        return json.load(f), weights


def load_state_dict(path: str | os.PathLike) -> dict[str, Any]:
    """Read a PyTorch checkpoint without unpickling arbitrary objects.

    `.safetensors` is read with safetensors' numpy reader (no torch needed); `.ckpt`, `.pt`,
    `.pth` and `.bin` go through `torch.load(weights_only=True)`, which refuses pickled code.
    A Lightning-style `{'state_dict': ...}` wrapper is unwrapped.
    """
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"checkpoint file not found: {path}")
    if path.endswith(".safetensors"):
        from safetensors.numpy import load_file
        try:
            return dict(load_file(path))
        except Exception as e:  # bf16 tensors cannot be read as numpy: fall back to torch
            try:
                from safetensors.torch import load_file as load_torch
            except ImportError:
                raise ValueError(f"could not read {path} as numpy ({e}); install torch to read it") from e
            return dict(load_torch(path))
    try:
        import torch
    except ImportError as e:
        raise ImportError(f"reading {path} needs PyTorch (pip install torch); "
                          "or convert it to .safetensors first") from e
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ValueError(
            f"could not read {path} as a weights-only PyTorch checkpoint ({type(e).__name__}: {e}). "
            "Files that need arbitrary unpickling are refused; re-save the state dict with "
            "torch.save(model.state_dict()) or as .safetensors.") from e
    if isinstance(obj, Mapping) and "state_dict" in obj and isinstance(obj["state_dict"], Mapping):
        obj = obj["state_dict"]
    if not isinstance(obj, Mapping):
        raise ValueError(f"{path} does not hold a state dict (got {type(obj).__name__})")
    return dict(obj)


def state_dict_of(source: Any) -> dict[str, Any]:
    """A state dict from a path, a mapping, or a torch module."""
    if isinstance(source, (str, os.PathLike)):
        return load_state_dict(source)
    if hasattr(source, "state_dict") and callable(source.state_dict):
        return dict(source.state_dict())
    if isinstance(source, Mapping):
        return dict(source)
    raise TypeError(f"expected a path, a state dict or a torch module, got {type(source).__name__}")
