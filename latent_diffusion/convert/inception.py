"""FID InceptionV3 weights: pytorch-fid / torch-fidelity state dicts -> our params, and the project file.

Both `pt_inception-2015-12-05-6726825d.pth` (pytorch-fid) and
`weights-inception-2015-12-05-6726825d.pth` (torch-fidelity) hold torchvision-style names
(`Mixed_5b.branch1x1.conv.weight`, `fc.weight`); pytorch-fid's `InceptionV3` wrapper module
stores the same layers as `blocks.<i>.<j>.` and has no fc. All three are accepted.

Convert once, then point evaluate.py at the result:
    python -m latent_diffusion.convert.inception --src=pt_inception-2015-12-05-6726825d.pth \
        --dst=~/.cache/latent_diffusion/inception-2015-12-05.npz
"""
from __future__ import annotations

import argparse
import os
import re
from typing import Any

import numpy as np

from latent_diffusion.convert.common import StateDict, check_tree_shapes, state_dict_of

ENV_VAR = "LDM_INCEPTION_WEIGHTS"
DEFAULT_PATH = os.path.join("~", ".cache", "latent_diffusion", "inception-2015-12-05.npz")
SOURCE_FILES = ("pt_inception-2015-12-05-6726825d.pth (pytorch-fid) or "
                "weights-inception-2015-12-05-6726825d.pth (torch-fidelity)")

# pytorch-fid's InceptionV3 wrapper: blocks.<i>.<j> -> layer name (pools hold no weights).
_WRAPPER_BLOCKS = (
    ("Conv2d_1a_3x3", "Conv2d_2a_3x3", "Conv2d_2b_3x3"),
    ("Conv2d_3b_1x1", "Conv2d_4a_3x3"),
    ("Mixed_5b", "Mixed_5c", "Mixed_5d", "Mixed_6a", "Mixed_6b", "Mixed_6c", "Mixed_6d", "Mixed_6e"),
    ("Mixed_7a", "Mixed_7b", "Mixed_7c"),
)


def _canonical_names(state_dict: dict[str, Any]) -> dict[str, Any]:
    """Strip DataParallel prefixes and rename pytorch-fid wrapper keys to torchvision names."""
    out = {}
    for key, value in state_dict.items():
        key = key[len("module."):] if key.startswith("module.") else key
        m = re.match(r"blocks\.(\d+)\.(\d+)\.(.*)", key)
        if m:
            i, j, rest = int(m.group(1)), int(m.group(2)), m.group(3)
            if i >= len(_WRAPPER_BLOCKS) or j >= len(_WRAPPER_BLOCKS[i]):
                raise ValueError(f"unexpected key {key!r} in a pytorch-fid InceptionV3 state dict")
            key = f"{_WRAPPER_BLOCKS[i][j]}.{rest}"
        out[key] = value
    return out


def _convert_tree(sd: StateDict, template: Any, prefix: str = "") -> Any:
    """Walk our param tree and take the matching PyTorch tensors (names mirror the PyTorch modules)."""
    out = {}
    for name, sub in template.items():
        path = f"{prefix}{name}"
        if name == "conv":
            out[name] = {"kernel": sd.conv(path)["kernel"]}
        elif name == "bn":
            out[name] = {"scale": sd.take(f"{path}.weight"), "bias": sd.take(f"{path}.bias"),
                         "mean": sd.take(f"{path}.running_mean"), "var": sd.take(f"{path}.running_var")}
        elif name == "fc":
            out[name] = sd.linear(path)
        else:
            out[name] = _convert_tree(sd, sub, path + ".")
    return out


def build_model(num_classes: int = 1008, **kwargs):
    from latent_diffusion.models.inception import InceptionV3
    return InceptionV3(num_classes=num_classes, **kwargs)


def param_shapes(module) -> Any:
    import jax
    import jax.numpy as jnp
    size = module.resize_to or 75  # 75 is the smallest input the graph accepts
    dummy = jax.ShapeDtypeStruct((1, size, size, 3), jnp.uint8)
    return jax.eval_shape(module.init, jax.random.PRNGKey(0), dummy)["params"]


