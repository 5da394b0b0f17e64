"""Config sections the library reads field by field: one table of defaults each, and the unknown-key check.

The configs build these sections from the tables (configs/common.py, configs/ldm_common.py) with
`config_dict`, importing nothing heavier than ml_collections; the loader and the fine-tuning start
take what they are given through `section`, and model sections are checked against the module's
fields with `check_known` (models/build.py). On the command line, typos already fail in
ml_collections' locked config; these checks cover configs and dicts built in code.
"""
from __future__ import annotations

from typing import Iterable, Mapping

import ml_collections

# config.data: the input pipeline (latent_diffusion/data/loader.py).
DATA = dict(
    source="tfds",  # 'tfds', or files read in place: 'webdataset', 'parquet', 'folder' (data/sources.py)
    name="shapes",  # source 'tfds': 'shapes' (built on demand) or any TFDS name, e.g. 'imagenet2012'
    data_dir=None,  # None: $TFDS_DATA_DIR or ~/tensorflow_datasets
    config=None,  # TFDS builder config; for shapes None picks it from resolution
    version=None,  # TFDS version string, None = the builder's default
    image_key="image",
    resolution=64,  # shorter side resized to this, then a square crop; None keeps size
    random_crop=False,  # False: centre crop
    random_flip=True,
    resize_method="bicubic",  # 'bicubic', 'area' or 'bilinear' (see preprocess.py)
    keys=(),  # extra features to keep, e.g. ('caption', 'objects')
    max_objects=16,  # sequence features are padded / truncated to this length
    drop_remainder=True,
    train_split="train",  # read by the training loop, not the loader
    eval_split="test",
    num_threads=2,  # decode threads per process (per worker when num_workers > 0)
    num_workers=0,  # > 0: decode in this many worker processes per host (grain mp_prefetch; same order)
    jpeg_draft=True,  # JPEGs at least twice the target size are decoded at 1/2, 1/4 or 1/8 scale (libjpeg)
    prefetch_buffer_size=16,  # decoded elements kept ahead of the batcher
    shards="",  # other sources: the training files, e.g. '/laion/{00000..00099}.tar', a glob, or a folder
    eval_shards="",  # other sources: the files of the eval split (data.eval_split)
    index_cache="",  # a folder (local or gs://) keeping each shard's index, so a shard is scanned once
    index_threads=16,  # shards indexed at once at start
    folder_labels=False,  # source 'folder': first-level subfolders are the classes ('label')
    min_width=0,  # filters (from .json / parquet metadata, at indexing): the original image's size
    min_height=0,
    max_aspect_ratio=0.0,  # 0: no limit
    filter_where="",  # e.g. 'aesthetic_score>=5,punsafe<0.1,pwatermark<0.5'
    max_bad_fraction=0.1,  # more bad records than this fraction of those read stops the run (loader.py)
    latents_dir="",  # '': decode images; else first-stage latents from scripts/precompute_latents.py
)

# config.init: a fresh LDM run's weights from elsewhere (latent_diffusion/training/init_from.py); one source.
INIT = dict(
    checkpoint="",  # a CompVis / Stable Diffusion .ckpt or .safetensors (needs compvis_config)
    compvis_config="",  # that checkpoint's yaml (e.g. v1-inference.yaml): the UNet's architecture
    diffusers_unet="",  # a diffusers UNet folder (config.json + diffusion_pytorch_model.*)
    workdir="",  # another LDM run of ours
    use_ema=True,  # the source's EMA weights where it has them
    allow_new_input_channels=False,  # zero-init extra unet conv_in input channels (inpainting)
)


def check_known(given: Iterable[str], known: Iterable[str], where: str, what: str = "expected some of") -> None:
    """Fails naming every key of `given` that is not in `known`, as config.`where`.<key>."""
    known = sorted(known)
    unknown = sorted(set(given) - set(known))
    if unknown:
        names = ", ".join(f"config.{where}.{k}" for k in unknown)
        raise ValueError(f"unknown config key(s) {names}; {what} {known}")


def section(cfg, defaults: Mapping, where: str) -> dict:
    """`cfg` (a ConfigDict, a dict or None) over `defaults`, as a plain dict; unknown keys fail."""
    given = {} if cfg is None else (cfg.to_dict() if hasattr(cfg, "to_dict") else dict(cfg))
    check_known(given, defaults, where)
    return {**defaults, **given}


def config_dict(defaults: Mapping, where: str, **overrides) -> ml_collections.ConfigDict:
    """The section as a ConfigDict with `overrides`; a field whose default is None takes a str."""
    check_known(overrides, defaults, where)
    cfg = ml_collections.ConfigDict({k: ml_collections.FieldReference(None, field_type=str) if v is None else v
                                     for k, v in defaults.items()})
    cfg.update(overrides)
    return cfg
