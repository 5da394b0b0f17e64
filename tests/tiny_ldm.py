"""Pieces the LDM tests share: the smallest text-to-image config, random weights for a tree of shapes."""
import jax
import numpy as np


def text_ldm_config(data_dir):
    """A random-init first stage, a 32-channel UNet and a one-layer text encoder on 32x32 'tiny' shapes."""
    from configs import ldm_f8_laion
    c = ldm_f8_laion.get_config("tiny")
    c.first_stage.workdir, c.first_stage.random_init = "", True
    c.first_stage.model.ch, c.first_stage.model.ch_mult, c.first_stage.model.num_groups = 16, (1, 2), 4
    c.unet.model_channels, c.unet.num_head_channels = 32, 16
    c.unet.channel_mult, c.unet.attention_resolutions = (1, 2), (2,)
    c.sample.prompt_score.num_prompts = 0
    # The tests' numbers were set with the first tiny recipe: eps, constant lr 2e-4, EMA 0.9999.
    c.diffusion.prediction_type = "eps"
    c.optim.update(lr=2e-4, warmup_steps=100, schedule="constant", decay_steps=0, end_lr_factor=0.0)
    c.ema.decay = 0.9999
    c.conditioning.text.model.update(width=32, depth=1, heads=2, head_dim=16)
    c.unet.context_dim = 32
    c.data.data_dir, c.data.config, c.data.resolution = data_dir, "tiny", 32
    c.batch_size, c.eval_batch_size, c.num_eval_batches = 8, 8, 1
    c.checkpoint.async_save = False
    c.sample.steps = 0
    return c


def random_weights(seed, shapes):
    """Random weights of a sensible scale for a tree of shapes: no init to compile, and no
    zero-initialised output layers, so every input (context included) changes the output."""
    rng = np.random.default_rng(seed)
    flat, tree = jax.tree_util.tree_flatten_with_path(shapes)
    out = []
    for path, s in flat:
        n = rng.standard_normal(s.shape).astype(np.float32)
        name = getattr(path[-1], "key", "")
        out.append(1 + 0.1 * n if name == "scale" else 0.05 * n if name == "bias" else
                   n if name == "embedding" else n / np.sqrt(max(1, int(np.prod(s.shape[:-1])))))
    return jax.tree.unflatten(tree, out)
