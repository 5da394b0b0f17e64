"""evaluate.py end to end (random Inception behind the test-only switch) and the pipeline's wiring."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from latent_diffusion.convert.inception import random_params
from latent_diffusion.evaluation import metrics as M
from latent_diffusion.evaluation import pipeline
from latent_diffusion.evaluation.features import FeatureExtractor
from latent_diffusion.evaluation.images import ArraySet
from latent_diffusion.models.inception import InceptionV3

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _images(n, size, seed):
    rng = np.random.RandomState(seed)
    base = rng.randint(0, 256, (1, size, size, 3))
    return np.clip(base + rng.randint(-40, 40, (n, size, size, 3)), 0, 255).astype(np.uint8)


def _folder(path, images):
    path.mkdir()
    for i, im in enumerate(images):
        Image.fromarray(im).save(path / f"{i:05d}.png")
    return str(path)


def _run(*args):
    env = dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS="cpu")
    return subprocess.run([sys.executable, os.path.join(ROOT, "evaluate.py"), *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)


# A 2048-d sqrtm takes minutes on a loaded 2-core runner, so the end-to-end runs leave the FID value
# itself to test_metrics.py (checked against pytorch-fid) and check only what FID is given here.


def test_cli_end_to_end_with_random_inception(tmp_path):
    samples = _folder(tmp_path / "samples", _images(12, 32, 0))
    np.savez(tmp_path / "ref.npz", arr_0=_images(12, 32, 1))
    out = tmp_path / "results.json"
    proc = _run(f"--samples={samples}", f"--reference={tmp_path / 'ref.npz'}", "--metrics=kid,is,pr",
                "--allow_random_inception_for_tests", "--batch_size=8", "--kid_subsets=3", "--is_splits=2",
                f"--out={out}", "--noprogress")
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads(out.read_text())
    m = results["metrics"]
    assert set(m) == {"kid_mean", "kid_std", "kid_subset_size", "is_mean", "is_std", "precision", "recall",
                      "f_score"}
    assert np.isfinite(m["kid_mean"]) and m["is_mean"] >= 1 and m["kid_subset_size"] == 12
    assert results["samples"]["num_images"] == 12 and results["samples"]["resolution"] == [32, 32]
    assert results["inception_weights"] == "RANDOM (test only)"
    assert any("rank-deficient" in w for w in results["samples"]["warnings"])
    assert "kid_mean" in proc.stdout and not os.path.exists(str(out) + ".tmp")


def test_cli_without_weights_says_where_to_get_them(tmp_path):
    np.savez(tmp_path / "s.npz", arr_0=_images(4, 8, 0))
    proc = _run(f"--samples={tmp_path / 's.npz'}", f"--reference={tmp_path / 's.npz'}",
                f"--inception_weights={tmp_path / 'missing.npz'}")
    assert proc.returncode != 0
    assert "pt_inception-2015-12-05-6726825d.pth" in proc.stderr
    assert "python -m latent_diffusion.convert.inception" in proc.stderr


@pytest.fixture(scope="module")
def small_extractor():
    module = InceptionV3(resize_to=None)  # 75x75 inputs, no resize: fast to compile
    return FeatureExtractor(module, random_params(module, seed=3), batch_size=8, progress=False)


def test_pipeline_stats_roundtrip_and_metric_values(tmp_path, small_extractor, monkeypatch):
    fid_calls = []

    def fake_frechet(mu1, s1, mu2, s2):
        fid_calls.append((mu1, s1, mu2, s2))
        return float(np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2))

    monkeypatch.setattr(M, "frechet_distance", fake_frechet)
    samples, reference = _images(20, 75, 2), _images(24, 75, 3)
    np.savez(tmp_path / "samples.npz", arr_0=samples)
    ref_dir = _folder(tmp_path / "ref", reference)
    stats_path = str(tmp_path / "ref_stats.npz")
    opts = pipeline.EvalOptions(samples=str(tmp_path / "samples.npz"), reference=ref_dir,
                                metrics=("fid", "kid", "pr", "is"), save_stats=stats_path, save_features=True,
                                kid_subsets=4, is_splits=2, progress=False)
    res = pipeline.evaluate(opts, extractor=small_extractor)

    fs = small_extractor(ArraySet(samples, "s"))
    fr = small_extractor(ArraySet(reference, "r"))
    for got, want in zip(fid_calls[0], (*M.gaussian_stats(fs["pool3"]), *M.gaussian_stats(fr["pool3"]))):
        np.testing.assert_allclose(got, want, rtol=1e-9, atol=1e-12)
    assert res["metrics"]["fid"] == fake_frechet(*fid_calls[0])
    assert res["metrics"]["kid_mean"] == pytest.approx(
        M.kernel_inception_distance(fs["pool3"], fr["pool3"], subsets=4)["kid_mean"], rel=1e-9)
    assert res["metrics"]["is_mean"] == pytest.approx(M.inception_score(fs["logits_unbiased"], 2)["is_mean"])
    assert res["saved_stats"]["of"].startswith("reference")

    # The saved reference statistics (with features) reproduce every metric.
    opts2 = pipeline.EvalOptions(samples=opts.samples, reference=stats_path, metrics=("fid", "kid", "pr"),
                                 kid_subsets=4, progress=False)
    res2 = pipeline.evaluate(opts2, extractor=small_extractor)
    for k in ("fid", "kid_mean", "precision", "recall"):
        assert res2["metrics"][k] == pytest.approx(res["metrics"][k], rel=1e-6), k

    # A stats file of another resolution is refused unless explicitly allowed.
    np.savez(tmp_path / "other.npz", **{**np.load(stats_path), "resolution": np.array([256, 256])})
    opts3 = pipeline.EvalOptions(samples=opts.samples, reference=str(tmp_path / "other.npz"), progress=False)
    with pytest.raises(ValueError, match="256x256"):
        pipeline.evaluate(opts3, extractor=small_extractor)
    with pytest.raises(ValueError, match="unknown metric"):
        pipeline.evaluate(pipeline.EvalOptions(samples="x", reference="y", metrics=("fdi",)))
    with pytest.raises(ValueError, match="--clip_model"):
        pipeline.evaluate(pipeline.EvalOptions(samples="x", reference="y", metrics=("clip",)))
