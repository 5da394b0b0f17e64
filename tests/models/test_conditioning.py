"""The class embedder of class-conditional LDMs: a (B, 1, D) context, one table row per label."""
import jax
import jax.numpy as jnp
import numpy as np

from latent_diffusion.models.conditioning import ClassEmbedder, Conditioner


def test_class_embedder_is_a_length_one_context_of_table_rows():
    module = ClassEmbedder(num_classes=5, features=8)
    labels = jnp.array([0, 4, 5, 2], jnp.int32)   # 5 = the null class
    params = module.init(jax.random.key(0), labels)["params"]
    table = np.asarray(params["embedding"])
    assert table.shape == (6, 8)                  # num_classes + 1 rows, as CompVis' n_classes=1001
    # N(0, 1) like torch nn.Embedding (a fresh table and a converted one have the same scale).
    assert 0.5 < table.std() < 1.5
    out = module.apply({"params": params}, labels)
    assert out.shape == (4, 1, 8) and out.dtype == jnp.float32
    np.testing.assert_array_equal(np.asarray(out)[:, 0], table[[0, 4, 5, 2]])
    half = ClassEmbedder(num_classes=5, features=8, dtype=jnp.bfloat16).apply({"params": params}, labels)
    assert half.dtype == jnp.bfloat16


def test_conditioner_holds_the_class_embedder_beside_the_other_encoders():
    cond = Conditioner(classes=dict(num_classes=3, features=4), concat_channels=2)
    labels = jnp.array([1, 3], jnp.int32)
    variables = cond.init(jax.random.key(1), labels=labels, spatial=jnp.ones((2, 8, 8, 1)), size=(4, 4))
    params = variables["params"]
    # The path that converted CompVis weights (cond_stage_model.embedding.weight) are written to.
    assert params["class_embedder"]["embedding"].shape == (4, 4)
    assert set(params) == {"class_embedder", "rescaler"}
    ctx = cond.apply(variables, labels, method="encode_class")
    np.testing.assert_array_equal(ctx[:, 0], params["class_embedder"]["embedding"][np.array([1, 3])])
    assert "class_embedder" not in Conditioner().init(jax.random.key(0)).get("params", {})
