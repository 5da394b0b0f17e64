"""The FID InceptionV3 (the 2015-12-05 TensorFlow graph), as pytorch-fid and torch-fidelity port it.

Differences from torchvision's InceptionV3 that FID depends on: average pools ignore the padded
zeros (TensorFlow semantics), the last block (Mixed_7c) pools with max instead of average, the
classifier has 1008 classes, and the input is resized to 299x299 with TensorFlow 1.x's bilinear
resize (no half-pixel offset) before `(x - 128) / 128`. Module and parameter names follow the
PyTorch ports so the converter is a plain renaming.
"""
from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

Dtype = Any
Pad = Sequence[tuple[int, int]]

INPUT_SIZE = 299
FEATURE_DIM = 2048
NUM_CLASSES = 1008


def _tf1_resize_indices(in_size: int, out_size: int):
    """Source rows/cols and weights of TF1 bilinear resize (align_corners=False, no half pixels).

    Computed in float32 exactly as torch-fidelity's `interpolate_bilinear_2d_like_tensorflow1x`
    does, so the sampled positions (and hence the features) agree bit for bit.
    """
    scale = np.float32(in_size / out_size)
    pos = np.arange(out_size, dtype=np.float32) * scale
    lo = pos.astype(np.int64)  # truncation == floor, positions are non-negative
    hi = np.minimum(lo + 1, in_size - 1)
    frac = pos - lo.astype(np.float32)
    return lo, hi, frac


def resize_bilinear_tf1(x: jnp.ndarray, size: tuple[int, int]) -> jnp.ndarray:
    """Bilinear resize of NHWC float images like TensorFlow 1.x `resize_bilinear` (no half-pixel)."""
    out_h, out_w = size
    in_h, in_w = x.shape[1], x.shape[2]
    if (in_h, in_w) == (out_h, out_w):
        return x  # every weight is 0 and every index the identity: skip the work
    ylo, yhi, dy = _tf1_resize_indices(in_h, out_h)
    xlo, xhi, dx = _tf1_resize_indices(in_w, out_w)
    dx = jnp.asarray(dx, x.dtype)[None, None, :, None]
    dy = jnp.asarray(dy, x.dtype)[None, :, None, None]
    top, bottom = x[:, ylo], x[:, yhi]
    # Same association order as the reference: interpolate along x first, then along y.
    in_0 = top[:, :, xlo] + (top[:, :, xhi] - top[:, :, xlo]) * dx
    in_1 = bottom[:, :, xlo] + (bottom[:, :, xhi] - bottom[:, :, xlo]) * dx
    return in_0 + (in_1 - in_0) * dy


class FrozenBatchNorm(nn.Module):
    """Inference-only BatchNorm whose running statistics live in `params` (no mutable collection)."""
    features: int
    epsilon: float = 1e-3
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        scale = self.param("scale", nn.initializers.ones, (self.features,), self.param_dtype)
        bias = self.param("bias", nn.initializers.zeros, (self.features,), self.param_dtype)
        mean = self.param("mean", nn.initializers.zeros, (self.features,), self.param_dtype)
        var = self.param("var", nn.initializers.ones, (self.features,), self.param_dtype)
        # PyTorch's eval-mode kernel: y = x * alpha + beta, alpha = w / sqrt(var + eps); in float32.
        alpha = scale.astype(jnp.float32) * jnp.reciprocal(jnp.sqrt(var.astype(jnp.float32) + self.epsilon))
        beta = bias.astype(jnp.float32) - mean.astype(jnp.float32) * alpha
        return (x.astype(jnp.float32) * alpha + beta).astype(x.dtype)


class BasicConv2d(nn.Module):
    """Conv (no bias) -> BatchNorm(eps=1e-3) -> ReLU."""
    features: int
    kernel_size: tuple[int, int]
    strides: tuple[int, int] = (1, 1)
    padding: Pad = ((0, 0), (0, 0))
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    precision: Any = "highest"

    @nn.compact
    def __call__(self, x):
        x = nn.Conv(self.features, self.kernel_size, self.strides, padding=self.padding,
                    use_bias=False, dtype=self.dtype, param_dtype=self.param_dtype,
                    precision=self.precision, name="conv")(x)
        x = FrozenBatchNorm(self.features, param_dtype=self.param_dtype, name="bn")(x)
        return nn.relu(x)


