"""Pure numpy image helpers shared by the loader and the LDM tasks.

Resizing uses PIL. 'bicubic' (the default) and 'area' (PIL's BOX filter) both widen
their kernels when downsampling, so they antialias like the PIL/albumentations
pipelines of the LDM code base; 'nearest' is for label maps.
"""

from __future__ import annotations

import dataclasses
import re

import numpy as np
from PIL import Image

_PIL_METHODS = {
    "bicubic": Image.Resampling.BICUBIC,
    "area": Image.Resampling.BOX,
    "bilinear": Image.Resampling.BILINEAR,
    "nearest": Image.Resampling.NEAREST,
}


def to_float(image: np.ndarray) -> np.ndarray:
    """uint8 [0, 255] -> float32 [-1, 1]."""
    return np.asarray(image, np.float32) / 127.5 - 1.0


def to_uint8(image: np.ndarray) -> np.ndarray:
    """float [-1, 1] -> uint8 [0, 255], rounded and clipped."""
    return np.clip(np.round((np.asarray(image, np.float32) + 1.0) * 127.5), 0, 255).astype(np.uint8)


def resize(image: np.ndarray, height: int, width: int, method: str = "bicubic") -> np.ndarray:
    """Resizes an HWC (or HW) uint8 or float image with PIL; keeps dtype and rank."""
    if method not in _PIL_METHODS:
        raise ValueError(f"resize method {method!r} unknown; expected one of {sorted(_PIL_METHODS)}")
    image = np.asarray(image)
    if image.shape[:2] == (height, width):
        return image
    squeeze = image.ndim == 2
    if squeeze:
        image = image[..., None]
    resample = _PIL_METHODS[method]
    if image.dtype == np.uint8 and image.shape[-1] in (1, 3, 4):
        pil = Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image)
        out = np.asarray(pil.resize((width, height), resample))
        out = out.reshape(height, width, image.shape[-1])
    else:  # float (or odd channel counts): PIL's 32-bit float mode, one channel at a time
        chans = [
            np.asarray(
                Image.fromarray(np.asarray(image[..., c], np.float32), mode="F").resize(
                    (width, height), resample
                )
            )
            for c in range(image.shape[-1])
        ]
        out = np.stack(chans, -1).astype(image.dtype)
    return out[..., 0] if squeeze else out


@dataclasses.dataclass(frozen=True)
class CropPlan:
    """Resize an image to (height, width), then take the resolution^2 window at (top, left)."""

    height: int
    width: int
    top: int
    left: int
    resolution: int
    flip: bool = False


def plan_crop(
    h: int, w: int, resolution: int, rng: np.random.Generator | None = None, flip: bool = False
) -> CropPlan:
    """Shorter side to `resolution`, then a centre crop (rng=None) or a uniform random crop."""
    scale = resolution / min(h, w)
    nh, nw = max(resolution, round(h * scale)), max(resolution, round(w * scale))
    if rng is None:
        top, left = (nh - resolution) // 2, (nw - resolution) // 2
    else:
        top = int(rng.integers(0, nh - resolution + 1))
        left = int(rng.integers(0, nw - resolution + 1))
    return CropPlan(nh, nw, top, left, resolution, flip)


def apply_crop(image: np.ndarray, plan: CropPlan, method: str = "bicubic") -> np.ndarray:
    out = resize(image, plan.height, plan.width, method)
    r = plan.resolution
    out = out[plan.top : plan.top + r, plan.left : plan.left + r]
    return out[:, ::-1] if plan.flip else out


def crop_boxes(boxes: np.ndarray, plan: CropPlan) -> tuple[np.ndarray, np.ndarray]:
    """Maps normalized (ymin, xmin, ymax, xmax) boxes through a plan; also returns which survive."""
    boxes = np.asarray(boxes, np.float32).reshape(-1, 4)
    r = plan.resolution
    ys = (boxes[:, [0, 2]] * plan.height - plan.top) / r
    xs = (boxes[:, [1, 3]] * plan.width - plan.left) / r
    ys, xs = np.clip(ys, 0, 1), np.clip(xs, 0, 1)
    if plan.flip:
        xs = 1.0 - xs[:, ::-1]
    out = np.stack([ys[:, 0], xs[:, 0], ys[:, 1], xs[:, 1]], -1)
    keep = (out[:, 2] > out[:, 0]) & (out[:, 3] > out[:, 1])
    return out, keep


