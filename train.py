"""Train a first-stage autoencoder or a latent diffusion model.

  python train.py --config=configs/autoencoder_kl.py:tiny --workdir=runs/ae
  python train.py --config=configs/ldm_f8_laion.py --workdir=gs://bucket/run --config.data.data_dir=...

Every host of a multi-host job runs the same command. Running it again with the same
--workdir resumes from the last checkpoint.
"""
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")  # before TensorFlow is first imported

from absl import app, flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

config_flags.DEFINE_config_file("config", None, "Experiment config file, e.g. configs/autoencoder_kl.py:tiny",
                                lock_config=True)
flags.DEFINE_string("workdir", None, "Where checkpoints and TensorBoard logs go.")
flags.DEFINE_bool("distributed", False, "Call jax.distributed.initialize() (multi-host jobs; "
                  "auto-detected on TPU pods and SLURM/Open MPI clusters).")
flags.mark_flags_as_required(["config", "workdir"])
FLAGS = flags.FLAGS


def main(argv):
    del argv
    from latent_diffusion import cli
    cli.start(FLAGS.distributed)
    from latent_diffusion.training.loop import train_and_evaluate
    result = train_and_evaluate(FLAGS.config, FLAGS.workdir)
    if result.resumed_from is not None and result.resumed_from >= FLAGS.config.num_train_steps:
        print(f"{FLAGS.workdir} is already at step {result.step}: nothing to train "
              "(raise --config.num_train_steps to continue)")
        return
    summary = ", ".join(f"{k}={v:.4g}" for k, v in sorted(result.eval_metrics.items()))
    print(f"finished at step {result.step} ({result.steps_per_sec:.2f} steps/s"
          f"{', resumed from ' + str(result.resumed_from) if result.resumed_from is not None else ''}); "
          f"eval: {summary}")


if __name__ == "__main__":
    app.run(main)
