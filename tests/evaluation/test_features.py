"""Sharded feature extraction (batch size / device count independence), image sets and stats files."""
import json
import logging
import os
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest
from PIL import Image

from latent_diffusion.convert.inception import random_params
from latent_diffusion.evaluation import stats as S
from latent_diffusion.evaluation.features import ArrayRows, FeatureExtractor, ShardedMap
from latent_diffusion.evaluation.images import ArraySet, open_image_set
from latent_diffusion.models.inception import InceptionV3


def test_features_independent_of_batch_size_and_devices():
    assert len(jax.devices()) == 8  # tests/conftest.py fakes 8 CPU devices
    # The real network at its smallest input (75x75, no resize) keeps compile time down; the
    # 299 path with the resize is covered by the parity test.
    module = InceptionV3(resize_to=None)
    params = random_params(module, seed=1)
    images = ArraySet(np.random.RandomState(0).randint(0, 256, (10, 75, 75, 3), dtype=np.uint8), "test")
    runs = {}
    for batch_size, n_devices in [(7, 8), (64, 8), (7, 1), (64, 1)]:
        fe = FeatureExtractor(module, params, batch_size, devices=jax.devices()[:n_devices], progress=False)
        assert fe.batch_size % n_devices == 0
        runs[(batch_size, n_devices)] = fe(images)
    base = runs[(7, 8)]
    assert base["pool3"].shape == (10, 2048) and base["logits_unbiased"].shape == (10, 1008)
    direct = jax.jit(lambda p, x: module.apply({"params": p}, x))(params, images.images)
    for k in base:
        # Neither the batch size nor the device count changes a bit: every row runs as the same
        # batch-1 program on whichever device holds it.
        for key in [(64, 8), (7, 1), (64, 1)]:
            np.testing.assert_array_equal(runs[key][k], base[k], err_msg=f"{k} {key}")
        scale = np.abs(base[k]).max()
        # A batched call picks other conv blockings than batch-1 rows: rounding only as well.
        assert np.abs(np.asarray(direct[k]) - base[k]).max() <= 1e-5 * scale, k


def _save(path, arr, mode=None):
    img = Image.fromarray(arr)
    if mode:
        img = img.convert(mode)
    img.save(path)


def test_folder_modes_sizes_and_jpeg_warning(tmp_path, caplog):
    rng = np.random.RandomState(0)
    rgb = [rng.randint(0, 256, (16, 16, 3), dtype=np.uint8) for _ in range(5)]
    _save(tmp_path / "a.png", rgb[0])
    _save(tmp_path / "b.png", rgb[1], "L")
    _save(tmp_path / "c.png", rgb[2], "RGBA")
    _save(tmp_path / "d.png", rgb[3], "P")
    _save(tmp_path / "e.jpg", rgb[4])
    with caplog.at_level(logging.WARNING):
        images = open_image_set(str(tmp_path), "samples")
    assert images.info.num_images == 5 and images.info.converted_to_rgb == 3
    assert any("JPEG" in w for w in images.info.warnings)
    batches = list(images.batches(2))
    assert [b.shape for b in batches] == [(2, 16, 16, 3), (2, 16, 16, 3), (1, 16, 16, 3)]
    assert all(b.dtype == np.uint8 for b in batches)
    np.testing.assert_array_equal(batches[0][0], rgb[0])
    np.testing.assert_array_equal(batches[1][0], rgb[2])  # RGBA: alpha dropped, colours kept
    gray = batches[0][1]
    assert (gray[..., 0] == gray[..., 1]).all()

    _save(tmp_path / "f.png", rng.randint(0, 256, (24, 20, 3), dtype=np.uint8))
    with pytest.raises(ValueError, match="different sizes.*--image_size"):
        open_image_set(str(tmp_path), "samples")
    resized = open_image_set(str(tmp_path), "samples", image_size=16)
    assert resized.info.resized == 1 and any("resized" in w for w in resized.info.warnings)
    assert {b.shape[1:] for b in resized.batches(4)} == {(16, 16, 3)}


def test_manifest_npz_and_too_few(tmp_path):
    rng = np.random.RandomState(1)
    arrs = [rng.randint(0, 256, (8, 8, 3), dtype=np.uint8) for _ in range(3)]
    (tmp_path / "imgs").mkdir()
    with open(tmp_path / "manifest.jsonl", "w") as f:
        for i in (2, 0, 1):
            _save(tmp_path / "imgs" / f"{i}.png", arrs[i])
            f.write(json.dumps({"index": i, "path": f"imgs/{i}.png"}) + "\n")
    got = np.concatenate(list(open_image_set(str(tmp_path), "samples").batches(8)))
    np.testing.assert_array_equal(got, np.stack([arrs[2], arrs[0], arrs[1]]))  # manifest order

    np.savez(tmp_path / "s.npz", arr_0=np.stack(arrs))
    assert len(open_image_set(str(tmp_path / "s.npz"), "samples")) == 3
    np.savez(tmp_path / "f.npz", arr_0=np.stack(arrs).astype(np.float32))
    with pytest.raises(ValueError, match="uint8"):
        open_image_set(str(tmp_path / "f.npz"), "samples")

    module = InceptionV3(resize_to=None)
    fe = FeatureExtractor(module, {}, 8, progress=False)
    with pytest.raises(ValueError, match="at least 2"):
        fe(ArraySet(np.zeros((1, 75, 75, 3), np.uint8), "one image"))


