"""Files read in place (data/sources.py): img2dataset WebDataset / Parquet / TFRecord / files layouts, written
by data/img2dataset_layout.py, and image folders, with their bad records, filters, host slices and exact
resume through the loader."""
import hashlib
import io
import json
import os
import shutil
import tarfile

import numpy as np
import pytest
from PIL import Image

from latent_diffusion.data import img2dataset_layout as layout
from latent_diffusion.data import loader, sources

_PNG_MODES = ("RGBA", "P", "I;16")


def _pixels(seed, size=(20, 24)):
    return np.random.default_rng(seed).integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)


def _image(seed, size=(20, 24), mode="RGB"):
    """Encoded image bytes: JPEG for RGB and CMYK, PNG for RGBA, palette and 16-bit greyscale."""
    rgb = Image.fromarray(_pixels(seed, size))
    if mode == "I;16":  # 16-bit: the 8-bit grey levels scaled to the full 0..65535 range
        im = Image.fromarray(np.asarray(rgb.convert("L")).astype(np.uint16) * 257)
        assert im.mode == "I;16"
    else:
        im = rgb.convert(mode)
    buf = io.BytesIO()
    im.save(buf, format="PNG" if mode in _PNG_MODES else "JPEG")
    return buf.getvalue()


def _examples(shard_id, n, *, bad_image=(), no_caption=(), failed=(), mode_of=None, meta=None, seed=0):
    """n img2dataset input rows for shard `shard_id`; arguments name indices within the shard."""
    out = []
    for i in range(n):
        key = layout.compute_key(shard_id, i, 10_000)
        image = (None if i in failed else b"not an image" if i in bad_image
                 else _image(seed + 100 * shard_id + i, mode=(mode_of or {}).get(i, "RGB")))
        ex = dict(image=image, caption=None if i in no_caption else f"caption {key}",
                  url=f"https://example.invalid/{key}.jpg", aesthetic=6.0, punsafe=0.0,
                  original_width=640, original_height=480)
        ex.update((meta or {}).get(i, {}))
        out.append(ex)
    return out


def _drop_members(path, names):
    """Rewrites a tar without the named members (a shard edited by hand, or damaged)."""
    with tarfile.open(path) as tar:
        kept = [(m, tar.extractfile(m).read()) for m in tar if m.name not in names]
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as tar:
        for m, data in kept:
            tar.addfile(m, io.BytesIO(data))


