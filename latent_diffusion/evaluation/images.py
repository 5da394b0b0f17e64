"""Image sets for evaluation: folders of PNG/JPEG, sample.py output, .npz arrays, TFDS splits.

Every source yields uint8 NHWC RGB batches of one size. Grayscale / RGBA / palette images are
converted to RGB (and counted); mixed sizes are an error unless `image_size` is given, in which
case images of another size are center-cropped and resized (PIL bicubic, as ADM's reference
batches are made) and counted.
"""
from __future__ import annotations

import concurrent.futures
import copy
import dataclasses
import json
import logging
import os
from typing import Iterator, Sequence

import numpy as np

log = logging.getLogger(__name__)
IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
LOSSY_EXTS = (".jpg", ".jpeg", ".webp")
MANIFEST = "manifest.jsonl"
# sample.py writes `file` (relative to the folder); the others are accepted for hand-made manifests.
_MANIFEST_KEYS = ("file", "path", "filename", "image")


@dataclasses.dataclass
class SetInfo:
    """What was read, for the report: counts of converted / resized images and warnings."""
    description: str
    num_images: int = 0
    resolution: tuple[int, int] | None = None
    converted_to_rgb: int = 0
    resized: int = 0
    warnings: list[str] = dataclasses.field(default_factory=list)

    def warn(self, msg: str) -> None:
        log.warning(msg)
        self.warnings.append(msg)


def center_crop_resize(img, size: int):
    """PIL image -> size x size: center square crop, then bicubic resize."""
    from PIL import Image
    w, h = img.size
    s = min(w, h)
    left, top = (w - s) // 2, (h - s) // 2
    return img.crop((left, top, left + s, top + s)).resize((size, size), Image.BICUBIC)


def _to_rgb_array(img, image_size: int | None, where: str) -> np.ndarray:
    if img.mode != "RGB":
        img = img.convert("RGB")  # counted from the headers in the scan; RGBA drops alpha
    if image_size is not None and img.size != (image_size, image_size):
        img = center_crop_resize(img, image_size)
    arr = np.asarray(img, dtype=np.uint8)
    if arr.ndim != 3 or arr.shape[2] != 3:
        raise ValueError(f"{where}: could not convert the image to RGB (got array shape {arr.shape})")
    return arr


class ImageSet:
    """A finite set of images with a known count, read batch by batch."""
    info: SetInfo

    def __len__(self) -> int:
        return self.info.num_images

    def batches(self, batch_size: int) -> Iterator[np.ndarray]:
        raise NotImplementedError

    def slice(self, start: int, stop: int) -> "ImageSet":
        """Images [start, stop) as a set of their own (one host's share); `info` is shared."""
        raise NotImplementedError


class ArraySet(ImageSet):
    """Images already in memory (an .npz `arr_0`, an ADM reference batch)."""

    def __init__(self, images: np.ndarray, description: str, image_size: int | None = None):
        images = np.asarray(images)
        if images.dtype != np.uint8:
            raise ValueError(f"{description}: expected uint8 images (N, H, W, 3), got dtype {images.dtype}. "
                             "Save samples as uint8 in [0, 255].")
        if images.ndim == 3:  # (N, H, W) grayscale
            images = images[..., None]
        if images.ndim != 4 or images.shape[-1] not in (1, 3, 4):
            raise ValueError(f"{description}: expected NHWC images with 1, 3 or 4 channels, got {images.shape}")
        self.info = SetInfo(description, num_images=len(images))
        if images.shape[-1] != 3:
            self.info.converted_to_rgb = len(images)
            self.info.warn(f"{description}: {len(images)} images with {images.shape[-1]} channel(s) "
                           "converted to RGB")
            images = np.repeat(images, 3, axis=-1) if images.shape[-1] == 1 else images[..., :3]
        if image_size is not None and images.shape[1:3] != (image_size, image_size):
            from PIL import Image
            self.info.resized = len(images)
            self.info.warn(f"{description}: {len(images)} images of {images.shape[1]}x{images.shape[2]} "
                           f"center-cropped and resized to {image_size}x{image_size}")
            images = np.stack([np.asarray(center_crop_resize(Image.fromarray(im), image_size)) for im in images])
        self.info.resolution = tuple(images.shape[1:3])
        self.images = images

    def batches(self, batch_size):
        for start in range(0, len(self.images), batch_size):
            yield self.images[start:start + batch_size]

    def slice(self, start, stop):
        part = copy.copy(self)
        part.images = self.images[start:stop]
        return part

    def __len__(self):
        return len(self.images)


