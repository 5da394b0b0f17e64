"""First-stage autoencoders of LDM (CompVis `ldm/modules/diffusionmodules/model.py`): KL and VQ.

Parameter names follow the CompVis layout (`down_{level}_block_{i}`, `mid_attn_1`, ...) so the
converters are plain renames. Images are NHWC in [-1, 1].
"""
from __future__ import annotations

from typing import Any, Sequence

import jax
import jax.numpy as jnp
import flax.linen as nn
from flax import struct

from latent_diffusion.models.quantizer import VectorQuantizer

Dtype = Any


@struct.dataclass
class DiagonalGaussian:
    """Diagonal Gaussian posterior q(z|x); build with `from_moments` so logvar is clamped."""
    mean: jax.Array
    logvar: jax.Array

    @classmethod
    def from_moments(cls, moments):
        mean, logvar = jnp.split(moments.astype(jnp.float32), 2, axis=-1)
        # Clamped as in CompVis, so exp() stays finite early in training.
        return cls(mean=mean, logvar=jnp.clip(logvar, -30.0, 20.0))

    @property
    def std(self):
        return jnp.exp(0.5 * self.logvar)

    @property
    def var(self):
        return jnp.exp(self.logvar)

    def sample(self, rng):
        return self.mean + self.std * jax.random.normal(rng, self.mean.shape, self.mean.dtype)

    def mode(self):
        return self.mean

    def kl(self):
        """KL(q || N(0, I)) per sample, summed over H, W, C."""
        return 0.5 * jnp.sum(self.mean ** 2 + self.var - 1.0 - self.logvar, axis=(1, 2, 3))


def _norm(num_groups, param_dtype, name):
    # Statistics in float32 whatever the compute dtype; two-pass variance for accuracy.
    return nn.GroupNorm(num_groups=num_groups, epsilon=1e-6, dtype=jnp.float32,
                        param_dtype=param_dtype, use_fast_variance=False, name=name)


class ResnetBlock(nn.Module):
    """norm-swish-conv twice, with a 1x1 (or 3x3) shortcut when channels change; no time embedding."""
    out_channels: int
    num_groups: int = 32
    dropout: float = 0.0
    conv_shortcut: bool = False
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, deterministic=True):
        conv = lambda k, name: nn.Conv(self.out_channels, (k, k), padding=k // 2, dtype=self.dtype,
                                       param_dtype=self.param_dtype, name=name)
        h = nn.swish(_norm(self.num_groups, self.param_dtype, "norm1")(x)).astype(self.dtype)
        h = conv(3, "conv1")(h)
        h = nn.swish(_norm(self.num_groups, self.param_dtype, "norm2")(h)).astype(self.dtype)
        h = nn.Dropout(self.dropout, deterministic=deterministic)(h)
        h = conv(3, "conv2")(h)
        if x.shape[-1] != self.out_channels:
            x = conv(3, "conv_shortcut")(x) if self.conv_shortcut else conv(1, "nin_shortcut")(x)
        return x.astype(self.dtype) + h


class AttnBlock(nn.Module):
    """Single-head self-attention over all spatial positions, with a residual connection."""
    num_groups: int = 32
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        b, hh, ww, c = x.shape
        dense = lambda name: nn.Dense(c, dtype=self.dtype, param_dtype=self.param_dtype, name=name)
        h = _norm(self.num_groups, self.param_dtype, "norm")(x).astype(self.dtype)
        h = h.reshape(b, hh * ww, 1, c)
        h = jax.nn.dot_product_attention(dense("q")(h), dense("k")(h), dense("v")(h))
        h = dense("proj_out")(h.reshape(b, hh, ww, c))
        return x.astype(self.dtype) + h


class Downsample(nn.Module):
    """Stride-2 3x3 conv after padding one row/column at the bottom/right (CompVis' asymmetric pad)."""
    channels: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        x = jnp.pad(x, ((0, 0), (0, 1), (0, 1), (0, 0)))
        return nn.Conv(self.channels, (3, 3), strides=(2, 2), padding="VALID", dtype=self.dtype,
                       param_dtype=self.param_dtype, name="conv")(x)


class Upsample(nn.Module):
    """Nearest-neighbour x2 then a 3x3 conv."""
    channels: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        x = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
        return nn.Conv(self.channels, (3, 3), padding=1, dtype=self.dtype,
                       param_dtype=self.param_dtype, name="conv")(x)


