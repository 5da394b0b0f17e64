"""Files read in place (data/sources.py): img2dataset WebDataset / Parquet / files layouts and image
folders, with their bad records, filters, host slices and exact resume through the loader."""
import io
import json
import os
import tarfile

import numpy as np
import pytest
from PIL import Image

from latent_diffusion.data import loader, sources


def _jpeg(seed, size=(20, 24), mode="RGB"):
    rng = np.random.default_rng(seed)
    arr = rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)
    im = Image.fromarray(arr).convert(mode)
    buf = io.BytesIO()
    im.save(buf, format="PNG" if mode in ("RGBA", "P", "I;16") else "JPEG")
    return buf.getvalue()


def _add(tar, name, data):
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def _write_shard(path, keys, *, bad_image=(), no_caption=(), meta=None, mode_of=None):
    """img2dataset's layout: per key {key}.jpg, {key}.txt, {key}.json, in PAX format."""
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as tar:
        for k in keys:
            mode = (mode_of or {}).get(k, "RGB")
            image = b"not an image" if k in bad_image else _jpeg(int(k), mode=mode)
            _add(tar, f"{k}.{'png' if mode != 'RGB' else 'jpg'}", image)
            if k not in no_caption:
                _add(tar, f"{k}.txt", f"caption {k}".encode())
            m = {"key": k, "original_width": 640, "original_height": 480, "aesthetic": 6.0,
                 "punsafe": 0.0}
            m.update((meta or {}).get(k, {}))
            _add(tar, f"{k}.json", json.dumps(m).encode())