class FileSet(ImageSet):
    """Image files; headers are scanned first so size / mode problems show before any compute."""

    def __init__(self, paths: Sequence[str], description: str, image_size: int | None = None,
                 role: str = "samples", num_workers: int = 8):
        from PIL import Image
        self.paths, self.image_size, self.num_workers = list(paths), image_size, num_workers
        self.info = SetInfo(description, num_images=len(self.paths))
        sizes: dict[tuple[int, int], str] = {}
        for p in self.paths:
            try:
                with Image.open(p) as im:
                    w, h = im.size
                    mode = im.mode
            except Exception as e:
                raise ValueError(f"cannot read image {p}: {e}. Remove or replace the file.") from e
            sizes.setdefault((h, w), p)
            self.info.converted_to_rgb += mode != "RGB"
        if self.info.converted_to_rgb:
            self.info.warn(f"{description}: {self.info.converted_to_rgb} non-RGB images (grayscale/RGBA/palette) "
                           "converted to RGB")
        if image_size is None:
            if len(sizes) > 1:
                examples = ", ".join(f"{h}x{w} ({p})" for (h, w), p in list(sizes.items())[:4])
                raise ValueError(f"{description}: images have {len(sizes)} different sizes: {examples}. "
                                 "Use images of one size, or pass --image_size=N to center-crop and resize them.")
            self.info.resolution = next(iter(sizes), None)
        else:
            self.info.resolution = (image_size, image_size)
            self.info.resized = sum(1 for p in self.paths if self._size_of(p) != (image_size, image_size))
            if self.info.resized:
                self.info.warn(f"{description}: {self.info.resized} images center-cropped and resized to "
                               f"{image_size}x{image_size}")
        lossy = sum(1 for p in self.paths if p.lower().endswith(LOSSY_EXTS))
        if lossy and role == "samples":
            self.info.warn(f"{description}: {lossy} samples are JPEG/WebP; lossy compression changes FID "
                           "(save samples as PNG for comparable numbers)")

    @staticmethod
    def _size_of(path):
        from PIL import Image
        with Image.open(path) as im:
            return im.size[1], im.size[0]

    def _load(self, path):
        from PIL import Image
        with Image.open(path) as im:
            return _to_rgb_array(im, self.image_size, path)

    def __len__(self):
        return len(self.paths)

    def slice(self, start, stop):
        part = copy.copy(self)
        part.paths = self.paths[start:stop]
        return part

    def batches(self, batch_size):
        chunks = [self.paths[i:i + batch_size] for i in range(0, len(self.paths), batch_size)]
        with concurrent.futures.ThreadPoolExecutor(self.num_workers) as pool:
            pending = [pool.submit(self._load, p) for p in chunks[0]] if chunks else []
            for i in range(len(chunks)):
                current = pending
                if i + 1 < len(chunks):  # decode the next batch while this one is on the device
                    pending = [pool.submit(self._load, p) for p in chunks[i + 1]]
                yield np.stack([f.result() for f in current])


def read_manifest(folder: str) -> list[dict] | None:
    """sample.py's manifest.jsonl entries in file order, each with `path` resolved; None without one."""
    manifest = os.path.join(folder, MANIFEST)
    if not os.path.isfile(manifest):
        return None
    entries, seen = [], {}
    with open(manifest, encoding="utf-8") as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                entry = json.loads(line)
            except ValueError as e:
                raise ValueError(f"{manifest}:{line_no}: not a JSON line ({e}); a sampling job that is still "
                                 "running or was killed rewrites it when rerun to completion") from None
            key = next((k for k in _MANIFEST_KEYS if isinstance(entry.get(k), str)), None)
            if key is None:
                raise ValueError(f"{manifest}:{line_no}: no image file name (expected one of {_MANIFEST_KEYS})")
            p = entry[key] if os.path.isabs(entry[key]) else os.path.join(folder, entry[key])
            if not os.path.isfile(p):
                raise FileNotFoundError(f"{manifest}:{line_no}: listed image {p} does not exist "
                                        "(is the sampling job still running?)")
            if p in seen:
                raise ValueError(f"{manifest}:{line_no}: image {p} is listed twice (first on line {seen[p]}); "
                                 "rerun the sampling job to rebuild the manifest")
            seen[p] = line_no
            entries.append(dict(entry, path=p))
    return entries


def list_images(folder: str) -> list[str]:
    """Image files of a folder (recursive, sorted); sample.py's manifest.jsonl order if present."""
    entries = read_manifest(folder)
    if entries is not None:
        return [e["path"] for e in entries]
    paths = []
    for root, dirs, files in os.walk(folder):
        dirs.sort()
        paths += [os.path.join(root, f) for f in sorted(files)
                  if f.lower().endswith(IMAGE_EXTS) and not f.startswith(".")]
    return paths