class _Trunk(nn.Module):
    """Fields and block factories shared by Encoder and Decoder."""
    ch: int = 128
    ch_mult: Sequence[int] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    attn_resolutions: Sequence[int] = ()
    out_channels: int = 3
    resolution: int = 256
    dropout: float = 0.0
    num_groups: int = 32
    mid_attention: bool = True
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    remat: bool = False

    def _res(self, out_channels, name):
        cls = nn.remat(ResnetBlock, static_argnums=(2,)) if self.remat else ResnetBlock
        return cls(out_channels, self.num_groups, self.dropout, dtype=self.dtype,
                   param_dtype=self.param_dtype, name=name)

    def _attn(self, name):
        return AttnBlock(self.num_groups, dtype=self.dtype, param_dtype=self.param_dtype, name=name)

    def _conv(self, channels, name):
        return nn.Conv(channels, (3, 3), padding=1, dtype=self.dtype, param_dtype=self.param_dtype,
                       name=name)

    def _mid(self, h, deterministic):
        c = self.ch * self.ch_mult[-1]
        h = self._res(c, "mid_block_1")(h, deterministic)
        if self.mid_attention:
            h = self._attn("mid_attn_1")(h)
        return self._res(c, "mid_block_2")(h, deterministic)


class Encoder(_Trunk):
    """Image -> latent moments (2 * out_channels channels when double_z)."""
    double_z: bool = True

    @nn.compact
    def __call__(self, x, deterministic=True):
        h = self._conv(self.ch, "conv_in")(x.astype(self.dtype))
        res = self.resolution
        for level, mult in enumerate(self.ch_mult):
            for i in range(self.num_res_blocks):
                h = self._res(self.ch * mult, f"down_{level}_block_{i}")(h, deterministic)
                if res in self.attn_resolutions:
                    h = self._attn(f"down_{level}_attn_{i}")(h)
            if level != len(self.ch_mult) - 1:
                h = Downsample(self.ch * mult, self.dtype, self.param_dtype,
                               name=f"down_{level}_downsample")(h)
                res //= 2
        h = self._mid(h, deterministic)
        h = nn.swish(_norm(self.num_groups, self.param_dtype, "norm_out")(h)).astype(self.dtype)
        out = 2 * self.out_channels if self.double_z else self.out_channels
        return self._conv(out, "conv_out")(h)


class Decoder(_Trunk):
    """Latent -> (image, features), features being the input of conv_out (for the GAN weight)."""

    @nn.compact
    def __call__(self, z, deterministic=True):
        levels = len(self.ch_mult)
        h = self._conv(self.ch * self.ch_mult[-1], "conv_in")(z.astype(self.dtype))
        h = self._mid(h, deterministic)
        res = self.resolution // 2 ** (levels - 1)
        for level in reversed(range(levels)):
            for i in range(self.num_res_blocks + 1):
                h = self._res(self.ch * self.ch_mult[level], f"up_{level}_block_{i}")(h, deterministic)
                if res in self.attn_resolutions:
                    h = self._attn(f"up_{level}_attn_{i}")(h)
            if level != 0:
                h = Upsample(self.ch * self.ch_mult[level], self.dtype, self.param_dtype,
                             name=f"up_{level}_upsample")(h)
                res *= 2
        features = nn.swish(_norm(self.num_groups, self.param_dtype, "norm_out")(h)).astype(self.dtype)
        return self._conv(self.out_channels, "conv_out")(features), features


class _FirstStage(nn.Module):
    """Encoder/decoder fields shared by AutoencoderKL and VQModel."""
    ch: int = 128
    ch_mult: Sequence[int] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    attn_resolutions: Sequence[int] = ()
    z_channels: int = 4
    embed_dim: int = 4
    resolution: int = 256
    in_channels: int = 3
    out_ch: int = 3
    dropout: float = 0.0
    num_groups: int = 32
    mid_attention: bool = True
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    remat: bool = False

    def _trunk_kwargs(self):
        return dict(ch=self.ch, ch_mult=tuple(self.ch_mult), num_res_blocks=self.num_res_blocks,
                    attn_resolutions=tuple(self.attn_resolutions), resolution=self.resolution,
                    dropout=self.dropout, num_groups=self.num_groups,
                    mid_attention=self.mid_attention, dtype=self.dtype,
                    param_dtype=self.param_dtype, remat=self.remat)

    def _check_fields(self):
        widths = [self.ch * m for m in self.ch_mult]
        if any(w % self.num_groups for w in widths):
            raise ValueError(f"{type(self).__name__}: channel widths ch * ch_mult = {widths} must all "
                             f"be divisible by num_groups={self.num_groups}")

    def _conv1x1(self, channels, name):
        return nn.Conv(channels, (1, 1), dtype=self.dtype, param_dtype=self.param_dtype, name=name)

    @property
    def downsample_factor(self) -> int:
        return 2 ** (len(self.ch_mult) - 1)


