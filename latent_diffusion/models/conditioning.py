"""Condition encoders of the LDM (paper Sec. 3.3): what the UNet attends to or gets concatenated.

`Conditioner` owns the trainable encoders: the text encoder when trained jointly (the paper's
BERT-style transformer for LAION), the layout encoder (boxes + labels as a token sequence),
the class embedder (ImageNet: one learned vector per class as a context of length 1), and the
optional learned channel map of concatenated spatial inputs. A frozen text encoder
(CLIP) is run outside, from frozen params, and its output passed in as `context`.
"""
from __future__ import annotations

from typing import Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from latent_diffusion.models.text_encoders import BERTEmbedder

Dtype = jnp.dtype


def layout_tokens(bbox: np.ndarray, labels: np.ndarray, mask: np.ndarray, *, num_classes: int,
                  bins: int, max_objects: int) -> np.ndarray:
    """Boxes and labels -> int32 tokens (B, 1 + 5 * max_objects): [BOS, (label, x0, y0, x1, y1)...].

    Token ids: 0 = pad, 1 = BOS, 2.. = object classes, then `bins` quantised coordinates.
    bbox holds (ymin, xmin, ymax, xmax) in [0, 1] as TFDS writes it.
    """
    bbox, labels, mask = np.asarray(bbox), np.asarray(labels), np.asarray(mask, bool)
    b = bbox.shape[0]
    out = np.zeros((b, 1 + 5 * max_objects), np.int32)
    out[:, 0] = 1
    coord0 = 2 + num_classes
    q = np.clip(np.floor(bbox * bins), 0, bins - 1).astype(np.int32) + coord0
    for i in range(b):
        for j in range(min(max_objects, bbox.shape[1])):
            if not mask[i, j]:
                continue
            ymin, xmin, ymax, xmax = q[i, j]
            out[i, 1 + 5 * j: 6 + 5 * j] = (2 + labels[i, j], xmin, ymin, xmax, ymax)
    return out


def layout_vocab_size(num_classes: int, bins: int) -> int:
    return 2 + num_classes + bins


class SpatialRescaler(nn.Module):
    """Resize a spatial condition to the latent grid; optionally remap its channels with a 1x1 conv."""
    out_channels: Optional[int] = None
    method: str = "nearest"
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, c, size: tuple[int, int]):
        b, _, _, ch = c.shape
        c = jax.image.resize(c.astype(jnp.float32), (b, size[0], size[1], ch), method=self.method)
        if self.out_channels:
            c = nn.Conv(self.out_channels, (1, 1), use_bias=False, dtype=self.dtype,
                        param_dtype=self.param_dtype, name="channel_map")(c)
        return c


class ClassEmbedder(nn.Module):
    """Class label (B,) -> cross-attention context (B, 1, features), as CompVis' `ClassEmbedder`.

    The table has num_classes + 1 rows: row `num_classes` is the null class of classifier-free
    guidance (CompVis cin256-v2: n_classes 1001, labels 0..999, 1000 = unconditional).
    """
    num_classes: int
    features: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, labels):
        # N(0, 1) like torch nn.Embedding, so converted and fresh tables have the same scale.
        table = self.param("embedding", nn.initializers.normal(1.0), (self.num_classes + 1, self.features),
                           self.param_dtype)
        labels = jnp.asarray(labels, jnp.int32)
        return jnp.take(table, labels, axis=0).astype(self.dtype)[:, None, :]


class Conditioner(nn.Module):
    """The trainable condition encoders; each is built only if its config asks for it.

    text: kwargs of BERTEmbedder (the jointly trained text encoder) or None.
    layout: kwargs of BERTEmbedder for the layout token sequence, or None.
    classes: kwargs of ClassEmbedder (num_classes, features), or None.
    concat_channels: channel map size for the concatenated input (None: concatenate as is).
    """
    text: Optional[dict] = None
    layout: Optional[dict] = None
    classes: Optional[dict] = None
    concat_channels: Optional[int] = None
    concat_method: str = "nearest"
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    def setup(self):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        self.text_encoder = BERTEmbedder(**self.text, **kw) if self.text else None
        self.layout_encoder = BERTEmbedder(**self.layout, **kw) if self.layout else None
        self.class_embedder = ClassEmbedder(**self.classes, **kw) if self.classes else None
        self.rescaler = SpatialRescaler(self.concat_channels, self.concat_method, **kw)

    def encode_text(self, tokens):
        return self.text_encoder(tokens)

    def encode_layout(self, tokens):
        return self.layout_encoder(tokens)

    def encode_class(self, labels):
        return self.class_embedder(labels)

    def rescale(self, c, size):
        return self.rescaler(c, size)

    def __call__(self, tokens=None, layout=None, labels=None, spatial=None, size=None):
        """Initialise every encoder in one call (used by init)."""
        out = {}
        if self.text_encoder is not None and tokens is not None:
            out["text"] = self.encode_text(tokens)
        if self.layout_encoder is not None and layout is not None:
            out["layout"] = self.encode_layout(layout)
        if self.class_embedder is not None and labels is not None:
            out["class"] = self.encode_class(labels)
        if spatial is not None:
            out["spatial"] = self.rescale(spatial, size)
        return out
