"""PatchGAN discriminator of the LDM / taming autoencoder loss (pix2pix's NLayerDiscriminator)."""
from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import flax.linen as nn

Dtype = Any


def normal_init(mean: float, stddev: float):
    """N(mean, stddev), the reference's `weights_init` for convs (0, 0.02) and BN scales (1, 0.02)."""
    def init(key, shape, dtype=jnp.float32):
        return mean + stddev * jax.random.normal(key, shape, dtype)
    return init


class BatchNorm(nn.Module):
    """PyTorch BatchNorm2d semantics over the channel (last) axis, statistics in float32.

    Differs from flax.linen.BatchNorm in one place on purpose: like torch, the running variance
    tracks the unbiased batch variance. `momentum` is flax's (torch 0.1 == 0.9 here).
    Batch statistics are over the whole (global) batch the call sees; under jit with a sharded
    batch that is every device's share, i.e. synchronised BN.
    """
    momentum: float = 0.9
    epsilon: float = 1e-5
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        c = x.shape[-1]
        scale = self.param("scale", normal_init(1.0, 0.02), (c,), self.param_dtype)
        bias = self.param("bias", nn.initializers.zeros, (c,), self.param_dtype)
        ra_mean = self.variable("batch_stats", "mean", lambda: jnp.zeros((c,), jnp.float32))
        ra_var = self.variable("batch_stats", "var", lambda: jnp.ones((c,), jnp.float32))
        x32 = x.astype(jnp.float32)
        axes = tuple(range(x.ndim - 1))
        if train:
            mean = jnp.mean(x32, axes)
            var = jnp.mean(jnp.square(x32 - mean), axes)
            if not self.is_initializing():
                n = x.size // c
                unbiased = var * (n / max(n - 1, 1))
                m = self.momentum
                ra_mean.value = m * ra_mean.value + (1 - m) * jax.lax.stop_gradient(mean)
                ra_var.value = m * ra_var.value + (1 - m) * jax.lax.stop_gradient(unbiased)
        else:
            mean, var = ra_mean.value, ra_var.value
        y = (x32 - mean) * (jax.lax.rsqrt(var + self.epsilon) * scale.astype(jnp.float32))
        return (y + bias.astype(jnp.float32)).astype(self.dtype)


class NLayerDiscriminator(nn.Module):
    """PatchGAN: NHWC images -> (B, h, w, 1) real/fake logits, one per overlapping patch.

    Call with `train=True` and `mutable=['batch_stats']` while training. The reference calls it
    separately on real and on fake images (so each gets its own batch statistics and each call
    updates the running stats); do the same to match it.
    """
    ndf: int = 64
    n_layers: int = 3
    use_actnorm: bool = False
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        if self.use_actnorm:
            raise NotImplementedError(
                "NLayerDiscriminator(use_actnorm=True) is not implemented; the LDM configs use "
                "BatchNorm (use_actnorm=False, the default).")
        if self.n_layers < 1:
            raise ValueError(f"NLayerDiscriminator: n_layers must be >= 1, got {self.n_layers}")
        conv = functools.partial(
            nn.Conv, kernel_size=(4, 4), padding=((1, 1), (1, 1)), dtype=self.dtype,
            param_dtype=self.param_dtype, kernel_init=normal_init(0.0, 0.02))
        x = conv(self.ndf, strides=(2, 2), name="conv0")(x.astype(self.dtype))
        x = nn.leaky_relu(x, 0.2)
        for n in range(1, self.n_layers + 1):
            # The last of these keeps the resolution (stride 1), as in pix2pix.
            stride = 2 if n < self.n_layers else 1
            x = conv(self.ndf * min(2 ** n, 8), strides=(stride, stride), use_bias=False,
                     name=f"conv{n}")(x)
            x = BatchNorm(dtype=self.dtype, param_dtype=self.param_dtype, name=f"norm{n}")(x, train)
            x = nn.leaky_relu(x, 0.2)
        x = conv(1, strides=(1, 1), name="conv_out")(x)
        return x.astype(jnp.float32)
