"""A prompt-following judge for the synthetic shapes data that does not trust the model being judged.

The shapes renderer (`latent_diffusion/data/shapes.py`) puts at most one shape in each cell of a 3x3
grid, so an image is read cell by cell: a small CNN, shared by the nine cells, looks at each cell's
22x22 crop of a 64x64 image and says whether it holds a shape and, if so, its kind, colour and size.
Position is the cell. The network is trained on the renderer's ground truth only (fresh random scenes,
with blur and noise so that it also reads softer, generated images), never on a model's output.

Its per-cell embeddings, concatenated over the nine cells, are the features of the shapes-FID
(`features`), a Frechet distance that knows what the scenes are made of.
"""
from __future__ import annotations

import dataclasses
import hashlib
import os
from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from latent_diffusion.data import shapes

RESOLUTION = 64
GRID = 3
CROP = 22  # ceil(64 / 3) + 1: every cell's pixels, shapes never leave their cell
EMBED_DIM = 16
ATTRIBUTES = ("kind", "color", "size")
NUM_VALUES = {"kind": len(shapes.KINDS), "color": len(shapes.COLOR_NAMES), "size": len(shapes.SIZE_NAMES)}
DEFAULT_WEIGHTS = os.path.join(os.path.dirname(__file__), "assets", "shapes_classifier.npz")


def cell_bounds(resolution: int = RESOLUTION) -> list[tuple[int, int]]:
    """[start, start + CROP) of each grid row (the same for columns) at 64 px, covering the renderer's cell."""
    out = []
    for i in range(GRID):
        start = min(int(np.floor(i * resolution / GRID)), resolution - CROP)
        out.append((start, start + CROP))
    return out


def to_unit_float(images) -> np.ndarray:
    """uint8 [0, 255] or float [-1, 1] images (B, H, W, 3) -> float32 [-1, 1] at 64x64."""
    images = np.asarray(images)
    if images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"expected RGB images (B, H, W, 3), got shape {images.shape}")
    x = images.astype(np.float32) / 127.5 - 1.0 if images.dtype == np.uint8 else images.astype(np.float32)
    if x.shape[1:3] != (RESOLUTION, RESOLUTION):
        x = np.asarray(jax.image.resize(x, (x.shape[0], RESOLUTION, RESOLUTION, 3), "linear", antialias=True))
    return x


def cell_crops(x):
    """(B, 64, 64, 3) -> (B, 9, CROP, CROP, 3), cells in reading order (row-major)."""
    rows = [x[:, a:b] for a, b in cell_bounds()]
    return jnp.stack([r[:, :, a:b] for r in rows for a, b in cell_bounds()], axis=1)


class CellNet(nn.Module):
    """One cell crop -> presence logit, kind / colour / size logits and an embedding."""
    width: int = 16

    @nn.compact
    def __call__(self, x):
        w = self.width
        # (features, stride): full resolution only for the first layer, which is where the cost is.
        for i, (feat, stride) in enumerate(((w, 1), (2 * w, 2), (2 * w, 1), (4 * w, 2), (4 * w, 1))):
            x = nn.Conv(feat, (3, 3), strides=stride, name=f"conv_{i}")(x)
            x = nn.relu(nn.GroupNorm(num_groups=8, name=f"norm_{i}")(x))
        x = jnp.concatenate([x.mean(axis=(1, 2)), x.max(axis=(1, 2))], axis=-1)
        x = nn.relu(nn.Dense(8 * w, name="hidden")(x))
        embedding = nn.Dense(EMBED_DIM, name="embedding")(x)
        h = nn.relu(embedding)
        out = {"presence": nn.Dense(1, name="presence")(h)[..., 0], "embedding": embedding}
        for name in ATTRIBUTES:
            out[name] = nn.Dense(NUM_VALUES[name], name=name)(h)
        return out


def apply_cells(params, x):
    """Images (B, 64, 64, 3) in [-1, 1] -> the CellNet outputs with a (B, 9) leading shape."""
    crops = cell_crops(x)
    b = crops.shape[0]
    out = CellNet().apply({"params": params}, crops.reshape((b * GRID * GRID,) + crops.shape[2:]))
    return jax.tree.map(lambda a: a.reshape((b, GRID * GRID) + a.shape[1:]), out)


