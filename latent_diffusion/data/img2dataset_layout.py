"""Writes (image bytes, caption, metadata) examples in img2dataset's output layouts, file for file.

For tests of the sources that read them (data/sources.py), and for users who want their own images in
the layout a LAION download has. What is matched (img2dataset 1.47, writer.py / downloader.py / logger.py):
- Shard names `{shard_id:05d}` (oom_shard_count=5); sample keys `shard_id * 10**d + index` written in
  5 + d digits, d = ceil(log10(samples_per_shard)): the default 10000 per shard gives shard 3 sample 12
  -> "000030012".
- Metadata of every row, in this order: the extra columns (img2dataset's save_additional_columns),
  `caption`, `url`, `key`, `status` ("success" / "failed_to_download"), `error_message`, `width`,
  `height`, `original_width`, `original_height`, `exif` (extract_exif, on by default) and `sha256`
  (compute_hash, on by default), with the Parquet types img2dataset gives them (int32 sizes, strings).
- `webdataset`: `{shard}.tar` as webdataset's TarWriter writes it (stream mode, PAX: a float mtime gives
  every member a PAX header; mode 0o444, owner bigdata), per successful sample the members
  `{key}.{ext}`, `{key}.json` (the metadata, `json.dumps(indent=4)`), `{key}.txt` in sorted order;
  failed downloads are not in the tar.
- `parquet`: `{shard}.parquet` of every row, the metadata columns then the image bytes column named by
  the encode format (null for failed rows); no `txt` column (img2dataset's writer drops it).
- `tfrecord`: `{shard}.tfrecord` of tf.train.Example with `key`, the image under the encode format's
  name, `txt`, then every metadata field (ints as int64, floats as float, the rest bytes, None as b"").
- `files`: a folder `{shard}/` of `{key}.{ext}`, `{key}.txt`, `{key}.json`.
- Beside each shard but the `parquet` one, `{shard}.parquet` of the metadata of EVERY row, failed
  downloads included, in row groups of 100 (img2dataset's buffer); and for every format
  `{shard}_stats.json`: count, successes, failed_to_download, failed_to_resize, duration, start_time,
  end_time, status_dict (a count per error message and of "success").
What differs: img2dataset writes rows in download-completion order, this writer in input order; images
are written as given (img2dataset with disable_all_reencoding does the same), so sizes are read from them.
"""
from __future__ import annotations

import hashlib
import io
import json
import math
import tarfile
import time
from typing import Any, Iterable

FORMATS = ("webdataset", "parquet", "tfrecord", "files")
ENCODE_FORMATS = ("jpg", "png", "webp")
DEFAULT_ERROR = "HTTP Error 404: Not Found"
_KNOWN = ("image", "caption", "url", "error_message", "original_width", "original_height")
_TAIL = ("key", "status", "error_message", "width", "height", "original_width", "original_height", "exif",
         "sha256")
_ROW_GROUP = 100


def shard_name(shard_id: int, oom_shard_count: int = 5) -> str:
    return f"{shard_id:0{oom_shard_count}d}"


def compute_key(shard_id: int, index: int, samples_per_shard: int, oom_shard_count: int = 5) -> str:
    """img2dataset's sample key: the shard id then the index within it, zero-padded."""
    digits = math.ceil(math.log10(samples_per_shard))
    return f"{shard_id * 10 ** digits + index:0{digits + oom_shard_count}d}"


def _size(image: bytes) -> tuple[int | None, int | None]:
    from PIL import Image
    try:
        with Image.open(io.BytesIO(image)) as im:
            return im.size
    except Exception:  # pylint: disable=broad-except  (bytes that are not an image are written as given)
        return None, None


