"""Class conditioning of LDMTask: the paper's cross-attention mode (crossattn 'class', configs/ldm_cin.py)
and the time-embedding mode (class_label): contexts, label dropout to the null class, config checks."""
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import ldm_cin
from latent_diffusion.training import partitioning
from latent_diffusion.training.ldm_task import LDMTask

SIZE, NUM_CLASSES = 32, 30


def tiny_cin_config():
    """configs/ldm_cin.py:tiny with a small random VQ first stage and a one-level UNet."""
    c = ldm_cin.get_config("tiny")
    fs = c.first_stage
    fs.workdir, fs.random_init = "", True
    fs.model.update(ch=8, ch_mult=(1, 2), num_groups=4, num_res_blocks=1, resolution=SIZE, n_embed=32)
    c.unet.update(channel_mult=(1,), attention_resolutions=(), num_res_blocks=1)
    c.data.resolution = SIZE
    return c


def _batch(labels):
    labels = np.asarray(labels, np.int32)
    return {"image": np.zeros((len(labels), SIZE, SIZE, 3), np.float32), "label": labels}


@pytest.fixture(scope="module")
def cin(tmp_path_factory):
    cfg = tiny_cin_config()
    task = LDMTask(cfg, partitioning.make_mesh(), str(tmp_path_factory.mktemp("cin")))
    frozen = task.frozen()
    state = jax.jit(task.init)(jax.random.key(0), _batch([3]), frozen)
    return task, frozen, state


def test_class_embedding_is_a_trained_and_ema_param(cin):
    task, _, state = cin
    dim = task.config.conditioning.class_embed_dim
    assert dim == task.config.unet.context_dim == 64
    table = state.params["model"]["cond"]["class_embedder"]["embedding"]
    assert table.shape == (NUM_CLASSES + 1, dim)
    np.testing.assert_array_equal(state.ema_params["cond"]["class_embedder"]["embedding"], table)
    assert "label_emb" not in state.params["model"]["unet"]   # not added to the time embedding
    assert task.num_classes == NUM_CLASSES


def test_context_is_one_embedding_row_and_dropped_labels_are_the_null_class(cin):
    task, frozen, state = cin
    cond = state.params["model"]["cond"]
    table = np.asarray(cond["class_embedder"]["embedding"])
    labels = np.arange(64) % NUM_CLASSES
    batch = _batch(labels)

    def context(drop, p, seed=0):
        task.config.conditioning.dropout.class_label = p
        raw = task.raw_conditions(batch, frozen, jax.random.key(seed), drop=drop)
        assert set(raw) == {"class"}
        inputs = task.unet_inputs(cond, frozen, raw, (SIZE // 2, SIZE // 2))
        assert set(inputs) == {"context"}
        return np.asarray(raw["class"]), np.asarray(inputs["context"])

    try:
        y, ctx = context(drop=False, p=0.5)
        assert ctx.shape == (64, 1, 64)
        np.testing.assert_array_equal(y, labels)
        np.testing.assert_array_equal(ctx[:, 0], table[labels])
        y, ctx = context(drop=True, p=1.0)
        np.testing.assert_array_equal(y, NUM_CLASSES)
        np.testing.assert_array_equal(ctx[:, 0], np.broadcast_to(table[NUM_CLASSES], (64, 64)))
        y, ctx = context(drop=True, p=0.5, seed=3)
        gone = y == NUM_CLASSES
        assert 10 < gone.sum() < 54, gone.sum()
        np.testing.assert_array_equal(y[~gone], labels[~gone])
        np.testing.assert_array_equal(ctx[gone, 0], np.broadcast_to(table[NUM_CLASSES], (gone.sum(), 64)))
        np.testing.assert_array_equal(ctx[~gone, 0], table[labels[~gone]])
        assert not np.array_equal(context(drop=True, p=0.5, seed=4)[0], y)   # per-step randomness
    finally:
        task.config.conditioning.dropout.class_label = 0.1
    null = task.null_conditions({"class": jnp.asarray(labels)})
    np.testing.assert_array_equal(null["class"], NUM_CLASSES)


def test_time_embedding_mode_still_works(tmp_path):
    cfg = tiny_cin_config()
    cfg.conditioning.update(crossattn="none", class_label=True)
    cfg.unet.update(context_dim=None, num_classes=NUM_CLASSES)
    task = LDMTask(cfg, partitioning.make_mesh(), str(tmp_path))
    frozen = task.frozen()
    state = jax.jit(task.init)(jax.random.key(0), _batch([3]), frozen)
    assert state.params["model"]["unet"]["label_emb"]["embedding"].shape[0] == NUM_CLASSES + 1
    assert "class_embedder" not in state.params["model"]["cond"]
    cfg.conditioning.dropout.class_label = 1.0
    raw = task.raw_conditions(_batch([1, 2]), frozen, jax.random.key(0), drop=True)
    np.testing.assert_array_equal(raw["y"], NUM_CLASSES)
    inputs = task.unet_inputs(state.params["model"]["cond"], frozen, raw, (SIZE // 2, SIZE // 2))
    assert set(inputs) == {"y"}
    np.testing.assert_array_equal(task.null_conditions({"y": jnp.array([1, 2])})["y"], NUM_CLASSES)


def _check(cfg):
    fake = types.SimpleNamespace(config=cfg, first_stage=types.SimpleNamespace(
        latent_channels=cfg.first_stage.model.embed_dim), concat_channels=lambda: 0)
    LDMTask._check_channels(fake)


def test_class_config_errors_name_the_keys():
    _check(tiny_cin_config())
    cfg = tiny_cin_config()
    cfg.conditioning.class_embed_dim = 32     # one reference: the UNet's context_dim follows
    assert cfg.unet.context_dim == 32
    _check(cfg)
    cfg = ldm_cin.get_config()
    cfg.unet = cfg.unet.copy_and_resolve_references()
    cfg.unet.context_dim = 256
    with pytest.raises(ValueError, match="unet.context_dim is 256 .*class_embed_dim=512"):
        _check(cfg)
    cfg = tiny_cin_config()
    cfg.conditioning.class_label = True
    cfg.unet.num_classes = NUM_CLASSES
    with pytest.raises(ValueError, match="set one"):
        _check(cfg)
    cfg = tiny_cin_config()
    cfg.conditioning.num_classes = 0
    with pytest.raises(ValueError, match="conditioning.num_classes"):
        _check(cfg)