def prompts_of(spec: str) -> list[str]:
    """The prompt of every image of `spec`, in the order open_image_set reads them.

    A folder needs sample.py's manifest.jsonl; an .npz (sample.py's samples.npz, ordered by
    index) uses the manifest.jsonl beside it, sorted by index.
    """
    folder = spec if os.path.isdir(spec) else os.path.dirname(os.path.abspath(spec))
    entries = read_manifest(folder)
    if entries is None:
        raise ValueError(f"CLIP score needs the prompt of every image: {spec} has no {MANIFEST} "
                         f"(evaluate a sample.py output folder, or write one JSON line per image with "
                         "'file' and 'prompt')")
    if not os.path.isdir(spec):
        if any(not isinstance(e.get("index"), int) for e in entries):
            raise ValueError(f"{folder}/{MANIFEST}: every line needs an integer 'index' to pair prompts "
                             f"with the images of {spec}")
        entries = sorted(entries, key=lambda e: e["index"])
    missing = [e["path"] for e in entries if not isinstance(e.get("prompt"), str)]
    if missing:
        raise ValueError(f"{folder}/{MANIFEST}: {len(missing)} image(s) have no 'prompt' (first: {missing[0]}); "
                         "CLIP score needs text-conditional samples")
    return [e["prompt"] for e in entries]


class TFDSSet(ImageSet):
    """A TFDS split's `image` feature, e.g. `tfds:cifar10/train`."""

    def __init__(self, spec: str, image_size: int | None = None, data_dir: str | None = None):
        import tensorflow_datasets as tfds
        name, _, split = spec.partition("/")
        if not name or not split:
            raise ValueError(f"TFDS reference must look like tfds:NAME/SPLIT (e.g. tfds:cifar10/train), got {spec!r}")
        try:
            builder = tfds.builder(name, data_dir=data_dir)
            self.ds = builder.as_dataset(split=split, shuffle_files=False)
        except Exception as e:  # not prepared, unknown name or split
            raise ValueError(f"cannot open tfds:{spec} ({type(e).__name__}: {e}). Prepare it first "
                             "(tfds build NAME) and pass --tfds_data_dir if it is not in the default place.") from e
        self.image_size = image_size
        count = int(self.ds.cardinality().numpy())
        if count < 0:
            raise ValueError(f"tfds:{spec}: unknown number of examples; use a prepared, finite split")
        self.info = SetInfo(f"tfds:{spec}", num_images=count)
        if "image" not in builder.info.features:
            raise ValueError(f"tfds:{spec} has no 'image' feature (features: {list(builder.info.features)})")
        shape = builder.info.features["image"].shape
        if shape[0] and shape[1]:
            self.info.resolution = (image_size, image_size) if image_size else (shape[0], shape[1])
        elif image_size is None:
            raise ValueError(f"tfds:{spec} has images of varying size; pass --image_size=N to center-crop and "
                             "resize them")
        else:
            self.info.resolution = (image_size, image_size)

    def batches(self, batch_size):
        import tensorflow_datasets as tfds
        from PIL import Image
        batch, converted = [], 0
        for ex in tfds.as_numpy(self.ds):
            img = ex["image"]
            converted += img.shape[-1] != 3
            batch.append(_to_rgb_array(Image.fromarray(img.squeeze(-1) if img.shape[-1] == 1 else img),
                                       self.image_size, self.info.description))
            if len(batch) == batch_size:
                yield np.stack(batch)
                batch = []
        if batch:
            yield np.stack(batch)
        # Counted once, at the end of the first full pass (a set may be read for several metrics).
        if converted and not self.info.converted_to_rgb:
            self.info.converted_to_rgb = converted
            self.info.warn(f"{self.info.description}: {converted} non-RGB images converted to RGB")

    def slice(self, start, stop):
        part = copy.copy(self)
        part.ds = self.ds.skip(start).take(stop - start)
        return part


def open_image_set(spec: str, role: str, image_size: int | None = None,
                   tfds_data_dir: str | None = None) -> ImageSet:
    """A folder, an .npz with `arr_0`, or `tfds:name/split` -> ImageSet."""
    if spec.startswith("tfds:"):
        return TFDSSet(spec[len("tfds:"):], image_size, tfds_data_dir)
    if os.path.isdir(spec):
        paths = list_images(spec)
        if not paths:
            raise ValueError(f"no images ({', '.join(IMAGE_EXTS)}) found in folder {spec}")
        return FileSet(paths, f"{role} {spec}", image_size, role)
    if spec.endswith(".npz") and os.path.isfile(spec):
        with np.load(spec, allow_pickle=False) as data:
            if "arr_0" not in data.files:
                raise ValueError(f"{spec}: expected images as 'arr_0' (uint8 NHWC), found arrays {data.files}")
            images = data["arr_0"]
        return ArraySet(images, f"{role} {spec}", image_size)
    raise FileNotFoundError(f"{role}: {spec!r} is not a folder of images, an .npz file or tfds:NAME/SPLIT")