def _meta(example: dict, extras: list[str], key: str) -> dict:
    """The metadata img2dataset keeps for one row (the .json, the parquet row), in its order."""
    image = example.get("image")
    meta: dict[str, Any] = {name: example.get(name) for name in extras}
    meta.update(caption=example.get("caption"), url=example.get("url"), key=key)
    if image is None:
        meta.update(status="failed_to_download", error_message=example.get("error_message") or DEFAULT_ERROR,
                    width=None, height=None, original_width=None, original_height=None, exif=None, sha256=None)
        return meta
    width, height = _size(image)
    meta.update(status="success", error_message=None, width=width, height=height,
                original_width=example.get("original_width", width),
                original_height=example.get("original_height", height),
                exif="{}",  # exifread finds no tag in these images; img2dataset stores json.dumps of the tags
                sha256=hashlib.sha256(image).hexdigest())
    return meta


def _schema(extras: list[str], rows: list[dict], image_column: str | None):
    import pyarrow as pa
    fields = []
    for name in extras:
        kind = pa.array([r[name] for r in rows]).type if rows else pa.null()
        fields.append(pa.field(name, pa.string() if kind == pa.null() else kind))
    fields += [pa.field("caption", pa.string()), pa.field("url", pa.string())]
    ints = ("width", "height", "original_width", "original_height")
    fields += [pa.field(n, pa.int32() if n in ints else pa.string()) for n in _TAIL]
    if image_column:
        fields.append(pa.field(image_column, pa.binary()))
    return pa.schema(fields)


def _write_parquet(path, rows: list[dict], schema):
    import pyarrow as pa
    import pyarrow.parquet as pq
    with _path(path).open("wb") as f, pq.ParquetWriter(f, schema) as writer:
        for start in range(0, len(rows), _ROW_GROUP):
            part = rows[start:start + _ROW_GROUP]
            writer.write_table(pa.Table.from_pydict({n: [r[n] for r in part] for n in schema.names}, schema))


def _tar_member(tar, name: str, data: bytes):
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = len(data), time.time(), 0o444
    info.uname = info.gname = "bigdata"
    tar.addfile(info, io.BytesIO(data))


def _feature(value):
    from tensorflow.core.example import feature_pb2
    if isinstance(value, list) and value:
        if isinstance(value[0], int):
            return feature_pb2.Feature(int64_list=feature_pb2.Int64List(value=value))
        if isinstance(value[0], float):
            return feature_pb2.Feature(float_list=feature_pb2.FloatList(value=value))
        return feature_pb2.Feature(bytes_list=feature_pb2.BytesList(
            value=[(v or "").encode() if not isinstance(v, bytes) else v for v in value]))
    if isinstance(value, int):  # bool too, as img2dataset does
        return feature_pb2.Feature(int64_list=feature_pb2.Int64List(value=[value]))
    if isinstance(value, float):
        return feature_pb2.Feature(float_list=feature_pb2.FloatList(value=[value]))
    if value is None:
        value = b""
    return feature_pb2.Feature(bytes_list=feature_pb2.BytesList(
        value=[value.encode() if isinstance(value, str) else bytes(value)]))


def _path(p):
    from etils import epath  # local files and gs:// alike
    return epath.Path(p)