# --- ground truth ----------------------------------------------------------------------------
def scene_targets(scene: dict) -> dict:
    """Per-cell labels of a scene: presence (9,) and kind / color / size (9,), -1 where empty."""
    t = {"presence": np.zeros(GRID * GRID, np.float32)}
    t.update({name: np.full(GRID * GRID, -1, np.int32) for name in ATTRIBUTES})
    for o in scene["objects"]:
        cell = o["row"] * GRID + o["col"]
        t["presence"][cell] = 1.0
        t["kind"][cell] = shapes.KINDS.index(o["kind"])
        t["color"][cell] = shapes.COLOR_NAMES.index(o["color"])
        t["size"][cell] = shapes.SIZE_NAMES.index(o["size"])
    return t


def objects_targets(objects: Sequence[dict]) -> dict:
    """The same labels from a prompt's object list (dicts with kind, color, size, row, col)."""
    return scene_targets({"objects": list(objects)})


# --- reading images --------------------------------------------------------------------------
@dataclasses.dataclass
class Reading:
    """What the judge sees in a batch of images, per cell: presence (B, 9) bool, attributes (B, 9) int."""
    presence: np.ndarray
    kind: np.ndarray
    color: np.ndarray
    size: np.ndarray
    embedding: np.ndarray  # (B, 9, EMBED_DIM)
    presence_logit: np.ndarray  # (B, 9): how sure the judge is that a cell holds a shape

    def objects(self, i: int) -> list[dict]:
        """The shapes seen in image i, as the renderer's object dicts."""
        out = []
        for cell in np.flatnonzero(self.presence[i]):
            row, col = divmod(int(cell), GRID)
            out.append(dict(kind=shapes.KINDS[self.kind[i, cell]], color=shapes.COLOR_NAMES[self.color[i, cell]],
                            size=shapes.SIZE_NAMES[self.size[i, cell]], row=row, col=col))
        return out


class ShapesJudge:
    """Loads the trained CellNet and reads images; `features` gives the shapes-FID features."""

    def __init__(self, params):
        self.params = params
        self._apply = jax.jit(apply_cells)

    @classmethod
    def load(cls, path: str = DEFAULT_WEIGHTS) -> "ShapesJudge":
        if not os.path.exists(path):
            raise FileNotFoundError(f"no shapes classifier weights at {path}; train them with "
                                    "`python scripts/train_shapes_classifier.py --out=" + path + "`")
        return cls(load_params(path))

    def read(self, images, batch_size: int = 256) -> Reading:
        x = to_unit_float(images)
        parts = [jax.device_get(self._apply(self.params, jnp.asarray(x[i:i + batch_size])))
                 for i in range(0, len(x), batch_size)]
        out = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
        return Reading(presence=out["presence"] > 0, kind=out["kind"].argmax(-1), color=out["color"].argmax(-1),
                       size=out["size"].argmax(-1), embedding=out["embedding"], presence_logit=out["presence"])

    def features(self, images, batch_size: int = 256) -> np.ndarray:
        """(B, 9 * EMBED_DIM) float64 features for the shapes-FID."""
        r = self.read(images, batch_size)
        return r.embedding.reshape(len(r.embedding), -1).astype(np.float64)


# --- weights on disk -------------------------------------------------------------------------
def renderer_fingerprint() -> str:
    """A hash of the renderer's constants and of a few rendered scenes: weights are stale when it changes."""
    h = hashlib.sha256(repr((shapes.KINDS, shapes.COLORS, shapes.SIZES, shapes.POSITIONS)).encode())
    for i in range(4):
        h.update(shapes.render_example([99, i], RESOLUTION)["image"].tobytes())
    return h.hexdigest()[:16]


def save_params(path: str, params, meta: dict) -> None:
    """Atomically writes the flattened params and JSON-able metadata to an .npz file."""
    import json
    from flax import traverse_util
    flat = {"/".join(k): np.asarray(v, np.float32) for k, v in traverse_util.flatten_dict(params).items()}
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp-{os.getpid()}.npz"
    np.savez_compressed(tmp, __meta__=np.frombuffer(json.dumps(meta).encode(), np.uint8), **flat)
    os.replace(tmp, path)


def load_meta(path: str) -> dict:
    import json
    with np.load(path) as f:
        return json.loads(bytes(f["__meta__"]).decode())


