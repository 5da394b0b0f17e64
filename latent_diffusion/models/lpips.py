"""LPIPS-VGG perceptual distance (Zhang et al. 2018, lpips v0.1), a frozen network used as a loss.

Layout follows torchvision's `vgg16().features` (conv1_1 .. conv5_3) plus the five lpips linear
heads `lin0` .. `lin4`; weights come from `latent_diffusion.convert.lpips`.
"""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import flax.linen as nn

Dtype = Any

# (stage, channels, convs per stage) of VGG16's feature trunk; LPIPS taps the last ReLU of each stage.
VGG16_STAGES: tuple[tuple[int, int, int], ...] = (
    (1, 64, 2), (2, 128, 2), (3, 256, 3), (4, 512, 3), (5, 512, 3))
LPIPS_CHANNELS: tuple[int, ...] = tuple(c for _, c, _ in VGG16_STAGES)

# lpips' ScalingLayer: maps [-1, 1] inputs to ImageNet-normalised ones (shift, scale per RGB channel).
SHIFT: tuple[float, ...] = (-0.030, -0.088, -0.188)
SCALE: tuple[float, ...] = (0.458, 0.448, 0.450)
NORM_EPS = 1e-10  # lpips.normalize_tensor


class FrozenConv3x3(nn.Module):
    """3x3 stride-1 'same' conv whose params never receive gradients."""
    features: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        kernel = self.param("kernel", nn.initializers.lecun_normal(), (3, 3, x.shape[-1], self.features),
                            self.param_dtype)
        bias = self.param("bias", nn.initializers.zeros, (self.features,), self.param_dtype)
        # The network is a fixed metric: cutting the params out of autodiff means a caller that
        # differentiates a closure holding them pays nothing for (and cannot train) them.
        kernel, bias = jax.lax.stop_gradient(kernel), jax.lax.stop_gradient(bias)
        y = jax.lax.conv_general_dilated(
            x.astype(self.dtype), kernel.astype(self.dtype), (1, 1), ((1, 1), (1, 1)),
            dimension_numbers=("NHWC", "HWIO", "NHWC"))
        return y + bias.astype(self.dtype)


class VGG16Features(nn.Module):
    """VGG16 trunk up to relu5_3; returns the five LPIPS taps (relu1_2 .. relu5_3)."""
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x) -> list[jax.Array]:
        taps = []
        for stage, channels, n_convs in VGG16_STAGES:
            if stage > 1:
                x = nn.max_pool(x, (2, 2), strides=(2, 2), padding="VALID")
            for i in range(1, n_convs + 1):
                x = FrozenConv3x3(channels, self.dtype, self.param_dtype, name=f"conv{stage}_{i}")(x)
                x = nn.relu(x)
            taps.append(x)
        return taps


def _unit_normalize(f: jax.Array) -> jax.Array:
    f = f.astype(jnp.float32)
    norm = jnp.sqrt(jnp.sum(jnp.square(f), axis=-1, keepdims=True))
    return f / (norm + NORM_EPS)


class LPIPS(nn.Module):
    """LPIPS-VGG distance between NHWC images in [-1, 1]; returns one value per sample, shape (B,).

    The trunk runs once per input (not on a concatenated batch) so that, under `jax.grad` w.r.t.
    one of them (the reconstruction), only that branch is back-propagated. Keep the params out of
    the trainable state: they are wrapped in stop_gradient.
    """
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    def setup(self):
        self.net = VGG16Features(self.dtype, self.param_dtype)
        self.lins = [self.param(f"lin{k}", self._lin_init(c)) for k, c in enumerate(LPIPS_CHANNELS)]

    def _lin_init(self, channels: int):
        def init(key):
            w = nn.initializers.lecun_normal()(key, (channels, 1), self.param_dtype)
            return {"kernel": w}
        return init

    def _scale(self, x: jax.Array) -> jax.Array:
        if x.ndim != 4 or x.shape[-1] != 3:
            raise ValueError(f"LPIPS expects NHWC RGB images of shape (B, H, W, 3), got {x.shape}")
        x = x.astype(jnp.float32)
        return (x - jnp.asarray(SHIFT, jnp.float32)) / jnp.asarray(SCALE, jnp.float32)

    def __call__(self, x: jax.Array, y: jax.Array) -> jax.Array:
        if x.shape != y.shape:
            raise ValueError(f"LPIPS inputs must have the same shape, got {x.shape} and {y.shape}")
        fx = self.net(self._scale(x))
        fy = self.net(self._scale(y))
        total = jnp.zeros((x.shape[0],), jnp.float32)
        for a, b, lin in zip(fx, fy, self.lins):
            d = jnp.square(_unit_normalize(a) - _unit_normalize(b))
            # The 1x1 head and the spatial mean are both linear, so averaging first is exact and
            # touches C numbers per sample instead of H*W*C.
            d = jnp.mean(d, axis=(1, 2))
            w = jax.lax.stop_gradient(lin["kernel"]).astype(jnp.float32)
            total = total + (d @ w)[:, 0]
        return total


def lpips_shapes(dtype: Dtype = jnp.float32) -> Any:
    """The params tree of `LPIPS` as ShapeDtypeStructs (no compute, for checking converted weights)."""
    x = jax.ShapeDtypeStruct((1, 32, 32, 3), jnp.float32)
    return jax.eval_shape(lambda a: LPIPS(param_dtype=dtype).init(jax.random.PRNGKey(0), a, a), x)["params"]

