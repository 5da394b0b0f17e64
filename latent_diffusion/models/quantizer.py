"""Vector quantiser of VQGAN / LDM first stages (taming-transformers' VectorQuantizer2)."""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import flax.linen as nn

Dtype = Any


def _codebook_init(n_embed: int):
    def init(key, shape, dtype=jnp.float32):
        return jax.random.uniform(key, shape, dtype, -1.0 / n_embed, 1.0 / n_embed)
    return init


class VectorQuantizer(nn.Module):
    """Nearest-neighbour codebook lookup with a straight-through gradient.

    `legacy=True` keeps taming's original weighting, which (by a historical slip) puts `beta`
    on the codebook term instead of the commitment term:
      legacy:      mean((sg[z_q] - z)^2) + beta * mean((z_q - sg[z])^2)
      non-legacy:  beta * mean((sg[z_q] - z)^2) + mean((z_q - sg[z])^2)
    Both have the same value, (1 + beta) * mse; only the gradients differ.
    """
    n_embed: int
    embed_dim: int
    beta: float = 0.25
    legacy: bool = True
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    def setup(self):
        self.embedding = self.param("embedding", _codebook_init(self.n_embed),
                                    (self.n_embed, self.embed_dim), self.param_dtype)

    def __call__(self, z):
        """z: (..., embed_dim) -> (z_q, aux) with z_q carrying z's gradient."""
        if z.shape[-1] != self.embed_dim:
            raise ValueError(f"quantizer expects {self.embed_dim} channels last, got shape {z.shape}")
        zf = z.astype(jnp.float32)
        codebook = self.embedding.astype(jnp.float32)
        flat = zf.reshape(-1, self.embed_dim)
        # |z|^2 is the same for every code, so it does not change the argmin.
        dist = (jnp.sum(codebook ** 2, axis=-1)[None, :]
                - 2.0 * jnp.dot(flat, codebook.T, precision=jax.lax.Precision.HIGHEST))
        indices = jnp.argmin(dist, axis=-1)
        z_q = jnp.take(codebook, indices, axis=0).reshape(zf.shape)

        commit = jnp.mean((jax.lax.stop_gradient(z_q) - zf) ** 2)
        codebook_term = jnp.mean((z_q - jax.lax.stop_gradient(zf)) ** 2)
        if self.legacy:
            loss = commit + self.beta * codebook_term
        else:
            loss = self.beta * commit + codebook_term

        counts = jnp.zeros((self.n_embed,), jnp.float32).at[indices].add(1.0)
        probs = counts / flat.shape[0]
        perplexity = jnp.exp(-jnp.sum(probs * jnp.log(probs + 1e-10)))
        usage = jnp.mean((counts > 0).astype(jnp.float32))

        z_q = zf + jax.lax.stop_gradient(z_q - zf)
        aux = {"codebook_loss": loss, "perplexity": perplexity, "codebook_usage": usage,
               "indices": indices.reshape(z.shape[:-1])}
        return z_q.astype(self.dtype), aux

    def embed(self, indices):
        """Codebook vectors for integer indices of any shape: (...) -> (..., embed_dim)."""
        return jnp.take(self.embedding, indices, axis=0).astype(self.dtype)
