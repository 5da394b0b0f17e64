"""Grain loader over TFDS array_record datasets, and the preprocessing helpers."""

import io
import logging

import grain
import numpy as np
import orbax.checkpoint as ocp
import pytest
import tensorflow_datasets as tfds
from PIL import Image

from latent_diffusion import config_fields
from latent_diffusion.data import loader, preprocess, shapes

KEYS = ("caption", "label", "objects", "segmentation")


@pytest.fixture(scope="module")
def shapes_dir(tmp_path_factory):
    data_dir = str(tmp_path_factory.mktemp("tfds"))
    shapes.ensure_built(data_dir, "tiny")
    return data_dir


def _cfg(data_dir, **overrides):
    cfg = config_fields.config_dict(config_fields.DATA, "data")
    cfg.update(
        dict(
            name="shapes",
            random_flip=False,
            config="tiny",
            data_dir=data_dir,
            resolution=32,
            keys=KEYS,
            max_objects=6,
            num_threads=2,
            prefetch_buffer_size=8,
        )
    )
    cfg.update(overrides)
    return cfg


def _take(it, n):
    return [next(it) for _ in range(n)]


def _assert_batches_equal(a, b):
    for x, y in zip(a, b):
        assert x.keys() == y.keys()
        for k in x:
            if k == "objects":
                for s in x[k]:
                    np.testing.assert_array_equal(x[k][s], y[k][s])
            else:
                np.testing.assert_array_equal(x[k], y[k])


def test_batch_shapes_dtypes_and_ranges(shapes_dir):
    it = loader.make_dataset(
        _cfg(shapes_dir, resolution=24, random_crop=True, random_flip=True),
        "train",
        global_batch_size=8,
        seed=0,
        process_index=0,
        process_count=2,
    )
    for batch in _take(it, 3):
        assert batch["image"].shape == (4, 24, 24, 3) and batch["image"].dtype == np.float32
        assert -1 <= batch["image"].min() < batch["image"].max() <= 1
        assert batch["caption"].dtype == object and isinstance(batch["caption"][0], str)
        assert batch["label"].shape == (4,) and batch["label"].dtype == np.int32
        assert batch["segmentation"].shape == (4, 24, 24, 1)
        assert batch["segmentation"].dtype == np.uint8
        assert batch["segmentation"].max() < shapes.NUM_SEGMENTATION_CLASSES
        objects = batch["objects"]
        assert objects["bbox"].shape == (4, 6, 4) and objects["label"].shape == (4, 6)
        assert objects["mask"].dtype == bool and objects["mask"].any(1).all()
        assert (objects["bbox"] >= 0).all() and (objects["bbox"] <= 1).all()
        assert not objects["bbox"][~objects["mask"]].any()
        # Crop and flip moved boxes and class map together: every labelled pixel lies in
        # a surviving box of its class.
        for b in range(4):
            seg = batch["segmentation"][b, ..., 0]
            covered = np.zeros_like(seg, bool)
            for box, label, ok in zip(objects["bbox"][b], objects["label"][b], objects["mask"][b]):
                if ok:
                    y0, x0 = np.floor(box[:2] * 24).astype(int)
                    y1, x1 = np.ceil(box[2:] * 24).astype(int)
                    covered[y0:y1, x0:x1] |= seg[y0:y1, x0:x1] == 1 + label
            assert not ((seg > 0) & ~covered).any()
    assert it.skipped == 0


def test_deterministic_and_seeded(shapes_dir):
    cfg = _cfg(shapes_dir, random_flip=True)
    a = _take(
        loader.make_dataset(cfg, "train", global_batch_size=4, seed=3, process_index=0, process_count=1), 3
    )
    b = _take(
        loader.make_dataset(cfg, "train", global_batch_size=4, seed=3, process_index=0, process_count=1), 3
    )
    c = _take(
        loader.make_dataset(cfg, "train", global_batch_size=4, seed=4, process_index=0, process_count=1), 3
    )
    _assert_batches_equal(a, b)
    assert not np.array_equal(a[0]["image"], c[0]["image"])


