"""Loss terms of the LDM first-stage training (CompVis LPIPSWithDiscriminator / VQLPIPSWithDiscriminator).

Pure functions on NHWC arrays; the autoencoder train step composes them:

    generator:      weighted_nll + kl_weight * kl + d_weight * adopt_weight(disc_factor, step, start) * g_loss
    discriminator:  adopt_weight(disc_factor, step, start) * hinge_d_loss(D(x), D(xrec))
"""
from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp


def _f32(x) -> jax.Array:
    return jnp.asarray(x, jnp.float32)


def hinge_d_loss(logits_real: jax.Array, logits_fake: jax.Array) -> jax.Array:
    """0.5 * (E[relu(1 - D(x))] + E[relu(1 + D(xrec))])."""
    return 0.5 * (jnp.mean(jax.nn.relu(1.0 - _f32(logits_real)))
                  + jnp.mean(jax.nn.relu(1.0 + _f32(logits_fake))))


def vanilla_d_loss(logits_real: jax.Array, logits_fake: jax.Array) -> jax.Array:
    """0.5 * (E[softplus(-D(x))] + E[softplus(D(xrec))]), the non-saturating GAN loss."""
    return 0.5 * (jnp.mean(jax.nn.softplus(-_f32(logits_real)))
                  + jnp.mean(jax.nn.softplus(_f32(logits_fake))))


def generator_loss(logits_fake: jax.Array) -> jax.Array:
    """-E[D(xrec)], the generator's adversarial term in both reference losses."""
    return -jnp.mean(_f32(logits_fake))


def adopt_weight(weight, step, threshold, value=0.0) -> jax.Array:
    """`weight` once `step >= threshold`, else `value`; `step` may be traced."""
    return jnp.where(jnp.asarray(step) >= threshold, _f32(weight), _f32(value))


def adaptive_weight_from_grads(nll_grad: jax.Array, g_grad: jax.Array, disc_weight=1.0) -> jax.Array:
    """||dNLL/dW|| / (||dG/dW|| + 1e-4), clipped to [0, 1e4], without gradient, times disc_weight."""
    nll_norm = jnp.linalg.norm(_f32(nll_grad).ravel())
    g_norm = jnp.linalg.norm(_f32(g_grad).ravel())
    d = jnp.clip(nll_norm / (g_norm + 1e-4), 0.0, 1e4)
    return jax.lax.stop_gradient(d) * disc_weight


def adaptive_disc_weight(nll_fn: Callable[[Any], jax.Array], g_fn: Callable[[Any], jax.Array],
                         last_layer: Any, disc_weight=1.0) -> jax.Array:
    """The reference's calculate_adaptive_weight, balancing the GAN term against the NLL.

    `nll_fn(W)` and `g_fn(W)` are the (unweighted) NLL and generator loss as functions of the
    decoder's last layer params W = {'kernel', 'bias', ...}; gradients are taken w.r.t. the kernel
    only, as the reference differentiates `decoder.conv_out.weight`. For speed, let both close over
    the activations entering that layer so only the loss heads are re-run, not the decoder.
    """
    last_layer = dict(last_layer)
    if "kernel" not in last_layer:
        raise ValueError(f"adaptive_disc_weight: last_layer must hold a 'kernel', got keys {sorted(last_layer)}")

    def grad_wrt_kernel(fn):
        return jax.grad(lambda k: _f32(fn({**last_layer, "kernel": k})))(last_layer["kernel"])

    return adaptive_weight_from_grads(grad_wrt_kernel(nll_fn), grad_wrt_kernel(g_fn), disc_weight)


def _per_sample(p_loss: jax.Array, batch: int) -> jax.Array:
    p = _f32(p_loss)
    if p.size != batch:
        raise ValueError(f"perceptual loss must hold one value per sample ({batch}), got shape {p.shape}")
    return p.reshape((batch, 1, 1, 1))


def kl_reconstruction_loss(x: jax.Array, xrec: jax.Array, logvar, perceptual: jax.Array | None = None,
                           perceptual_weight: float = 1.0, weights: jax.Array | None = None):
    """(weighted_nll, nll, rec_loss_mean) of LPIPSWithDiscriminator for NHWC images.

    rec = |x - xrec| + perceptual_weight * perceptual (per-sample LPIPS, broadcast over pixels);
    nll = rec / exp(logvar) + logvar, summed over all elements and divided by the batch size.
    `weights` (broadcastable to x) scale the per-element nll of `weighted_nll`; `perceptual=None`
    turns the LPIPS term off.
    """
    x, xrec, logvar = _f32(x), _f32(xrec), _f32(logvar)
    batch = x.shape[0]
    rec = jnp.abs(x - xrec)
    if perceptual is not None:
        rec = rec + perceptual_weight * _per_sample(perceptual, batch)
    nll = rec / jnp.exp(logvar) + logvar
    weighted = nll if weights is None else _f32(weights) * nll
    return jnp.sum(weighted) / batch, jnp.sum(nll) / batch, jnp.mean(rec)


def vq_reconstruction_loss(x: jax.Array, xrec: jax.Array, perceptual: jax.Array | None = None,
                           perceptual_weight: float = 1.0, pixel_loss: str = "l1"):
    """(nll, nll, rec_loss_mean) of VQLPIPSWithDiscriminator, shaped like kl_reconstruction_loss's.

    nll is the mean over all elements of pixel loss + perceptual_weight * per-sample LPIPS; the
    reference has no logvar or weights, so the loss term, the nll and the mean rec loss coincide.
    """
    x, xrec = _f32(x), _f32(xrec)
    if pixel_loss == "l1":
        rec = jnp.abs(x - xrec)
    elif pixel_loss == "l2":
        rec = jnp.square(x - xrec)
    else:
        raise ValueError(f"vq_reconstruction_loss: pixel_loss must be 'l1' or 'l2', got {pixel_loss!r}")
    if perceptual is not None:
        rec = rec + perceptual_weight * _per_sample(perceptual, x.shape[0])
    nll = jnp.mean(rec)
    return nll, nll, nll

