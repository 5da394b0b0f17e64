"""Text encoders and the CLIP vision tower: shapes, masking, sizes, dtypes, errors."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from latent_diffusion.models.clip_vision import CLIPVisionTransformer, preprocess
from latent_diffusion.models.text_encoders import BERTEmbedder, CLIPTextTransformer

SMALL_BERT = dict(vocab_size=100, max_length=16, width=32, depth=2, heads=2, head_dim=8)
SMALL_CLIP = dict(vocab_size=100, max_length=16, width=32, layers=2, heads=4, mlp_dim=64, eos_token_id=99)


def _count(tree):
    return sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(tree))


def _init(model, x):
    return jax.jit(model.init)(jax.random.PRNGKey(0), x)["params"]


def _ids(batch=2, length=16, seed=0):
    return jax.random.randint(jax.random.PRNGKey(seed), (batch, length), 1, 99)


def test_bert_embedder_shapes_and_bidirectional():
    model = BERTEmbedder(**SMALL_BERT)
    ids = _ids()
    params = _init(model, ids)
    apply = jax.jit(model.apply)
    out = apply({"params": params}, ids)
    assert out.shape == (2, 16, 32) and out.dtype == jnp.float32
    # Bidirectional: changing the last token changes the first position's output.
    ids2 = ids.at[:, -1].set((ids[:, -1] + 1) % 99 + 1)
    out2 = apply({"params": params}, ids2)
    assert float(jnp.abs(out2[:, 0] - out[:, 0]).max()) > 1e-4
    # Shorter prompts work too (positions are taken from the start).
    assert apply({"params": params}, ids[:, :5]).shape == (2, 5, 32)
    # Attention is heads x head_dim wide (16 here), not the model width.
    assert params["layers_0"]["self_attn"]["q_proj"]["kernel"].shape == (32, 16)
    assert "bias" not in params["layers_0"]["self_attn"]["q_proj"]


def test_clip_text_is_causal():
    model = CLIPTextTransformer(**SMALL_CLIP)
    ids = _ids()
    params = _init(model, ids)
    apply = jax.jit(model.apply)
    hidden, pooled = apply({"params": params}, ids)
    assert hidden.shape == (2, 16, 32) and pooled.shape == (2, 32)
    ids2 = ids.at[:, -1].set((ids[:, -1] + 1) % 98 + 1)
    hidden2, _ = apply({"params": params}, ids2)
    np.testing.assert_allclose(hidden2[:, :-1], hidden[:, :-1], atol=1e-6)
    assert float(jnp.abs(hidden2[:, -1] - hidden[:, -1]).max()) > 1e-4


def test_bert_embedder_full_config_param_count():
    """The LAION LDM's text encoder (n_embed=1280, n_layer=32): counted without allocating it."""
    model = BERTEmbedder()  # defaults are the paper's full configuration
    shapes = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, 77), jnp.int32)))
    n = _count(shapes["params"])
    d, inner, v, length, depth = 1280, 8 * 64, 30522, 77, 32
    per_layer = 2 * 2 * d + 3 * d * inner + (inner * d + d) + (d * 4 * d + 4 * d) + (4 * d * d + d)
    assert n == v * d + length * d + depth * per_layer + 2 * d
    assert n == 542_895_360  # + 39.1M for x-transformers' unused to_logits head = 582.0M in the checkpoint


def test_bf16_compute_keeps_float32_params():
    model = CLIPTextTransformer(**SMALL_CLIP, dtype=jnp.bfloat16)
    ids = _ids()
    params = _init(model, ids)
    apply = jax.jit(model.apply)
    assert all(x.dtype == jnp.float32 for x in jax.tree_util.tree_leaves(params))
    hidden, _ = apply({"params": params}, ids)
    ref, _ = jax.jit(model.clone(dtype=jnp.float32).apply)({"params": params}, ids)
    assert hidden.dtype == jnp.bfloat16
    assert float(jnp.abs(hidden.astype(jnp.float32) - ref).max()) < 0.1


def test_errors_name_the_problem():
    model = CLIPTextTransformer(**SMALL_CLIP)
    with pytest.raises(ValueError, match="exceeds max_length"):
        model.init(jax.random.PRNGKey(0), _ids(length=17))
    with pytest.raises(ValueError, match="output_layer"):
        model.clone(output_layer=-4).init(jax.random.PRNGKey(0), _ids())
    with pytest.raises(ValueError, match="expected images of shape"):
        CLIPVisionTransformer(image_size=32, patch_size=8, width=32, layers=1, heads=2, mlp_dim=64).init(
            jax.random.PRNGKey(0), jnp.zeros((1, 24, 24, 3)))


def test_vision_tower_and_preprocess():
    model = CLIPVisionTransformer(image_size=32, patch_size=8, width=32, layers=1, heads=2, mlp_dim=64,
                                  projection_dim=16)
    images = jax.random.uniform(jax.random.PRNGKey(1), (2, 48, 64, 3), minval=-1, maxval=1)
    x = jax.jit(preprocess, static_argnums=1)(images, 32)
    assert x.shape == (2, 32, 32, 3)
    params = _init(model, x)
    apply = jax.jit(model.apply)
    hidden, embeds = apply({"params": params}, x)
    assert hidden.shape == (2, 1 + 16, 32) and embeds.shape == (2, 16)
    # A mid-grey image maps to CLIP's normalised 0.5.
    grey = preprocess(jnp.zeros((1, 32, 32, 3)), 32)
    np.testing.assert_allclose(grey[0, 0, 0], (0.5 - np.array([0.48145466, 0.4578275, 0.40821073]))
                               / np.array([0.26862954, 0.26130258, 0.27577711]), atol=1e-5)
