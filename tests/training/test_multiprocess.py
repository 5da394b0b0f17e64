"""Multi-process training (jax.distributed on 127.0.0.1, CPU collectives) and a killed-then-resumed run."""
import json
import os
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
WORKER = os.path.join(ROOT, "tests", "training", "run_worker.py")


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(spec):
    env = dict(os.environ, PYTHONPATH=ROOT, TF_CPP_MIN_LOG_LEVEL="3")
    return subprocess.Popen([sys.executable, WORKER, json.dumps(spec)], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _finish(proc, timeout=600):
    out, _ = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, out[-4000:]
    return out


def _load(path):
    with np.load(path) as z:
        return {k: z[k] for k in z.files}


@pytest.mark.slow
def test_two_processes_match_one(shapes_data_dir, tmp_path):
    port = _free_port()
    common = dict(data_dir=shapes_data_dir, steps=3, local_devices=4, num_processes=2, port=port,
                  workdir=str(tmp_path / "multi"), sgd=True)
    # Process 1 starts its step 35 s late: more than gloo's 30 s to join a collective's first run.
    procs = [_launch(dict(common, process_id=i, out=str(tmp_path / "multi.npz"), delay_s=35 * i)) for i in range(2)]
    for p in procs:
        _finish(p)
    _finish(_launch(dict(data_dir=shapes_data_dir, steps=3, local_devices=8, workdir=str(tmp_path / "one"),
                         out=str(tmp_path / "one.npz"), sgd=True)))
    multi, one = _load(tmp_path / "multi.npz"), _load(tmp_path / "one.npz")
    assert multi.keys() == one.keys()
    for k in one:
        np.testing.assert_allclose(multi[k], one[k], rtol=1e-5, atol=1e-6, err_msg=k)


@pytest.mark.slow
def test_killed_run_resumes_bit_identical(shapes_data_dir, tmp_path):
    workdir = tmp_path / "killed"
    proc = _launch(dict(data_dir=shapes_data_dir, steps=10_000, local_devices=8, workdir=str(workdir),
                        checkpoint_every=2))
    ckpts = workdir / "checkpoints"
    deadline = time.time() + 600
    while time.time() < deadline:
        # Orbax writes into a temporary folder and renames it: a numbered folder is complete.
        done = [int(d) for d in os.listdir(ckpts) if d.isdigit() and int(d) >= 4] if ckpts.exists() else []
        if done or proc.poll() is not None:
            break
        time.sleep(0.5)
    proc.send_signal(signal.SIGKILL)
    proc.communicate()
    steps = sorted(int(d) for d in os.listdir(ckpts) if d.isdigit())
    assert steps and steps[-1] >= 4, f"no checkpoint before the kill: {steps}"
    resume_at = steps[-1]
    _finish(_launch(dict(data_dir=shapes_data_dir, steps=resume_at + 2, local_devices=8,
                         workdir=str(workdir), out=str(tmp_path / "resumed.npz"))))
    _finish(_launch(dict(data_dir=shapes_data_dir, steps=resume_at + 2, local_devices=8,
                         workdir=str(tmp_path / "straight"), out=str(tmp_path / "straight.npz"))))
    resumed, straight = _load(tmp_path / "resumed.npz"), _load(tmp_path / "straight.npz")
    for k in straight:
        np.testing.assert_array_equal(resumed[k], straight[k], err_msg=k)
