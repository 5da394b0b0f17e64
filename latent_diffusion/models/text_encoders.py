"""Text encoders for conditioning: the CLIP text transformer and the LDM paper's BERT-style encoder.

Both are stacks of pre-LayerNorm transformer blocks; they differ in masking (causal for CLIP),
biases, widths and activations. `CLIPTextTransformer` mirrors transformers' `CLIPTextModel`
(its converter is `latent_diffusion.convert.clip`); `BERTEmbedder` mirrors the CompVis
`BERTEmbedder` (x-transformers `TransformerWrapper` + `Encoder`), trained jointly with the UNet.
"""
from __future__ import annotations

from typing import Any, Callable, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

Dtype = Any


def quick_gelu(x):
    return x * jax.nn.sigmoid(1.702 * x)


ACTIVATIONS: dict[str, Callable] = {
    "quick_gelu": quick_gelu,
    # torch's nn.GELU / transformers' "gelu" is the exact (erf) form, not the tanh approximation.
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
}


def activation(name: str) -> Callable:
    if name not in ACTIVATIONS:
        raise ValueError(f"unknown activation {name!r}; expected one of {sorted(ACTIVATIONS)}")
    return ACTIVATIONS[name]


class LayerNorm(nn.Module):
    """LayerNorm computed in float32 whatever the compute dtype, cast back afterwards."""
    epsilon: float = 1e-5
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        d = x.shape[-1]
        scale = self.param("scale", nn.initializers.ones, (d,), self.param_dtype)
        bias = self.param("bias", nn.initializers.zeros, (d,), self.param_dtype)
        x = x.astype(jnp.float32)
        mean = x.mean(-1, keepdims=True)
        var = jnp.square(x - mean).mean(-1, keepdims=True)
        y = (x - mean) * jax.lax.rsqrt(var + self.epsilon)
        return (y * scale.astype(jnp.float32) + bias.astype(jnp.float32)).astype(self.dtype)


class SelfAttention(nn.Module):
    """Multi-head self-attention; inner width heads * head_dim may differ from the model width."""
    heads: int
    head_dim: int
    out_features: int
    qkv_bias: bool = True
    causal: bool = False
    kernel_init: Callable = nn.initializers.lecun_normal()
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, mask: Optional[jax.Array] = None):
        b, n, _ = x.shape
        inner = self.heads * self.head_dim

        def proj(name, bias):
            y = nn.Dense(inner, use_bias=bias, kernel_init=self.kernel_init, dtype=self.dtype,
                         param_dtype=self.param_dtype, name=name)(x)
            return y.reshape(b, n, self.heads, self.head_dim)

        q, k, v = proj("q_proj", self.qkv_bias), proj("k_proj", self.qkv_bias), proj("v_proj", self.qkv_bias)
        # The XLA path accumulates logits and runs the softmax in float32 for low-precision inputs.
        out = jax.nn.dot_product_attention(q, k, v, mask=mask, is_causal=self.causal)
        return nn.Dense(self.out_features, kernel_init=self.kernel_init, dtype=self.dtype,
                        param_dtype=self.param_dtype, name="out_proj")(out.reshape(b, n, inner))


class MLP(nn.Module):
    hidden: int
    out_features: int
    act: str = "gelu"
    kernel_init: Callable = nn.initializers.lecun_normal()
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        dense = lambda n, name: nn.Dense(n, kernel_init=self.kernel_init, dtype=self.dtype,
                                         param_dtype=self.param_dtype, name=name)
        return dense(self.out_features, "fc2")(activation(self.act)(dense(self.hidden, "fc1")(x)))


class EncoderBlock(nn.Module):
    """Pre-LN block: x + attn(LN(x)), then x + mlp(LN(x))."""
    width: int
    heads: int
    head_dim: int
    mlp_dim: int
    act: str = "quick_gelu"
    qkv_bias: bool = True
    causal: bool = False
    layer_norm_eps: float = 1e-5
    kernel_init: Callable = nn.initializers.lecun_normal()
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, mask=None):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        h = LayerNorm(self.layer_norm_eps, name="layer_norm1", **kw)(x)
        x = x + SelfAttention(self.heads, self.head_dim, self.width, self.qkv_bias, self.causal,
                              self.kernel_init, name="self_attn", **kw)(h, mask)
        h = LayerNorm(self.layer_norm_eps, name="layer_norm2", **kw)(x)
        return x + MLP(self.mlp_dim, self.width, self.act, self.kernel_init, name="mlp", **kw)(h)


def padding_mask(attention_mask: Optional[jax.Array]) -> Optional[jax.Array]:
    """(B, L) with 1 for real tokens -> boolean (B, 1, 1, L) key mask, broadcast over heads and queries."""
    if attention_mask is None:
        return None
    return attention_mask.astype(bool)[:, None, None, :]


def _check_ids(input_ids, max_length: int, what: str):
    if input_ids.ndim != 2:
        raise ValueError(f"{what}: expected token ids of shape (batch, length), got {input_ids.shape}")
    if input_ids.shape[1] > max_length:
        raise ValueError(f"{what}: sequence length {input_ids.shape[1]} exceeds max_length {max_length}; "
                         "tokenize with truncation to the model's context length")


