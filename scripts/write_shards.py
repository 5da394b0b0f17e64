"""Write a split of the built-in shapes dataset as img2dataset output shards, to train on files read in place.

  python scripts/write_shards.py --config=tiny --split=train --format=webdataset --out=data/shapes_wds/train \
      --samples_per_shard=256
  python train.py ... --config.data.source=webdataset --config.data.shards='data/shapes_wds/train/{00000..00019}.tar'

The images are JPEG-encoded (or PNG / WebP: --encode_format), the captions are the shapes captions and the
metadata holds the scene's class label; the layout is img2dataset's (latent_diffusion/data/img2dataset_layout.py):
`{shard}.tar` / `.parquet` / `.tfrecord` / `{shard}/` with the `.parquet` of every row and `_stats.json`
beside each shard. --failed_every=N makes every N-th row a failed download (a null image in the parquet,
absent from the tars), as a real download has. The last line printed is the shard pattern for data.shards.
"""
import argparse
import io
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repo root, not scripts/
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

from latent_diffusion.data import img2dataset_layout as layout  # noqa: E402

_PIL_FORMAT = {"jpg": "JPEG", "png": "PNG", "webp": "WEBP"}
_SUFFIX = {"webdataset": ".tar", "parquet": ".parquet", "tfrecord": ".tfrecord"}


def _parse(argv):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default="64", help="shapes builder config: tiny, 32, 64, 128 or 256")
    p.add_argument("--data_dir", default=None, help="where the shapes TFDS dataset is (built there if missing); "
                   "default $TFDS_DATA_DIR or ~/tensorflow_datasets")
    p.add_argument("--split", default="train", help="train or test")
    p.add_argument("--format", default="webdataset", choices=layout.FORMATS, help="img2dataset's output_format")
    p.add_argument("--out", required=True, help="output folder (one per split), e.g. data/shapes_wds/train")
    p.add_argument("--samples_per_shard", type=int, default=10_000, help="img2dataset's number_sample_per_shard")
    p.add_argument("--encode_format", default="jpg", choices=layout.ENCODE_FORMATS)
    p.add_argument("--encode_quality", type=int, default=95, help="JPEG / WebP quality (img2dataset's default)")
    p.add_argument("--failed_every", type=int, default=0, help="every N-th row is a failed download (0: none)")
    p.add_argument("--limit", type=int, default=0, help="write only the first N examples (0: all)")
    return p.parse_args(argv)


def examples(builder, split: str, *, encode_format: str, quality: int, failed_every: int, limit: int = 0):
    """img2dataset input rows (image bytes, caption, url, label) of a shapes split, in index order."""
    import tensorflow_datasets as tfds
    from PIL import Image
    source = builder.as_data_source(split, decoders={"image": tfds.decode.SkipDecoding(),
                                                     "segmentation": tfds.decode.SkipDecoding()})
    names = builder.info.features["label"].names
    n = min(len(source), limit) if limit else len(source)
    res = builder.builder_config.resolution
    for i in range(n):
        record = source[i]
        caption = record["caption"]
        caption = caption.decode("utf-8") if isinstance(caption, bytes) else str(caption)
        url = f"https://shapes.invalid/{builder.builder_config.name}/{split}/{i:06d}.png"
        if failed_every and i % failed_every == failed_every - 1:
            yield dict(image=None, caption=caption, url=url, label=names[int(record["label"])],
                       error_message="HTTP Error 404: Not Found")
            continue
        with Image.open(io.BytesIO(record["image"])) as im:
            buf = io.BytesIO()
            im.convert("RGB").save(buf, format=_PIL_FORMAT[encode_format], quality=quality)
        yield dict(image=buf.getvalue(), caption=caption, url=url, label=names[int(record["label"])],
                   original_width=res, original_height=res)


def main(argv=None):
    args = _parse(argv)
    from latent_diffusion.data import shapes
    if args.split not in shapes.SPLIT_IDS:
        raise SystemExit(f"--split must be one of {sorted(shapes.SPLIT_IDS)}, got {args.split!r}")
    builder = shapes.ensure_built(args.data_dir, args.config)
    rows = examples(builder, args.split, encode_format=args.encode_format, quality=args.encode_quality,
                    failed_every=args.failed_every, limit=args.limit)
    stats = layout.write_shards(rows, args.out, args.format, args.samples_per_shard,
                                encode_format=args.encode_format)
    if not stats:
        raise SystemExit(f"split {args.split!r} of shapes/{args.config} has no example: nothing written")
    written = sum(s["successes"] for s in stats)
    failed = sum(s["failed_to_download"] for s in stats)
    print(f"wrote {len(stats)} {args.format} shard(s) of shapes/{args.config} {args.split} to {args.out}: "
          f"{written} images, {failed} failed download(s)")
    if args.format == "files":  # data.source=folder reads the whole folder
        print(args.out)
    else:
        last = layout.shard_name(len(stats) - 1)
        print(os.path.join(args.out, f"{{{layout.shard_name(0)}..{last}}}{_SUFFIX[args.format]}"))


if __name__ == "__main__":
    main()
