"""Encode a data set once with the frozen first stage, for training an LDM on stored latents.

  python scripts/precompute_latents.py --config=configs/ldm_f8_laion.py --out=gs://.../latents [--split=train]
  python train.py --config=configs/ldm_f8_laion.py --config.data.latents_dir=gs://.../latents ...

Reads the split in its own order with the training preprocessing but a centre crop; when the config
flips at random it also encodes every mirror image, so training keeps its flips. KL first stages
store the posterior mean and std (training samples fresh noise every step, as before), VQ ones the
latents; see latent_diffusion/data/latents.py for the format. Where the text encoder is a frozen
CLIP (sd_v1, sd_v2) the embedding of every view's caption is stored too (--text_embeddings,
float16 by default: 77x768 numbers are 118 KiB a view), and training then runs neither encoder
in its step. Every host runs the same command;
the work is split over all devices with ShardedMap. Shards are written atomically and a killed job
resumes at the first missing shard. Precompute the eval split too (--split=test), or training
stops at start saying so.
"""
import json
import logging
import math
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repo root, not scripts/
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import numpy as np  # noqa: E402

log = logging.getLogger("latent_diffusion.precompute_latents")


class _ShardRows:
    """Float images of examples [start, stop) (and their mirrors), decoded on demand; what ShardedMap reads."""

    def __init__(self, source, decoder, start, stop, views, resolution, rows=None):
        self.source, self.decoder, self.views, self.res = source, decoder, views, resolution
        self.start, self.stop = start, stop
        self.rows = rows if rows is not None else (0, (stop - start) * views)
        self.fields = {}  # example index -> decoded fields without the image (shared by slices)

    def __len__(self):
        return self.rows[1] - self.rows[0]

    def slice(self, a, b):
        out = _ShardRows(self.source, self.decoder, self.start, self.stop, self.views, self.res,
                         (self.rows[0] + a, self.rows[0] + b))
        out.fields = self.fields
        return out

    def element(self, i, view):
        from latent_diffusion.data.loader import CORRUPT
        e = self.decoder.decode(self.source[i], flip=bool(view))
        if CORRUPT not in e and e["image"].shape != (self.res, self.res, 3):
            e = {CORRUPT: f"decoded to {e['image'].shape}, expected ({self.res}, {self.res}, 3)"}
        self.fields.setdefault(i, [None] * self.views)[view] = {k: v for k, v in e.items() if k != "image"}
        return e.get("image", np.zeros((self.res, self.res, 3), np.float32))

    def batches(self, batch_size):
        rows = range(*self.rows)
        for a in range(0, len(rows), batch_size):
            yield np.stack([self.element(self.start + r // self.views, r % self.views)
                            for r in rows[a:a + batch_size]]).astype(np.float32)


class _CaptionRows:
    """Token ids of the captions of examples [start, stop) (and of their mirror images), read on demand."""

    def __init__(self, source, tokenizer, start, stop, views, rows=None):
        self.source, self.tokenizer, self.start, self.stop, self.views = source, tokenizer, start, stop, views
        self.rows = rows if rows is not None else (0, (stop - start) * views)

    def __len__(self):
        return self.rows[1] - self.rows[0]

    def slice(self, a, b):
        return _CaptionRows(self.source, self.tokenizer, self.start, self.stop, self.views,
                            (self.rows[0] + a, self.rows[0] + b))

    def caption(self, i, view):
        from latent_diffusion.data import preprocess
        text = self.source[i].get("caption", "")  # as loader.ExampleDecoder reads a text feature
        text = text.decode("utf-8") if isinstance(text, bytes) else str(text)
        return preprocess.mirror_text(text) if view else text

    def batches(self, batch_size):
        rows = range(*self.rows)
        for a in range(0, len(rows), batch_size):
            yield self.tokenizer([self.caption(self.start + r // self.views, r % self.views)
                                  for r in rows[a:a + batch_size]])


def _text_encoder(config, mesh):
    """(tokenizer, CLIP module, params) of a config whose text encoder is a frozen CLIP; else a message."""
    c = config.conditioning
    if c.crossattn != "text" or c.text.encoder != "clip":
        what = "text encoder is trained jointly" if c.crossattn == "text" else "model has no text condition"
        raise ValueError(f"--text_embeddings stores a frozen text encoder's output, but this config's {what} "
                         "(conditioning.text.encoder must be 'clip'); run without --text_embeddings")
    from latent_diffusion.data.tokenizers import make_tokenizer
    from latent_diffusion.sampling.ldm_model import LDMModel
    module, params = LDMModel._load_clip(c.text, mesh)  # pylint: disable=protected-access
    return make_tokenizer(c.text.tokenizer, int(c.text.max_length)), module, params


def _encode_fn(first_stage):
    def fn(params, x):
        out = first_stage.module.apply({"params": params}, x, method="encode")
        if first_stage.kind == "kl":
            return {"z_mean": out.mean, "z_std": out.std}
        return {"z": out.astype(np.float32)}
    return fn


def _write_json(path, obj):
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1, sort_keys=True)
    os.replace(tmp, path)


def _agree(value: bool) -> bool:
    """Process 0's answer on every process (each host may see a file system a moment apart)."""
    import jax
    if jax.process_count() == 1:
        return value
    from jax.experimental import multihost_utils
    return bool(multihost_utils.broadcast_one_to_all(np.int32(value)))


def precompute(config, out: str, split: str = "train", shard_size: int = 2048, batch_size: int = 64,
               first_stage=None, progress: bool = False, text_embeddings: bool | None = None,
               text_dtype: str = "float16") -> dict:
    """Writes the latents of `split` under out/<split>/ and returns its metadata; resumes a partial run.

    text_embeddings: also store the frozen CLIP's embedding of every view's caption ('context'), so
    training runs neither encoder; None: when the config's text encoder is a frozen CLIP.
    """
    import jax
    from array_record.python import array_record_module

    from latent_diffusion.data import latents, loader
    from latent_diffusion.evaluation.features import ShardedMap
    from latent_diffusion.training import first_stage as first_stage_lib, partitioning

    if config.conditioning.concat in ("lowres", "inpaint"):
        raise ValueError(f"conditioning.concat={config.conditioning.concat!r} needs the image at every step; "
                         "precomputed latents are not supported for it yet: train from images")
    cfg = loader.settings(config.data)
    cfg["latents_dir"] = ""
    if cfg["random_crop"]:
        raise ValueError("data.random_crop=True: random crops cannot be encoded once; set "
                         "--config.data.random_crop=False (a centre crop) to precompute latents")
    if cfg["resolution"] is None:
        raise ValueError("data.resolution must be set to precompute latents (stored latents need one size)")
    res = int(cfg["resolution"])
    if first_stage is None:
        first_stage = first_stage_lib.load(config.first_stage, partitioning.make_mesh())
    c = config.conditioning
    if text_embeddings is None:
        text_embeddings = c.crossattn == "text" and c.text.encoder == "clip"
    if text_dtype not in ("float16", "float32"):
        raise ValueError(f"--text_dtype must be float16 or float32, got {text_dtype!r}")
    text = _text_encoder(config, partitioning.make_mesh()) if text_embeddings else None
    views = 2 if cfg["random_flip"] else 1
    _, features, source = loader.open_source(cfg, split)  # TFDS, img2dataset shards or a folder
    decoder = loader.ExampleDecoder(cfg, features)
    n = len(source)
    num_shards = max(1, math.ceil(n / shard_size))
    folder = latents.split_dir(out, split)
    os.makedirs(folder, exist_ok=True)
    f = first_stage.downsample
    meta = dict(format=latents.FORMAT, split=split, num_examples=n, shard_size=shard_size, views=views,
                kind=first_stage.kind, latent_shape=[res // f, res // f, first_stage.latent_channels],
                fields=list(latents.KL_FIELDS if first_stage.kind == "kl" else latents.VQ_FIELDS),
                first_stage=latents.first_stage_identity(first_stage, config.first_stage),
                data={k: cfg[k] for k in latents.PREPROCESSING + ("keys", "random_flip")},
                shards=[latents.shard_name(k) for k in range(num_shards)], complete=False)
    meta["data"]["keys"] = list(cfg["keys"])
    if text is not None:
        meta["text"] = latents.text_identity(c.text, text[2], text_dtype)
        meta["fields"].append(latents.TEXT_FIELD)
    meta_path = os.path.join(folder, "metadata.json")
    if os.path.exists(meta_path):
        with open(meta_path) as fh:
            old = json.load(fh)
        same = lambda m: json.loads(json.dumps({k: v for k, v in m.items() if k != "complete"}, sort_keys=True))
        if same(old) != same(meta):
            raise ValueError(f"{folder} holds latents made with other settings or another first stage; "
                             "use a fresh --out (or delete it) to precompute with these")
        if old.get("complete"):
            log.info("%s is complete already", folder)
            return old
    if jax.process_index() == 0:
        _write_json(meta_path, meta)
    smap = ShardedMap(_encode_fn(first_stage), first_stage.params, batch_size=batch_size, progress=progress)
    if text is not None:
        tokenizer, clip, clip_params = text
        text_map = ShardedMap(lambda p, tok: {latents.TEXT_FIELD: clip.apply({"params": p}, tok)[0]}, clip_params,
                              batch_size=batch_size, progress=progress)
    for k in range(num_shards):
        path = os.path.join(folder, latents.shard_name(k))
        if _agree(os.path.exists(path)):
            continue
        start, stop = k * shard_size, min(n, (k + 1) * shard_size)
        rows = _ShardRows(source, decoder, start, stop, views, res)
        z = smap(rows, desc=f"{split} shard {k + 1}/{num_shards}", row_shape=(res, res, 3), row_dtype=np.float32)
        if text is not None:
            ctx = text_map(_CaptionRows(source, tokenizer, start, stop, views), desc=f"{split} captions {k + 1}",
                           row_shape=(int(c.text.max_length),), row_dtype=np.int32)
            z[latents.TEXT_FIELD] = ctx[latents.TEXT_FIELD].astype(text_dtype)
        if jax.process_index() == 0:
            tmp = path + ".tmp"
            writer = array_record_module.ArrayRecordWriter(tmp, "group_size:1")
            for i in range(start, stop):
                if i not in rows.fields or any(v is None for v in rows.fields[i]):
                    for v in range(views):  # rows another host decoded: their fields, read here
                        rows.element(i, v)
                fields = rows.fields[i]
                bad = next((v[loader.CORRUPT] for v in fields if loader.CORRUPT in v), None)
                if bad is not None:
                    writer.write(latents.encode_record(None, corrupt=bad))
                    continue
                r = (i - start) * views
                writer.write(latents.encode_record(
                    [dict(fields[v], **{name: z[name][r + v] for name in z}) for v in range(views)]))
            writer.close()
            os.replace(tmp, path)  # a shard is either whole or absent: a killed job redoes only it
        log.info("wrote %s (%d examples)", path, stop - start)
    meta["complete"] = True
    if jax.process_index() == 0:
        _write_json(meta_path, meta)
    return meta


def main(argv):
    del argv
    from absl import flags

    from latent_diffusion import cli
    F = flags.FLAGS
    cli.start(F.distributed)
    text = {"auto": None, "true": True, "false": False}[F.text_embeddings]
    meta = precompute(F.config, F.out, F.split, F.shard_size, F.batch_size, progress=True, text_embeddings=text,
                      text_dtype=F.text_dtype)
    print(f"{meta['num_examples']} examples x {meta['views']} view(s) of split {meta['split']!r} encoded "
          f"to {os.path.join(F.out, meta['split'])} (latents {tuple(meta['latent_shape'])})")


if __name__ == "__main__":
    from absl import app, flags
    from ml_collections import config_flags

    config_flags.DEFINE_config_file("config", None, "the LDM config whose first stage and data are used",
                                    lock_config=True)
    flags.DEFINE_string("out", None, "the latents directory (config.data.latents_dir for training)")
    flags.DEFINE_string("split", "train", "the split to encode; run again with the eval split")
    flags.DEFINE_integer("shard_size", 2048, "examples per array_record shard (the unit of resuming)")
    flags.DEFINE_integer("batch_size", 64, "images per encoder call over all devices")
    flags.DEFINE_enum("text_embeddings", "auto", ["auto", "true", "false"],
                      "also store the frozen text encoder's caption embeddings (auto: when it is a frozen CLIP)")
    flags.DEFINE_enum("text_dtype", "float16", ["float16", "float32"], "the stored text embeddings' dtype")
    flags.DEFINE_bool("distributed", False, "call jax.distributed.initialize() (multi-host jobs)")
    flags.mark_flags_as_required(["config", "out"])
    app.run(main)
