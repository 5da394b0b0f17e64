"""The whole text-to-image job on the built-in shapes data, from nothing to scored samples.

  python end_to_end.py --workdir=runs/shapes

1. stage 1: the KL autoencoder (configs/autoencoder_kl.py:tiny)            -> WORKDIR/autoencoder
2. stage 2: the text-conditional LDM on its latents (ldm_f8_laion.py:tiny) -> WORKDIR/ldm
3. samples for held-out prompts (texts absent from the training captions), DDIM with guidance,
   as a resumable sampling job                                               -> WORKDIR/samples/...
4. scores: the shapes judge reads every sample (kind, colour, size, position of each shape);
   accuracies for one- and two-shape prompts and the shapes-FID             -> WORKDIR/scores.json
   and a grid of samples with their prompts                                  -> WORKDIR/grid.png

Every stage resumes: rerunning the command continues where it stopped. Either config can be
overridden as in train.py, e.g. --ldm_config.num_train_steps=20000.
"""
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")  # before TensorFlow is first imported

from absl import app, flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

config_flags.DEFINE_config_file("ae_config", "configs/autoencoder_kl.py:tiny", "Stage-1 config.", lock_config=True)
config_flags.DEFINE_config_file("ldm_config", "configs/ldm_f8_laion.py:tiny", "Stage-2 config.", lock_config=True)
flags.DEFINE_string("workdir", "runs/shapes", "Where both runs, the samples and the scores go.")
flags.DEFINE_string("data_dir", None, "TFDS data dir of the shapes dataset (default: $TFDS_DATA_DIR or "
                    "~/tensorflow_datasets; built there on first use).")
flags.DEFINE_integer("num_prompts", 64, "Held-out prompts of each kind (one shape, two shapes).")
flags.DEFINE_list("guidance", ["3"], "Guidance scales to sample and score at.")
flags.DEFINE_integer("sample_steps", 50, "DDIM steps.")
flags.DEFINE_integer("fid_samples", 256, "Test captions sampled for the shapes-FID (0: no FID).")
flags.DEFINE_integer("seed", 0, "Sampling seed.")
flags.DEFINE_bool("distributed", False, "Call jax.distributed.initialize() (multi-host).")
FLAGS = flags.FLAGS


def main(argv):
    del argv
    from latent_diffusion import cli
    cli.start(FLAGS.distributed)
    from latent_diffusion import end_to_end
    result = end_to_end.run(FLAGS.ae_config, FLAGS.ldm_config, FLAGS.workdir, data_dir=FLAGS.data_dir,
                            num_prompts=FLAGS.num_prompts, guidance=[float(g) for g in FLAGS.guidance],
                            sample_steps=FLAGS.sample_steps, fid_samples=FLAGS.fid_samples, seed=FLAGS.seed)
    print(end_to_end.report(result))


if __name__ == "__main__":
    app.run(main)
