"""Attention layers of the LDM UNet: the cross-attention SpatialTransformer (CompVis
`ldm/modules/attention.py`) and the plain self-attention AttentionBlock (`openaimodel.py`).

Images are NHWC. Norms and the attention softmax run in float32; matmuls in `dtype`.
"""
from __future__ import annotations

from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

Dtype = Any


def _layer_norm(name: str, param_dtype: Dtype) -> nn.LayerNorm:
    # Two-pass variance, as PyTorch computes it; E[x^2]-E[x]^2 loses digits on large activations.
    return nn.LayerNorm(epsilon=1e-5, dtype=jnp.float32, param_dtype=param_dtype,
                        use_fast_variance=False, name=name)


class CrossAttention(nn.Module):
    """Multi-head attention of `x` to `context` (to itself when context is None).

    q/k/v projections have no bias and the output projection has one, as in the reference.
    """
    heads: int
    dim_head: int
    dropout: float = 0.0
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    implementation: Optional[str] = None  # jax.nn.dot_product_attention's: None (XLA), 'cudnn' (fused, GPU)

    @nn.compact
    def __call__(self, x, context=None, deterministic: bool = True):
        context = x if context is None else context.astype(self.dtype)
        inner = self.heads * self.dim_head

        def proj(name, inp):
            y = nn.Dense(inner, use_bias=False, dtype=self.dtype, param_dtype=self.param_dtype,
                         name=name)(inp)
            return y.reshape(y.shape[:-1] + (self.heads, self.dim_head))

        q, k, v = proj("to_q", x), proj("to_k", context), proj("to_v", context)
        # (B, T, heads, dim_head); softmax in float32
        out = jax.nn.dot_product_attention(q, k, v, implementation=self.implementation)
        out = out.reshape(out.shape[:-2] + (inner,))
        out = nn.Dense(x.shape[-1], dtype=self.dtype, param_dtype=self.param_dtype, name="to_out")(out)
        return nn.Dropout(self.dropout)(out, deterministic=deterministic)


class GEGLUFeedForward(nn.Module):
    """Linear to 2x inner, value * GELU(gate) with exact (erf) GELU, dropout, linear back."""
    mult: int = 4
    dropout: float = 0.0
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, deterministic: bool = True):
        dim = x.shape[-1]
        inner = dim * self.mult
        h = nn.Dense(2 * inner, dtype=self.dtype, param_dtype=self.param_dtype, name="geglu")(x)
        value, gate = jnp.split(h, 2, axis=-1)
        h = value * nn.gelu(gate, approximate=False)
        h = nn.Dropout(self.dropout)(h, deterministic=deterministic)
        return nn.Dense(dim, dtype=self.dtype, param_dtype=self.param_dtype, name="out")(h)


class BasicTransformerBlock(nn.Module):
    """Pre-norm self-attention, cross-attention and GEGLU feed-forward, each residual."""
    heads: int
    dim_head: int
    dropout: float = 0.0
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    attention_impl: Optional[str] = None

    @nn.compact
    def __call__(self, x, context=None, deterministic: bool = True):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        attn = dict(heads=self.heads, dim_head=self.dim_head, dropout=self.dropout,
                    implementation=self.attention_impl, **kw)

        def norm(name, h):
            return _layer_norm(name, self.param_dtype)(h).astype(self.dtype)

        x = x + CrossAttention(**attn, name="attn1")(norm("norm1", x), None, deterministic)
        x = x + CrossAttention(**attn, name="attn2")(norm("norm2", x), context, deterministic)
        x = x + GEGLUFeedForward(dropout=self.dropout, **kw, name="ff")(norm("norm3", x), deterministic)
        return x


class SpatialTransformer(nn.Module):
    """GroupNorm, project in, `depth` transformer blocks over the H*W tokens, zero-init project out.

    The reference projects with a 1x1 conv (SD1/LDM) or a linear layer (SD2,
    `use_linear`); both are the same map on NHWC tokens, so both are a Dense here and the
    flag is kept only so converters know which PyTorch layout to read and write.
    """
    heads: int
    dim_head: int
    depth: int = 1
    dropout: float = 0.0
    use_linear: bool = False
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    attention_impl: Optional[str] = None

    @nn.compact
    def __call__(self, x, context=None, deterministic: bool = True):
        b, hgt, wid, ch = x.shape
        inner = self.heads * self.dim_head
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        h = nn.GroupNorm(num_groups=32, epsilon=1e-6, dtype=jnp.float32, param_dtype=self.param_dtype,
                         use_fast_variance=False, name="norm")(x).astype(self.dtype)
        h = h.reshape(b, hgt * wid, ch)
        h = nn.Dense(inner, **kw, name="proj_in")(h)
        for i in range(self.depth):
            h = BasicTransformerBlock(self.heads, self.dim_head, self.dropout, **kw, attention_impl=self.attention_impl,
                                      name=f"blocks_{i}")(h, context, deterministic)
        h = nn.Dense(ch, kernel_init=nn.initializers.zeros, **kw, name="proj_out")(h)
        return x + h.reshape(b, hgt, wid, ch)


class AttentionBlock(nn.Module):
    """Self-attention over the H*W positions (CompVis `openaimodel.AttentionBlock`), residual.

    GroupNorm(32) in float32, q/k/v projections with bias, `heads` heads of width C // heads,
    zero-initialised output projection. The reference computes q, k and v with one fused 1x1
    conv whose channel order depends on its attention variant; here they are separate, and the
    converters split the fused weight in the checkpoint's order.
    """
    heads: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    attention_impl: Optional[str] = None

    @nn.compact
    def __call__(self, x):
        b, hgt, wid, ch = x.shape
        if ch % self.heads:
            raise ValueError(f"AttentionBlock: {ch} channels do not split into {self.heads} heads")
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        h = nn.GroupNorm(num_groups=32, epsilon=1e-5, dtype=jnp.float32, param_dtype=self.param_dtype,
                         use_fast_variance=False, name="norm")(x).astype(self.dtype)
        h = h.reshape(b, hgt * wid, ch)

        def proj(name):
            return nn.Dense(ch, **kw, name=name)(h).reshape(b, hgt * wid, self.heads, ch // self.heads)

        out = jax.nn.dot_product_attention(proj("to_q"), proj("to_k"), proj("to_v"),
                                           implementation=self.attention_impl)
        out = nn.Dense(ch, kernel_init=nn.initializers.zeros, **kw, name="to_out")(out.reshape(b, hgt * wid, ch))
        return x + out.reshape(b, hgt, wid, ch)
