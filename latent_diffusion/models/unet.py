"""The LDM time-conditional UNet (CompVis `openaimodel.UNetModel`), NHWC.

Layout follows the reference: `num_res_blocks` ResBlocks per level (each followed by an
attention layer when the level's downsample factor is in `attention_resolutions`), a
stride-2 conv (or a downsampling ResBlock) between levels, a ResBlock-attention-ResBlock middle,
and a mirrored decoder with `num_res_blocks + 1` ResBlocks per level fed by skip connections.
The attention layer is a cross-attention SpatialTransformer (text/layout/class models) or the
plain self-attention AttentionBlock (the paper's unconditional and concat-conditioned models).
"""
from __future__ import annotations

import math
from typing import Any, Optional, Sequence, Union

import flax.linen as nn
import jax
import jax.numpy as jnp

from latent_diffusion.models.attention import AttentionBlock, SpatialTransformer

Dtype = Any


def timestep_embedding(t, dim: int, max_period: float = 10000.0):
    """Sinusoidal embedding [cos, sin] of (B,) timesteps, in float32 (CompVis order = diffusers flip_sin_to_cos)."""
    half = dim // 2
    freqs = jnp.exp(-math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / half)
    args = jnp.asarray(t, jnp.float32)[:, None] * freqs[None, :]
    emb = jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)
    if dim % 2:
        emb = jnp.pad(emb, ((0, 0), (0, 1)))
    return emb


def _group_norm(name: str, param_dtype: Dtype, eps: float = 1e-5) -> nn.GroupNorm:
    return nn.GroupNorm(num_groups=32, epsilon=eps, dtype=jnp.float32, param_dtype=param_dtype,
                        use_fast_variance=False, name=name)


def _conv(features: int, name: str, dtype, param_dtype, *, kernel: int = 3, stride: int = 1,
          zero: bool = False) -> nn.Conv:
    pad = (kernel - 1) // 2
    extra = dict(kernel_init=nn.initializers.zeros) if zero else {}
    return nn.Conv(features, (kernel, kernel), strides=(stride, stride), padding=((pad, pad), (pad, pad)),
                   dtype=dtype, param_dtype=param_dtype, name=name, **extra)


def _resample(x, kind: Optional[str]):
    """2x2 average pooling ('down'), nearest-neighbour x2 ('up'), or nothing (None)."""
    if kind == "down":
        return nn.avg_pool(x, (2, 2), strides=(2, 2))
    if kind == "up":
        return jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
    if kind is not None:
        raise ValueError(f"ResBlock: resample must be None, 'up' or 'down', got {kind!r}")
    return x


class ResBlock(nn.Module):
    """GroupNorm-SiLU-conv, add (or scale-shift by) the embedding, GroupNorm-SiLU-dropout-zero conv, skip.

    With `resample` ('up' / 'down') both the branch, between its first SiLU and conv, and the skip
    are resampled, as the reference's `resblock_updown` blocks do.
    """
    out_channels: int
    dropout: float = 0.0
    use_scale_shift_norm: bool = False
    resample: Optional[str] = None
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, emb, deterministic: bool = True):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        h = nn.silu(_group_norm("in_norm", self.param_dtype)(x)).astype(self.dtype)
        h, x = _resample(h, self.resample), _resample(x, self.resample)
        h = _conv(self.out_channels, "in_conv", **kw)(h)
        n_emb = 2 * self.out_channels if self.use_scale_shift_norm else self.out_channels
        e = nn.Dense(n_emb, **kw, name="emb_proj")(nn.silu(emb))[:, None, None, :]
        if self.use_scale_shift_norm:
            scale, shift = jnp.split(e.astype(jnp.float32), 2, axis=-1)
            h = _group_norm("out_norm", self.param_dtype)(h) * (1 + scale) + shift
        else:
            h = _group_norm("out_norm", self.param_dtype)(h + e)
        h = nn.silu(h).astype(self.dtype)
        h = nn.Dropout(self.dropout)(h, deterministic=deterministic)
        h = _conv(self.out_channels, "out_conv", **kw, zero=True)(h)
        if x.shape[-1] != self.out_channels:
            x = _conv(self.out_channels, "skip", **kw, kernel=1)(x)
        return x + h


REMAT_POLICIES = ("none", "full", "dots")