@pytest.fixture(scope="module")
def wds(tmp_path_factory):
    root = tmp_path_factory.mktemp("wds")
    # Shard 0: a corrupt image (3), a key whose .txt is gone (4) and one with an empty caption (10), one too
    # small for the filter (5), non-RGB images (RGBA, palette, CMYK, 16-bit grey: 6-9), a failed download (11).
    layout.write_shard(_examples(0, 12, bad_image={3}, no_caption={10}, failed={11},
                                 meta={5: {"original_width": 100}},
                                 mode_of={6: "RGBA", 7: "P", 8: "CMYK", 9: "I;16"}), root, 0)
    _drop_members(root / "00000.tar", {"000000004.txt"})
    layout.write_shard(_examples(1, 10, meta={1: {"aesthetic": 4.0}, 2: {"punsafe": 0.9}}), root, 1)
    # A truncated shard (its second half cut off) and an empty one (every download failed).
    layout.write_shard(_examples(2, 10), root, 2)
    data = (root / "00002.tar").read_bytes()
    (root / "00002.tar").write_bytes(data[: len(data) // 2])
    layout.write_shard(_examples(3, 3, failed={0, 1, 2}), root, 3)
    layout.write_shard(_examples(0, 8, seed=7), root / "eval", 0)
    return root


def _cfg(root, **kw):
    cfg = dict(source="webdataset", shards=f"{root}/{{00000..00003}}.tar,{root}/00001.tar",
               eval_shards=f"{root}/eval/00000.tar", keys=("caption",), resolution=16, random_flip=False,
               num_threads=1, min_width=256)
    cfg.update(kw)
    return cfg


def test_brace_ranges_and_globs(wds):
    assert sources.expand_braces("a/{008..011}.tar") == ["a/008.tar", "a/009.tar", "a/010.tar", "a/011.tar"]
    assert sources.expand_braces("{x,y}{1..2}") == ["x1", "x2", "y1", "y2"]
    tars = [str(wds / f"{i:05d}.tar") for i in range(4)]
    assert sources.list_shards(f"{wds}/0000*.tar", ".tar") == tars
    # A folder stands for its tars: the .parquet and _stats.json img2dataset writes beside them are not shards.
    assert sources.list_shards(str(wds), ".tar") == tars


def test_webdataset_index_counts_what_it_leaves_out(wds):
    src = sources.WebDatasetSource([f"{wds}/{{00000..00003}}.tar", f"{wds}/00001.tar"],
                                   filters=sources.Filters(min_width=256, where="aesthetic>=5,punsafe<0.5"))
    idx = src.index
    assert len(idx.shards) == 4  # 00001 listed twice, read once
    # The missing .txt and the empty one (the failed download is not in the tar at all), and at most one
    # key the cut left without its .txt or its .json (no size to filter on).
    no_caption, no_size = idx.dropped.pop("no_caption"), idx.dropped.pop("filter:no_size", 0)
    assert no_caption >= 2 and no_caption - 2 + no_size <= 1
    assert idx.dropped == {"filter:min_size": 1, "filter:aesthetic": 1, "filter:punsafe": 1}
    assert "truncated" in idx.bad_shards[str(wds / "00002.tar")]
    assert str(wds / "00003.tar") not in idx.bad_shards  # an empty tar is whole, just empty
    keys = [src[i]["key"] for i in range(len(src))]
    assert keys[:8] == ["000000000", "000000001", "000000002", "000000003", "000000006", "000000007",
                        "000000008", "000000009"]
    assert len(keys) == len(set(keys)) and "000020000" in keys  # the truncated shard's first keys are kept
    first = src[0]
    assert first["caption"] == "caption 000000000" and Image.open(io.BytesIO(first["image"])).size == (20, 24)
    with pytest.raises(ValueError, match="cannot read 'aesthetic=5'"):
        sources.Filters(where="aesthetic=5")


def test_index_cache_scans_each_shard_once(wds, tmp_path, monkeypatch):
    """data.index_cache: the same index from the cache, from any host's starting point and any thread
    count; a cached shard is not scanned again, a changed one is; unreadable shards are not cached."""
    patterns, filters = [f"{wds}/{{00000..00003}}.tar"], sources.Filters(min_width=256, where="aesthetic>=5")
    plain = sources.WebDatasetSource(patterns, filters=filters).index
    cache = str(tmp_path / "index")
    first = sources.WebDatasetSource(patterns, filters=filters, cache_dir=cache, threads=3, process_index=1,
                                     process_count=2).index
    assert first == plain and len(os.listdir(cache)) == 4  # the empty shard too; the truncated one as such
    scanned = []
    real = sources.WebDatasetSource._index_shard
    monkeypatch.setattr(sources.WebDatasetSource, "_index_shard",
                        lambda self, shard, *a: scanned.append(shard) or real(self, shard, *a))
    again = sources.WebDatasetSource(patterns, filters=filters, cache_dir=cache, threads=1).index
    assert again == plain and scanned == []
    # Other filters are another cache entry; a rewritten shard is indexed again.
    sources.WebDatasetSource(patterns, cache_dir=cache)
    assert len(scanned) == 4 and len(os.listdir(cache)) == 8
    scanned.clear()
    copy = tmp_path / "copy"
    shutil.copytree(wds, copy)
    moved = [f"{copy}/{{00000..00003}}.tar"]
    sources.WebDatasetSource(moved, cache_dir=cache)
    assert len(scanned) == 4
    scanned.clear()
    (copy / "00001.tar").write_bytes((copy / "00000.tar").read_bytes())
    os.utime(copy / "00001.tar", (1, 1))
    sources.WebDatasetSource(moved, cache_dir=cache)
    assert scanned == [str(copy / "00001.tar")]


def test_loader_reads_webdataset_and_counts_bad_images(wds):
    n = len(sources.WebDatasetSource(_cfg(wds)["shards"], filters=sources.Filters(min_width=256)))
    it = loader.make_dataset(_cfg(wds), "train", global_batch_size=4, seed=0, shuffle=True, num_epochs=1)
    batches = list(it)
    seen = sum(len(b["caption"]) for b in batches)
    assert batches[0]["image"].shape == (4, 16, 16, 3) and batches[0]["image"].dtype == np.float32
    assert -1.0 <= batches[0]["image"].min() and batches[0]["image"].max() <= 1.0
    assert all(c.startswith("caption ") for b in batches for c in b["caption"])
    # Non-RGB images are converted; only the undecodable one is dropped, counted by cause.
    assert it.skipped == 1 and it.skipped_by_cause == {"UnidentifiedImageError": 1}
    assert seen == 4 * ((n - 1) // 4)
    ev = list(loader.make_dataset(_cfg(wds), "test", global_batch_size=4, seed=0, shuffle=False, num_epochs=1))
    assert [c for b in ev for c in b["caption"]] == [f"caption {layout.compute_key(0, i, 10_000)}" for i in range(8)]


def _decoded_shard0(wds):
    """{caption: decoded float image} of every record of shard 0, and the iterator that read them."""
    it = loader.make_dataset(_cfg(wds, shards=f"{wds}/00000.tar", min_width=0), "train", global_batch_size=1,
                             seed=0, shuffle=False, num_epochs=1)
    return {str(b["caption"][0]): b["image"][0] for b in it}, it


def test_non_rgb_images_are_converted(wds):
    images, it = _decoded_shard0(wds)
    assert it.skipped == 1  # the corrupt image only
    for i, mode in ((6, "RGBA"), (7, "P"), (8, "CMYK"), (9, "I;16")):
        image = images[f"caption {layout.compute_key(0, i, 10_000)}"]
        assert image.shape == (16, 16, 3) and image.dtype == np.float32, mode
        assert -1.0 <= image.min() and image.max() <= 1.0, mode
    # A CMYK JPEG keeps its colours (the mean of a noise image, through JPEG and the resize).
    cmyk = images[f"caption {layout.compute_key(0, 8, 10_000)}"]
    assert abs(cmyk.mean() - (_pixels(8).mean() / 127.5 - 1)) < 0.05


def test_16bit_greyscale_keeps_its_grey_levels(wds):
    images, _ = _decoded_shard0(wds)
    grey = images[f"caption {layout.compute_key(0, 9, 10_000)}"]
    expected = np.asarray(Image.fromarray(_pixels(9)).convert("L")).mean() / 127.5 - 1
    assert abs(grey.mean() - expected) < 0.05, f"mean {grey.mean():.3f}, expected about {expected:.3f}"


def test_webdataset_resume_and_host_slices(wds):
    cfg = _cfg(wds)
    make = lambda **kw: loader.make_dataset(cfg, "train", global_batch_size=4, seed=3, shuffle=True,
                                            num_epochs=None, **kw)
    straight = make()
    ref = [next(straight)["caption"].tolist() for _ in range(8)]
    it = make()
    for _ in range(5):
        next(it)
    state = it.get_state()
    resumed = make()
    resumed.set_state(json.loads(json.dumps(state)))
    assert [next(resumed)["caption"].tolist() for _ in range(3)] == ref[5:]
    # Two hosts read disjoint halves of each global batch (of a shard with no bad record: a host
    # that drops one fills its batch from its own next elements).
    clean = dict(cfg, shards=f"{wds}/00001.tar")
    make = lambda **kw: loader.make_dataset(clean, "train", global_batch_size=4, seed=3, shuffle=True,
                                            num_epochs=None, **kw)
    one, hosts = make(), [make(process_index=p, process_count=2) for p in range(2)]
    for _ in range(6):
        a, b = (next(h)["caption"].tolist() for h in hosts)
        assert a + b == next(one)["caption"].tolist()


def test_missing_shards_option_names_it(wds):
    with pytest.raises(ValueError, match="data.eval_shards"):
        loader.make_dataset(_cfg(wds, eval_shards=""), "test", global_batch_size=4, seed=0, num_epochs=1)
    with pytest.raises(ValueError, match="no usable record"):
        loader.make_dataset(_cfg(wds, shards=f"{wds}/00003.tar"), "train", global_batch_size=4, seed=0)


def test_parquet_skips_failed_downloads(tmp_path):
    # 230 rows in shards of 200: row groups of 100 (img2dataset's), keys of 5 + 3 digits.
    failed, unsafe = {2, 7, 150}, {5, 120}
    rows = _examples(0, 230, failed=failed, meta={i: {"punsafe": 0.9} for i in unsafe})
    layout.write_shards(rows, tmp_path / "pq", "parquet", 200)
    assert sorted(os.listdir(tmp_path / "pq")) == ["00000.parquet", "00000_stats.json", "00001.parquet",
                                                   "00001_stats.json"]
    src = sources.ParquetSource(str(tmp_path / "pq"), filters=sources.Filters(where="punsafe<0.5"))
    assert src.index.dropped == {"failed_download": 3, "filter:punsafe": 2} and not src.index.bad_shards
    keys = [layout.compute_key(i // 200, i % 200, 200) for i in range(230)]
    assert keys[199:201] == ["00000199", "00001000"]
    assert [src[i]["key"] for i in range(len(src))] == [k for i, k in enumerate(keys) if i not in failed | unsafe]
    cfg = dict(source="parquet", shards=str(tmp_path / "pq"), keys=("caption",), resolution=16,
               random_flip=False, num_threads=1)
    batches = list(loader.make_dataset(cfg, "train", global_batch_size=3, seed=0, shuffle=False, num_epochs=1))
    kept = [f"caption {layout.compute_key(0, i, 10_000)}" for i in range(230) if i not in failed]
    assert [c for b in batches for c in b["caption"]] == kept[:225]  # 227 rows: 75 whole batches
    # The metadata-only parquet img2dataset writes beside a tar is no image shard: said so, not read.
    layout.write_shard(rows[:4], tmp_path / "wds", 0)
    meta_only = sources.ParquetSource(str(tmp_path / "wds" / "00000.parquet"))
    assert "no image column" in meta_only.index.bad_shards[str(tmp_path / "wds" / "00000.parquet")]


def test_image_folder_with_captions_or_class_subfolders(tmp_path):
    for cls in ("cat", "dog"):
        os.makedirs(tmp_path / "classes" / cls / "nested")
        for i in range(3):
            (tmp_path / "classes" / cls / "nested" / f"{i}.jpg").write_bytes(_image(i))
    cfg = dict(source="folder", shards=str(tmp_path / "classes"), folder_labels=True, keys=("label",),
               resolution=16, random_flip=False, num_threads=1)
    batch = next(loader.make_dataset(cfg, "train", global_batch_size=6, seed=0, shuffle=False, num_epochs=1))
    assert batch["label"].tolist() == [0, 0, 0, 1, 1, 1]
    # img2dataset's `files` output: one folder per shard of {key}.jpg/.txt/.json, a failed download absent;
    # a caption file deleted by hand is a record without caption.
    layout.write_shard(_examples(0, 5, failed={4}), tmp_path / "files", 0, "files")
    os.remove(tmp_path / "files" / "00000" / "000000002.txt")
    src = sources.FolderSource(str(tmp_path / "files"), caption_required=True)
    assert src.index.dropped == {"no_caption": 1} and [src[i]["caption"] for i in range(3)] == [
        f"caption {layout.compute_key(0, i, 10_000)}" for i in (0, 1, 3)]


def test_too_many_bad_records_stops_naming_the_shard(tmp_path):
    layout.write_shard(_examples(0, 300, bad_image=set(range(0, 300, 3))), tmp_path, 0)
    cfg = dict(source="webdataset", shards=str(tmp_path / "00000.tar"), keys=("caption",), resolution=8,
               random_flip=False, num_threads=1, max_bad_fraction=0.2)
    it = loader.make_dataset(cfg, "train", global_batch_size=8, seed=0, num_epochs=None)
    with pytest.raises(loader.TooManyBadRecords, match=r"00000.tar \(\d+\)"):
        for _ in range(60):
            next(it)
    # A lenient threshold reads on, and the counts by cause and shard go on with it.
    it = loader.make_dataset(dict(cfg, max_bad_fraction=0.5), "train", global_batch_size=8, seed=0,
                             num_epochs=None)
    for _ in range(60):
        next(it)
    assert it.skipped_by_cause == {"UnidentifiedImageError": it.skipped} and it.skipped > 100
    assert it.skipped_by_shard == {str(tmp_path / "00000.tar"): it.skipped}


def test_tfrecord_shards(tmp_path):
    rows = _examples(0, 8, no_caption={2}, failed={6}, meta={4: {"original_width": 8}})
    layout.write_shard(rows, tmp_path, 0, "tfrecord")
    src = sources.TFRecordSource(str(tmp_path), filters=sources.Filters(min_width=32, where="punsafe<0.5"))
    assert src.index.dropped == {"no_caption": 1, "filter:min_size": 1} and not src.index.bad_shards
    assert [src[i]["caption"] for i in range(len(src))] == [f"caption {layout.compute_key(0, i, 10_000)}"
                                                           for i in (0, 1, 3, 5, 7)]
    cfg = dict(source="tfrecord", shards=str(tmp_path / "00000.tfrecord"), keys=("caption",), resolution=16,
               random_flip=False, num_threads=1)
    batch = next(loader.make_dataset(cfg, "train", global_batch_size=5, seed=0, shuffle=False, num_epochs=1))
    assert batch["image"].shape == (5, 16, 16, 3) and batch["caption"][0] == "caption 000000000"


def test_resume_with_another_host_count_is_refused(wds):
    make = lambda p, n: loader.make_dataset(_cfg(wds), "train", global_batch_size=4, seed=0, num_epochs=None,
                                            process_index=p, process_count=n)
    it = make(0, 2)
    next(it)
    with pytest.raises(ValueError, match="saved by 2 process.*this job has 1"):
        make(0, 1).set_state(it.get_state())


# --- the writer's layout is img2dataset's ----------------------------------------------------------------

_META_FIELDS = ["aesthetic", "caption", "url", "key", "status", "error_message", "width", "height",
                "original_width", "original_height", "exif", "sha256"]


def _layout_rows():
    return [dict(image=_image(0), caption="a red circle", url="https://example.invalid/0.jpg", aesthetic=6.5),
            dict(image=None, caption="lost", url="https://example.invalid/1.jpg", aesthetic=5.0,
                 error_message="<urlopen error timed out>"),
            dict(image=_image(2, size=(32, 16)), caption="a blue star", url="https://example.invalid/2.jpg",
                 aesthetic=4.0, original_width=640, original_height=320)]


def test_writer_layout_is_img2dataset(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq
    assert layout.compute_key(3, 12, 10_000) == "000030012" and layout.compute_key(3, 12, 256) == "00003012"
    rows = _layout_rows()
    stats = layout.write_shard(rows, tmp_path / "wds", 3)
    assert sorted(os.listdir(tmp_path / "wds")) == ["00003.parquet", "00003.tar", "00003_stats.json"]
    # The tar: per successful sample image, json, txt (webdataset's TarWriter sorts a sample's members),
    # PAX headers (the float mtime), read-only members owned by bigdata; the failed download is absent.
    with tarfile.open(tmp_path / "wds" / "00003.tar") as tar:
        members = tar.getmembers()
        assert [m.name for m in members] == ["000030000.jpg", "000030000.json", "000030000.txt",
                                             "000030002.jpg", "000030002.json", "000030002.txt"]
        assert all(m.mode == 0o444 and m.uname == m.gname == "bigdata" and "mtime" in m.pax_headers
                   for m in members)
        assert tar.extractfile("000030000.txt").read() == b"a red circle"
        assert tar.extractfile("000030002.jpg").read() == rows[2]["image"]
        raw = tar.extractfile("000030002.json").read().decode()
    assert raw.startswith('{\n    "aesthetic": 4.0,')  # json.dumps(meta, indent=4)
    meta = json.loads(raw)
    assert list(meta) == _META_FIELDS
    assert meta == dict(aesthetic=4.0, caption="a blue star", url="https://example.invalid/2.jpg", key="000030002",
                        status="success", error_message=None, width=32, height=16, original_width=640,
                        original_height=320, exif="{}", sha256=hashlib.sha256(rows[2]["image"]).hexdigest())
    # The parquet beside it: every row, the failed download included, with img2dataset's column types.
    table = pq.read_table(tmp_path / "wds" / "00003.parquet")
    assert table.schema.names == _META_FIELDS
    assert table.schema.field("width").type == pa.int32() and table.schema.field("exif").type == pa.string()
    got = table.to_pylist()
    assert [r["status"] for r in got] == ["success", "failed_to_download", "success"]
    assert got[1] == dict(aesthetic=5.0, caption="lost", url="https://example.invalid/1.jpg", key="000030001",
                          status="failed_to_download", error_message="<urlopen error timed out>", width=None,
                          height=None, original_width=None, original_height=None, exif=None, sha256=None)
    assert got[0]["width"] == 20 and got[0]["original_height"] == 24 and got[2] == meta
    # The stats file: img2dataset's fields exactly.
    on_disk = json.loads((tmp_path / "wds" / "00003_stats.json").read_text())
    assert on_disk == stats and list(on_disk) == ["count", "successes", "failed_to_download", "failed_to_resize",
                                                  "duration", "start_time", "end_time", "status_dict"]
    assert (on_disk["count"], on_disk["successes"], on_disk["failed_to_download"], on_disk["failed_to_resize"]) == (
        3, 2, 1, 0)
    assert on_disk["status_dict"] == {"success": 2, "<urlopen error timed out>": 1}
    assert on_disk["end_time"] - on_disk["start_time"] == pytest.approx(on_disk["duration"])

    # parquet: the metadata columns, then the image bytes named by the encode format (null when failed).
    layout.write_shard(rows, tmp_path / "pq", 3, "parquet", encode_format="png")
    assert sorted(os.listdir(tmp_path / "pq")) == ["00003.parquet", "00003_stats.json"]
    table = pq.read_table(tmp_path / "pq" / "00003.parquet")
    assert table.schema.names == _META_FIELDS + ["png"] and table.schema.field("png").type == pa.binary()
    assert table.column("png").to_pylist() == [rows[0]["image"], None, rows[2]["image"]]
    # tfrecord: key, the image under the encode format's name, txt, then every metadata field.
    from tensorflow.core.example import example_pb2
    layout.write_shard(rows, tmp_path / "tfr", 3, "tfrecord")
    assert sorted(os.listdir(tmp_path / "tfr")) == ["00003.parquet", "00003.tfrecord", "00003_stats.json"]
    src = sources.TFRecordSource(str(tmp_path / "tfr" / "00003.tfrecord"))
    assert len(src) == 2
    offset, length = src.index.records[1][1:]
    with open(tmp_path / "tfr" / "00003.tfrecord", "rb") as f:
        f.seek(offset)
        feats = example_pb2.Example.FromString(f.read(length)).features.feature
    assert set(feats) == {"jpg", "txt"} | set(_META_FIELDS)
    assert feats["txt"].bytes_list.value == [b"a blue star"] and feats["key"].bytes_list.value == [b"000030002"]
    assert feats["width"].int64_list.value == [32] and feats["aesthetic"].float_list.value == [4.0]
    assert feats["error_message"].bytes_list.value == [b""]  # None is written as empty bytes
    # files: one folder per shard, the parquet and stats beside it.
    layout.write_shard(rows, tmp_path / "files", 3, "files", encode_format="webp")
    assert sorted(os.listdir(tmp_path / "files")) == ["00003", "00003.parquet", "00003_stats.json"]
    assert sorted(os.listdir(tmp_path / "files" / "00003")) == [
        "000030000.json", "000030000.txt", "000030000.webp", "000030002.json", "000030002.txt", "000030002.webp"]
    assert json.loads((tmp_path / "files" / "00003" / "000030002.json").read_text()) == meta
    with pytest.raises(ValueError, match="same extra fields"):
        layout.write_shard(rows + [dict(rows[0], punsafe=0.1)], tmp_path / "bad", 0)


def test_every_format_reads_back_the_same_records(tmp_path):
    rows = _examples(0, 9, failed={1, 5})
    for fmt in layout.FORMATS:
        layout.write_shards(rows, tmp_path / fmt, fmt, 4)
    src = {"webdataset": sources.WebDatasetSource(str(tmp_path / "webdataset")),
           "parquet": sources.ParquetSource(str(tmp_path / "parquet")),
           "tfrecord": sources.TFRecordSource(str(tmp_path / "tfrecord")),
           "files": sources.FolderSource(str(tmp_path / "files"), caption_required=True)}
    want = [(layout.compute_key(i // 4, i % 4, 4), rows[i]["caption"], rows[i]["image"])
            for i in range(9) if i not in (1, 5)]
    for fmt, s in src.items():
        assert [(s[i]["key"], s[i]["caption"], s[i]["image"]) for i in range(len(s))] == want, fmt


def test_write_shards_script_writes_shapes_the_loader_reads(shapes_data_dir, tmp_path, capsys):
    import importlib.util

    from latent_diffusion.data import shapes
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    spec = importlib.util.spec_from_file_location("write_shards", os.path.join(root, "scripts", "write_shards.py"))
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    out = tmp_path / "wds"
    script.main(["--config=tiny", f"--data_dir={shapes_data_dir}", "--split=test", "--format=webdataset",
                 f"--out={out}", "--samples_per_shard=8", "--failed_every=5"])
    pattern = capsys.readouterr().out.strip().splitlines()[-1]
    assert pattern == f"{out}/{{00000..00001}}.tar"  # what to pass as data.shards
    stats = [json.loads((out / f"0000{i}_stats.json").read_text()) for i in range(2)]
    assert [(s["count"], s["successes"]) for s in stats] == [(8, 7), (8, 6)]  # rows 4, 9 and 14 failed
    cfg = dict(source="webdataset", shards=pattern, eval_shards=pattern, keys=("caption",), resolution=32,
               random_flip=False, num_threads=1)
    batch = next(loader.make_dataset(cfg, "test", global_batch_size=13, seed=0, shuffle=False, num_epochs=1))
    renders = [shapes.render_example(shapes.example_seed("test", i), 32) for i in range(16) if i % 5 != 4]
    assert batch["caption"].tolist() == [r["caption"] for r in renders]
    # JPEG at quality 95 of each render.
    diff = np.abs(batch["image"] - np.stack([r["image"] for r in renders]) / 127.5 + 1)
    assert diff.mean() < 0.03
