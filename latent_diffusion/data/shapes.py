"""The built-in synthetic "shapes" dataset: a pure numpy renderer and its TFDS builder.

Every scene holds 1-4 coloured shapes, each inside its own cell of a 3x3 grid, so
shapes never overlap and every position word names exactly one cell. Scene
parameters are sampled in normalized coordinates, independent of the resolution,
so the same (split, index) describes the same scene at 32, 64, 128 or 256 pixels.

Labels:
  object class = kind_index * len(COLORS) + color_index   (30 classes)
  'label'       = object class of the largest shape (ties: the first in the caption)
  'segmentation'= 0 for background, 1 + object class elsewhere (31 values)
"""

from __future__ import annotations

import dataclasses
import io
import os
import shutil
import uuid

import numpy as np
from PIL import Image
import tensorflow_datasets as tfds

KINDS = ("circle", "square", "triangle", "diamond", "star")
COLORS = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (235, 215, 40),
    "purple": (150, 60, 190),
    "orange": (245, 140, 30),
}
COLOR_NAMES = tuple(COLORS)
# Radius as a fraction of the image side; large shapes still fit inside one grid cell.
SIZES = {"small": 0.07, "medium": 0.11, "large": 0.15}
SIZE_NAMES = tuple(SIZES)
POSITIONS = (
    ("at the top left", "at the top", "at the top right"),
    ("on the left", "in the center", "on the right"),
    ("at the bottom left", "at the bottom", "at the bottom right"),
)
CLASS_NAMES = tuple(f"{c}_{k}" for k in KINDS for c in COLOR_NAMES)
NUM_CLASSES = len(CLASS_NAMES)
NUM_SEGMENTATION_CLASSES = NUM_CLASSES + 1
MAX_OBJECTS = 4
SPLIT_IDS = {"train": 0, "test": 1}
_SUPERSAMPLE = 2  # coverage from a 2x2 sub-pixel grid: cheap anti-aliasing


def object_class(kind: str, color: str) -> int:
    return KINDS.index(kind) * len(COLOR_NAMES) + COLOR_NAMES.index(color)


def _inside(kind: str, u: np.ndarray, v: np.ndarray, r: float) -> np.ndarray:
    """Boolean mask of points (u, v), relative to the shape centre, inside the shape."""
    if kind == "circle":
        return u * u + v * v <= r * r
    if kind == "square":
        h = 0.85 * r  # equal-area-ish with the circle, so sizes read the same
        return (np.abs(u) <= h) & (np.abs(v) <= h)
    if kind == "diamond":
        return np.abs(u) + np.abs(v) <= r
    if kind == "triangle":  # apex up, base at v = +r, base half-width r
        return (v <= r) & (np.abs(u) <= (v + r) / 2)
    if kind == "star":
        # Fold the angle into one half-spike, then test against the edge from the
        # outer tip (r, 0) to the inner vertex (0.45 r at 36 degrees).
        rho = np.hypot(u, v)
        phi = np.arctan2(u, -v)  # 0 points straight up
        sector = 2 * np.pi / 5
        phi = np.abs((phi + sector / 2) % sector - sector / 2)
        x, y = rho * np.cos(phi), rho * np.sin(phi)
        ix, iy = 0.45 * r * np.cos(sector / 2), 0.45 * r * np.sin(sector / 2)
        return (x - r) * iy - y * (ix - r) <= 0
    raise ValueError(f"unknown shape kind {kind!r}; expected one of {KINDS}")


def sample_scene(rng: np.random.Generator) -> dict:
    """Samples resolution-free scene parameters."""
    n = int(rng.integers(1, MAX_OBJECTS + 1))
    cells = rng.choice(9, size=n, replace=False)
    objects = []
    for cell in cells:
        row, col = divmod(int(cell), 3)
        size = SIZE_NAMES[int(rng.integers(len(SIZES)))]
        r = SIZES[size]
        slack = 1 / 6 - r - 0.005
        cy = (row + 0.5) / 3 + rng.uniform(-slack, slack)
        cx = (col + 0.5) / 3 + rng.uniform(-slack, slack)
        objects.append(
            dict(
                kind=KINDS[int(rng.integers(len(KINDS)))],
                color=COLOR_NAMES[int(rng.integers(len(COLORS)))],
                size=size,
                row=row,
                col=col,
                cy=cy,
                cx=cx,
                jitter=rng.integers(-12, 13, size=3),
            )
        )
    # Soft background: two low-saturation colours blended along a random direction.
    grey = rng.uniform(70, 190)
    bg = np.clip(grey + rng.uniform(-25, 25, size=(2, 3)), 0, 255)
    if rng.random() < 0.4:
        bg[1] = bg[0]  # plain background
    return dict(objects=objects, background=bg, angle=rng.uniform(0, 2 * np.pi))


