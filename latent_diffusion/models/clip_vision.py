"""CLIP's vision transformer (transformers `CLIPVisionModel` / `...WithProjection`), for CLIP score."""
from __future__ import annotations

from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from latent_diffusion.models.text_encoders import EncoderBlock, LayerNorm

Dtype = Any

# OpenAI CLIP's input normalisation (RGB), applied to images in [0, 1].
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def preprocess(images: jax.Array, image_size: int = 224) -> jax.Array:
    """NHWC images in [-1, 1] -> CLIP input: resized (bicubic, antialiased), normalised.

    Square images are resized straight to `image_size`; others get their short side resized and a
    centre crop, like CLIP's processor. jax's bicubic differs slightly from PIL's, so CLIP scores
    can move in the third decimal against PIL-preprocessed references.
    """
    b, h, w, c = images.shape
    if c != 3:
        raise ValueError(f"CLIP preprocess: expected RGB images (B, H, W, 3), got shape {images.shape}")
    scale = image_size / min(h, w)
    nh, nw = max(image_size, round(h * scale)), max(image_size, round(w * scale))
    x = (images.astype(jnp.float32) + 1.0) / 2.0
    if (nh, nw) != (h, w):
        x = jax.image.resize(x, (b, nh, nw, c), method="bicubic", antialias=True)
    top, left = (nh - image_size) // 2, (nw - image_size) // 2
    x = jnp.clip(x[:, top:top + image_size, left:left + image_size], 0.0, 1.0)
    return (x - jnp.asarray(CLIP_MEAN)) / jnp.asarray(CLIP_STD)


class CLIPVisionTransformer(nn.Module):
    """ViT image tower of CLIP. Input: normalised NHWC pixels of size `image_size`.

    Returns (last_hidden_state (B, 1 + patches, width), pooled): pooled is the post-LayerNorm
    class token, mapped by `visual_projection` into the joint space when `projection_dim` is set
    (transformers' image_embeds).
    """
    image_size: int = 224
    patch_size: int = 32
    num_channels: int = 3
    width: int = 768
    layers: int = 12
    heads: int = 12
    mlp_dim: int = 3072
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5
    projection_dim: Optional[int] = None
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, pixels):
        expect = (self.image_size, self.image_size, self.num_channels)
        if pixels.ndim != 4 or tuple(pixels.shape[1:]) != expect:
            raise ValueError(f"CLIPVisionTransformer: expected images of shape (B, {expect[0]}, {expect[1]}, "
                             f"{expect[2]}), got {pixels.shape}; resize with clip_vision.preprocess")
        if self.width % self.heads:
            raise ValueError(f"CLIPVisionTransformer: width {self.width} is not divisible by heads {self.heads}")
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        p = self.patch_size
        x = nn.Conv(self.width, (p, p), strides=(p, p), padding="VALID", use_bias=False,
                    name="patch_embedding", **kw)(pixels.astype(self.dtype))
        b = x.shape[0]
        x = x.reshape(b, -1, self.width)  # row-major over the patch grid, as torch's flatten(2)
        cls = self.param("class_embedding", nn.initializers.normal(self.width ** -0.5),
                         (self.width,), self.param_dtype)
        x = jnp.concatenate([jnp.broadcast_to(cls.astype(self.dtype), (b, 1, self.width)), x], axis=1)
        x = x + nn.Embed(x.shape[1], self.width, embedding_init=nn.initializers.normal(0.02),
                         name="position_embedding", **kw)(jnp.arange(x.shape[1]))[None]
        x = LayerNorm(self.layer_norm_eps, name="pre_layrnorm", **kw)(x)
        for i in range(self.layers):
            x = EncoderBlock(self.width, self.heads, self.width // self.heads, self.mlp_dim, self.hidden_act,
                             qkv_bias=True, causal=False, layer_norm_eps=self.layer_norm_eps,
                             name=f"layers_{i}", **kw)(x)
        pooled = LayerNorm(self.layer_norm_eps, name="post_layernorm", **kw)(x[:, 0])
        if self.projection_dim is not None:
            pooled = nn.Dense(self.projection_dim, use_bias=False, name="visual_projection", **kw)(pooled)
        return x, pooled