@pytest.fixture(scope="module")
def wds(tmp_path_factory):
    root = tmp_path_factory.mktemp("wds")
    _write_shard(root / "00000.tar", [f"{i:09d}" for i in range(0, 10)], bad_image={"000000003"},
                 no_caption={"000000004"}, meta={"000000005": {"original_width": 100}},
                 mode_of={"000000006": "RGBA", "000000007": "P"})
    _write_shard(root / "00001.tar", [f"{i:09d}" for i in range(10, 20)],
                 meta={"000000011": {"aesthetic": 4.0}, "000000012": {"punsafe": 0.9}})
    # A truncated shard (its second half cut off) and an empty one.
    _write_shard(root / "00002.tar", [f"{i:09d}" for i in range(20, 30)])
    data = (root / "00002.tar").read_bytes()
    (root / "00002.tar").write_bytes(data[: len(data) // 2])
    with tarfile.open(root / "00003.tar", "w"):
        pass
    _write_shard(root / "eval.tar", [f"{i:09d}" for i in range(100, 108)])
    return root


def _cfg(root, **kw):
    cfg = dict(source="webdataset", shards=f"{root}/{{00000..00003}}.tar,{root}/00001.tar",
               eval_shards=f"{root}/eval.tar", keys=("caption",), resolution=16, random_flip=False, num_threads=1,
               min_width=256)
    cfg.update(kw)
    return cfg


def test_brace_ranges_and_globs(wds):
    assert sources.expand_braces("a/{008..011}.tar") == ["a/008.tar", "a/009.tar", "a/010.tar", "a/011.tar"]
    assert sources.expand_braces("{x,y}{1..2}") == ["x1", "x2", "y1", "y2"]
    assert sources.list_shards(f"{wds}/0000*.tar", ".tar") == [str(wds / f"{i:05d}.tar") for i in range(4)]
    assert sources.list_shards(str(wds), ".tar")[-1].endswith("eval.tar")


def test_webdataset_index_counts_what_it_leaves_out(wds):
    src = sources.WebDatasetSource([f"{wds}/{{00000..00003}}.tar", f"{wds}/00001.tar"],
                                   filters=sources.Filters(min_width=256, where="aesthetic>=5,punsafe<0.5"))
    idx = src.index
    assert len(idx.shards) == 4  # 00001 listed twice, read once
    # The truncated shard's last key may have lost its .json (no size to filter on).
    assert idx.dropped.pop("filter:no_size", 0) <= 1
    assert idx.dropped == {"no_caption": 1, "filter:min_size": 1, "filter:aesthetic": 1, "filter:punsafe": 1}
    assert "truncated" in idx.bad_shards[str(wds / "00002.tar")]
    keys = [src[i]["key"] for i in range(len(src))]
    assert keys[:5] == ["000000000", "000000001", "000000002", "000000003", "000000006"]
    assert len(keys) == len(set(keys)) and "000000020" in keys  # the truncated shard's first keys are kept
    first = src[0]
    assert first["caption"] == "caption 000000000" and Image.open(io.BytesIO(first["image"])).size == (20, 24)
    with pytest.raises(ValueError, match="cannot read 'aesthetic=5'"):
        sources.Filters(where="aesthetic=5")


def test_loader_reads_webdataset_and_counts_bad_images(wds):
    n = len(sources.WebDatasetSource(_cfg(wds)["shards"], filters=sources.Filters(min_width=256)))
    it = loader.make_dataset(_cfg(wds), "train", global_batch_size=4, seed=0, shuffle=True, num_epochs=1)
    batches = list(it)
    seen = sum(len(b["caption"]) for b in batches)
    assert batches[0]["image"].shape == (4, 16, 16, 3) and batches[0]["image"].dtype == np.float32
    assert -1.0 <= batches[0]["image"].min() and batches[0]["image"].max() <= 1.0
    assert all(c.startswith("caption ") for b in batches for c in b["caption"])
    # RGBA and palette images are converted; only the undecodable one is dropped, counted by cause.
    assert it.skipped == 1 and it.skipped_by_cause == {"UnidentifiedImageError": 1}
    assert seen == 4 * ((n - 1) // 4)
    ev = list(loader.make_dataset(_cfg(wds), "test", global_batch_size=4, seed=0, shuffle=False, num_epochs=1))
    assert [c for b in ev for c in b["caption"]] == [f"caption {i:09d}" for i in range(100, 108)]


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
    import pyarrow as pa
    import pyarrow.parquet as pq
    keys = [f"{i:09d}" for i in range(12)]
    images = [None if i in (2, 7) else _jpeg(i) for i in range(12)]
    table = pa.table({"key": keys, "caption": [f"caption {k}" for k in keys],
                      "width": [32] * 12, "punsafe": [0.9 if i == 5 else 0.1 for i in range(12)],
                      "jpg": pa.array(images, pa.binary())})
    pq.write_table(table, tmp_path / "00000.parquet", row_group_size=5)
    src = sources.ParquetSource(str(tmp_path / "00000.parquet"), filters=sources.Filters(where="punsafe<0.5"))
    assert src.index.dropped == {"failed_download": 2, "filter:punsafe": 1}
    assert [src[i]["key"] for i in range(len(src))] == [k for i, k in enumerate(keys) if i not in (2, 5, 7)]
    cfg = dict(source="parquet", shards=str(tmp_path / "00000.parquet"), keys=("caption",), resolution=16,
               random_flip=False, num_threads=1)
    batches = list(loader.make_dataset(cfg, "train", global_batch_size=3, seed=0, shuffle=False, num_epochs=1))
    kept = [f"caption {k}" for i, k in enumerate(keys) if i not in (2, 7)]
    assert [c for b in batches for c in b["caption"]] == kept[:9]  # 10 rows: three whole batches


def test_image_folder_with_captions_or_class_subfolders(tmp_path):
    for cls in ("cat", "dog"):
        os.makedirs(tmp_path / "classes" / cls / "nested")
        for i in range(3):
            (tmp_path / "classes" / cls / "nested" / f"{i}.jpg").write_bytes(_jpeg(i))
    cfg = dict(source="folder", shards=str(tmp_path / "classes"), folder_labels=True, keys=("label",),
               resolution=16, random_flip=False, num_threads=1)
    batch = next(loader.make_dataset(cfg, "train", global_batch_size=6, seed=0, shuffle=False, num_epochs=1))
    assert batch["label"].tolist() == [0, 0, 0, 1, 1, 1]
    # img2dataset's `files` output: one folder per shard of {key}.jpg/.txt/.json.
    shard = tmp_path / "files" / "00000"
    os.makedirs(shard)
    for i in range(4):
        (shard / f"{i:09d}.jpg").write_bytes(_jpeg(i))
        if i != 2:
            (shard / f"{i:09d}.txt").write_text(f"caption {i}")
    src = sources.FolderSource(str(tmp_path / "files"), caption_required=True)
    assert src.index.dropped == {"no_caption": 1} and [src[i]["caption"] for i in range(3)] == [
        "caption 0", "caption 1", "caption 3"]


def test_too_many_bad_records_stops_naming_the_shard(tmp_path):
    keys = [f"{i:09d}" for i in range(300)]
    _write_shard(tmp_path / "00000.tar", keys, bad_image=set(keys[::3]))
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
    import tensorflow as tf
    path = str(tmp_path / "00000.tfrecord")
    with tf.io.TFRecordWriter(path) as w:
        for i in range(7):
            feats = {"key": tf.train.Feature(bytes_list=tf.train.BytesList(value=[f"{i:09d}".encode()])),
                     "jpg": tf.train.Feature(bytes_list=tf.train.BytesList(value=[_jpeg(i)])),
                     "width": tf.train.Feature(int64_list=tf.train.Int64List(value=[64 if i != 4 else 8]))}
            if i != 2:
                feats["txt"] = tf.train.Feature(bytes_list=tf.train.BytesList(value=[f"caption {i}".encode()]))
            w.write(tf.train.Example(features=tf.train.Features(feature=feats)).SerializeToString())
    src = sources.TFRecordSource(path, filters=sources.Filters(where="width>=32"))
    assert src.index.dropped == {"no_caption": 1, "filter:width": 1}
    assert [src[i]["caption"] for i in range(len(src))] == [f"caption {i}" for i in (0, 1, 3, 5, 6)]
    cfg = dict(source="tfrecord", shards=path, keys=("caption",), resolution=16, random_flip=False, num_threads=1)
    batch = next(loader.make_dataset(cfg, "train", global_batch_size=5, seed=0, shuffle=False, num_epochs=1))
    assert batch["image"].shape == (5, 16, 16, 3) and batch["caption"][0] == "caption 0"


def test_resume_with_another_host_count_is_refused(wds):
    make = lambda p, n: loader.make_dataset(_cfg(wds), "train", global_batch_size=4, seed=0, num_epochs=None,
                                            process_index=p, process_count=n)
    it = make(0, 2)
    next(it)
    with pytest.raises(ValueError, match="saved by 2 process.*this job has 1"):
        make(0, 1).set_state(it.get_state())