def caption_of(objects: list[dict]) -> str:
    phrases = [f"a {o['size']} {o['color']} {o['kind']} {POSITIONS[o['row']][o['col']]}" for o in objects]
    if len(phrases) == 1:
        return phrases[0]
    return ", ".join(phrases[:-1]) + " and " + phrases[-1]


def render_scene(scene: dict, resolution: int) -> dict:
    """Rasterizes a scene into image, segmentation, boxes and labels."""
    res = int(resolution)
    centres = (np.arange(res, dtype=np.float32) + 0.5) / res
    yy, xx = np.meshgrid(centres, centres, indexing="ij")
    t = (np.cos(scene["angle"]) * (xx - 0.5) + np.sin(scene["angle"]) * (yy - 0.5)) + 0.5
    bg0, bg1 = scene["background"]
    image = bg0 + (bg1 - bg0) * np.clip(t, 0, 1)[..., None]
    seg = np.zeros((res, res), np.uint8)
    sub = (np.arange(_SUPERSAMPLE, dtype=np.float32) + 0.5) / (_SUPERSAMPLE * res)
    boxes, labels = [], []
    for o in scene["objects"]:
        r = SIZES[o["size"]]
        # Only rasterize the pixels of this shape's grid cell: shapes never leave it.
        y0, y1 = (int(np.floor(o["row"] * res / 3)), int(np.ceil((o["row"] + 1) * res / 3)))
        x0, x1 = (int(np.floor(o["col"] * res / 3)), int(np.ceil((o["col"] + 1) * res / 3)))
        py = (np.arange(y0, y1, dtype=np.float32) / res)[:, None] + sub[None, :]
        px = (np.arange(x0, x1, dtype=np.float32) / res)[:, None] + sub[None, :]
        v = py.reshape(-1)[:, None] - o["cy"]
        u = px.reshape(-1)[None, :] - o["cx"]
        inside = _inside(o["kind"], u, v, r).astype(np.float32)
        cover = inside.reshape(y1 - y0, _SUPERSAMPLE, x1 - x0, _SUPERSAMPLE).mean((1, 3))
        color = np.clip(np.asarray(COLORS[o["color"]]) + o["jitter"], 0, 255)
        region = image[y0:y1, x0:x1]
        image[y0:y1, x0:x1] = region + (color - region) * cover[..., None]
        mask = cover >= 0.5
        cls = object_class(o["kind"], o["color"])
        seg[y0:y1, x0:x1][mask] = 1 + cls
        rows, cols = np.nonzero(mask)
        if rows.size == 0:  # too small to own a pixel at this resolution: keep box at centre
            ymin = ymax = o["cy"]
            xmin = xmax = o["cx"]
        else:
            ymin, ymax = (y0 + rows.min()) / res, (y0 + rows.max() + 1) / res
            xmin, xmax = (x0 + cols.min()) / res, (x0 + cols.max() + 1) / res
        boxes.append((ymin, xmin, ymax, xmax))
        labels.append(cls)
    sizes = [SIZE_NAMES.index(o["size"]) for o in scene["objects"]]
    largest = int(np.argmax(sizes))  # argmax returns the first of equal sizes
    return {
        "image": np.clip(np.round(image), 0, 255).astype(np.uint8),
        "caption": caption_of(scene["objects"]),
        "label": labels[largest],
        "objects": {
            "bbox": np.asarray(boxes, np.float32).reshape(-1, 4),
            "label": np.asarray(labels, np.int64),
        },
        "segmentation": seg[..., None],
    }


def render_example(rng_or_seed, resolution: int = 64) -> dict:
    """Renders one example from a Generator or any np.random.default_rng seed."""
    rng = rng_or_seed if isinstance(rng_or_seed, np.random.Generator) else np.random.default_rng(rng_or_seed)
    return render_scene(sample_scene(rng), resolution)


def example_seed(split: str, index: int) -> list[int]:
    return [SPLIT_IDS[split], int(index)]


def _png(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array.squeeze(-1) if array.shape[-1] == 1 else array).save(
        buf, format="PNG", compress_level=1
    )
    return buf.getvalue()


@dataclasses.dataclass
class ShapesConfig(tfds.core.BuilderConfig):
    resolution: int = 64
    num_train: int = 5_000
    num_test: int = 500