def write_shard(examples: Iterable[dict], out_dir, shard_id: int, fmt: str = "webdataset", *,
                samples_per_shard: int = 10_000, encode_format: str = "jpg", oom_shard_count: int = 5) -> dict:
    """Writes one shard of `examples` (at most samples_per_shard of them) as img2dataset does; returns its stats.

    An example is a dict: `image` (encoded bytes, or None for a failed download), `caption`, `url`, optionally
    `error_message` (of a failed download), `original_width` / `original_height` (default: the image's size),
    and any other field as an extra metadata column (the same fields in every example).
    """
    if fmt not in FORMATS:
        raise ValueError(f"format must be one of {FORMATS} (img2dataset's output_format), got {fmt!r}")
    if encode_format not in ENCODE_FORMATS:
        raise ValueError(f"encode_format must be one of {ENCODE_FORMATS}, got {encode_format!r}")
    examples = list(examples)
    if len(examples) > samples_per_shard:
        raise ValueError(f"shard {shard_id}: {len(examples)} examples, more than samples_per_shard="
                         f"{samples_per_shard}; split them with write_shards")
    extras = [k for k in (examples[0] if examples else {}) if k not in _KNOWN]
    for i, ex in enumerate(examples):
        other = sorted(k for k in ex if k not in _KNOWN and k not in extras)
        if other:
            raise ValueError(f"shard {shard_id} example {i} has metadata {other} that the first example lacks; "
                             "give every example the same extra fields (None where unknown)")
    out = _path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    name = shard_name(shard_id, oom_shard_count)
    if fmt == "tfrecord":
        import tensorflow as tf  # before the clock starts: importing it takes seconds
        from tensorflow.core.example import example_pb2, feature_pb2
    start = time.time()
    rows, status = [], {}
    samples = []  # (key, image, caption, meta) of the successful downloads
    for i, ex in enumerate(examples):
        key = compute_key(shard_id, i, samples_per_shard, oom_shard_count)
        meta = _meta(ex, extras, key)
        rows.append(meta)
        cause = "success" if meta["status"] == "success" else meta["error_message"]
        status[cause] = status.get(cause, 0) + 1
        if ex.get("image") is not None:
            caption = ex.get("caption")
            samples.append((key, bytes(ex["image"]), "" if caption is None else str(caption), meta))
    if fmt == "parquet":
        _write_parquet(out / f"{name}.parquet", [dict(r, **{encode_format: ex.get("image")})
                                                 for r, ex in zip(rows, examples)],
                       _schema(extras, rows, encode_format))
    else:
        _write_parquet(out / f"{name}.parquet", rows, _schema(extras, rows, None))
    if fmt == "webdataset":
        with (out / f"{name}.tar").open("wb") as f, tarfile.open(fileobj=f, mode="w|",
                                                                 format=tarfile.PAX_FORMAT) as tar:
            for key, image, caption, meta in samples:
                members = {encode_format: image, "txt": caption.encode(), "json": json.dumps(meta, indent=4).encode()}
                for ext in sorted(members):  # webdataset's TarWriter writes a sample's members sorted
                    _tar_member(tar, f"{key}.{ext}", members[ext])
    elif fmt == "tfrecord":
        with tf.io.TFRecordWriter(str(out / f"{name}.tfrecord")) as writer:
            for key, image, caption, meta in samples:
                feats = {"key": _feature(key), encode_format: _feature(image), "txt": _feature(caption)}
                feats.update((k, _feature(v)) for k, v in meta.items())
                writer.write(example_pb2.Example(features=feature_pb2.Features(feature=feats)).SerializeToString())
    elif fmt == "files":
        folder = out / name
        folder.mkdir(exist_ok=True)
        for key, image, caption, meta in samples:
            (folder / f"{key}.{encode_format}").write_bytes(image)
            (folder / f"{key}.txt").write_text(caption)
            (folder / f"{key}.json").write_text(json.dumps(meta, indent=4))
    end = time.time()
    stats = {"count": len(examples), "successes": len(samples), "failed_to_download": len(examples) - len(samples),
             "failed_to_resize": 0, "duration": end - start, "start_time": start, "end_time": end,
             "status_dict": status}
    (out / f"{name}_stats.json").write_text(json.dumps(stats, indent=4))
    return stats


def write_shards(examples: Iterable[dict], out_dir, fmt: str = "webdataset", samples_per_shard: int = 10_000, *,
                 encode_format: str = "jpg", start_shard: int = 0, oom_shard_count: int = 5) -> list[dict]:
    """Writes `examples` in shards of samples_per_shard (the last one may be smaller); returns each shard's
    stats. See write_shard for what an example holds."""
    if samples_per_shard < 1:
        raise ValueError(f"samples_per_shard must be at least 1, got {samples_per_shard}")
    stats, chunk, shard_id = [], [], start_shard
    for ex in examples:
        chunk.append(ex)
        if len(chunk) == samples_per_shard:
            stats.append(write_shard(chunk, out_dir, shard_id, fmt, samples_per_shard=samples_per_shard,
                                     encode_format=encode_format, oom_shard_count=oom_shard_count))
            chunk, shard_id = [], shard_id + 1
    if chunk:
        stats.append(write_shard(chunk, out_dir, shard_id, fmt, samples_per_shard=samples_per_shard,
                                 encode_format=encode_format, oom_shard_count=oom_shard_count))
    return stats
