"""Compile a config's train step for a TPU topology on this machine (no TPU needed) and say whether it fits.

  pip install "jax[tpu]==0.10.2"     # the libtpu wheel: the TPU compiler, no TPU needed
  python scripts/compile_for.py --config=configs/ldm_f8_laion.py --topology=v5e:16x16 \\
      --config.mesh.fsdp=16 --config.batch_size=1024 --sample_steps=50

Prints per-chip memory (arguments, outputs, temporaries, total against the chip's HBM), XLA's FLOPs
per step, and the step time and samples/s per chip at --mfu. Exits 1 when a program does not fit.
The mesh and batch are the config's, overridable as in train.py; a batch that the device count does
not divide is raised to the next multiple, and the printout says so. See latent_diffusion/training/fit.py
for what the compiler's answer cannot include.
"""
import os
import sys

os.environ["JAX_PLATFORMS"] = "cpu"  # compile for the topology; never look for a TPU here
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # configs/ and the package

from absl import app, flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

config_flags.DEFINE_config_file("config", None, "Experiment config file, e.g. configs/ldm_f8_laion.py",
                                lock_config=True)
flags.DEFINE_string("topology", "v5e:16x16", "TPU topology, e.g. v5e:16x16, v4:4x4x4, v5p:8x8x4")
flags.DEFINE_float("mfu", 0.4, "model FLOPs utilisation for the predicted step time")
flags.DEFINE_integer("sample_steps", 0, "also compile a DDIM sampling loop of this many steps (0: no)")
flags.mark_flags_as_required(["config"])
FLAGS = flags.FLAGS


def main(argv):
    del argv
    from latent_diffusion.training import fit

    config = FLAGS.config
    chip = fit.chip_of(FLAGS.topology)
    devices = fit.topology_devices(FLAGS.topology)
    batch = fit.global_batch_for(config.batch_size, len(devices))
    note = ("" if batch == config.batch_size else
            f" (config.batch_size {config.batch_size} raised to a multiple of {len(devices)})")
    print(f"{FLAGS.topology}: {len(devices)} chips ({devices[0].device_kind}), mesh data={config.mesh.data} "
          f"fsdp={config.mesh.fsdp}, global batch {batch}{note}, unet dtype {config.unet.get('dtype', 'float32')}")
    fits = fit.compile_ldm(config, devices, chip, batch_size=batch, sample_steps=FLAGS.sample_steps)
    for f in fits:
        print(f.table(FLAGS.mfu, batch, len(devices)))
    if not all(f.fits for f in fits):
        sys.exit(1)


if __name__ == "__main__":
    app.run(main)