def _config(name, resolution, num_train, num_test):
    return ShapesConfig(
        name=name,
        resolution=resolution,
        num_train=num_train,
        num_test=num_test,
        description=f"{resolution}x{resolution} images, {num_train} train / {num_test} test.",
    )


class Shapes(tfds.core.GeneratorBasedBuilder):
    """Synthetic scenes of 1-4 coloured shapes with captions, boxes and segmentation."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Initial release."}
    BUILDER_CONFIGS = [
        # Sizes keep each build to about five seconds on one CPU core.
        _config("64", 64, 5_000, 500),
        _config("32", 32, 5_000, 500),
        _config("128", 128, 3_000, 300),
        _config("256", 256, 1_000, 100),
        _config("tiny", 32, 64, 16),  # for tests and smoke runs
    ]
    DEFAULT_CONFIG_NAME = "64"

    # Nothing is downloaded, so no checksums file; this also keeps TFDS from looking
    # up its code path, which needs the optional `importlib_resources` package.
    @tfds.core.utils.classproperty
    @classmethod
    def _checksums_path(cls):
        return None

    def _info(self) -> tfds.core.DatasetInfo:
        res = self.builder_config.resolution
        cls = tfds.features.ClassLabel(names=CLASS_NAMES)
        return self.dataset_info_from_configs(
            description=(
                "Synthetic scenes of 1-4 non-overlapping shapes (circle, square, triangle, "
                "diamond, star) in 6 colours and 3 sizes, each in one cell of a 3x3 grid, "
                "on a plain or softly graded background. Each example has a caption built "
                "from size/colour/shape/position words, a class label (colour x shape of the "
                "largest shape, ties to the first mentioned), per-object boxes and labels, "
                "and a segmentation map (0 = background, 1 + object class). Deterministic: "
                "example i of a split is rendered from np.random.default_rng([split_id, i])."
            ),
            features=tfds.features.FeaturesDict(
                {
                    "image": tfds.features.Image(shape=(res, res, 3), encoding_format="png"),
                    "caption": tfds.features.Text(),
                    "label": cls,
                    "objects": tfds.features.Sequence(
                        {
                            "bbox": tfds.features.BBoxFeature(),
                            "label": tfds.features.ClassLabel(names=CLASS_NAMES),
                        }
                    ),
                    "segmentation": tfds.features.Image(shape=(res, res, 1), encoding_format="png"),
                }
            ),
            supervised_keys=("image", "label"),
            # Record i of a split is example i: the loader shuffles, and scenes stay indexable.
            disable_shuffling=True,
            homepage="https://arxiv.org/abs/2112.10752",
        )

    def _split_generators(self, dl_manager):
        del dl_manager
        cfg = self.builder_config
        return {
            "train": self._generate_examples("train", cfg.num_train),
            "test": self._generate_examples("test", cfg.num_test),
        }

    def _generate_examples(self, split, num):
        res = self.builder_config.resolution
        for i in range(num):
            ex = render_example(example_seed(split, i), res)
            # Encode PNGs here: TFDS would otherwise run a TF graph per image (much slower).
            ex["image"] = _png(ex["image"])
            ex["segmentation"] = _png(ex["segmentation"])
            yield i, ex


def default_data_dir() -> str:
    return os.path.expanduser(os.environ.get("TFDS_DATA_DIR", "~/tensorflow_datasets"))


def ensure_built(data_dir: str | None = None, config_name: str = "64") -> Shapes:
    """Returns the prepared builder, generating it first if missing.

    Safe to call from several processes sharing a POSIX data_dir: each builds into a
    private directory and renames it into place; a loser of the race keeps the winner's.
    """
    data_dir = os.path.expanduser(data_dir or default_data_dir())
    builder = Shapes(data_dir=data_dir, config=config_name, file_format="array_record")
    if builder.is_prepared():
        return builder
    tmp_root = os.path.join(data_dir, f".shapes-build-{uuid.uuid4().hex}")
    try:
        tmp = Shapes(data_dir=tmp_root, config=config_name, file_format="array_record")
        tmp.download_and_prepare(
            file_format="array_record", download_config=tfds.download.DownloadConfig(compute_stats="skip")
        )
        final = builder.data_dir
        os.makedirs(os.path.dirname(final), exist_ok=True)
        try:
            os.rename(tmp.data_dir, final)
        except OSError:
            if not os.path.isdir(final):
                raise
    finally:
        shutil.rmtree(tmp_root, ignore_errors=True)
    return Shapes(data_dir=data_dir, config=config_name, file_format="array_record")
