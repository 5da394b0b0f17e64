"""Tiny configs shared by the training tests."""
import jax
import numpy as np

from configs import autoencoder_kl, autoencoder_vq


def tiny_ae_config(data_dir: str, kind: str = "kl", steps: int = 4, sgd: bool = False):
    """A very small autoencoder run on 32x32 shapes, with the GAN switched on from step 2.

    `sgd`: plain SGD instead of Adam, for comparing runs whose reductions differ in order: Adam's
    first steps move every parameter by about lr * sign(grad), which turns rounding-level
    differences in near-zero gradients into lr-sized ones.
    """
    c = (autoencoder_kl if kind == "kl" else autoencoder_vq).get_config("tiny")
    c.model.ch, c.model.ch_mult, c.model.num_groups, c.model.resolution = 16, (1, 2), 4, 32
    if kind == "vq":
        c.model.n_embed = 32
    c.loss.disc_start, c.loss.disc_ndf, c.loss.disc_num_layers = 2, 8, 2
    c.data.data_dir, c.data.config, c.data.resolution = data_dir, "tiny", 32
    c.batch_size, c.eval_batch_size, c.num_eval_batches = 8, 8, 1
    c.num_train_steps, c.log_every, c.eval_every = steps, 2, steps
    c.checkpoint.every, c.checkpoint.async_save = 2, False
    c.ema.enabled = True
    if sgd:
        c.optim.name, c.optim.lr, c.optim.grad_clip_norm = "sgd", 1e-5, 0.0
        c.disc_optim.name, c.disc_optim.lr = "sgd", 1e-2
    return c


def params_close(a, b, rtol=0.0, atol=0.0):
    la, lb = jax.tree.leaves(jax.device_get(a)), jax.tree.leaves(jax.device_get(b))
    assert len(la) == len(lb)
    worst = 0.0
    for x, y in zip(la, lb):
        x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
        assert x.shape == y.shape
        worst = max(worst, float(np.max(np.abs(x - y) - rtol * np.abs(y))) if x.size else 0.0)
    assert worst <= atol, f"params differ: worst excess {worst}"