def _avg_pool_tf(x):
    """3x3/1 average pool, SAME padding, padded zeros excluded from the mean (TF semantics).

    The divisor (how many real pixels each window covers) is a constant built with numpy at trace
    time, so every program that runs the network divides by the same literal. Computing it on the
    device (flax's count_include_pad=False pools a tensor of ones) leaves XLA free to fold it in one
    program and not in another (seen: a sharded program kept the divide, a single-device one turned
    it into a multiply), which changes the last bit of the features with the device layout.
    """
    pad = ((0, 0), (1, 1), (1, 1), (0, 0))
    sums = jax.lax.reduce_window(x, jnp.zeros((), x.dtype), jax.lax.add, (1, 3, 3, 1), (1, 1, 1, 1), pad)
    h, w = x.shape[1:3]
    ones = np.pad(np.ones((h, w), np.float32), 1)
    counts = sum(ones[i:i + h, j:j + w] for i in range(3) for j in range(3))
    return sums / jnp.asarray(counts[None, :, :, None], x.dtype)


def _max_pool_3x3_s2(x):
    return nn.max_pool(x, (3, 3), (2, 2), padding="VALID")


class _Block(nn.Module):
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    precision: Any = "highest"

    def conv(self, name, features, kernel, strides=(1, 1), pad=(0, 0)):
        return BasicConv2d(features, kernel, strides, ((pad[0], pad[0]), (pad[1], pad[1])),
                           dtype=self.dtype, param_dtype=self.param_dtype, precision=self.precision, name=name)


class InceptionA(_Block):
    pool_features: int = 32

    @nn.compact
    def __call__(self, x):
        b1 = self.conv("branch1x1", 64, (1, 1))(x)
        b5 = self.conv("branch5x5_1", 48, (1, 1))(x)
        b5 = self.conv("branch5x5_2", 64, (5, 5), pad=(2, 2))(b5)
        b3 = self.conv("branch3x3dbl_1", 64, (1, 1))(x)
        b3 = self.conv("branch3x3dbl_2", 96, (3, 3), pad=(1, 1))(b3)
        b3 = self.conv("branch3x3dbl_3", 96, (3, 3), pad=(1, 1))(b3)
        bp = self.conv("branch_pool", self.pool_features, (1, 1))(_avg_pool_tf(x))
        return jnp.concatenate([b1, b5, b3, bp], axis=-1)


class InceptionB(_Block):
    @nn.compact
    def __call__(self, x):
        b3 = self.conv("branch3x3", 384, (3, 3), strides=(2, 2))(x)
        bd = self.conv("branch3x3dbl_1", 64, (1, 1))(x)
        bd = self.conv("branch3x3dbl_2", 96, (3, 3), pad=(1, 1))(bd)
        bd = self.conv("branch3x3dbl_3", 96, (3, 3), strides=(2, 2))(bd)
        return jnp.concatenate([b3, bd, _max_pool_3x3_s2(x)], axis=-1)


class InceptionC(_Block):
    channels_7x7: int = 128

    @nn.compact
    def __call__(self, x):
        c7 = self.channels_7x7
        b1 = self.conv("branch1x1", 192, (1, 1))(x)
        b7 = self.conv("branch7x7_1", c7, (1, 1))(x)
        b7 = self.conv("branch7x7_2", c7, (1, 7), pad=(0, 3))(b7)
        b7 = self.conv("branch7x7_3", 192, (7, 1), pad=(3, 0))(b7)
        bd = self.conv("branch7x7dbl_1", c7, (1, 1))(x)
        bd = self.conv("branch7x7dbl_2", c7, (7, 1), pad=(3, 0))(bd)
        bd = self.conv("branch7x7dbl_3", c7, (1, 7), pad=(0, 3))(bd)
        bd = self.conv("branch7x7dbl_4", c7, (7, 1), pad=(3, 0))(bd)
        bd = self.conv("branch7x7dbl_5", 192, (1, 7), pad=(0, 3))(bd)
        bp = self.conv("branch_pool", 192, (1, 1))(_avg_pool_tf(x))
        return jnp.concatenate([b1, b7, bd, bp], axis=-1)


class InceptionD(_Block):
    @nn.compact
    def __call__(self, x):
        b3 = self.conv("branch3x3_1", 192, (1, 1))(x)
        b3 = self.conv("branch3x3_2", 320, (3, 3), strides=(2, 2))(b3)
        b7 = self.conv("branch7x7x3_1", 192, (1, 1))(x)
        b7 = self.conv("branch7x7x3_2", 192, (1, 7), pad=(0, 3))(b7)
        b7 = self.conv("branch7x7x3_3", 192, (7, 1), pad=(3, 0))(b7)
        b7 = self.conv("branch7x7x3_4", 192, (3, 3), strides=(2, 2))(b7)
        return jnp.concatenate([b3, b7, _max_pool_3x3_s2(x)], axis=-1)


