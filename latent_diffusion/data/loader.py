"""Grain input pipeline over any TFDS image dataset prepared as array_record.

Pipeline: TFDS random-access source -> global shuffle (reshuffled every epoch) -> repeat ->
decode + crop/flip (threads, or data.num_workers processes) -> this process's slice of every global batch -> extra
transforms -> drop corrupt records (counted) -> batch.

Batches are host-local: a leading dim of global_batch_size // process_count.
  'image'        float32 (B, R, R, 3) in [-1, 1]
  text features  numpy object arrays of str
  image-valued features other than the image (e.g. 'segmentation'): uint8, cropped
                 and flipped with the image (nearest resize)
  sequence features (e.g. 'objects'): each leaf padded to max_objects, plus a bool
                 'mask'; a 'bbox' leaf is mapped through the same crop and flip
  everything else: stacked numpy arrays (ints as int32)
The returned iterator is a grain DatasetIterator: get_state()/set_state() and
grain.checkpoint.CheckpointSave/CheckpointRestore resume it exactly, and its
`skipped` attribute counts the corrupt records dropped so far.

With data.latents_dir set, batches come from stored first-stage latents instead (see
latents.py): the same examples and flips, with 'z_mean'/'z_std' (or 'z') in place of 'image'.
"""

from __future__ import annotations

import io
import json
import logging
import os
from typing import Any, Callable, Sequence

import grain
import numpy as np
from PIL import Image

from latent_diffusion import config_fields
from latent_diffusion.data import preprocess

CORRUPT = "_corrupt"  # the key of a record that is dropped and counted (latents.py marks its own with it too)
_SKIPPED = "_skipped"
_BY_CAUSE = "_skipped_by_cause"
_SHARD = "_shard"
_MIN_RECORDS_FOR_FRACTION = 256  # data.max_bad_fraction is judged after this many records


def _fmt_causes(by_cause: dict) -> str:
    return ", ".join(f"{k} {v}" for k, v in sorted(by_cause.items()))


def settings(data_cfg) -> dict:
    """config.data (or a dict of some of its fields) as a checked dict of all of them (config_fields.DATA)."""
    cfg = config_fields.section(data_cfg, config_fields.DATA, "data")
    if cfg["resolution"] is not None and int(cfg["resolution"]) <= 0:
        raise ValueError(f"data.resolution must be a positive int or None, got {cfg['resolution']}")
    if cfg["resize_method"] not in ("bicubic", "area", "bilinear"):
        raise ValueError(f"data.resize_method must be 'bicubic', 'area' or 'bilinear', got {cfg['resize_method']!r}")
    cfg["keys"] = tuple(cfg["keys"] or ())
    return cfg


def _open_builder(cfg):
    """Returns a prepared TFDS builder, or raises saying how to prepare it."""
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
    from latent_diffusion.data import shapes  # pylint: disable=g-import-not-at-top

    name, config = cfg["name"], cfg["config"]
    if name == "shapes" or name.startswith("shapes/"):
        if "/" in name:
            config = name.split("/", 1)[1]
        if config is None:
            res = cfg["resolution"]
            config = str(res) if res in (32, 64, 128, 256) else shapes.Shapes.DEFAULT_CONFIG_NAME
        return shapes.ensure_built(cfg["data_dir"], config)
    data_dir = os.path.expanduser(cfg["data_dir"]) if cfg["data_dir"] else None
    where = f"data_dir '{data_dir}'" if data_dir else "the default TFDS data_dir"
    how = (
        f"Prepare it first, e.g. `tfds build {name} --data_dir="
        f"{data_dir or '~/tensorflow_datasets'} --file_format=array_record`, or point "
        f"data.data_dir at the directory where it is prepared; this loader never downloads."
    )
    kwargs = {"data_dir": data_dir}
    if config is not None:
        kwargs["config"] = config
    if cfg["version"] is not None:
        kwargs["version"] = cfg["version"]
    try:
        builder = tfds.builder(name, **kwargs)
    except Exception as e:  # TFDS raises several types for unknown or absent datasets
        raise FileNotFoundError(
            f"Dataset '{name}' was not found in {where} ({type(e).__name__}: {e}). {how}"
        ) from e
    if not builder.is_prepared():
        raise FileNotFoundError(
            f"Dataset '{name}' is not prepared in {where}: expected its files under "
            f"'{builder.data_dir}'. {how}"
        )
    return builder


