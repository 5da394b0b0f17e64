"""Train the shapes judge (latent_diffusion/evaluation/shapes_classifier.py) on the renderer's ground truth.

  python scripts/train_shapes_classifier.py            # writes the weights the package ships
  python scripts/train_shapes_classifier.py --steps=300 --out=/tmp/judge.npz

Prints its accuracy on the shapes test split (the held-out renders of the dataset) at the end.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repo root

from absl import app, flags  # noqa: E402

flags.DEFINE_integer("steps", 4000, "Training steps.")
flags.DEFINE_integer("batch_size", 32, "Scenes per step (9 cells each).")
flags.DEFINE_float("lr", 2e-3, "Peak learning rate.")
flags.DEFINE_integer("seed", 0, "Seed of the weights and of the training scenes.")
flags.DEFINE_string("out", None, "Where to write the weights (default: the packaged file).")
flags.DEFINE_integer("num_test", 500, "Test-split scenes to measure the accuracy on.")
FLAGS = flags.FLAGS


def main(argv):
    del argv
    import numpy as np

    from latent_diffusion.data import shapes
    from latent_diffusion.evaluation import shapes_classifier as sc

    params = sc.train(FLAGS.steps, FLAGS.batch_size, FLAGS.lr, FLAGS.seed)
    scenes = [shapes.sample_scene(np.random.default_rng(shapes.example_seed("test", i)))
              for i in range(FLAGS.num_test)]
    images = np.stack([shapes.render_scene(s, sc.RESOLUTION)["image"] for s in scenes])
    acc = sc.accuracy_on_renders(sc.ShapesJudge(params), images, scenes)
    print("accuracy on the shapes test split: " + ", ".join(f"{k}={v:.4f}" for k, v in acc.items()))
    out = FLAGS.out or sc.DEFAULT_WEIGHTS
    sc.save_params(out, params, dict(steps=FLAGS.steps, batch_size=FLAGS.batch_size, lr=FLAGS.lr, seed=FLAGS.seed,
                                     renderer=sc.renderer_fingerprint(), test_accuracy=acc))
    print(f"wrote {out}")


if __name__ == "__main__":
    app.run(main)
