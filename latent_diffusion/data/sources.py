"""Random-access sources over the data LAION users have: img2dataset output and image folders.

Every source is a sequence of records `{"image": bytes, "caption": str, "key": str, ...}` with
`len()` and `[i]`, so the loader's one grain pipeline (global seeded shuffle, per-epoch reshuffle,
host slice, checkpointed position) serves it exactly as it serves TFDS: a resumed run reads the
same examples an uninterrupted one would, because the iterator state is an index into a fixed list.

How each format becomes random access (read in place, nothing converted):
- WebDataset tars (img2dataset `webdataset`): the member headers of each shard are scanned once at
  start (header reads and seeks only; the `.json` members are read for the filters), giving the
  byte offset of each key's image, caption and metadata. A record read is one seek and one read.
- Parquet (img2dataset `parquet`): row groups are read on demand; rows whose image is null (failed
  downloads) are left out when the shard is indexed.
- TFRecord (img2dataset `tfrecord`): the record offsets of each shard are read once from the
  length prefixes; the Examples are parsed then for the filters and the caption check.
- Image folders (img2dataset `files`, or any tree of images): a recursive listing; captions from
  same-name `.txt` files, or one subfolder per class as labels.

The order of shards is the sorted, de-duplicated list their patterns give (globs and brace ranges
such as `{00000..00099}.tar`), so every host builds the same index. Shards that cannot be read are
skipped with a warning and counted in `Index.bad_shards`; records whose image or caption is missing
are left out and counted by cause in `Index.dropped`. The filters are applied when indexing, from
metadata only, so the kept list (and the run) is a function of the data and the config.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import re
import tarfile
from typing import Any, Callable

import numpy as np

log = logging.getLogger(__name__)

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp", "bmp", "gif")
KINDS = ("tfds", "webdataset", "parquet", "tfrecord", "folder")


def expand_braces(pattern: str) -> list[str]:
    """`a{00..02}b` -> a00b a01b a02b (zero padding kept), `{x,y}` -> x y; nested and repeated."""
    m = re.search(r"\{([^{}]*)\}", pattern)
    if not m:
        return [pattern]
    head, body, tail = pattern[:m.start()], m.group(1), pattern[m.end():]
    rng = re.fullmatch(r"(\d+)\.\.(\d+)", body)
    if rng:
        lo, hi = rng.groups()
        width = len(lo) if lo.startswith("0") else 0
        items = [str(i).zfill(width) for i in range(int(lo), int(hi) + 1)]
    else:
        items = body.split(",")
    return [p for item in items for p in expand_braces(head + item + tail)]


def _path(p: str):
    from etils import epath  # local files and gs:// alike
    return epath.Path(p)


def list_shards(patterns, suffix: str) -> list[str]:
    """The sorted files matching `patterns` (a string or list: globs, brace ranges, folders); a
    folder stands for the files in it ending in `suffix`. A file listed twice is kept once."""
    if isinstance(patterns, str):
        patterns = [p for p in re.split(r",(?![^{]*\})", patterns) if p]  # commas outside braces
    found = []
    for pattern in patterns:
        for expanded in expand_braces(pattern):
            path = _path(expanded)
            if any(c in expanded for c in "*?["):
                root, glob = _split_glob(expanded)
                matches = sorted(str(m) for m in _path(root).glob(glob))
            elif path.is_dir():
                matches = sorted(str(m) for m in path.iterdir() if str(m).endswith(suffix))
            else:
                matches = [str(path)]
            found.extend(matches)
    unique = sorted(set(found))
    seen_twice = len(found) - len(unique)
    if seen_twice:
        log.warning("%d shard(s) listed more than once; each is read once", seen_twice)
    return unique


def _split_glob(pattern: str) -> tuple[str, str]:
    parts = pattern.split("/")
    for i, part in enumerate(parts):
        if any(c in part for c in "*?["):
            return "/".join(parts[:i]) or ".", "/".join(parts[i:])
    return ".", pattern


# --- filters -------------------------------------------------------------------------------------

_FILTER = re.compile(r"^\s*([A-Za-z_][\w.]*)\s*(>=|<=|==|!=|>|<)\s*(-?[\d.eE+-]+)\s*$")
_OPS: dict[str, Callable[[float, float], bool]] = {
    ">=": lambda a, b: a >= b, "<=": lambda a, b: a <= b, ">": lambda a, b: a > b,
    "<": lambda a, b: a < b, "==": lambda a, b: a == b, "!=": lambda a, b: a != b}


@dataclasses.dataclass(frozen=True)
class Filters:
    """Keep a record only if its metadata passes every condition (LAION-style selection).

    `where` is a comma-separated list such as "aesthetic_score>=5,punsafe<0.1,pwatermark<0.5"; a
    record without a named field fails that condition. Sizes are the original image's
    (img2dataset's `original_width`/`original_height`, else `width`/`height`).
    """
    min_width: int = 0
    min_height: int = 0
    max_aspect_ratio: float = 0.0  # 0: no limit; else max(w, h) / min(w, h) at most this
    where: str = ""

    def __post_init__(self):
        self.conditions()  # a condition that cannot be read fails at start, not at the first record

    def conditions(self) -> list[tuple[str, str, float]]:
        out = []
        for part in [p for p in self.where.split(",") if p.strip()]:
            m = _FILTER.match(part)
            if not m:
                raise ValueError(f"data.filter_where: cannot read {part!r}; expected e.g. 'punsafe<0.1' "
                                 "(a field, one of >= <= > < == !=, a number), comma-separated")
            out.append((m.group(1), m.group(2), float(m.group(3))))
        return out

    @property
    def active(self) -> bool:
        return bool(self.min_width or self.min_height or self.max_aspect_ratio or self.where.strip())

    def reason(self, meta: dict) -> str | None:
        """None when the record is kept, else the name of the first condition it fails."""
        w = meta.get("original_width", meta.get("width"))
        h = meta.get("original_height", meta.get("height"))
        if self.min_width or self.min_height or self.max_aspect_ratio:
            if w is None or h is None:
                return "filter:no_size"
            w, h = float(w), float(h)
            if w < self.min_width or h < self.min_height:
                return "filter:min_size"
            if self.max_aspect_ratio and max(w, h) > self.max_aspect_ratio * max(min(w, h), 1e-9):
                return "filter:aspect_ratio"
        for field, op, value in self.conditions():
            got = meta.get(field)
            try:
                ok = got is not None and _OPS[op](float(got), value)
            except (TypeError, ValueError):
                ok = False
            if not ok:
                return f"filter:{field}"
        return None


# --- the index -----------------------------------------------------------------------------------

@dataclasses.dataclass
class Index:
    """What indexing found: the kept records' locations, and what was left out and why."""
    shards: list[str]
    records: list[tuple]  # per kind: where to read one record
    dropped: dict[str, int] = dataclasses.field(default_factory=dict)
    bad_shards: dict[str, str] = dataclasses.field(default_factory=dict)

    def drop(self, cause: str):
        self.dropped[cause] = self.dropped.get(cause, 0) + 1

    def summary(self) -> str:
        parts = [f"{len(self.records)} records from {len(self.shards) - len(self.bad_shards)} shard(s)"]
        if self.dropped:
            parts.append("left out: " + ", ".join(f"{k} {v}" for k, v in sorted(self.dropped.items())))
        if self.bad_shards:
            parts.append(f"{len(self.bad_shards)} unreadable shard(s), e.g. "
                         + "; ".join(f"{s}: {e}" for s, e in list(self.bad_shards.items())[:3]))
        return ", ".join(parts)


class ShardIndexCache:
    """Per-shard indexes kept in a folder (data.index_cache; local or gs://), so a shard is scanned once.

    One JSON file per shard, named by a digest of the shard's path and of what indexing depends on
    (the source kind, the caption rule, the filters); it also records the shard's size and mtime,
    and a shard that changed is indexed again. Files are written under a temporary name and renamed,
    so hosts that index the same shard at once each leave a whole file. Unreadable shards are not
    cached (the failure may be transient)."""

    def __init__(self, folder: str, settings: dict):
        self.folder = _path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.settings = json.dumps(settings, sort_keys=True)

    def _file(self, shard: str):
        import hashlib  # pylint: disable=g-import-not-at-top
        return self.folder / (hashlib.sha1(f"{shard}\n{self.settings}".encode()).hexdigest() + ".json")

    @staticmethod
    def _stamp(shard: str) -> list:
        st = _path(shard).stat()
        return [int(st.length), int(st.mtime)]

    def get(self, shard: str) -> dict | None:
        try:
            entry = json.loads(self._file(shard).read_text())
            return entry if entry.get("stamp") == self._stamp(shard) else None
        except (OSError, ValueError):
            return None

    def put(self, shard: str, entry: dict) -> None:
        import uuid  # pylint: disable=g-import-not-at-top
        target = self._file(shard)
        tmp = target.parent / f".{target.name}.{uuid.uuid4().hex}.tmp"
        tmp.write_text(json.dumps(dict(entry, stamp=self._stamp(shard))))
        tmp.rename(target)


_UNREADABLE = (OSError, tarfile.TarError, EOFError, ValueError)


def build_index(kind: str, shards: list[str], index_one: Callable[[str, Index], None], settings: dict, *,
                cache_dir: str = "", threads: int = 16, process_index: int = 0, process_count: int = 1) -> Index:
    """The index of all `shards`: `index_one(shard, part)` fills a one-shard Index (records carrying
    shard id 0), read from / written to the cache when `cache_dir` is set. Shards are indexed in
    `threads` threads (the work is mostly waiting for reads on gs://), each host starting at its own
    offset so that with a cache the hosts of a job share the first scan; the result does not depend
    on the thread count, the host or the cache."""
    from concurrent.futures import ThreadPoolExecutor  # pylint: disable=g-import-not-at-top
    cache = ShardIndexCache(cache_dir, dict(settings, kind=kind)) if cache_dir else None

    def one(shard: str) -> dict:
        if cache is not None:
            hit = cache.get(shard)
            if hit is not None:
                return hit
        part = Index([shard], [])
        try:
            index_one(shard, part)
        except _UNREADABLE as e:
            log.warning("skipping unreadable shard %s (%s: %s)", shard, type(e).__name__, e)
            return {"records": [], "dropped": {}, "bad": f"{type(e).__name__}: {e}", "unreadable": True}
        entry = {"records": [list(r[1:]) for r in part.records], "dropped": part.dropped,
                 "bad": part.bad_shards.get(shard)}
        if cache is not None:
            try:
                cache.put(shard, entry)
            except OSError as e:  # a read-only cache still serves what it has
                log.warning("cannot write the index cache for %s (%s)", shard, e)
        return entry

    start = (process_index * len(shards)) // max(1, process_count)
    order = shards[start:] + shards[:start]
    with ThreadPoolExecutor(max(1, min(threads, len(shards)))) as pool:
        entries = dict(zip(order, pool.map(one, order)))
    index = Index(shards, [])
    for shard_id, shard in enumerate(shards):
        entry = entries[shard]
        index.records.extend((shard_id, *(tuple(x) if isinstance(x, list) else x for x in r))
                             for r in entry["records"])
        for cause, n in entry["dropped"].items():
            index.dropped[cause] = index.dropped.get(cause, 0) + n
        if entry["bad"]:
            index.bad_shards[shard] = entry["bad"]
    log.info("%s: %s", kind, index.summary())
    return index


def _split_member(name: str) -> tuple[str, str]:
    """'dir/000123.jpg' -> ('dir/000123', 'jpg'): the key is everything before the first dot of the basename."""
    slash = name.rfind("/")
    dot = name.find(".", slash + 1)
    return (name, "") if dot < 0 else (name[:dot], name[dot + 1:].lower())


def _read_at(path: str, offset: int, size: int) -> bytes:
    with _path(path).open("rb") as f:
        f.seek(offset)
        data = f.read(size)
    if len(data) != size:
        raise OSError(f"short read ({len(data)} of {size} bytes)")
    return data


class WebDatasetSource:
    """img2dataset WebDataset shards: `{key}.jpg|png|webp` with `{key}.txt` and `{key}.json`."""

    def __init__(self, patterns, *, caption_required: bool = True, filters: Filters = Filters(), **index_kw):
        self._caption_required = caption_required
        self.index = build_index("webdataset", list_shards(patterns, ".tar"),
                                 lambda shard, part: self._index_shard(shard, part, filters),
                                 dict(caption_required=caption_required, filters=dataclasses.asdict(filters)),
                                 **index_kw)

    def _index_shard(self, shard: str, index: Index, filters: Filters):
        shard_id = 0
        groups: dict[str, dict[str, tuple[int, int]]] = {}
        order: list[str] = []
        with _path(shard).open("rb") as f:
            file_size = f.seek(0, 2)
            f.seek(0)
            cut = 0
            try:
                with tarfile.open(fileobj=f, mode="r:") as tar:
                    for member in tar:
                        if not member.isfile():
                            continue
                        if member.offset_data + member.size > file_size:  # tarfile stops quietly at a cut
                            cut += 1
                            continue
                        key, ext = _split_member(member.name)
                        if key not in groups:
                            groups[key] = {}
                            order.append(key)
                        groups[key][ext] = (member.offset_data, member.size)
                    # A whole tar ends in two zero blocks; a cut one stops early and quietly.
                    f.seek(tar.offset)
                    tail = f.read(1024)
                    if len(tail) < 1024 or tail.strip(b"\0"):
                        cut += 1
            except (tarfile.ReadError, EOFError, OSError) as e:
                # A truncated shard: keep what was indexed before the damage, and say so.
                if not order:
                    raise
                cut = cut or 1
                log.warning("shard %s: %s: %s", shard, type(e).__name__, e)
            if cut:
                index.bad_shards[shard] = f"truncated after {len(order)} keys"
                log.warning("shard %s is truncated; reading the %d keys before the damage", shard, len(order))
            for key in order:
                members = groups[key]
                image_ext = next((e for e in IMAGE_EXTS if e in members), None)
                if image_ext is None:
                    index.drop("no_image")
                    continue
                # img2dataset writes an empty .txt for a row without caption: no caption either.
                if self._caption_required and members.get("txt", (0, 0))[1] == 0:
                    index.drop("no_caption")
                    continue
                if filters.active:
                    meta = {}
                    if "json" in members:
                        off, size = members["json"]
                        f.seek(off)
                        try:
                            meta = json.loads(f.read(size))
                        except ValueError:
                            meta = {}
                    why = filters.reason(meta)
                    if why:
                        index.drop(why)
                        continue
                index.records.append((shard_id, key, members[image_ext], members.get("txt")))

    def __len__(self):
        return len(self.index.records)

    def __getitem__(self, i: int) -> dict:
        shard_id, key, image, txt = self.index.records[i]
        shard = self.index.shards[shard_id]
        out = {"key": key.rsplit("/", 1)[-1], "shard": shard}
        try:
            out["image"] = _read_at(shard, *image)
            out["caption"] = _read_at(shard, *txt).decode("utf-8", "replace").strip() if txt else ""
        except OSError as e:
            out["_read_error"] = f"read_error: {shard} {key}: {e}"
        return out


class ParquetSource:
    """img2dataset Parquet shards: `caption`, `key`, metadata columns, the image bytes under the encode
    format's name (`jpg`, `png`, `webp`); rows of failed downloads (null image) are left out."""

    def __init__(self, patterns, *, caption_required: bool = True, filters: Filters = Filters(), **index_kw):
        self._caption_required, self._filters = caption_required, filters
        self.index = build_index("parquet", list_shards(patterns, ".parquet"), self._index_shard,
                                 dict(caption_required=caption_required, filters=dataclasses.asdict(filters)),
                                 **index_kw)

    def _index_shard(self, shard: str, index: Index):
        import pyarrow.parquet as pq
        try:
            with _path(shard).open("rb") as f:
                pf = pq.ParquetFile(f)
                names = pf.schema_arrow.names
                col = next((c for c in IMAGE_EXTS if c in names), "")
                if not col:
                    raise OSError(f"no image column: expected one named {IMAGE_EXTS}")
                meta_cols = [c for c in names if c != col]
                for group in range(pf.num_row_groups):
                    table = pf.read_row_group(group, columns=meta_cols + [col])
                    images = table.column(col)
                    rows = table.drop([col]).to_pylist()
                    for row_in_group, (row, image) in enumerate(zip(rows, images)):
                        if not image.is_valid:
                            index.drop("failed_download")
                            continue
                        if self._caption_required and not row.get("caption"):
                            index.drop("no_caption")
                            continue
                        why = self._filters.reason(row) if self._filters.active else None
                        if why:
                            index.drop(why)
                            continue
                        index.records.append((0, group, row_in_group, col))
        except _UNREADABLE:
            raise
        except Exception as e:  # pylint: disable=broad-except  (pyarrow raises its own types)
            raise OSError(f"{type(e).__name__}: {e}") from e

    def __len__(self):
        return len(self.index.records)

    def __getitem__(self, i: int) -> dict:
        import pyarrow.parquet as pq
        shard_id, group, row, col = self.index.records[i]
        shard = self.index.shards[shard_id]
        try:
            # One row group per read: img2dataset writes small groups; large ones make this slow.
            with _path(shard).open("rb") as f:
                pf = pq.ParquetFile(f)
                cols = [c for c in (col, "caption", "key") if c in pf.schema_arrow.names]
                record = pf.read_row_group(group, columns=cols).slice(row, 1).to_pylist()[0]
            return {"image": record[col], "caption": record.get("caption") or "",
                    "key": str(record.get("key", f"{group}:{row}")), "shard": shard}
        except Exception as e:  # pylint: disable=broad-except
            return {"key": f"{group}:{row}", "shard": shard, "_read_error": f"read_error: {shard}: {e}"}


def _walk(folder) -> list[str]:
    """Every file under `folder`, recursively (epath's glob refuses '**' on gs://)."""
    out = []
    for child in folder.iterdir():
        out.extend(_walk(child) if child.is_dir() else [str(child)])
    return out


class TFRecordSource:
    """img2dataset TFRecord shards: tf.train.Example records with `key`, the image bytes under the
    encode format's name (`jpg`, `png`, `webp`), `txt` and the metadata fields. Record offsets are
    found once by reading the length prefixes (TFRecord framing: 8-byte length, 4-byte CRC, data,
    4-byte CRC); a record read is one seek and one read."""

    def __init__(self, patterns, *, caption_required: bool = True, filters: Filters = Filters(), **index_kw):
        self._caption_required, self._filters = caption_required, filters
        self.index = build_index("tfrecord", list_shards(patterns, ".tfrecord"), self._index_shard,
                                 dict(caption_required=caption_required, filters=dataclasses.asdict(filters)),
                                 **index_kw)

    def _index_shard(self, shard: str, index: Index):
        shard_id = 0
        with _path(shard).open("rb") as f:
            size, offset = f.seek(0, 2), 0
            f.seek(0)
            while offset < size:
                head = f.read(12)
                if len(head) < 12:
                    index.bad_shards[shard] = f"truncated at byte {offset}"
                    break
                length = int.from_bytes(head[:8], "little")
                if offset + 16 + length > size:
                    index.bad_shards[shard] = f"truncated at byte {offset}"
                    break
                data = f.read(length) if self._filters.active or self._caption_required else None
                if data is None:
                    f.seek(length, 1)
                f.seek(4, 1)
                keep = True
                if data is not None:
                    fields = _example_fields(data)
                    if not any(e in fields for e in IMAGE_EXTS):
                        index.drop("no_image")
                        keep = False
                    elif self._caption_required and not fields.get("txt"):
                        index.drop("no_caption")
                        keep = False
                    elif self._filters.active:
                        why = self._filters.reason(fields)
                        if why:
                            index.drop(why)
                            keep = False
                if keep:
                    index.records.append((shard_id, offset + 12, length))
                offset += 16 + length

    def __len__(self):
        return len(self.index.records)

    def __getitem__(self, i: int) -> dict:
        shard_id, offset, length = self.index.records[i]
        shard = self.index.shards[shard_id]
        try:
            fields = _example_fields(_read_at(shard, offset, length))
            image = next(fields[e] for e in IMAGE_EXTS if e in fields)
            return {"image": image, "caption": (fields.get("txt") or b"").decode("utf-8", "replace").strip(),
                    "key": (fields.get("key") or b"").decode("utf-8", "replace"), "shard": shard}
        except Exception as e:  # pylint: disable=broad-except
            return {"key": f"@{offset}", "shard": shard, "_read_error": f"read_error: {shard}: {e}"}


def _example_fields(data: bytes) -> dict:
    """A serialized tf.train.Example as {name: bytes or number} (first value of each feature)."""
    from tensorflow.core.example import example_pb2  # pylint: disable=g-import-not-at-top
    example = example_pb2.Example.FromString(data)
    out = {}
    for name, feature in example.features.feature.items():
        kind = feature.WhichOneof("kind")
        values = getattr(feature, kind).value if kind else []
        if values:
            out[name] = values[0]
    return out


class FolderSource:
    """A folder of images, recursive. Captions from same-name `.txt` files (img2dataset `files`
    output), or with `labels=True` the first-level subfolder names as classes (sorted, from 0)."""

    def __init__(self, root: str, *, labels: bool = False, caption_required: bool = False,
                 filters: Filters = Filters()):
        base = _path(root)
        if not base.is_dir():
            raise FileNotFoundError(f"data.shards: the image folder {root!r} does not exist")
        files = sorted(p for p in _walk(base) if _split_member(p)[1] in IMAGE_EXTS)
        self.index = Index([root], [])
        names = sorted({str(_path(f).relative_to(base)).split("/")[0] for f in files if "/" in
                        str(_path(f).relative_to(base))})
        self.class_names = names if labels else []
        for f in files:
            stem = _split_member(f)[0]
            txt, meta_path = _path(stem + ".txt"), _path(stem + ".json")
            has_txt = txt.exists()
            if caption_required and not has_txt:
                self.index.drop("no_caption")
                continue
            if filters.active:
                try:
                    meta = json.loads(meta_path.read_text()) if meta_path.exists() else {}
                except ValueError:
                    meta = {}
                if not ({"width", "original_width"} & set(meta)) and (filters.min_width or filters.min_height
                                                                       or filters.max_aspect_ratio):
                    from PIL import Image
                    try:
                        with Image.open(f) as im:
                            meta["width"], meta["height"] = im.size
                    except Exception:  # pylint: disable=broad-except  (left to the decoder to count)
                        pass
                why = filters.reason(meta)
                if why:
                    self.index.drop(why)
                    continue
            label = names.index(str(_path(f).relative_to(base)).split("/")[0]) if labels else -1
            self.index.records.append((f, str(txt) if has_txt else "", label))
        if labels and not names:
            raise ValueError(f"data.folder_labels=True, but {root!r} has no class subfolders")
        log.info("folder: %s", self.index.summary())

    def __len__(self):
        return len(self.index.records)

    def __getitem__(self, i: int) -> dict:
        path, txt, label = self.index.records[i]
        out: dict[str, Any] = {"key": _split_member(path)[0].rsplit("/", 1)[-1], "shard": path,
                               "label": np.int64(label)}
        try:
            out["image"] = _path(path).read_bytes()
            out["caption"] = _path(txt).read_text().strip() if txt else ""
        except OSError as e:
            out["_read_error"] = f"read_error: {path}: {e}"
        return out


def open_records(cfg: dict, split: str, process_index: int = 0, process_count: int = 1):
    """The source config.data names for `split` (train: data.shards, else data.eval_shards); the
    process only decides where this host starts indexing (see build_index), not the result."""
    kind = cfg["source"]
    patterns = cfg["shards"] if split == cfg["train_split"] else cfg["eval_shards"]
    if not patterns:
        option = "data.shards" if split == cfg["train_split"] else "data.eval_shards"
        raise ValueError(f"data.source={kind!r} reads the files in --config.{option}, which is empty "
                         f"(split {split!r}); set it to a glob, a brace range or a folder")
    filters = Filters(int(cfg["min_width"]), int(cfg["min_height"]), float(cfg["max_aspect_ratio"]),
                      cfg["filter_where"] or "")
    wants_caption = "caption" in cfg["keys"]
    kw = dict(caption_required=wants_caption, filters=filters, cache_dir=cfg["index_cache"] or "",
              threads=int(cfg["index_threads"]), process_index=process_index, process_count=process_count)
    if kind == "webdataset":
        source = WebDatasetSource(patterns, **kw)
    elif kind == "parquet":
        source = ParquetSource(patterns, **kw)
    elif kind == "tfrecord":
        source = TFRecordSource(patterns, **kw)
    elif kind == "folder":
        source = FolderSource(patterns, labels=bool(cfg["folder_labels"]), caption_required=wants_caption,
                              filters=filters)
    else:
        raise ValueError(f"data.source must be one of {KINDS}, got {kind!r}")
    if not len(source):
        raise ValueError(f"data.source={kind!r} found no usable record in {patterns!r}: {source.index.summary()}")
    return source


def features_of(source, keys) -> dict:
    """TFDS feature objects describing these records, for the loader's decoder."""
    import tensorflow_datasets as tfds
    feats = {"image": tfds.features.Image(), "caption": tfds.features.Text(), "key": tfds.features.Text()}
    names = getattr(source, "class_names", [])
    if names:
        feats["label"] = tfds.features.ClassLabel(names=names)
    unknown = [k for k in keys if k not in feats]
    if unknown:
        raise KeyError(f"data.keys {unknown} are not given by this source; it gives {sorted(feats)}")
    return feats