def _is_image_feature(feature) -> bool:
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

    return isinstance(feature, tfds.features.Image)


def _is_text_feature(feature) -> bool:
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

    return isinstance(feature, tfds.features.Text)


def _decode_image(value, rgb: bool, min_side: int | None = None) -> np.ndarray:
    """Encoded bytes (or an already decoded array) -> uint8 HWC; RGB when `rgb`.

    `min_side`: a JPEG whose shorter side is at least twice this is decoded at the largest of libjpeg's
    1/2, 1/4, 1/8 scales that keeps its shorter side >= min_side (PIL's draft mode: the DCT is scaled,
    so the decode does a fraction of the work); other formats decode at full size.
    """
    if isinstance(value, np.ndarray) and value.dtype != object:
        array = value if value.ndim == 3 else value[..., None]
        if rgb and array.shape[-1] == 1:
            array = np.repeat(array, 3, -1)
        return array[..., :3] if rgb else array
    with Image.open(io.BytesIO(bytes(value))) as pil:
        if min_side and pil.format == "JPEG" and min(pil.size) >= 2 * min_side:
            # draft() picks the smallest scale whose size is >= the request in both dimensions.
            w, h = pil.size
            s = min_side / min(w, h)
            pil.draft(None, (max(1, int(np.ceil(w * s))), max(1, int(np.ceil(h * s)))))
        pil.load()  # truncated / corrupt payloads fail here, not later
        if pil.mode in ("I;16", "I;16B", "I;16L", "I"):
            # 16-bit (and 32-bit integer) greyscale: PIL's convert would clip every level above 255 to white.
            wide = np.asarray(pil, np.uint32 if pil.mode == "I" else np.uint16)
            shift = 8 if pil.mode != "I" or wide.max() < 65536 else 24
            pil = Image.fromarray((wide >> shift).astype(np.uint8), mode="L")
        if rgb and pil.mode != "RGB":
            pil = pil.convert("RGB")  # grayscale, palette, CMYK; RGBA drops its alpha
        array = np.asarray(pil)
    return array if array.ndim == 3 else array[..., None]


