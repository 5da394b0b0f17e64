"""The caption reaches the UNet, and the training gradient reaches the text encoder. If the text stops
reaching the UNet (tokens dropped, context zeroed, a mask gone wrong) the x0 errors with true, shuffled and
empty captions become equal; if the gradient is cut, the text encoder's gradient norm is zero.

Random weights of a sensible scale (no zero-initialised output layers), so the check needs no training. A
trained version (a 300-step run whose true-caption error must beat shuffled captions by 15%) did not pass:
at that length the caption's effect on the prediction is below 1e-4 relative, as it is at step 40; on the
shapes data the prompt-following score first moves between steps 500 and 1000 (BENCHMARKS.md)."""
import jax
import numpy as np

from latent_diffusion.data import loader
from latent_diffusion.evaluation import conditioning_probe as probe
from latent_diffusion.training import partitioning, tasks
from tests.tiny_ldm import random_weights, text_ldm_config


def test_caption_reaches_the_unet_and_gradients_reach_the_text_encoder(shapes_data_dir):
    c = text_ldm_config(shapes_data_dir)
    c.diffusion.prediction_type = "v"
    task = tasks.build(c, partitioning.make_mesh(), "")
    it = loader.make_dataset(c.data, c.data.train_split, global_batch_size=8, seed=0, shuffle=False, num_epochs=1,
                             extra_transforms=task.host_transforms(), process_index=0, process_count=1)
    batch = {k: np.asarray(v) for k, v in next(it).items() if not k.startswith("_") and k != "objects"}
    frozen = task.frozen()
    shapes = jax.eval_shape(task.init, jax.random.key(0), batch, frozen).params["model"]
    params = random_weights(3, shapes)
    errors = probe.bucket_errors(task, params, frozen, batch, num_buckets=4, num_draws=1)
    true, shuffled, empty = (float(np.mean(errors[k]["x0"])) for k in probe.CONDITIONS)
    assert abs(shuffled - true) > 1e-4 * true and abs(empty - true) > 1e-4 * true, (true, shuffled, empty)
    grads = probe.condition_gradient_norms(task, params, frozen, batch, jax.random.key(0))
    assert np.isfinite(grads["cond"]) and grads["cond"] > 1e-6 * grads["unet"], grads