def load_params(path: str):
    from flax import traverse_util
    with np.load(path) as f:
        flat = {tuple(k.split("/")): jnp.asarray(f[k]) for k in f.files if k != "__meta__"}
    return traverse_util.unflatten_dict(flat)


# --- training on the renderer's ground truth -------------------------------------------------
def render_batch(rng: np.random.Generator, n: int, augment: bool = True) -> tuple[np.ndarray, dict]:
    """n fresh random scenes: images (n, 64, 64, 3) in [-1, 1] and their per-cell targets."""
    from scipy import ndimage
    images, targets = [], []
    for _ in range(n):
        scene = shapes.sample_scene(rng)
        x = shapes.render_scene(scene, RESOLUTION)["image"].astype(np.float32) / 127.5 - 1.0
        if augment:
            # Generated images are softer and noisier than renders: blur and noise some of the batch.
            if rng.random() < 0.5:
                x = ndimage.gaussian_filter(x, sigma=(rng.uniform(0.3, 1.3),) * 2 + (0,))
            if rng.random() < 0.5:
                x = x + rng.normal(0.0, rng.uniform(0.01, 0.08), x.shape).astype(np.float32)
            x = np.clip(x * rng.uniform(0.92, 1.08) + rng.uniform(-0.06, 0.06), -1, 1)
        images.append(x)
        targets.append(scene_targets(scene))
    return np.stack(images), {k: np.stack([t[k] for t in targets]) for k in targets[0]}


def loss_fn(params, x, targets):
    """Presence BCE plus, on occupied cells, the attribute cross-entropies; and the mean accuracies."""
    import optax
    out = apply_cells(params, x)
    present = targets["presence"]
    loss = optax.sigmoid_binary_cross_entropy(out["presence"], present).mean()
    metrics = {"presence_acc": ((out["presence"] > 0) == (present > 0)).mean()}
    n = jnp.maximum(present.sum(), 1.0)
    for name in ATTRIBUTES:
        label = jnp.maximum(targets[name], 0)
        ce = optax.softmax_cross_entropy_with_integer_labels(out[name], label)
        loss = loss + (ce * present).sum() / n
        metrics[f"{name}_acc"] = ((out[name].argmax(-1) == label) * present).sum() / n
    return loss, dict(metrics, loss=loss)


def train(steps: int = 3000, batch_size: int = 32, lr: float = 2e-3, seed: int = 0, log_every: int = 250,
          log=print):
    """Trains CellNet on fresh renders (seeded stream [2, seed], disjoint from the dataset's splits)."""
    import optax
    rng = np.random.default_rng([2, seed])
    params = CellNet().init(jax.random.key(seed), jnp.zeros((1, CROP, CROP, 3)))["params"]
    sched = optax.warmup_cosine_decay_schedule(0.0, lr, min(200, steps // 10), steps, lr * 0.02)
    tx = optax.adamw(sched, weight_decay=1e-4)
    opt_state = tx.init(params)

    @jax.jit
    def step(params, opt_state, x, targets):
        (_, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, x, targets)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, metrics

    history = []
    for i in range(steps):
        x, targets = render_batch(rng, batch_size)
        params, opt_state, metrics = step(params, opt_state, x, targets)
        history.append(metrics)
        if (i + 1) % log_every == 0 or i + 1 == steps:
            mean = {k: float(np.mean([h[k] for h in history])) for k in history[0]}
            history = []
            log(f"classifier step {i + 1}/{steps}: " + ", ".join(f"{k}={v:.4f}" for k, v in sorted(mean.items())))
    return params


def accuracy_on_renders(judge: ShapesJudge, images, scenes) -> dict:
    """How often the judge reads rendered scenes right: per cell, per object attribute, per object, per image."""
    reading = judge.read(images)
    targets = [scene_targets(s) for s in scenes]
    t = {k: np.stack([x[k] for x in targets]) for k in targets[0]}
    present = t["presence"] > 0
    out = {"cells": float((reading.presence == present).mean())}
    right = present & reading.presence
    for name in ATTRIBUTES:
        ok = getattr(reading, name) == t[name]
        out[name] = float(ok[present].mean())
        right &= ok
    out["objects"] = float(right[present].mean())
    image_ok = (reading.presence == present).all(1) & (right | ~present).all(1)
    out["images"] = float(image_ok.mean())
    return out