class ExampleDecoder:
    """Decodes, crops and flips one record (a random map for grain); marks it corrupt instead of raising."""

    def __init__(self, cfg, features):
        self.cfg = cfg
        self.features = features

    def _pad_sequence(self, key, value, plan):
        n_max = self.cfg["max_objects"]
        spec = self.features[key].feature  # FeaturesDict inside tfds Sequence
        out = {}
        n = None
        for sub, leaf in value.items():
            shape = tuple(spec[sub].shape)
            arr = np.asarray(leaf, spec[sub].np_dtype).reshape((-1,) + shape)
            n = arr.shape[0] if n is None else n
            out[sub] = arr
        n = n or 0
        mask = np.ones((n,), bool)
        if "bbox" in out and plan is not None:
            out["bbox"], keep = preprocess.crop_boxes(out["bbox"], plan)
            mask &= keep
        padded = {}
        for sub, arr in out.items():
            arr = arr[:n_max]
            if arr.dtype == np.int64:
                arr = arr.astype(np.int32)
            pad = np.zeros((n_max - arr.shape[0],) + arr.shape[1:], arr.dtype)
            padded[sub] = np.concatenate([arr, pad])
        padded["mask"] = np.concatenate([mask[:n_max], np.zeros(n_max - min(n, n_max), bool)])
        return padded

    def __call__(self, record: dict, rng: np.random.Generator) -> dict:
        # Draw both numbers every time so the random stream does not depend on settings.
        crop_rng = np.random.default_rng(rng.integers(2**63))
        flip = bool(rng.random() < 0.5) and self.cfg["random_flip"]
        return self.decode(record, flip, crop_rng)

    def decode(self, record: dict, flip: bool, crop_rng: np.random.Generator | None = None) -> dict:
        cfg = self.cfg
        if "_read_error" in record:  # a record the source could not read (data/sources.py)
            return {CORRUPT: record["_read_error"], _SHARD: record.get("shard", "")}
        try:
            res = cfg["resolution"]
            image = _decode_image(record[cfg["image_key"]], rgb=True,
                                  min_side=int(res) if res is not None and cfg["jpeg_draft"] else None)
            plan = None
            if cfg["resolution"] is not None:
                plan = preprocess.plan_crop(
                    image.shape[0],
                    image.shape[1],
                    int(cfg["resolution"]),
                    crop_rng if cfg["random_crop"] else None,
                    flip,
                )
                image = preprocess.apply_crop(image, plan, cfg["resize_method"])
            elif flip:
                plan = preprocess.CropPlan(*image.shape[:2], 0, 0, image.shape[0], True)
                image = image[:, ::-1]
            out = {"image": preprocess.to_float(image)}
            for key in cfg["keys"]:
                feature, value = self.features[key], record[key]
                if _is_image_feature(feature):
                    label_map = _decode_image(value, rgb=False)
                    out[key] = (
                        preprocess.apply_crop(label_map, plan, "nearest") if plan is not None else label_map
                    )
                elif _is_text_feature(feature):
                    text = value.decode("utf-8") if isinstance(value, bytes) else str(value)
                    out[key] = preprocess.mirror_text(text) if flip else text
                elif isinstance(value, dict):
                    out[key] = self._pad_sequence(key, value, plan)
                else:
                    arr = np.asarray(value)
                    out[key] = arr.astype(np.int32) if arr.dtype == np.int64 else arr
            return out
        except Exception as e:  # pylint: disable=broad-except
            where = f" ({record['shard']} key {record.get('key')})" if "shard" in record else ""
            return {CORRUPT: f"{type(e).__name__}: {e}{where}", _SHARD: record.get("shard", "")}


def _skip_corrupt(transform):
    """Runs a user transform only on good records."""
    if hasattr(transform, "random_map"):
        return (lambda x, rng: x if CORRUPT in x else transform.random_map(x, rng)), True
    fn = transform.map if hasattr(transform, "map") else transform
    return (lambda x: x if CORRUPT in x else fn(x)), False


class _DropCorruptDataset(grain.IterDataset):

    def __init__(self, parent, name: str):
        super().__init__(parent)
        self._name = name

    def __iter__(self):
        return _DropCorruptIterator(self._parent.__iter__(), self._name)


class _DropCorruptIterator(grain.DatasetIterator):
    """Drops records marked corrupt; the running count is checkpointed with the state."""

    def __init__(self, parent, name: str):
        super().__init__(parent)
        self._name = name
        self._skipped = 0
        self._by_cause: dict[str, int] = {}
        self._by_shard: dict[str, int] = {}

    def __next__(self):
        while True:
            element = next(self._parent)
            if CORRUPT not in element:
                element[_SKIPPED] = np.int64(self._skipped)
                element[_BY_CAUSE] = json.dumps([self._by_cause, self._by_shard])  # a str collates
                return element
            self._skipped += 1
            cause = element[CORRUPT].split(":", 1)[0]
            self._by_cause[cause] = self._by_cause.get(cause, 0) + 1
            if element.get(_SHARD):
                self._by_shard[element[_SHARD]] = self._by_shard.get(element[_SHARD], 0) + 1
            if self._skipped in (1, 10) or self._skipped % 100 == 0:  # rate-limited
                logging.warning("dataset %s: skipped %d corrupt or unusable record(s) so far (%s); latest: %s",
                                self._name,
                                self._skipped, _fmt_causes(self._by_cause), element[CORRUPT])

    def get_state(self):
        return {"parent": self._parent.get_state(), "skipped": self._skipped, "by_cause": dict(self._by_cause),
                "by_shard": dict(self._by_shard)}

    def set_state(self, state):
        self._parent.set_state(state["parent"])
        self._skipped = int(state["skipped"])
        self._by_cause = {str(k): int(v) for k, v in state.get("by_cause", {}).items()}
        self._by_shard = {str(k): int(v) for k, v in state.get("by_shard", {}).items()}


