"""First-stage latents stored once (scripts/precompute_latents.py) and read back as training batches.

Layout of a latents directory, one sub-folder per split:
  DIR/<split>/metadata.json            the first stage's identity, the preprocessing, the shard list
  DIR/<split>/shard-00000.array_record one record per example, in the dataset's own order
A record is an .npz (no pickle) with one or two views: view 0 of the centre-cropped image,
view 1 (when the config flips) of its mirror image. Each view holds the example's conditioning
fields as the image loader decodes them (captions, labels, padded objects, segmentation maps)
plus 'z_mean' and 'z_std' (KL, unscaled posterior, float32) or 'z' (VQ, unscaled quantized
latents), and with --text_embeddings (a frozen CLIP) 'context': the embedding of that view's
caption (float16 by default). Records of images that failed to decode hold only '_corrupt', so indices line up
with the source and the loader drops and counts them like the image loader does.

The reader builds the same grain pipeline as the image loader (seed, shuffle, repeat, one
random_map) and draws the flip the same way, so with the same seed it yields the same examples
in the same order, with the same flip, as training from images would.
"""
from __future__ import annotations

import io
import json
import os

import grain
import numpy as np

from latent_diffusion.data import loader
from latent_diffusion.data.loader import CORRUPT

FORMAT = 1
KL_FIELDS = ("z_mean", "z_std")
VQ_FIELDS = ("z",)
TEXT_FIELD = "context"  # a frozen CLIP's embedding of the view's caption (L, D), when stored


def split_dir(latents_dir: str, split: str) -> str:
    return os.path.join(latents_dir, split.replace("/", "_"))


def shard_name(index: int) -> str:
    return f"shard-{index:05d}.array_record"


def encode_record(views: list[dict] | None, corrupt: str | None = None) -> bytes:
    """Views (dicts of arrays / str / nested dicts) -> .npz bytes; strings as unicode arrays, never pickled."""
    flat = {}
    if corrupt is not None:
        flat[CORRUPT] = np.asarray(corrupt)
    for v, view in enumerate(views or ()):
        for key, value in _flatten(view):
            flat[f"{v}/{key}"] = np.asarray(value)
    buf = io.BytesIO()
    np.savez(buf, **flat)
    return buf.getvalue()


def decode_record(data: bytes) -> tuple[list[dict], str | None]:
    with np.load(io.BytesIO(data), allow_pickle=False) as z:
        flat = {k: z[k] for k in z.files}
    corrupt = flat.pop(CORRUPT, None)
    views: dict[int, dict] = {}
    for name, value in flat.items():
        v, _, key = name.partition("/")
        if value.dtype.kind == "U":
            value = str(value)
        node = views.setdefault(int(v), {})
        *parents, leaf = key.split("/")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return [views[i] for i in sorted(views)], (None if corrupt is None else str(corrupt))


def _flatten(d: dict, prefix: str = ""):
    for k, v in d.items():
        if isinstance(v, dict):
            yield from _flatten(v, f"{prefix}{k}/")
        else:
            yield f"{prefix}{k}", v


def read_metadata(latents_dir: str, split: str) -> dict:
    path = os.path.join(split_dir(latents_dir, split), "metadata.json")
    if not os.path.exists(path):
        raise FileNotFoundError(
            f"no precomputed latents for split '{split}' in {latents_dir} (expected {path}): run "
            f"`python scripts/precompute_latents.py --config=<this config> --out={latents_dir} --split={split}` "
            "first, or set --config.data.latents_dir= to train from images")
    with open(path) as f:
        meta = json.load(f)
    if not meta.get("complete"):
        raise ValueError(f"the latents in {os.path.dirname(path)} are incomplete (the precompute job did not "
                         "finish): run scripts/precompute_latents.py again with the same --out to resume it")
    if meta.get("format") != FORMAT:
        raise ValueError(f"{path} has latents format {meta.get('format')}, this code reads {FORMAT}: "
                         "recompute them")
    return meta


# Preprocessing settings that change what a stored latent means; a mismatch is refused.
PREPROCESSING = ("name", "config", "version", "image_key", "resolution", "resize_method", "jpeg_draft")


def check_data(meta: dict, cfg: dict, where: str) -> None:
    """The loader's settings against the stored latents' preprocessing (keys, crops, flips)."""
    stored = meta["data"]
    for key in PREPROCESSING:
        if stored.get(key) != cfg.get(key):
            raise ValueError(f"data.{key} is {cfg.get(key)!r} but the latents in {where} were computed with "
                             f"{stored.get(key)!r}: use matching settings, or precompute again")
    missing = sorted(set(cfg["keys"]) - set(stored["keys"]))
    if missing:
        raise ValueError(f"data.keys asks for {missing}, which the latents in {where} do not store "
                         f"(they have {sorted(stored['keys'])}): precompute again with these data.keys")
    if cfg["random_crop"]:
        raise ValueError("data.random_crop=True cannot be used with precomputed latents (each crop would need "
                         "its own encoding): set --config.data.random_crop=False")
    if cfg["random_flip"] and meta["views"] < 2:
        raise ValueError(f"data.random_flip=True but the latents in {where} were stored without mirror images: "
                         "precompute with a config that flips, or set --config.data.random_flip=False")