class AutoencoderKL(_FirstStage):
    """KL-regularised autoencoder; encode() returns a DiagonalGaussian over the latent."""
    double_z: bool = True
    use_quant_conv: bool = True
    use_post_quant_conv: bool = True

    def setup(self):
        self._check_fields()
        if not self.use_quant_conv and self.embed_dim != self.z_channels:
            raise ValueError(f"AutoencoderKL: embed_dim ({self.embed_dim}) must equal z_channels "
                             f"({self.z_channels}) when use_quant_conv is False")
        if not self.double_z:
            raise ValueError("AutoencoderKL needs double_z=True (mean and log-variance)")
        self.encoder = Encoder(out_channels=self.z_channels, double_z=True, **self._trunk_kwargs())
        self.decoder = Decoder(out_channels=self.out_ch, **self._trunk_kwargs())
        if self.use_quant_conv:
            self.quant_conv = self._conv1x1(2 * self.embed_dim, "quant_conv")
        if self.use_post_quant_conv:
            self.post_quant_conv = self._conv1x1(self.z_channels, "post_quant_conv")

    def encode(self, x, deterministic=True) -> DiagonalGaussian:
        h = self.encoder(x, deterministic)
        if self.use_quant_conv:
            h = self.quant_conv(h)
        return DiagonalGaussian.from_moments(h)

    def _decode(self, z, deterministic):
        if self.use_post_quant_conv:
            z = self.post_quant_conv(z.astype(self.dtype))
        return self.decoder(z, deterministic)

    def decode(self, z, deterministic=True):
        return self._decode(z, deterministic)[0]

    def __call__(self, x, *, sample_posterior=True, deterministic=True):
        posterior = self.encode(x, deterministic)
        z = posterior.sample(self.make_rng("sample")) if sample_posterior else posterior.mode()
        xrec, features = self._decode(z, deterministic)
        return xrec, {"posterior": posterior, "decoder_features": features}


class VQModel(_FirstStage):
    """VQ-regularised autoencoder (VQGAN first stage without the transformer)."""
    n_embed: int = 16384
    beta: float = 0.25
    legacy: bool = True
    double_z: bool = False  # accepted so CompVis ddconfigs pass through; must stay False

    def setup(self):
        self._check_fields()
        if self.double_z:
            raise ValueError("VQModel needs double_z=False (its encoder outputs the latent itself)")
        self.encoder = Encoder(out_channels=self.z_channels, double_z=False, **self._trunk_kwargs())
        self.decoder = Decoder(out_channels=self.out_ch, **self._trunk_kwargs())
        self.quant_conv = self._conv1x1(self.embed_dim, "quant_conv")
        self.post_quant_conv = self._conv1x1(self.z_channels, "post_quant_conv")
        # `quantize` is a method of the interface, so the submodule gets another attribute but
        # keeps the CompVis param name.
        self.quantizer = VectorQuantizer(self.n_embed, self.embed_dim, self.beta, self.legacy,
                                         dtype=self.dtype, param_dtype=self.param_dtype,
                                         name="quantize")

    def encode(self, x, deterministic=True):
        """Pre-quantisation latent (after quant_conv), as diffusers' VQModel.encode."""
        return self.quant_conv(self.encoder(x, deterministic))

    def quantize(self, h):
        """(z_q, aux): straight-through quantisation; aux has codebook_loss, perplexity,
        codebook_usage (fraction of codes used in the batch) and indices."""
        return self.quantizer(h)

    def _decode(self, z_q, deterministic):
        return self.decoder(self.post_quant_conv(z_q.astype(self.dtype)), deterministic)

    def decode(self, h, force_not_quantize=False, deterministic=True):
        z_q = h if force_not_quantize else self.quantize(h)[0]
        return self._decode(z_q, deterministic)[0]

    def decode_code(self, indices, deterministic=True):
        """Decode integer codes of shape (B, h, w)."""
        return self._decode(self.quantizer.embed(indices), deterministic)[0]

    def __call__(self, x, *, deterministic=True):
        z_q, aux = self.quantize(self.encode(x, deterministic))
        xrec, features = self._decode(z_q, deterministic)
        return xrec, {**aux, "decoder_features": features}
