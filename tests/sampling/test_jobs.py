"""Sampling jobs: device-count / batch-size invariance, resuming after a kill, folder ownership."""
import json
import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
from jax.sharding import Mesh

from latent_diffusion.sampling import outputs
from latent_diffusion.sampling.jobs import _keys, plan_batches, run_job
from latent_diffusion.sampling.requests import WorkItem, sample_key
from tests.sampling.standin import JOB_SPEC, StandInGenerator, standard_items

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
ITEMS = standard_items(11)  # with global batch 8: batches of 8 + 1 (5 steps) and 2 (3 steps), padded


def one_device_mesh():
    return Mesh(np.array(jax.devices()[:1]), ("data",))


def files_of(path):
    return {name: open(os.path.join(path, name), "rb").read() for name in sorted(os.listdir(path))}


def assert_same_folders(a, b):
    fa, fb = files_of(a), files_of(b)
    assert sorted(fa) == sorted(fb)
    different = [name for name in fa if fa[name] != fb[name]]
    assert not different, f"files differ between {a} and {b}: {different}"


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The uninterrupted job on all 8 devices, global batch 8."""
    path = str(tmp_path_factory.mktemp("ref"))
    result = run_job(StandInGenerator(), ITEMS, path, global_batch_size=8, job_spec=JOB_SPEC, write_npz=True,
                     progress=False)
    assert result.num_generated == len(ITEMS)
    return path


def test_reference_outputs(reference):
    names = [f"{i:06d}.png" for i in range(len(ITEMS))]
    assert sorted(outputs.sample_files(reference)) == names
    arr = np.load(os.path.join(reference, "samples.npz"))["arr_0"]
    assert arr.shape == (11, 8, 8, 3) and arr.dtype == np.uint8
    for i, name in enumerate(names):
        np.testing.assert_array_equal(arr[i], outputs.read_png(os.path.join(reference, name)))
    # Non-trivial images: not saturated, and every sample is different.
    assert 40 < arr.std() and (arr == 0).mean() < 0.2 and (arr == 255).mean() < 0.2
    assert len({a.tobytes() for a in arr}) == len(arr)
    manifest = outputs.load_manifest(reference)
    assert [m["index"] for m in manifest] == list(range(11))
    assert manifest[1] == {"index": 1, "label": 1, "seed": 7, "sampler": "ddim", "steps": 5, "scale": 2.0,
                           "negative_prompt": None, "file": "000001.png"}
    assert manifest[3]["steps"] == 3 and manifest[0]["seed"] == 100 and manifest[0]["scale"] == 3.0
    with open(os.path.join(reference, "job.json")) as f:
        assert json.load(f)["job"] == JOB_SPEC


@pytest.mark.parametrize("devices,batch", [(1, 3), (1, 1)])
def test_same_files_on_any_device_count_and_batch_size(reference, tmp_path, devices, batch):
    run_job(StandInGenerator(), ITEMS, str(tmp_path), global_batch_size=batch, mesh=one_device_mesh(),
            job_spec=JOB_SPEC, write_npz=True, progress=False)
    assert_same_folders(reference, str(tmp_path))


def test_sample_noise_depends_on_seed_and_index_only():
    seeds = np.array([0, 7, 7, 2 ** 32 - 1], np.uint32)
    idx = np.array([0, 0, 5, 123456], np.int32)
    got = jax.random.key_data(_keys(seeds, idx))
    want = np.stack([jax.random.key_data(sample_key(int(s), int(i))) for s, i in zip(seeds, idx)])
    np.testing.assert_array_equal(got, want)
    assert len({row.tobytes() for row in np.asarray(got)}) == 4


def test_plan_groups_by_steps_and_pads():
    plan = plan_batches(ITEMS, 8, 5)
    assert [(s, [it.index for it in b], n) for s, b, n in plan] == [
        (5, [0, 1, 2, 4, 5, 6, 7, 8], 8), (5, [9] * 8, 1), (3, [3, 10] + [10] * 6, 2)]


def test_failure_midway_then_rerun_matches(reference, tmp_path):
    out = str(tmp_path)
    with pytest.raises(RuntimeError, match="stand-in failure"):
        run_job(StandInGenerator(fail_after=2), ITEMS, out, global_batch_size=8, job_spec=JOB_SPEC,
                write_npz=True, progress=False)
    # The two batches sampled before the failure are kept; nothing else is written.
    assert len(outputs.sample_files(out)) == 9 and not os.path.exists(os.path.join(out, "samples.npz"))
    assert len(outputs.load_manifest(out)) == 9
    result = run_job(StandInGenerator(), ITEMS, out, global_batch_size=8, job_spec=JOB_SPEC, write_npz=True,
                     progress=False)
    assert result.num_generated == 2
    assert_same_folders(reference, out)


def test_killed_job_then_rerun_matches(reference, tmp_path):
    out = str(tmp_path / "job")
    log = open(tmp_path / "log.txt", "wb")
    # The child writes its first batch, then hangs in the third generate call until it is killed.
    proc = subprocess.Popen([sys.executable, "-m", "tests.sampling.standin", out, "--hang_after", "2"],
                            cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.time() + 120
        while time.time() < deadline and proc.poll() is None:
            if os.path.isdir(out) and len(outputs.sample_files(out)) >= 8 \
                    and os.path.exists(os.path.join(out, "manifest.jsonl")) \
                    and len(outputs.load_manifest(out)) >= 8:
                break
            time.sleep(0.1)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert proc.returncode == -signal.SIGKILL, open(tmp_path / "log.txt").read()
    assert len(outputs.sample_files(out)) == 8
    # Damage of the kind a crash (or a copy) can leave: a torn PNG, a torn manifest line, a stray temp file.
    with open(os.path.join(out, "000004.png"), "r+b") as f:
        f.truncate(30)
    with open(os.path.join(out, "manifest.jsonl"), "ab") as f:
        f.write(b'{"index": 9, "lab')
    open(os.path.join(out, ".000009.png.tmp.1234"), "wb").write(b"\x89PNG")
    result = run_job(StandInGenerator(), ITEMS, out, global_batch_size=8, job_spec=JOB_SPEC, write_npz=True,
                     progress=False)
    assert result.num_generated == 4  # the torn 000004.png, 000009 and both 3-step samples
    assert_same_folders(reference, out)


def test_refuses_a_different_job(tmp_path):
    out = str(tmp_path)
    items = ITEMS[:2]
    run_job(StandInGenerator(), items, out, global_batch_size=8, job_spec=JOB_SPEC, progress=False)
    with pytest.raises(FileExistsError, match=r"different job \(job\.steps: 5 -> 4\).*force"):
        run_job(StandInGenerator(), items, out, global_batch_size=8, job_spec={**JOB_SPEC, "steps": 4},
                progress=False)
    other = [WorkItem(index=i, seed=8, label=1) for i in range(2)]
    with pytest.raises(FileExistsError, match="requests_sha256"):
        run_job(StandInGenerator(), other, out, global_batch_size=8, job_spec=JOB_SPEC, progress=False)
    before = files_of(out)
    # force replaces the old job, including its samples and their manifest lines.
    open(os.path.join(out, "000007.png"), "wb").write(b"stale")
    run_job(StandInGenerator(), other[:1], out, global_batch_size=8, job_spec=JOB_SPEC, force=True,
            progress=False)
    assert outputs.sample_files(out) == ["000000.png"]
    assert files_of(out)["000000.png"] != before["000000.png"]
    assert [m["seed"] for m in outputs.load_manifest(out)] == [8]
    # Rerunning the same job is not refused and generates nothing.
    again = run_job(StandInGenerator(), other[:1], out, global_batch_size=8, job_spec=JOB_SPEC, progress=False)
    assert again.num_generated == 0


def test_refuses_unowned_samples(tmp_path):
    open(tmp_path / "000000.png", "wb").write(b"x")
    with pytest.raises(FileExistsError, match="no job.json"):
        run_job(StandInGenerator(), ITEMS[:1], str(tmp_path), global_batch_size=8, job_spec=JOB_SPEC,
                progress=False)


def test_bad_arguments(tmp_path):
    gen = StandInGenerator()
    with pytest.raises(ValueError, match="multiple of the 8 devices.*got 3"):
        run_job(gen, ITEMS, str(tmp_path), global_batch_size=3, job_spec=JOB_SPEC, progress=False)
    with pytest.raises(ValueError, match="indices must be 0..N-1"):
        run_job(gen, ITEMS[1:], str(tmp_path), global_batch_size=8, job_spec=JOB_SPEC, progress=False)
    with pytest.raises(ValueError, match="JSON values"):
        run_job(gen, ITEMS, str(tmp_path), global_batch_size=8, job_spec={"x": object()}, progress=False)
    with pytest.raises(ValueError, match="leading dimension 8"):
        run_job(gen, ITEMS[:1], str(tmp_path / "a"), global_batch_size=8, job_spec=JOB_SPEC, progress=False,
                prepare=lambda items: {"label": np.zeros((1,), np.int32)})
    with pytest.raises(ValueError, match=r"uint8 images of shape \(8, H, W, 3\)"):
        run_job(lambda arrays, keys, steps: np.zeros((8, 4, 4, 3), np.float32), ITEMS[:1], str(tmp_path / "b"),
                global_batch_size=8, job_spec=JOB_SPEC, progress=False, prepare=gen.prepare)