def first_stage_identity(first_stage, fs_cfg) -> dict:
    """What a stored latent depends on: the first stage's kind, shape, scale, source and a digest of its params."""
    return dict(kind=first_stage.kind, scale_factor=float(first_stage.scale_factor),
                downsample=int(first_stage.downsample), latent_channels=int(first_stage.latent_channels),
                workdir=str(fs_cfg.get("workdir", "") or ""), checkpoint=str(fs_cfg.get("checkpoint", "") or ""),
                random_init=bool(fs_cfg.get("random_init", False)), use_ema=bool(fs_cfg.get("use_ema", True)),
                params_sha256=params_digest(first_stage.params))


def params_digest(params) -> str:
    """sha256 of a parameter tree's values, in tree order."""
    import hashlib  # pylint: disable=g-import-not-at-top

    import jax  # pylint: disable=g-import-not-at-top

    digest = hashlib.sha256()
    for leaf in jax.tree.leaves(jax.device_get(params)):
        digest.update(np.ascontiguousarray(leaf).tobytes())
    return digest.hexdigest()


def text_identity(text_cfg, clip_params, dtype: str) -> dict:
    """What a stored text embedding depends on: the frozen CLIP's weights, its tokenizer, length and layer."""
    return dict(encoder="clip", tokenizer=str(text_cfg.tokenizer), max_length=int(text_cfg.max_length),
                penultimate=bool(text_cfg.get("penultimate", False)), checkpoint=str(text_cfg.checkpoint),
                params_sha256=params_digest(clip_params), dtype=dtype)


def check_text(meta: dict, identity: dict | None, where: str) -> None:
    """Refuses stored text embeddings ('context') made by another text encoder than the run's."""
    stored = meta.get("text")
    if stored is None:
        return
    if identity is None:
        raise ValueError(f"the latents in {where} hold text embeddings of a frozen CLIP, but this run's text "
                         "encoder is trained jointly (conditioning.text.encoder is not 'clip'): precompute "
                         "without --text_embeddings")
    for key in ("tokenizer", "max_length", "penultimate", "params_sha256"):
        if stored.get(key) != identity[key]:
            what = "weights" if key == "params_sha256" else key
            raise ValueError(f"the text embeddings in {where} were computed by another text encoder: its {what} "
                             f"{stored.get(key)!r} differs from this run's {identity[key]!r} (stored from "
                             f"checkpoint={stored.get('checkpoint')!r}). Point conditioning.text at that encoder, "
                             "or precompute again")


def check_first_stage(meta: dict, identity: dict, where: str) -> None:
    """Refuses latents made by another first stage than the run's (`identity` from first_stage_identity)."""
    stored = meta["first_stage"]
    for key in ("kind", "scale_factor", "downsample", "latent_channels", "params_sha256"):
        if stored.get(key) != identity[key]:
            what = "parameters" if key == "params_sha256" else key
            raise ValueError(
                f"the latents in {where} were computed by another first stage: its {what} "
                f"{stored.get(key)!r} differs from this run's {identity[key]!r} (stored from "
                f"workdir={stored.get('workdir')!r} checkpoint={stored.get('checkpoint')!r}). Point "
                "config.first_stage at the autoencoder that made them, or precompute them again with this one")


class _PickView:
    """Deserializes a record and picks its view, drawing the flip exactly as the image decoder does."""

    def __init__(self, cfg: dict, keys: tuple[str, ...]):
        self.flip = bool(cfg["random_flip"])
        self.keys = keys

    def __call__(self, data: bytes, rng: np.random.Generator) -> dict:
        rng.integers(2**63)  # the image decoder's crop draw, kept so the flip draw matches it
        flip = bool(rng.random() < 0.5) and self.flip
        views, corrupt = decode_record(data)
        if corrupt is not None:
            return {CORRUPT: corrupt}
        view = views[1 if flip else 0]
        return {k: v for k, v in view.items() if k in self.keys}


def make_dataset(cfg: dict, split: str, *, global_batch_size: int, seed: int, shuffle: bool, num_epochs,
                 extra_transforms, process_index: int, process_count: int):
    """Like loader.make_dataset, from stored latents; batches carry z_mean/z_std (or z) instead of 'image'."""
    folder = split_dir(cfg["latents_dir"], split)
    meta = read_metadata(cfg["latents_dir"], split)
    check_data(meta, cfg, folder)
    source = grain.sources.ArrayRecordDataSource([os.path.join(folder, n) for n in meta["shards"]])
    if len(source) != meta["num_examples"]:
        raise ValueError(f"{folder} holds {len(source)} records but its metadata says {meta['num_examples']}: "
                         "the files are damaged; precompute again")
    keys = tuple(cfg["keys"]) + (KL_FIELDS if meta["kind"] == "kl" else VQ_FIELDS)
    if meta.get("text"):
        keys += (TEXT_FIELD,)
    # The image pipeline's global order, so every step sees the same examples and flips.
    return loader.global_batches(source, _PickView(cfg, keys), cfg, f"latents:{folder}", split,
                                 global_batch_size=global_batch_size, seed=seed, shuffle=shuffle,
                                 num_epochs=num_epochs, extra_transforms=extra_transforms,
                                 process_index=process_index, process_count=process_count)