def rematted(cls, remat, static_argnums=()):
    """`cls` under the remat policy `remat` (UNet.remat: a bool or one of REMAT_POLICIES)."""
    name = {False: "none", True: "full"}.get(remat, remat) if isinstance(remat, bool) else str(remat)
    if name not in REMAT_POLICIES:
        raise ValueError(f"UNet: remat must be one of {REMAT_POLICIES} (or a bool), got {remat!r}")
    if name == "none":
        return cls
    policy = jax.checkpoint_policies.dots_with_no_batch_dims_saveable if name == "dots" else None
    return nn.remat(cls, static_argnums=static_argnums, policy=policy)


class UNet(nn.Module):
    """Time-conditional UNet; `apply({'params': p}, x, t, context=..., y=...)` -> same shape as x with out_channels.

    x: (B, H, W, in_channels) latents; t: (B,) or scalar, int or float timesteps;
    context: (B, L, context_dim) for cross-attention (with context_dim None the second
    attention attends to the image itself, as in the reference);
    y: (B,) int class labels when `num_classes` is set, (B, adm_in_channels) floats when
    `adm_in_channels` is set (the reference's num_classes="sequential").

    Class-conditional models have `num_classes + 1` label embeddings: index `num_classes` is the
    null (unconditional) label for classifier-free guidance. A reference checkpoint with N
    embedding rows therefore loads as num_classes = N - 1, its last row being the null label
    (the LDM cin256-v2 checkpoint's 1001 rows are 1000 classes plus the null one).

    Heads: exactly one of `num_heads` (same count at every level) and `num_head_channels`
    (count = channels // num_head_channels) is set. With `legacy`, as in the reference, the
    transformer's head width is then channels // heads; otherwise it is num_head_channels.
    The AttentionBlock's heads are always channels // heads wide.

    `use_spatial_transformer=False` puts the reference's AttentionBlock (self-attention only, no
    context) at every attention level and in the middle block; `resblock_updown` resamples with
    ResBlocks instead of convs. The output is float32 whatever the compute dtype.
    """
    in_channels: int
    model_channels: int
    out_channels: int
    num_res_blocks: int
    attention_resolutions: Sequence[int]
    channel_mult: Sequence[int] = (1, 2, 4, 4)
    dropout: float = 0.0
    num_heads: int = -1
    num_head_channels: int = -1
    use_scale_shift_norm: bool = False
    resblock_updown: bool = False
    use_spatial_transformer: bool = True
    transformer_depth: int = 1
    context_dim: Optional[int] = None
    use_linear_in_transformer: bool = False
    num_classes: Optional[int] = None
    adm_in_channels: Optional[int] = None
    legacy: bool = True
    # Rematerialisation of each ResBlock and attention block: False / 'none', True / 'full' (keep only the
    # block inputs), or 'dots' (keep the matmul outputs without a batch dimension: the attention and
    # feed-forward projections; convolutions and attention scores are recomputed). See REMAT_POLICIES.
    remat: Union[bool, str] = False
    # jax.nn.dot_product_attention's implementation: None lets XLA choose; 'cudnn' is the fused
    # (flash) kernel on NVIDIA GPUs, for bfloat16/float16 compute.
    attention_impl: Optional[str] = None
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    def heads_for(self, ch: int) -> tuple[int, int]:
        """(heads, dim_head) of the attention at a level with `ch` channels (the reference's rule)."""
        if (self.num_heads == -1) == (self.num_head_channels == -1):
            raise ValueError("UNet: set exactly one of num_heads and num_head_channels (the other -1); "
                             f"got num_heads={self.num_heads}, num_head_channels={self.num_head_channels}")
        if self.num_head_channels == -1:
            heads, dim_head = self.num_heads, ch // self.num_heads
        else:
            heads, dim_head = ch // self.num_head_channels, self.num_head_channels
        if self.legacy:
            dim_head = ch // heads
        if heads < 1 or dim_head < 1:
            raise ValueError(f"UNet: {ch} channels cannot be split into heads with num_heads="
                             f"{self.num_heads}, num_head_channels={self.num_head_channels}")
        return heads, dim_head

    def _check(self, x, context, y):
        if not self.use_spatial_transformer and (self.context_dim is not None or context is not None):
            raise ValueError("UNet: use_spatial_transformer=False (AttentionBlock) has no cross-attention; "
                             "set context_dim=None and pass no context, or use the spatial transformer")
        if self.num_classes is not None and self.adm_in_channels is not None:
            raise ValueError("UNet: set at most one of num_classes (labels) and adm_in_channels (vectors)")
        if x.ndim != 4 or x.shape[-1] != self.in_channels:
            raise ValueError(f"UNet: expected x of shape (B, H, W, {self.in_channels}) (NHWC), got {x.shape}")
        factor = 2 ** (len(self.channel_mult) - 1)
        if x.shape[1] % factor or x.shape[2] % factor:
            raise ValueError(f"UNet: height and width must be multiples of {factor} for "
                             f"{len(self.channel_mult)} levels; got {x.shape[1:3]}")
        if self.context_dim is not None and context is None:  # the middle block always attends
            raise ValueError(f"UNet: this model cross-attends to a context of width {self.context_dim}; "
                             "pass context=(B, L, context_dim)")
        if context is not None and self.context_dim is not None and context.shape[-1] != self.context_dim:
            raise ValueError(f"UNet: context width {context.shape[-1]} != context_dim {self.context_dim}")
        conditional = self.num_classes is not None or self.adm_in_channels is not None
        if conditional and y is None:
            raise ValueError("UNet: class-conditional model needs y (use label num_classes for "
                             "the unconditional/null label)")
        if not conditional and y is not None:
            raise ValueError("UNet: y was given but the model has neither num_classes nor adm_in_channels")

    @nn.compact
    def __call__(self, x, t, context=None, y=None, *, deterministic: bool = True):
        self._check(x, context, y)
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        res_cls = rematted(ResBlock, self.remat, static_argnums=(3,))
        attn_cls = rematted(SpatialTransformer, self.remat, static_argnums=(3,))
        block_cls = rematted(AttentionBlock, self.remat)

        def res(name, ch, h, resample=None):
            return res_cls(ch, self.dropout, self.use_scale_shift_norm, resample, **kw,
                           name=name)(h, emb, deterministic)

        def attn(name, ch, h):
            heads, dim_head = self.heads_for(ch)
            if not self.use_spatial_transformer:
                if self.num_head_channels != -1 and ch % self.num_head_channels:
                    raise ValueError(f"UNet: {ch} channels are not a multiple of num_head_channels="
                                     f"{self.num_head_channels} (the AttentionBlock needs whole heads)")
                return block_cls(heads, **kw, attention_impl=self.attention_impl, name=name)(h)
            return attn_cls(heads, dim_head, self.transformer_depth, self.dropout, self.use_linear_in_transformer,
                            **kw, attention_impl=self.attention_impl, name=name)(h, context, deterministic)

        b = x.shape[0]
        t = jnp.broadcast_to(jnp.asarray(t), (b,))
        ted = 4 * self.model_channels
        emb = timestep_embedding(t, self.model_channels).astype(self.dtype)
        emb = nn.Dense(ted, **kw, name="time_embed_0")(emb)
        emb = nn.Dense(ted, **kw, name="time_embed_1")(nn.silu(emb))
        if self.num_classes is not None:
            emb = emb + nn.Embed(self.num_classes + 1, ted, **kw, name="label_emb")(jnp.asarray(y, jnp.int32))
        if self.adm_in_channels is not None:
            a = nn.Dense(ted, **kw, name="adm_0")(jnp.asarray(y, self.dtype))
            emb = emb + nn.Dense(ted, **kw, name="adm_1")(nn.silu(a))

        h = _conv(self.model_channels, "conv_in", **kw)(x.astype(self.dtype))
        skips, ds = [h], 1
        last = len(self.channel_mult) - 1
        for level, mult in enumerate(self.channel_mult):
            ch = self.model_channels * mult
            for i in range(self.num_res_blocks):
                h = res(f"down_{level}_res_{i}", ch, h)
                if ds in self.attention_resolutions:
                    h = attn(f"down_{level}_attn_{i}", ch, h)
                skips.append(h)
            if level != last:
                name = f"down_{level}_downsample"
                h = res(name, ch, h, "down") if self.resblock_updown else _conv(ch, name, **kw, stride=2)(h)
                skips.append(h)
                ds *= 2

        h = res("mid_res_0", ch, h)
        h = attn("mid_attn", ch, h)
        h = res("mid_res_1", ch, h)

        for level in reversed(range(len(self.channel_mult))):
            ch = self.model_channels * self.channel_mult[level]
            for i in range(self.num_res_blocks + 1):
                h = jnp.concatenate([h, skips.pop()], axis=-1)
                h = res(f"up_{level}_res_{i}", ch, h)
                if ds in self.attention_resolutions:
                    h = attn(f"up_{level}_attn_{i}", ch, h)
            if level:
                name = f"up_{level}_upsample"
                h = res(name, ch, h, "up") if self.resblock_updown else _conv(ch, name, **kw)(_resample(h, "up"))
                ds //= 2

        h = nn.silu(_group_norm("out_norm", self.param_dtype)(h)).astype(self.dtype)
        h = _conv(self.out_channels, "conv_out", **kw, zero=True)(h)
        return h.astype(jnp.float32)