def test_checkpoint_resumes_exactly(shapes_dir, tmp_path):
    # The test split has 16 examples: 5 batches of 4 cross an epoch boundary.
    cfg = _cfg(shapes_dir, random_flip=True, random_crop=True, resolution=28)
    make = lambda: loader.make_dataset(
        cfg, "test", global_batch_size=4, seed=1, process_index=0, process_count=1
    )
    it = make()
    _take(it, 3)
    manager = ocp.CheckpointManager(tmp_path / "ckpt")
    manager.save(3, args=ocp.args.Composite(ds=grain.checkpoint.CheckpointSave(it)))
    manager.wait_until_finished()
    state = it.get_state()
    expected = _take(it, 2)

    fresh = make()
    next(fresh)  # a restored iterator must not care where it was
    manager.restore(3, args=ocp.args.Composite(ds=grain.checkpoint.CheckpointRestore(fresh)))
    _assert_batches_equal(_take(fresh, 2), expected)
    manager.close()

    again = make()
    again.set_state(state)
    _assert_batches_equal(_take(again, 2), expected)


def _all_images(it):
    return [img.tobytes() for batch in it for img in batch["image"]]


def test_processes_read_disjoint_shards(shapes_dir):
    cfg = _cfg(shapes_dir, drop_remainder=False)
    kw = dict(global_batch_size=4, seed=0, shuffle=False, num_epochs=1)
    full = _all_images(loader.make_dataset(cfg, "train", process_index=0, process_count=1, **kw))
    parts = [
        _all_images(loader.make_dataset(cfg, "train", process_index=i, process_count=2, **kw))
        for i in range(2)
    ]
    assert len(full) == 64 and [len(p) for p in parts] == [32, 32]
    assert not set(parts[0]) & set(parts[1])
    assert set(parts[0]) | set(parts[1]) == set(full)
    with pytest.raises(ValueError, match="divisible"):
        loader.make_dataset(cfg, "train", process_index=0, process_count=3, **kw)


def test_global_batch_does_not_depend_on_process_count(shapes_dir):
    # Random crops and flips too: per-example randomness must follow the global index.
    cfg = _cfg(shapes_dir, random_flip=True, random_crop=True)
    kw = dict(global_batch_size=8, seed=3, shuffle=True)
    single = _take(loader.make_dataset(cfg, "train", process_index=0, process_count=1, **kw), 3)
    for count in (2, 4):
        parts = [
            _take(loader.make_dataset(cfg, "train", process_index=i, process_count=count, **kw), 3)
            for i in range(count)
        ]
        for step in range(3):
            joined = np.concatenate([p[step]["image"] for p in parts])
            np.testing.assert_array_equal(joined, single[step]["image"])
            assert list(np.concatenate([p[step]["caption"] for p in parts])) == list(single[step]["caption"])


# A second, unrelated TFDS image dataset: odd sizes, grayscale / RGBA / palette PNGs, one
# corrupt and one truncated record. Every image is one flat colour, so the expected
# pixels do not depend on the resize filter.
_GREYS = [10, 60, 110, 160, 210, 250, 30, 90, 140, 200]
_BAD = {3: b"definitely not an image", 7: None}


