"""Two real JAX processes (jax.distributed on 127.0.0.1, gloo CPU collectives, 4 fake devices each) read one
img2dataset WebDataset shard set with bad records: their parts of every global batch, the resume, the eval
epoch that ends on every host together, checked against one process reading the same data."""
import io
import json
import os
import socket
import subprocess
import sys
import tarfile

import numpy as np
import pytest
from PIL import Image

from latent_diffusion.data import img2dataset_layout as layout
from latent_diffusion.data import loader, sources

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
WORKER = os.path.join(ROOT, "tests", "data", "two_hosts_worker.py")
GLOBAL_BATCH, LOCAL, SEED, STEPS, RESUME_AT = 8, 4, 34, 10, 4  # seed 34: the first 2 steps hold no bad record

# Uneven shards: {shard: (examples, corrupt images, missing captions, failed downloads, CMYK images)}.
TRAIN = {0: (23, {2, 17}, {5}, {11}, set()), 1: (9, {4}, set(), set(), {6}), 2: (31, {3}, set(), set(), set()),
         3: (14, {8}, set(), {0}, set())}
TRUNCATE = (2, 12)  # shard 2 is cut inside the image of its 13th sample: samples 0-11 are kept
# Eval: both corrupt records fall in host 0's slices (global positions 1 and 10), so host 0 has one batch fewer.
EVAL = {0: (20, {1, 10}, set(), set(), set()), 1: (7, set(), set(), set(), set())}