_MIRRORED_WORDS = {"left": "right", "right": "left", "Left": "Right", "Right": "Left", "LEFT": "RIGHT",
                   "RIGHT": "LEFT"}
_SIDE_WORD = re.compile(r"\b(left|right)\b", re.IGNORECASE)


def mirror_text(text: str) -> str:
    """The caption of a horizontally flipped image: the words 'left' and 'right' swapped.

    A flip that kept "a red circle on the left" under an image with the circle on the right would
    teach the model the opposite of its caption.
    """
    return _SIDE_WORD.sub(lambda m: _MIRRORED_WORDS.get(m.group(0), m.group(0)), text)


def center_crop(image: np.ndarray, resolution: int, method: str = "bicubic") -> np.ndarray:
    return apply_crop(image, plan_crop(*np.shape(image)[:2], resolution), method)


def random_crop(
    rng: np.random.Generator, image: np.ndarray, resolution: int, method: str = "bicubic"
) -> np.ndarray:
    return apply_crop(image, plan_crop(*np.shape(image)[:2], resolution, rng), method)


def lowres(image: np.ndarray, factor: int = 4) -> np.ndarray:
    """Bicubic downsample by `factor` (the paper's SR task uses 4), HWC or NHWC, any dtype."""
    image = np.asarray(image)
    if image.ndim == 4:
        return np.stack([lowres(x, factor) for x in image])
    h, w = image.shape[:2]
    if h % factor or w % factor:
        raise ValueError(f"lowres: image size {h}x{w} is not divisible by factor {factor}")
    return resize(image, h // factor, w // factor, "bicubic")


def _stroke(mask: np.ndarray, rng: np.random.Generator, yy, xx) -> None:
    """Draws a thick random polyline, like the free-form masks of LaMa / LDM inpainting."""
    h, w = mask.shape
    side = min(h, w)
    width = rng.uniform(0.05, 0.15) * side
    pts = [np.array([rng.uniform(0, h), rng.uniform(0, w)])]
    for _ in range(int(rng.integers(1, 6))):
        angle = rng.uniform(0, 2 * np.pi)
        length = rng.uniform(0.1, 0.4) * side
        pts.append(np.clip(pts[-1] + length * np.array([np.sin(angle), np.cos(angle)]), 0, [h - 1, w - 1]))
    for a, b in zip(pts[:-1], pts[1:]):
        d = b - a
        t = np.clip(((yy - a[0]) * d[0] + (xx - a[1]) * d[1]) / max(d @ d, 1e-6), 0, 1)
        dist2 = (yy - a[0] - t * d[0]) ** 2 + (xx - a[1] - t * d[1]) ** 2
        mask |= dist2 <= (width / 2) ** 2


def random_inpaint_mask(
    rng: np.random.Generator, h: int, w: int, max_boxes: int = 3, max_strokes: int = 4
) -> np.ndarray:
    """Random boxes and thick strokes; float32 (h, w, 1) with 1 = region to fill, 0 = keep."""
    yy, xx = np.meshgrid(np.arange(h) + 0.5, np.arange(w) + 0.5, indexing="ij")
    mask = np.zeros((h, w), bool)
    n_boxes = int(rng.integers(0, max_boxes + 1))
    n_strokes = int(rng.integers(0 if n_boxes else 1, max_strokes + 1))
    for _ in range(n_boxes):
        bh, bw = int(rng.uniform(0.1, 0.5) * h) + 1, int(rng.uniform(0.1, 0.5) * w) + 1
        top, left = int(rng.integers(0, h - bh + 1)), int(rng.integers(0, w - bw + 1))
        mask[top : top + bh, left : left + bw] = True
    for _ in range(n_strokes):
        _stroke(mask, rng, yy, xx)
    return mask.astype(np.float32)[..., None]


def one_hot_segmentation(seg: np.ndarray, num_classes: int) -> np.ndarray:
    """Class map (..., H, W) or (..., H, W, 1) -> float32 one-hot (..., H, W, num_classes)."""
    seg = np.asarray(seg)
    if seg.ndim >= 3 and seg.shape[-1] == 1:
        seg = seg[..., 0]
    if seg.size and (seg.min() < 0 or seg.max() >= num_classes):
        raise ValueError(
            f"segmentation values must lie in [0, {num_classes}); " f"got [{seg.min()}, {seg.max()}]"
        )
    return np.eye(num_classes, dtype=np.float32)[seg]
