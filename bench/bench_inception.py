"""FID Inception feature-extraction throughput: our Flax network vs torch-fidelity's, same batch and threads.

  python bench/bench_inception.py --batch=8 --size=64 --iters=3

Random weights (the speed does not depend on them); uint8 inputs of --size are resized to 299
inside both networks. Prints images/s for each.
"""
import argparse
import os
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def bench(fn, batch, iters):
    fn(batch)  # compile / warm up
    start = time.perf_counter()
    for _ in range(iters):
        fn(batch)
    return iters * len(batch) / (time.perf_counter() - start)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--iters", type=int, default=3)
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    args = parser.parse_args()

    import jax
    import torch
    from latent_diffusion.convert.inception import from_pytorch
    from tests.evaluation.reference_nets import random_inception_state_dict, to_torch_nchw, torch_fidelity_extractor

    torch.set_num_threads(args.threads)
    images = np.random.RandomState(0).randint(0, 256, (args.batch, args.size, args.size, 3), dtype=np.uint8)
    state_dict = random_inception_state_dict(0)

    module, params = from_pytorch(state_dict)
    params = jax.device_put(params)
    apply = jax.jit(lambda p, x: module.apply({"params": p}, x)["pool3"])
    flax_ips = bench(lambda x: apply(params, x).block_until_ready(), images, args.iters)

    import pathlib
    with tempfile.TemporaryDirectory() as tmp:
        net = torch_fidelity_extractor(state_dict, pathlib.Path(tmp))
    x_torch = to_torch_nchw(images)

    def run_torch(x):
        with torch.no_grad():
            return net(x)

    torch_ips = bench(run_torch, x_torch, args.iters)
    print(f"device: {jax.devices()[0].device_kind} x{len(jax.devices())}, torch threads {args.threads}, "
          f"batch {args.batch}, input {args.size}x{args.size} -> 299x299")
    print(f"flax (ours):            {flax_ips:8.2f} images/s")
    print(f"torch-fidelity (torch): {torch_ips:8.2f} images/s")


if __name__ == "__main__":
    main()