def _image(seed, mode="RGB"):
    pixels = np.random.default_rng(seed).integers(0, 255, (12, 10, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).convert(mode).save(buf, format="JPEG")
    return buf.getvalue()


def _write(folder, plan, *, corrupt: bool, truncate=None) -> set:
    """Writes the shards of `plan`; returns the keys of the corrupt images (valid images when not `corrupt`)."""
    bad_keys = set()
    for shard, (n, bad, no_caption, failed, cmyk) in plan.items():
        rows = []
        for i in range(n):
            key = layout.compute_key(shard, i, 10_000)
            image = _image(1000 * shard + i, "CMYK" if i in cmyk else "RGB")
            if i in bad:
                bad_keys.add(key)
                image = b"\xff\xd8 not a jpeg" if corrupt else image
            rows.append(dict(image=None if i in failed else image, url=f"https://example.invalid/{key}.jpg",
                             caption=None if i in no_caption else f"caption {key}"))
        layout.write_shard(rows, folder, shard)
    if truncate:
        shard, i = truncate
        path = os.path.join(folder, f"{layout.shard_name(shard)}.tar")
        with tarfile.open(path) as tar:
            member = tar.getmember(f"{layout.compute_key(shard, i, 10_000)}.jpg")
        with open(path, "r+b") as f:
            f.truncate(member.offset_data + member.size // 2)
    return bad_keys


def _cfg(folder):
    return dict(source="webdataset", shards=f"{folder}/{{00000..00003}}.tar",
                eval_shards=f"{folder}/eval/{{00000..00001}}.tar", keys=("caption", "key"), resolution=8,
                random_flip=False, num_threads=1, prefetch_buffer_size=4, max_bad_fraction=0.5)


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run_hosts(cfg, tmp_path, timeout=120):
    port = _free_port()
    env = dict(os.environ, PYTHONPATH=ROOT, TF_CPP_MIN_LOG_LEVEL="3")
    procs = []
    for p in range(2):
        spec = dict(port=port, process_id=p, local_devices=4, data=cfg, global_batch_size=GLOBAL_BATCH, seed=SEED,
                    steps=STEPS, resume_at=RESUME_AT, out=str(tmp_path / f"host{p}.json"))
        procs.append(subprocess.Popen([sys.executable, WORKER, json.dumps(spec)], cwd=ROOT, env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    try:
        for proc in procs:
            out, _ = proc.communicate(timeout=timeout)
            assert proc.returncode == 0, out[-4000:]
    except subprocess.TimeoutExpired:
        for proc in procs:
            proc.kill()
        pytest.fail(f"the two hosts did not finish in {timeout} s: a host waits in a collective the other never "
                    f"joins\n{procs[0].communicate()[0][-3000:]}\n{procs[1].communicate()[0][-3000:]}")
    return [json.loads((tmp_path / f"host{p}.json").read_text()) for p in range(2)]


def _one_process(cfg, split, steps, **kw):
    it = loader.make_dataset(cfg, split, global_batch_size=GLOBAL_BATCH, seed=SEED, process_index=0,
                             process_count=1, **kw)
    return [next(it)["key"].tolist() for _ in range(steps)]


def _host_plan(order, bad, host):
    """Where host `host` reads in the global order: (positions of its slices, the good ones among them)."""
    positions = [s * GLOBAL_BATCH + host * LOCAL + i for s in range(len(order) // GLOBAL_BATCH) for i in range(LOCAL)]
    return positions, [pos for pos in positions if order[pos] not in bad]


@pytest.mark.slow
def test_two_hosts_read_their_parts_of_one_global_stream(tmp_path):
    real, twin = tmp_path / "real", tmp_path / "twin"
    bad = _write(real, TRAIN, corrupt=True, truncate=TRUNCATE)
    eval_bad = _write(real / "eval", EVAL, corrupt=True)  # keys like the train shards' (img2dataset's)
    # The twin has valid images where the real set has corrupt ones and is otherwise the same (same index):
    # one process reading it gives the global order the hosts slice, bad records included.
    _write(twin, TRAIN, corrupt=False, truncate=TRUNCATE)
    _write(twin / "eval", EVAL, corrupt=False)
    hosts = _run_hosts(_cfg(real), tmp_path)

    index = sources.WebDatasetSource(_cfg(real)["shards"]).index
    index_keys = [r[1] for r in index.records]
    assert [r[1] for r in sources.WebDatasetSource(_cfg(twin)["shards"]).index.records] == index_keys
    usable = set(index_keys) - bad
    # Every host builds the same index: the missing caption left out, the truncated shard's first 12 kept.
    for h in hosts:
        assert h["process_count"] == 2 and h["index"]["records"] == len(index_keys) == 21 + 9 + 12 + 13
        assert h["index"]["dropped"] == {"no_caption": 1}
        assert list(h["index"]["bad_shards"]) == [str(real / "00002.tar")]

    order = [k for step in _one_process(_cfg(twin), "train", 16, shuffle=True, num_epochs=None) for k in step]
    epoch = len(index_keys)
    assert sorted(order[:epoch]) == sorted(index_keys)  # the twin drops nothing: this is the global order
    one = _one_process(_cfg(real), "train", STEPS, shuffle=True, num_epochs=None)
    assert [k for step in one for k in step] == [k for k in order if k not in bad][:STEPS * GLOBAL_BATCH]

    expected_reads = []
    for p, h in enumerate(hosts):
        positions, good = _host_plan(order, bad, p)
        assert len(good) >= STEPS * LOCAL
        expected_reads.append(good)
        for t, step in enumerate(h["train"]):
            # Host p reads its slice of every global batch, minus its bad records, refilled from its next slices.
            assert step["keys"] == [order[pos] for pos in good[t * LOCAL:(t + 1) * LOCAL]], (p, t)
            assert step["captions"] == [f"caption {k}" for k in step["keys"]]
            assert step["row"] == p * LOCAL  # its rows of the global array
            last = good[(t + 1) * LOCAL - 1]
            missed = [order[pos] for pos in positions if pos < last and order[pos] in bad]
            assert step["skipped"] == len(missed), (p, t)
            assert step["by_cause"] == ({"UnidentifiedImageError": len(missed)} if missed else {})
            assert sum(step["by_shard"].values()) == len(missed) and all(
                s.startswith(str(real)) for s in step["by_shard"])
        # (b) resumed from the state saved after RESUME_AT steps: the same continuation, the counts carried on.
        assert h["resumed"] == h["train"][RESUME_AT:], p
    # The hosts meet different numbers of bad records (so their streams shift apart), and both meet some.
    final = [h["train"][-1]["skipped"] for h in hosts]
    assert min(final) > 0 and final[0] != final[1], final

    # Until the first bad record, the hosts' parts of each step are the one-process global batch, in host order.
    clean = 0
    while clean < STEPS and all(expected_reads[p][clean * LOCAL:(clean + 1) * LOCAL] == [
            clean * GLOBAL_BATCH + p * LOCAL + i for i in range(LOCAL)] for p in range(2)):
        clean += 1
    assert clean >= 2, "the seed puts a bad record in the first two global batches: pick another"
    for t in range(clean):
        assert hosts[0]["train"][t]["keys"] + hosts[1]["train"][t]["keys"] == one[t]
    # Within the first epoch the hosts' parts are disjoint (no record read twice, by one host or both) ...
    first_epoch = [k for p in range(2) for t in range(STEPS) for k, pos in
                   zip(hosts[p]["train"][t]["keys"], expected_reads[p][t * LOCAL:(t + 1) * LOCAL]) if pos < epoch]
    assert len(first_epoch) == len(set(first_epoch))
    # ... and together they cover the usable data: every record but the corrupt ones.
    assert set(first_epoch) == usable
    assert all(k in usable for h in hosts for step in h["train"] for k in step["keys"])

    # (c) One eval epoch with uneven hosts: host 0 has 2 whole batches (two bad records), host 1 has 3; both
    # stop after 2, and read their slices in order.
    eval_keys = [r[1] for r in sources.WebDatasetSource(_cfg(real)["eval_shards"]).index.records]
    assert [h["eval_local_batches"] for h in hosts] == [2, 3]
    assert [len(h["eval"]) for h in hosts] == [2, 2]
    for p, h in enumerate(hosts):
        _, good = _host_plan(eval_keys[:3 * GLOBAL_BATCH], eval_bad, p)
        assert [k for b in h["eval"] for k in b] == [eval_keys[pos] for pos in good[:2 * LOCAL]]