class InceptionE(_Block):
    # The TF graph's last block (Mixed_7c) max-pools here; Mixed_7b average-pools.
    pool: str = "avg"

    @nn.compact
    def __call__(self, x):
        b1 = self.conv("branch1x1", 320, (1, 1))(x)
        b3 = self.conv("branch3x3_1", 384, (1, 1))(x)
        b3 = jnp.concatenate([self.conv("branch3x3_2a", 384, (1, 3), pad=(0, 1))(b3),
                              self.conv("branch3x3_2b", 384, (3, 1), pad=(1, 0))(b3)], axis=-1)
        bd = self.conv("branch3x3dbl_1", 448, (1, 1))(x)
        bd = self.conv("branch3x3dbl_2", 384, (3, 3), pad=(1, 1))(bd)
        bd = jnp.concatenate([self.conv("branch3x3dbl_3a", 384, (1, 3), pad=(0, 1))(bd),
                              self.conv("branch3x3dbl_3b", 384, (3, 1), pad=(1, 0))(bd)], axis=-1)
        if self.pool == "max":
            pooled = nn.max_pool(x, (3, 3), (1, 1), padding=((1, 1), (1, 1)))
        else:
            pooled = _avg_pool_tf(x)
        bp = self.conv("branch_pool", 192, (1, 1))(pooled)
        return jnp.concatenate([b1, b3, bd, bp], axis=-1)


class Classifier(nn.Module):
    """The 1008-way fc layer; returns logits without and with the bias (IS uses the former)."""
    num_classes: int
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        kernel = self.param("kernel", nn.initializers.lecun_normal(), (x.shape[-1], self.num_classes),
                            self.param_dtype)
        bias = self.param("bias", nn.initializers.zeros, (self.num_classes,), self.param_dtype)
        unbiased = jnp.dot(x, kernel.astype(jnp.float32), precision="highest")
        return unbiased, unbiased + bias.astype(jnp.float32)


class InceptionV3(nn.Module):
    """FID InceptionV3: uint8 (or 0..255 float) NHWC RGB images of any size -> features.

    Returns a dict with `pool3` (N, 2048), and when `num_classes` > 0 also `logits_unbiased`
    (pool3 @ W, used for the Inception Score as torch-fidelity does) and `logits` (with bias).
    `resize_to=None` feeds the images at their own size (tests only; FID needs 299).
    """
    num_classes: int = NUM_CLASSES
    resize_to: int | None = INPUT_SIZE
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    # FID compares against float32 references: keep TF32 / bf16 passes out of the convs on GPU/TPU.
    precision: Any = "highest"

    @nn.compact
    def __call__(self, images):
        if images.ndim != 4 or images.shape[-1] != 3:
            raise ValueError(f"InceptionV3 expects NHWC RGB images (N, H, W, 3), got shape {images.shape}")
        x = images.astype(jnp.float32)
        if self.resize_to is not None:
            x = resize_bilinear_tf1(x, (self.resize_to, self.resize_to))
        x = ((x - 128.0) / 128.0).astype(self.dtype)

        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype, precision=self.precision)

        def conv(name, features, kernel, strides=(1, 1), pad=(0, 0)):
            return BasicConv2d(features, kernel, strides, ((pad[0], pad[0]), (pad[1], pad[1])), name=name, **kw)

        x = conv("Conv2d_1a_3x3", 32, (3, 3), strides=(2, 2))(x)
        x = conv("Conv2d_2a_3x3", 32, (3, 3))(x)
        x = conv("Conv2d_2b_3x3", 64, (3, 3), pad=(1, 1))(x)
        x = _max_pool_3x3_s2(x)
        x = conv("Conv2d_3b_1x1", 80, (1, 1))(x)
        x = conv("Conv2d_4a_3x3", 192, (3, 3))(x)
        x = _max_pool_3x3_s2(x)
        x = InceptionA(pool_features=32, name="Mixed_5b", **kw)(x)
        x = InceptionA(pool_features=64, name="Mixed_5c", **kw)(x)
        x = InceptionA(pool_features=64, name="Mixed_5d", **kw)(x)
        x = InceptionB(name="Mixed_6a", **kw)(x)
        x = InceptionC(channels_7x7=128, name="Mixed_6b", **kw)(x)
        x = InceptionC(channels_7x7=160, name="Mixed_6c", **kw)(x)
        x = InceptionC(channels_7x7=160, name="Mixed_6d", **kw)(x)
        x = InceptionC(channels_7x7=192, name="Mixed_6e", **kw)(x)
        x = InceptionD(name="Mixed_7a", **kw)(x)
        x = InceptionE(pool="avg", name="Mixed_7b", **kw)(x)
        x = InceptionE(pool="max", name="Mixed_7c", **kw)(x)
        pool3 = jnp.mean(x.astype(jnp.float32), axis=(1, 2))
        out = {"pool3": pool3}
        if self.num_classes:
            out["logits_unbiased"], out["logits"] = Classifier(self.num_classes, self.param_dtype, name="fc")(pool3)
        return out
