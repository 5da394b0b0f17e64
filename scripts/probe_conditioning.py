"""How much a trained LDM listens to its condition (latent_diffusion/evaluation/conditioning_probe.py).

  python scripts/probe_conditioning.py --workdir=runs/shapes/ldm [--num_examples=128] [--raw]

Prints, per timestep bucket, the held-out error of the predicted clean latent with the true, shuffled
and empty captions, the gradient norms that reach the UNet and the condition encoder, and what the
tokenizer hands the text encoder for the first caption.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repo root, not scripts/
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

from absl import app, flags  # noqa: E402

flags.DEFINE_string("workdir", None, "An LDM training workdir.", required=True)
flags.DEFINE_integer("num_examples", 128, "Held-out examples (first of the eval split).")
flags.DEFINE_integer("num_draws", 4, "Noise draws per example and bucket.")
flags.DEFINE_bool("raw", False, "Probe the raw weights instead of the EMA ones.")
FLAGS = flags.FLAGS


def main(argv):
    del argv
    from latent_diffusion import cli
    cli.start(False)
    import jax
    import numpy as np

    from latent_diffusion.data import loader
    from latent_diffusion.evaluation import conditioning_probe as probe
    from latent_diffusion.sampling.pipeline import load_ldm
    from latent_diffusion.training import partitioning

    mesh = partitioning.make_mesh()
    task, params, frozen, meta = load_ldm(FLAGS.workdir, mesh, use_ema=not FLAGS.raw)
    c = task.config
    it = loader.make_dataset(c.data, c.data.eval_split, global_batch_size=FLAGS.num_examples, seed=0,
                             shuffle=False, num_epochs=1, extra_transforms=task.host_transforms())
    batch = {k: v for k, v in next(it).items() if not k.startswith("_")}
    print(f"{FLAGS.workdir}: step {meta.get('step')}, {'raw' if FLAGS.raw else 'EMA'} weights, "
          f"prediction {task.prediction_type}, {FLAGS.num_examples} held-out examples")
    if "tokens" in batch and task.tokenizer is not None:
        tok = np.asarray(batch["tokens"][0])
        n = int((tok != task.tokenizer.pad_id).sum())
        print(f"tokens of the first example: {n} of {len(tok)} are not padding: {tok[:n].tolist()}")
        if hasattr(task.tokenizer, "decode"):
            print(f"  decoded: {task.tokenizer.decode(tok)!r}")
        print(f"  empty prompt (guidance null): {np.asarray(task.tokenizer.empty)[:4].tolist()} ...")
    errors = probe.bucket_errors(task, params, frozen, batch, num_draws=FLAGS.num_draws)
    print(probe.table(errors, task.schedule.num_timesteps))
    if str(c.data.name).startswith("shapes"):
        _autoencoder_reading(task, frozen, int(c.data.resolution), FLAGS.num_examples)
    grads = probe.condition_gradient_norms(task, params, frozen, jax.tree.map(lambda a: a[:16], batch),
                                           jax.random.key(0))
    print("gradient norms of the training loss: " + ", ".join(f"{k} {v:.4g}" for k, v in grads.items()))


def _autoencoder_reading(task, frozen, resolution, n):
    """The judge on test renders and on the first stage's reconstructions of them: what survives stage 1."""
    import jax
    import numpy as np

    from latent_diffusion.data import shapes
    from latent_diffusion.evaluation import shapes_classifier as sc
    scenes = [shapes.sample_scene(np.random.default_rng(shapes.example_seed("test", i))) for i in range(n)]
    images = np.stack([shapes.render_scene(s, resolution)["image"] for s in scenes])
    x = images.astype(np.float32) / 127.5 - 1
    fs = task.first_stage
    recon = jax.jit(lambda im, k: fs.decode(frozen["first_stage"], fs.encode(frozen["first_stage"], im, k)))(
        x, jax.random.key(0))
    recon = np.clip(np.asarray(recon), -1, 1)
    judge = sc.ShapesJudge.load()
    mse = float(np.mean((recon - x) ** 2))
    print(f"first stage on {n} test renders: PSNR {10 * np.log10(4 / mse):.2f} dB; judge on the renders "
          f"{sc.accuracy_on_renders(judge, images, scenes)}, on their reconstructions "
          f"{sc.accuracy_on_renders(judge, recon, scenes)}")


if __name__ == "__main__":
    app.run(main)