class _HostSlice(grain.MapDataset):
    """This process's part of each global batch: elements [p*L, (p+1)*L) of every batch of B.

    Only whole global batches are kept; a final partial batch is dropped.
    """

    def __init__(self, parent, global_batch: int, process_index: int, process_count: int):
        super().__init__(parent)
        self._global = global_batch
        self._local = global_batch // process_count
        self._offset = process_index * self._local

    def __len__(self):
        return (len(self._parent) // self._global) * self._local

    def __getitem__(self, index):
        if isinstance(index, slice):
            return self.slice(index)
        step, i = divmod(index, self._local)
        return self._parent[step * self._global + self._offset + i]


def _collate(elements: Sequence[Any]):
    first = elements[0]
    if isinstance(first, dict):
        return {k: _collate([e[k] for e in elements]) for k in first}
    if isinstance(first, str):
        return np.array(list(elements), dtype=object)
    return np.stack([np.asarray(e) for e in elements])


class TooManyBadRecords(RuntimeError):
    """More than data.max_bad_fraction of the records read so far could not be used."""


class LoaderIterator(grain.DatasetIterator):
    """Host-local batch iterator. `skipped` counts the bad records dropped so far, `skipped_by_cause`
    and `skipped_by_shard` break that count down; past `max_bad_fraction` of the records read
    (judged after a few hundred) it stops with TooManyBadRecords naming the worst shards."""

    def __init__(self, parent: grain.DatasetIterator, name: str = "", max_bad_fraction: float = 1.0,
                 process_count: int = 1, num_workers: int = 0):
        super().__init__(parent)
        self._name, self._max_bad, self._process_count = name, float(max_bad_fraction), int(process_count)
        self._num_workers = int(num_workers)
        self.skipped, self.delivered = 0, 0
        self.skipped_by_cause: dict[str, int] = {}
        self.skipped_by_shard: dict[str, int] = {}

    def __next__(self) -> dict:
        batch = next(self._parent)
        self.skipped = int(batch.pop(_SKIPPED)[-1])
        self.skipped_by_cause, self.skipped_by_shard = json.loads(batch.pop(_BY_CAUSE)[-1])
        self.delivered += len(_first_leaf(batch))
        seen = self.skipped + self.delivered
        if seen >= _MIN_RECORDS_FOR_FRACTION and self.skipped > self._max_bad * seen:
            worst = sorted(self.skipped_by_shard.items(), key=lambda kv: -kv[1])[:5]
            raise TooManyBadRecords(
                f"dataset {self._name}: {self.skipped} of {seen} records read so far were bad "
                f"({_fmt_causes(self.skipped_by_cause)}), above data.max_bad_fraction={self._max_bad}; "
                f"worst shards: {', '.join(f'{s} ({n})' for s, n in worst) or 'unknown'}. Remove or "
                "re-download those shards, or raise --config.data.max_bad_fraction.")
        return batch

    def get_state(self):
        return {"pipeline": self._parent.get_state(), "process_count": self._process_count,
                "num_workers": self._num_workers,
                "skipped": self.skipped, "delivered": self.delivered,
                "skipped_by_cause": dict(self.skipped_by_cause), "skipped_by_shard": dict(self.skipped_by_shard)}

    def set_state(self, state):
        saved = int(state.get("process_count", self._process_count))
        if saved != self._process_count:
            # Each host's position is an index into its own slice of the global batches; another
            # host count slices differently, so the saved positions do not carry over.
            raise ValueError(f"dataset {self._name}: the checkpoint's data position was saved by {saved} "
                             f"process(es), this job has {self._process_count}; resume with {saved} hosts, "
                             "or train on in a new workdir")
        workers = int(state.get("num_workers", 0))
        if workers != self._num_workers:
            # Worker processes keep one position each; another worker count reads the stream in other parts.
            raise ValueError(f"dataset {self._name}: the checkpoint's data position was saved with "
                             f"data.num_workers={workers}, this run has {self._num_workers}; resume with "
                             f"--config.data.num_workers={workers}")
        self._parent.set_state(state["pipeline"])
        self.skipped, self.delivered = int(state["skipped"]), int(state.get("delivered", 0))
        self.skipped_by_cause = dict(state.get("skipped_by_cause", {}))
        self.skipped_by_shard = dict(state.get("skipped_by_shard", {}))


def _first_leaf(batch: dict):
    """Any one array of a batch (its leading dim is the batch size)."""
    value = next(iter(batch.values()))
    return _first_leaf(value) if isinstance(value, dict) else value


def make_dataset(
    data_cfg,
    split: str,
    *,
    global_batch_size: int,
    seed: int,
    shuffle: bool = True,
    num_epochs: int | None = None,
    extra_transforms: Sequence[Callable | Any] = (),
    process_index: int | None = None,
    process_count: int | None = None,
) -> LoaderIterator:
    """Returns a checkpointable iterator of host-local batches (see the module docstring).

    process_index / process_count default to JAX's; pass them to simulate other hosts.
    extra_transforms run per example after decoding, on float images in [-1, 1]: grain
    Map / RandomMap transforms, or plain callables element -> element.
    """
    if process_index is None or process_count is None:
        import jax  # pylint: disable=g-import-not-at-top

        process_index, process_count = jax.process_index(), jax.process_count()
    if global_batch_size % process_count:
        raise ValueError(
            f"global_batch_size {global_batch_size} must be divisible by the "
            f"number of processes {process_count}"
        )
    cfg = settings(data_cfg)
    if cfg["latents_dir"]:
        from latent_diffusion.data import latents  # pylint: disable=g-import-not-at-top

        return latents.make_dataset(cfg, split, global_batch_size=global_batch_size, seed=seed, shuffle=shuffle,
                                    num_epochs=num_epochs, extra_transforms=extra_transforms,
                                    process_index=process_index, process_count=process_count)
    name, features, source = open_source(cfg, split, process_index, process_count)
    return global_batches(source, ExampleDecoder(cfg, features), cfg, name, split,
                          global_batch_size=global_batch_size, seed=seed, shuffle=shuffle, num_epochs=num_epochs,
                          extra_transforms=extra_transforms, process_index=process_index,
                          process_count=process_count)


def global_batches(source, example_fn, cfg: dict, name: str, split: str, *, global_batch_size: int, seed: int,
                   shuffle: bool, num_epochs, extra_transforms, process_index: int,
                   process_count: int) -> LoaderIterator:
    """Batches of `example_fn(record, rng)` over `source` in one seeded global order.

    Shuffle, repeat and map in one global order, then give each process its contiguous slice of
    every global batch: the global batch, and so training, does not depend on the number of
    processes. Per-example randomness is keyed by the global index, so two sources of the same
    length (images, or their stored latents) get the same order and the same random numbers.
    """
    ds = grain.MapDataset.source(source)
    if len(ds) < global_batch_size and (cfg["drop_remainder"] or process_count > 1):
        raise ValueError(
            f"split '{split}' of '{name}' has {len(source)} examples, fewer "
            f"than one global batch of {global_batch_size}"
        )
    ds = ds.seed(seed)
    if shuffle:
        ds = ds.shuffle()
    ds = ds.repeat(num_epochs)
    ds = ds.random_map(example_fn)
    return batched(ds, cfg, name, global_batch_size=global_batch_size, extra_transforms=extra_transforms,
                   process_index=process_index, process_count=process_count)


def open_source(cfg: dict, split: str, process_index: int = 0, process_count: int = 1):
    """(name, features, random-access source) of a split, for every data.source; `cfg` as `settings`
    returns it. Files read in place (webdataset, parquet, folder) come from data/sources.py."""
    if cfg["source"] != "tfds":
        from latent_diffusion.data import sources  # pylint: disable=g-import-not-at-top

        if cfg["image_key"] != "image":
            raise ValueError(f"data.image_key={cfg['image_key']!r} names a TFDS feature; data.source="
                             f"{cfg['source']!r} finds the image itself (jpg/png/webp): leave it 'image'")
        source = sources.open_records(cfg, split, process_index, process_count)
        return f"{cfg['source']}:{split}", sources.features_of(source, cfg["keys"]), source
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

    builder = _open_builder(cfg)
    features = builder.info.features
    wanted = (cfg["image_key"],) + cfg["keys"]
    missing = [k for k in wanted if k not in features]
    if missing:
        raise KeyError(
            f"dataset '{builder.name}' has no feature(s) {missing}; its features are "
            f"{sorted(features.keys())} (set data.image_key / data.keys accordingly)"
        )
    if split not in builder.info.splits and split.split("[")[0] not in builder.info.splits:
        raise ValueError(
            f"dataset '{builder.name}' has no split '{split}'; it has "
            f"{sorted(builder.info.splits.keys())}"
        )
    decoders = {k: tfds.decode.SkipDecoding() for k in wanted if _is_image_feature(features[k])}
    try:
        source = builder.as_data_source(split, decoders=decoders)
    except NotImplementedError as e:
        raise ValueError(
            f"dataset '{builder.name}' in '{builder.data_dir}' is not stored in a random-access "
            "format; re-prepare it with `--file_format=array_record` (or convert it with "
            "`tfds convert_format --out_file_format=array_record`)."
        ) from e
    return builder.name, features, source


def batched(ds, cfg: dict, name: str, *, global_batch_size: int, extra_transforms, process_index: int,
            process_count: int) -> LoaderIterator:
    """The shared tail of the pipeline: host slice, extra transforms, drop corrupt records, batch."""
    if process_count > 1:
        ds = _HostSlice(ds, global_batch_size, process_index, process_count)
    for transform in extra_transforms:
        fn, is_random = _skip_corrupt(transform)
        ds = ds.random_map(fn) if is_random else ds.map(fn)
    read = grain.ReadOptions(
        num_threads=int(cfg["num_threads"]), prefetch_buffer_size=int(cfg["prefetch_buffer_size"])
    )
    it_ds = ds.to_iter_dataset(read)
    workers = int(cfg["num_workers"])
    if workers > 0:
        # Worker w decodes elements w, w + n, ... of the stream and the results are read back in turn,
        # so the order (and every batch) is the one of num_workers=0; the position is per worker.
        from absl import flags  # pylint: disable=g-import-not-at-top
        if not flags.FLAGS.is_parsed():  # grain reads its absl flags; a library caller may not have parsed any
            flags.FLAGS.mark_as_parsed()
        it_ds = it_ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=workers))
    it_ds = _DropCorruptDataset(it_ds, name)
    it_ds = it_ds.batch(global_batch_size // process_count, drop_remainder=bool(cfg["drop_remainder"]),
                        batch_fn=_collate)
    return LoaderIterator(iter(it_ds), name, cfg["max_bad_fraction"], process_count, workers)