def test_stats_file_roundtrip_and_checks(tmp_path):
    feats = np.random.RandomState(2).normal(size=(50, 2048))
    mu, sigma = feats.mean(0), np.cov(feats, rowvar=False)
    path = str(tmp_path / "stats.npz")
    S.save_stats(path, mu, sigma, num_images=50, resolution=(64, 64), features=feats)
    st = S.load_stats(path, feature_dim=2048)
    np.testing.assert_array_equal(st.mu, mu)
    assert st.resolution == (64, 64) and st.num_images == 50 and st.features.shape == (50, 2048)
    S.check_resolution(st, (64, 64), path, allow=False)
    with pytest.raises(ValueError, match="--allow_resolution_mismatch"):
        S.check_resolution(st, (256, 256), path, allow=False)
    S.check_resolution(st, (256, 256), path, allow=True)

    # pytorch-fid style (mu, sigma only) and ADM style (mu, sigma, arr_0) files.
    np.savez(tmp_path / "pf.npz", mu=mu[:64], sigma=sigma[:64, :64])
    with pytest.raises(ValueError, match="64-d features"):
        S.load_stats(str(tmp_path / "pf.npz"), feature_dim=2048)
    np.savez(tmp_path / "adm.npz", mu=mu, sigma=sigma, arr_0=np.zeros((4, 32, 32, 3), np.uint8))
    adm = S.load_stats(str(tmp_path / "adm.npz"), feature_dim=2048)
    assert adm.images.shape == (4, 32, 32, 3) and adm.resolution == (32, 32)
    np.savez(tmp_path / "bad.npz", arr_0=np.zeros(3))
    assert not S.is_stats_file(str(tmp_path / "bad.npz"))
    with pytest.raises(ValueError, match="'mu' and 'sigma'"):
        S.load_stats(str(tmp_path / "bad.npz"))


def test_tfds_split_as_image_set():
    pytest.importorskip("torchvision")  # must load before tensorflow: see tests/evaluation/reference_nets.py
    tfds = pytest.importorskip("tensorflow_datasets")
    with tfds.testing.mock_data(num_examples=5):  # random examples from the feature spec, no download
        images = open_image_set("tfds:mnist/train", "reference")
        assert len(images) == 5 and images.info.resolution == (28, 28)
        shapes = [b.shape for b in images.batches(2)]
        first = np.concatenate(list(images.batches(5)))
        part = np.concatenate(list(images.slice(1, 4).batches(2)))  # one host's share
    assert shapes == [(2, 28, 28, 3), (2, 28, 28, 3), (1, 28, 28, 3)]
    np.testing.assert_array_equal(part, first[1:4])
    assert images.info.converted_to_rgb == 5  # grayscale -> RGB, counted
    with pytest.raises(ValueError, match="tfds:NAME/SPLIT"):
        open_image_set("tfds:mnist", "reference")


def test_sharded_map_rows_host_fn_and_host_ranges():
    rows = np.arange(13 * 2, dtype=np.int32).reshape(13, 2)
    m = ShardedMap(lambda p, x: {"y": x.astype(np.float32) * p}, np.float32(3.0), batch_size=6, progress=False)
    assert m.batch_size == 8 and m.num_processes == 1 and m.host_range(13) == (0, 13)
    out = m(ArrayRows(rows), host_fn=lambda b: b + 1)
    np.testing.assert_array_equal(out["y"], (rows + 1) * 3.0)
    m.num_processes = 3  # the split alone: contiguous, disjoint, covering
    ranges = []
    for rank in range(3):
        m.rank = rank
        ranges.append(m.host_range(13))
    assert ranges == [(0, 5), (5, 10), (10, 13)]


_TWO_HOSTS = """
import os, sys
os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"
import jax, numpy as np
jax.config.update("jax_cpu_collectives_implementation", "gloo")
jax.distributed.initialize(sys.argv[2], num_processes=2, process_id=int(sys.argv[1]))
from latent_diffusion.evaluation.features import ArrayRows, ShardedMap
from latent_diffusion.evaluation.images import ArraySet
rows = np.arange(11 * 3, dtype=np.float32).reshape(11, 3)
m = ShardedMap(lambda p, x: {"y": x * p + 1}, np.float32(2.0), batch_size=4, progress=False)
assert m.num_processes == 2 and m.local_batch == 2
out = m(ArrayRows(rows), row_shape=(3,), row_dtype=np.float32)
assert np.array_equal(out["y"], rows * 2 + 1), out
imgs = np.random.RandomState(0).randint(0, 255, (3, 4, 4, 3)).astype(np.uint8)  # host 1 runs dry first
m2 = ShardedMap(lambda p, x: {"m": x.astype(np.float32).mean((1, 2, 3))}, {}, batch_size=4, progress=False)
out2 = m2(ArraySet(imgs, "t"), row_shape=(4, 4, 3), row_dtype=np.uint8)
assert np.allclose(out2["m"], imgs.mean((1, 2, 3))), out2
print("ok", m.host_range(11))
"""


def test_two_processes_split_and_gather(tmp_path):
    """Two CPU processes (2 devices each): each reads its slice, both get every output in order."""
    script = tmp_path / "two_hosts.py"
    script.write_text(_TWO_HOSTS)
    with socket.socket() as s:
        s.bind(("localhost", 0))
        port = s.getsockname()[1]
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env = dict(os.environ, PYTHONPATH=root, JAX_PLATFORMS="cpu")
    procs = [subprocess.Popen([sys.executable, str(script), str(r), f"localhost:{port}"], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for r in range(2)]
    outs = []
    for p in procs:
        try:
            outs.append(p.communicate(timeout=180))
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            raise
    if any(p.returncode for p in procs) and any("gloo" in err.lower() and "not" in err.lower() for _, err in outs):
        pytest.skip("this jaxlib has no gloo CPU collectives")
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0, err[-3000:]
    assert outs[0][0].strip().endswith("ok (0, 6)") and outs[1][0].strip().endswith("ok (6, 11)")
