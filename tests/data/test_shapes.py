"""Shapes renderer and TFDS builder."""

import concurrent.futures
import io
import os
import re
import time

import numpy as np
import pytest
from PIL import Image

from latent_diffusion.data import shapes

_PHRASE = re.compile(
    r"a (small|medium|large) (\w+) (\w+) (at the top left|at the top right|"
    r"at the bottom left|at the bottom right|at the top|at the bottom|"
    r"on the left|on the right|in the center)"
)


def _phrases(caption):
    found = _PHRASE.findall(caption)
    # Nothing but the phrases and their joining words.
    rest = _PHRASE.sub("#", caption).replace(", ", "").replace(" and ", "")
    assert set(rest) == {"#"}, caption
    return found


def _nearest_color(rgb):
    names = list(shapes.COLORS)
    dist = [np.abs(np.asarray(shapes.COLORS[n]) - rgb).sum() for n in names]
    return names[int(np.argmin(dist))]


def test_render_is_deterministic_and_seed_dependent():
    a = shapes.render_example([0, 7], 64)
    b = shapes.render_example(np.random.default_rng([0, 7]), 64)
    c = shapes.render_example([1, 7], 64)
    assert a["caption"] == b["caption"]
    for k in ("image", "segmentation"):
        np.testing.assert_array_equal(a[k], b[k])
    np.testing.assert_array_equal(a["objects"]["bbox"], b["objects"]["bbox"])
    assert a["caption"] != c["caption"] or not np.array_equal(a["image"], c["image"])


@pytest.mark.parametrize("resolution", [32, 64, 128])
def test_example_types(resolution):
    ex = shapes.render_example([0, 3], resolution)
    assert ex["image"].shape == (resolution, resolution, 3) and ex["image"].dtype == np.uint8
    assert ex["segmentation"].shape == (resolution, resolution, 1)
    assert ex["segmentation"].dtype == np.uint8
    n = len(ex["objects"]["label"])
    assert 1 <= n <= shapes.MAX_OBJECTS and ex["objects"]["bbox"].shape == (n, 4)
    assert isinstance(ex["caption"], str) and 0 <= ex["label"] < shapes.NUM_CLASSES


def test_scene_is_resolution_independent():
    small, large = shapes.render_example([0, 11], 32), shapes.render_example([0, 11], 128)
    assert small["caption"] == large["caption"]
    np.testing.assert_allclose(small["objects"]["bbox"], large["objects"]["bbox"], atol=2 / 32)


def test_captions_boxes_and_segmentation_agree():
    res = 64
    for i in range(40):
        ex = shapes.render_example([0, i], res)
        phrases = _phrases(ex["caption"])
        boxes, labels = ex["objects"]["bbox"], ex["objects"]["label"]
        seg = ex["segmentation"][..., 0]
        assert len(phrases) == len(labels)
        covered = np.zeros_like(seg, bool)
        for (size, color, kind, where), box, label in zip(phrases, boxes, labels):
            assert label == shapes.object_class(kind, color)
            ymin, xmin, ymax, xmax = box
            assert 0 <= ymin < ymax <= 1 and 0 <= xmin < xmax <= 1
            cy, cx = int((ymin + ymax) / 2 * res), int((xmin + xmax) / 2 * res)
            assert _nearest_color(ex["image"][cy, cx].astype(int)) == color, (i, ex["caption"])
            assert seg[cy, cx] == 1 + label
            row, col = int((ymin + ymax) / 2 * 3), int((xmin + xmax) / 2 * 3)
            assert shapes.POSITIONS[row][col] == where
            # The box is exactly the extent of the object's pixels in the class map.
            y0, x0, y1, x1 = (np.round(box * res)).astype(int)
            inside = seg[y0:y1, x0:x1] == 1 + label
            assert inside[0].any() and inside[-1].any() and inside[:, 0].any() and inside[:, -1].any()
            covered[y0:y1, x0:x1] |= inside
        # No labelled pixel lies outside every box.
        assert not ((seg > 0) & ~covered).any()
        sizes = [shapes.SIZE_NAMES.index(p[0]) for p in phrases]
        assert ex["label"] == labels[int(np.argmax(sizes))]


def test_all_kinds_colors_and_sizes_occur():
    seen = set()
    for i in range(200):
        seen.update(_phrases(shapes.render_example([0, i], 32)["caption"]))
    assert {p[1] for p in seen} == set(shapes.COLORS)
    assert {p[2] for p in seen} == set(shapes.KINDS)
    assert {p[0] for p in seen} == set(shapes.SIZES)


def _decode(png):
    return np.asarray(Image.open(io.BytesIO(png)))


def test_builder_builds_tiny_config(tmp_path):
    start = time.time()
    builder = shapes.ensure_built(str(tmp_path), "tiny")
    assert time.time() - start < 30
    assert builder.info.splits["train"].num_examples == 64
    assert builder.info.splits["test"].num_examples == 16
    assert builder.info.file_format.value == "array_record"
    import tensorflow_datasets as tfds

    source = builder.as_data_source(
        "test", decoders={"image": tfds.decode.SkipDecoding(), "segmentation": tfds.decode.SkipDecoding()}
    )
    for i in (0, 5):
        expected = shapes.render_example(shapes.example_seed("test", i), 32)
        np.testing.assert_array_equal(_decode(source[i]["image"]), expected["image"])
        np.testing.assert_array_equal(_decode(source[i]["segmentation"]), expected["segmentation"][..., 0])
        assert source[i]["caption"].decode() == expected["caption"]
        assert source[i]["label"] == expected["label"]
    # Idempotent: a second call reuses the files instead of rebuilding.
    files = sorted(os.listdir(builder.data_dir))
    mtimes = [os.path.getmtime(os.path.join(builder.data_dir, f)) for f in files]
    again = shapes.ensure_built(str(tmp_path), "tiny")
    assert [os.path.getmtime(os.path.join(again.data_dir, f)) for f in files] == mtimes
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".shapes-build")]


def test_concurrent_ensure_built(tmp_path):
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        builders = list(pool.map(lambda _: shapes.ensure_built(str(tmp_path), "tiny"), range(2)))
    assert all(b.is_prepared() for b in builders)
    assert len(builders[0].as_data_source("train")) == 64
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".shapes-build")]