def _png(i):
    grey = _GREYS[i]
    size = (20 + 3 * i, 30 - i)
    mode = ("L", "RGB", "RGBA", "P")[i % 4]
    if mode == "L":
        pil = Image.new("L", size, grey)
    else:
        pil = Image.new("RGB", size, (grey, grey, grey))
        if mode == "RGBA":
            pil.putalpha(128)
        elif mode == "P":
            pil = pil.convert("P")
    buf = io.BytesIO()
    pil.save(buf, format="PNG")
    data = buf.getvalue()
    if i in _BAD:
        return _BAD[i] or data[: len(data) // 2]
    return data


class LoaderTestImages(tfds.core.GeneratorBasedBuilder):
    """Tiny image dataset for the loader tests."""

    VERSION = tfds.core.Version("0.1.0")

    @tfds.core.utils.classproperty
    @classmethod
    def _checksums_path(cls):  # nothing is downloaded
        return None

    def _info(self):
        return self.dataset_info_from_configs(
            features=tfds.features.FeaturesDict(
                {
                    "image": tfds.features.Image(shape=(None, None, 3)),
                    "grey": tfds.features.Scalar(np.int64),
                    "caption": tfds.features.Text(),
                }
            ),
            disable_shuffling=True,
        )

    def _split_generators(self, dl_manager):
        return {"train": self._generate_examples()}

    def _generate_examples(self):
        for i in range(len(_GREYS)):
            yield i, {"image": _png(i), "grey": _GREYS[i], "caption": f"grey {_GREYS[i]}"}


@pytest.fixture(scope="module")
def other_dir(tmp_path_factory):
    data_dir = str(tmp_path_factory.mktemp("other"))
    LoaderTestImages(data_dir=data_dir, file_format="array_record").download_and_prepare(
        file_format="array_record", download_config=tfds.download.DownloadConfig(compute_stats="skip")
    )
    return data_dir


def test_any_tfds_image_dataset_with_corrupt_records(other_dir, caplog):
    cfg = _cfg(
        other_dir,
        name="loader_test_images",
        config=None,
        resolution=16,
        keys=("grey", "caption"),
        drop_remainder=False,
    )
    it = loader.make_dataset(
        cfg,
        "train",
        global_batch_size=4,
        seed=0,
        shuffle=False,
        num_epochs=1,
        process_index=0,
        process_count=1,
    )
    with caplog.at_level(logging.WARNING):
        batches = list(it)
    assert [len(b["grey"]) for b in batches] == [4, 4]
    good = [g for i, g in enumerate(_GREYS) if i not in _BAD]
    np.testing.assert_array_equal(np.concatenate([b["grey"] for b in batches]), good)
    for b in batches:
        assert b["image"].shape[1:] == (16, 16, 3)
        expected = preprocess.to_float(np.asarray(b["grey"], np.uint8))
        np.testing.assert_allclose(
            b["image"], np.broadcast_to(expected[:, None, None, None], b["image"].shape), atol=1e-6
        )
        assert list(b["caption"]) == [f"grey {g}" for g in b["grey"]]
    assert it.skipped == 2
    assert it.get_state()["skipped"] == 2
    warnings = [r for r in caplog.records if "corrupt" in r.getMessage()]
    assert len(warnings) == 1 and "loader_test_images" in warnings[0].getMessage()


def test_missing_dataset_errors(tmp_path, other_dir):
    kw = dict(global_batch_size=2, seed=0, process_index=0, process_count=1)
    empty = str(tmp_path / "empty")
    with pytest.raises(FileNotFoundError, match=r"tfds build loader_test_images") as e:
        loader.make_dataset(_cfg(empty, name="loader_test_images", config=None, keys=()), "train", **kw)
    assert empty in str(e.value) and "never downloads" in str(e.value)
    with pytest.raises(FileNotFoundError, match="no_such_dataset_xyz"):
        loader.make_dataset(_cfg(empty, name="no_such_dataset_xyz", config=None, keys=()), "train", **kw)
    with pytest.raises(KeyError, match="caption.*grey|grey.*caption"):
        loader.make_dataset(
            _cfg(other_dir, name="loader_test_images", config=None, keys=("segmentation",)), "train", **kw
        )
    with pytest.raises(ValueError, match="no split"):
        loader.make_dataset(
            _cfg(other_dir, name="loader_test_images", config=None, keys=()), "validation", **kw
        )
    with pytest.raises(ValueError, match="imgae_key"):
        loader.make_dataset({"name": "shapes", "imgae_key": "x"}, "train", **kw)


def test_extra_transforms_for_ldm_tasks(shapes_dir):
    class InpaintMask(grain.transforms.RandomMap):
        def random_map(self, x, rng):
            return {**x, "mask": preprocess.random_inpaint_mask(rng, 32, 32)}

    add_lowres = lambda x: {**x, "lowres": preprocess.lowres(x["image"], 4)}
    it = loader.make_dataset(
        _cfg(shapes_dir, keys=()),
        "train",
        global_batch_size=2,
        seed=0,
        extra_transforms=(add_lowres, InpaintMask()),
        process_index=0,
        process_count=1,
    )
    batch = next(it)
    assert batch["lowres"].shape == (2, 8, 8, 3) and batch["mask"].shape == (2, 32, 32, 1)
    assert set(np.unique(batch["mask"])) <= {0.0, 1.0}


def test_preprocess_helpers():
    rng = np.random.default_rng(0)
    img = rng.integers(0, 256, (16, 20, 3), dtype=np.uint8)
    np.testing.assert_array_equal(preprocess.to_uint8(preprocess.to_float(img)), img)
    assert preprocess.center_crop(img, 8).shape == (8, 8, 3)
    assert preprocess.random_crop(rng, img, 8).shape == (8, 8, 3)
    # Bicubic 4x downsampling of a smooth ramp stays close to the block means.
    ramp = np.linspace(-1, 1, 32, dtype=np.float32)[None, :, None].repeat(32, 0).repeat(3, 2)
    low = preprocess.lowres(ramp[None], 4)
    assert low.shape == (1, 8, 8, 3) and low.dtype == np.float32
    np.testing.assert_allclose(low[0], ramp.reshape(32, 8, 4, 3).mean(2)[::4], atol=0.02)
    # Boxes follow the crop and flip applied to a label map.
    seg = np.zeros((40, 60, 1), np.uint8)
    seg[10:20, 5:15] = 1
    plan = preprocess.plan_crop(40, 60, 20, np.random.default_rng(1), flip=True)
    (box,), (keep,) = preprocess.crop_boxes(np.array([[10 / 40, 5 / 60, 20 / 40, 15 / 60]]), plan)
    cropped = preprocess.apply_crop(seg, plan, "nearest")[..., 0]
    ys, xs = np.nonzero(cropped)
    if keep:
        np.testing.assert_allclose(box * 20, [ys.min(), xs.min(), ys.max() + 1, xs.max() + 1], atol=1)
    else:
        assert ys.size == 0
    masks = np.stack([preprocess.random_inpaint_mask(rng, 32, 32) for _ in range(20)])
    assert masks.shape == (20, 32, 32, 1) and masks.dtype == np.float32
    assert 0 < masks.mean() < 1 and (masks.reshape(20, -1).max(1) == 1).all()
    onehot = preprocess.one_hot_segmentation(np.array([[[0], [2]]], np.uint8), 3)
    np.testing.assert_array_equal(onehot, [[[1, 0, 0], [0, 0, 1]]])
    with pytest.raises(ValueError, match="segmentation values"):
        preprocess.one_hot_segmentation(np.array([[3]]), 3)


def test_flipped_captions_swap_left_and_right():
    from latent_diffusion.data import preprocess
    assert preprocess.mirror_text("a red circle at the top left and a star on the Right") == (
        "a red circle at the top right and a star on the Left")
    assert preprocess.mirror_text("leftover, righteous, in the center") == "leftover, righteous, in the center"


def test_worker_processes_give_the_same_batches_and_resume(shapes_dir):
    # Decoding in 2 worker processes (grain mp_prefetch) changes neither the batches nor their order.
    cfg = _cfg(shapes_dir, random_flip=True, random_crop=True, resolution=28, keys=("caption", "label"))
    make = lambda **kw: loader.make_dataset(dict(cfg.to_dict(), **kw), "train", global_batch_size=4, seed=5,
                                            process_index=0, process_count=1)
    threads = _take(make(), 6)
    it = make(num_workers=2)
    _assert_batches_equal(_take(it, 4), threads[:4])
    state = it.get_state()
    resumed = make(num_workers=2)
    resumed.set_state(state)
    _assert_batches_equal(_take(resumed, 2), threads[4:])
    with pytest.raises(ValueError, match="data.num_workers=2, this run has 0"):
        make().set_state(state)
    for i in (it, resumed):
        i.close()


def test_jpeg_draft_decodes_large_jpegs_at_a_reduced_scale():
    rng = np.random.default_rng(0)
    ramp = np.linspace(0, 255, 640)[None, :, None] * np.ones((480, 1, 3))
    img = np.clip(ramp + rng.normal(0, 8, ramp.shape), 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="JPEG", quality=95)
    full = loader._decode_image(buf.getvalue(), rgb=True)
    assert full.shape == (480, 640, 3)
    # Shorter side 480 >= 2 x 100: decoded at 1/4 (120 x 160), the largest scale keeping 100 px.
    small = loader._decode_image(buf.getvalue(), rgb=True, min_side=100)
    assert small.shape == (120, 160, 3)
    assert loader._decode_image(buf.getvalue(), rgb=True, min_side=250).shape == (480, 640, 3)
    # After the loader's resize to the target the two agree closely (JPEG's DCT scaling is a box filter).
    a = preprocess.resize(full, 75, 100, "bicubic").astype(np.float32)
    b = preprocess.resize(small, 75, 100, "bicubic").astype(np.float32)
    assert np.abs(a - b).mean() < 3.0
    # A PNG is never drafted.
    png = io.BytesIO()
    Image.fromarray(img).save(png, format="PNG")
    assert loader._decode_image(png.getvalue(), rgb=True, min_side=100).shape == (480, 640, 3)
