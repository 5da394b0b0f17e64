"""Image decode throughput of the loader: 512-px JPEGs to 256-px training crops, per CPU core and per host.

  python bench/bench_decode.py --count=256 --size=512 --resolution=256

Part 1 times the loader's own per-example work (loader.ExampleDecoder: decode, RGB, shorter side to
--resolution with bicubic, centre crop, float [-1, 1]) in one thread of this process, with and
without reduced-size JPEG decoding (data.jpeg_draft), so the figure is images/s per core.
Part 2 runs the whole loader pipeline (grain, global shuffle, batching) over the same records with
data.num_threads threads in this process, and with data.num_workers processes, for images/s per host.
The JPEGs are photo-like (smooth gradients, blobs and noise, quality 90, 4:2:0), not flat renders,
which decode unrealistically fast. Run it on an idle machine and state the load with the figures.
"""
import argparse
import io
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def photo_like_jpegs(count: int, size: int, seed: int = 0) -> list[bytes]:
    from PIL import Image
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    out = []
    for _ in range(count):
        img = np.zeros((size, size, 3), np.float32)
        for c in range(3):
            a, b, ph = rng.uniform(0.5, 4, 3)
            img[..., c] = 128 + 60 * np.sin(2 * np.pi * (a * xx + b * yy) + ph * 6)
        for _ in range(6):  # soft blobs, like objects
            cy, cx, r = rng.uniform(0, 1, 2).tolist() + [rng.uniform(0.05, 0.25)]
            mask = np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * r * r))[..., None]
            img = img * (1 - mask) + mask * rng.uniform(0, 255, 3)
        img += rng.normal(0, 10, img.shape)  # texture / sensor noise
        buf = io.BytesIO()
        Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(buf, format="JPEG", quality=90)
        out.append(buf.getvalue())
    return out


def per_core(records, resolution: int, draft: bool, repeats: int) -> float:
    from latent_diffusion.data import loader
    cfg = loader.settings(dict(resolution=resolution, jpeg_draft=draft, random_flip=False))
    dec = loader.ExampleDecoder(cfg, {})
    dec.decode(records[0], flip=False)  # warm up
    start = time.perf_counter()
    for _ in range(repeats):
        for r in records:
            out = dec.decode(r, flip=False)
    assert out["image"].shape == (resolution, resolution, 3), out
    return repeats * len(records) / (time.perf_counter() - start)


def pipeline(records, resolution: int, threads: int, workers: int, batches: int, batch: int) -> float:
    from latent_diffusion.data import loader
    cfg = loader.settings(dict(resolution=resolution, random_flip=True, num_threads=threads, num_workers=workers))
    it = loader.global_batches(records, loader.ExampleDecoder(cfg, {}), cfg, "bench", "train",
                               global_batch_size=batch, seed=0, shuffle=True, num_epochs=None, extra_transforms=(),
                               process_index=0, process_count=1)
    for _ in range(3):  # start-up (worker processes) and warm-up
        next(it)
    start = time.perf_counter()
    for _ in range(batches):
        next(it)
    rate = batches * batch / (time.perf_counter() - start)
    it.close()
    return rate


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--count", type=int, default=256, help="distinct JPEGs")
    p.add_argument("--size", type=int, default=512, help="their side in pixels")
    p.add_argument("--resolution", type=int, default=256, help="the training crop")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--batches", type=int, default=30)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--workers", type=int, default=os.cpu_count())
    a = p.parse_args()
    jpegs = photo_like_jpegs(a.count, a.size)
    records = [{"image": j} for j in jpegs]
    print(f"{a.count} JPEGs of {a.size}x{a.size} (mean {np.mean([len(j) for j in jpegs]) / 1024:.0f} KiB) "
          f"to {a.resolution}x{a.resolution}; os.getloadavg() = {os.getloadavg()}")
    full = per_core(records, a.resolution, False, a.repeats)
    draft = per_core(records, a.resolution, True, a.repeats)
    print(f"per core (one thread):  full-size decode {full:7.1f} images/s   reduced-size decode {draft:7.1f} "
          f"images/s   ({draft / full:.2f}x)")
    threads = pipeline(records, a.resolution, a.workers, 0, a.batches, a.batch)
    procs = pipeline(records, a.resolution, 1, a.workers, a.batches, a.batch)
    print(f"whole loader, this host ({os.cpu_count()} cores): {a.workers} threads {threads:7.1f} images/s   "
          f"{a.workers} worker processes {procs:7.1f} images/s")


if __name__ == "__main__":
    main()