def from_pytorch(source: Any, **model_kwargs):
    """(module, params) from a pytorch-fid / torch-fidelity state dict, file path or torch module."""
    state = _canonical_names(state_dict_of(source))
    has_fc = "fc.weight" in state
    module = build_model(num_classes=1008 if has_fc else 0, **model_kwargs)
    template = param_shapes(module)
    sd = StateDict(state, what="FID Inception checkpoint")
    params = _convert_tree(sd, template)
    sd.finish(ignore=("num_batches_tracked",))
    check_tree_shapes(template, params, what="FID Inception params")
    return module, params


def random_params(module, seed: int = 0) -> Any:
    """Random params for tests and benchmarks, drawn in numpy (jitting `init` takes a minute on CPU).

    He-normal conv kernels and BatchNorm statistics near identity keep activations O(1) through
    the 90-odd layers, so comparisons against a reference are not dominated by under/overflow.
    """
    import jax
    rng = np.random.default_rng(seed)

    def draw(path, leaf):
        name, shape = path[-1].key, leaf.shape
        if name == "kernel" and len(shape) == 4:
            return rng.normal(0, np.sqrt(2.0 / np.prod(shape[:3])), shape).astype(np.float32)
        if name == "kernel":
            return rng.normal(0, 1 / np.sqrt(shape[0]), shape).astype(np.float32)
        if name in ("scale", "var"):
            return rng.uniform(0.5, 1.5, shape).astype(np.float32)
        return rng.normal(0, 0.1, shape).astype(np.float32)  # bias, mean

    return jax.tree_util.tree_map_with_path(draw, param_shapes(module))


def save_params(path: str, params: Any) -> None:
    """Write params as a flat .npz (keys 'Mixed_5b/branch1x1/conv/kernel'), atomically."""
    from flax import traverse_util
    path = os.path.expanduser(path)
    flat = traverse_util.flatten_dict(params, sep="/")
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp.npz"
    np.savez(tmp, **{k: np.asarray(v, np.float32) for k, v in flat.items()})
    os.replace(tmp, path)


def missing_weights_message(path: str | None) -> str:
    where = path or f"${ENV_VAR} or {DEFAULT_PATH}"
    return (f"FID Inception weights not found at {where}. Download {SOURCE_FILES} on a machine with "
            "network access, then convert it:\n"
            f"  python -m latent_diffusion.convert.inception --src=<file.pth> --dst={DEFAULT_PATH}\n"
            f"and pass --inception_weights=<dst> (or set {ENV_VAR}, or use the default path).")


def resolve_path(path: str | None) -> str:
    return os.path.expanduser(path or os.environ.get(ENV_VAR) or DEFAULT_PATH)


def load_params(path: str | None = None, **model_kwargs):
    """(module, params) from our .npz (or directly from a .pth state dict); a clear error if absent."""
    from flax import traverse_util
    path = resolve_path(path)
    if not os.path.exists(path):
        raise FileNotFoundError(missing_weights_message(path))
    if not path.endswith(".npz"):
        return from_pytorch(path, **model_kwargs)
    with np.load(path, allow_pickle=False) as data:
        flat = {k: data[k] for k in data.files}
    params = traverse_util.unflatten_dict(flat, sep="/")
    module = build_model(num_classes=1008 if "fc" in params else 0, **model_kwargs)
    check_tree_shapes(param_shapes(module), params, what=f"FID Inception params in {path}")
    return module, params


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description="Convert FID Inception weights to the project's .npz.")
    parser.add_argument("--src", required=True, help=SOURCE_FILES)
    parser.add_argument("--dst", default=DEFAULT_PATH)
    args = parser.parse_args(argv)
    _, params = from_pytorch(args.src)
    save_params(args.dst, params)
    print(f"wrote {os.path.expanduser(args.dst)}")


if __name__ == "__main__":
    main()