class CLIPTextTransformer(nn.Module):
    """CLIP's causal text transformer (transformers `CLIPTextModel`, optionally with projection).

    Returns (hidden_states (B, L, width), pooled). `hidden_states` is the output of layer
    `output_layer` (-1: last, as SD v1; -2: penultimate, as SD v2 and SDXL) with the final
    LayerNorm applied when `output_final_norm` (SD v1/v2; SDXL leaves it off). `pooled` is always
    the final-LayerNorm feature of the last layer at the EOS position (transformers' pooler_output),
    mapped by `text_projection` into the joint image-text space when `projection_dim` is set.
    """
    vocab_size: int = 49408
    max_length: int = 77
    width: int = 768
    layers: int = 12
    heads: int = 12
    mlp_dim: int = 3072
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5
    # transformers' rule: id 2 marks legacy configs whose EOS is the largest id in the sequence.
    eos_token_id: int = 49407
    output_layer: int = -1
    output_final_norm: bool = True
    projection_dim: Optional[int] = None
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, input_ids, attention_mask=None):
        if self.width % self.heads:
            raise ValueError(f"CLIPTextTransformer: width {self.width} is not divisible by heads {self.heads}")
        if not -(self.layers + 1) <= self.output_layer <= self.layers:
            raise ValueError(f"CLIPTextTransformer: output_layer {self.output_layer} is out of range for "
                             f"{self.layers} layers (use -1 for the last, -2 for the penultimate)")
        _check_ids(input_ids, self.max_length, "CLIPTextTransformer")
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        emb_init = nn.initializers.normal(0.02)
        length = input_ids.shape[1]
        x = nn.Embed(self.vocab_size, self.width, embedding_init=emb_init, name="token_embedding", **kw)(input_ids)
        x = x + nn.Embed(self.max_length, self.width, embedding_init=emb_init,
                         name="position_embedding", **kw)(jnp.arange(length))[None]
        mask = padding_mask(attention_mask)
        hidden = [x]
        for i in range(self.layers):
            x = EncoderBlock(self.width, self.heads, self.width // self.heads, self.mlp_dim, self.hidden_act,
                             qkv_bias=True, causal=True, layer_norm_eps=self.layer_norm_eps,
                             name=f"layers_{i}", **kw)(x, mask)
            hidden.append(x)
        final_norm = LayerNorm(self.layer_norm_eps, name="final_layer_norm", **kw)
        last = final_norm(x)
        out = hidden[self.output_layer]
        if self.output_layer in (-1, self.layers):
            out = last if self.output_final_norm else x
        elif self.output_final_norm:
            out = final_norm(out)
        ids = input_ids.astype(jnp.int32)
        eos_pos = jnp.argmax(ids if self.eos_token_id == 2 else (ids == self.eos_token_id), axis=-1)
        pooled = jnp.take_along_axis(last, eos_pos[:, None, None], axis=1)[:, 0]
        if self.projection_dim is not None:
            pooled = nn.Dense(self.projection_dim, use_bias=False, name="text_projection", **kw)(pooled)
        return out, pooled


class BERTEmbedder(nn.Module):
    """The LDM paper's text encoder, trained from scratch with the UNet (CompVis `BERTEmbedder`).

    Matches x-transformers' `TransformerWrapper(num_tokens, max_seq_len, attn_layers=Encoder(dim, depth))`
    as vendored in CompVis `ldm/modules/x_transformer.py`: token + learned absolute position
    embeddings (both N(0, 0.02) at init, no scaling), `depth` bidirectional pre-LN blocks with
    attention of `heads` x 64 (q/k/v without bias, output projection with bias), a 4x exact-GELU
    feed-forward, LayerNorm eps 1e-5, a final LayerNorm. Returns (B, L, width). The wrapper's
    unused `to_logits` head is not part of this module.
    """
    vocab_size: int = 30522
    max_length: int = 77
    width: int = 1280
    depth: int = 32
    heads: int = 8
    head_dim: int = 64
    ff_mult: int = 4
    layer_norm_eps: float = 1e-5
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, input_ids, attention_mask=None):
        _check_ids(input_ids, self.max_length, "BERTEmbedder")
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        emb_init = nn.initializers.normal(0.02)
        # torch nn.Linear's default init (uniform, variance 1/(3 fan_in)), which x-transformers keeps.
        torch_linear = nn.initializers.variance_scaling(1 / 3, "fan_in", "uniform")
        length = input_ids.shape[1]
        x = nn.Embed(self.vocab_size, self.width, embedding_init=emb_init, name="token_embedding", **kw)(input_ids)
        x = x + nn.Embed(self.max_length, self.width, embedding_init=emb_init,
                         name="position_embedding", **kw)(jnp.arange(length))[None]
        mask = padding_mask(attention_mask)
        for i in range(self.depth):
            x = EncoderBlock(self.width, self.heads, self.head_dim, self.ff_mult * self.width, "gelu",
                             qkv_bias=False, causal=False, layer_norm_eps=self.layer_norm_eps,
                             kernel_init=torch_linear, name=f"layers_{i}", **kw)(x, mask)
        return LayerNorm(self.layer_norm_eps, name="final_layer_norm", **kw)(x)
