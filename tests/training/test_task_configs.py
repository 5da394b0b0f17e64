"""Every LDM experiment config: the tiny variants train on shapes, the full ones build and fail cleanly.

CI time is spent on XLA compiles, so the training test keeps them small: a very small random first
stage, built once per kind and shared; the 32x32 'tiny' shapes split; the config's UNet cut to one
level with only the middle transformer (which still cross-attends to the context), after checking
the config's own UNet at its own latent size with eval_shape; only init + train_step compiled, with
XLA's cheapest CPU code generation; and a compiled step reused by configs that are identical.
"""
import importlib
import math
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from latent_diffusion.data import loader
from latent_diffusion.models import build
from latent_diffusion.models.text_encoders import BERTEmbedder
from latent_diffusion.training import first_stage as first_stage_lib
from latent_diffusion.training import partitioning
from latent_diffusion.training.ldm_task import LDMTask
from latent_diffusion.training.loop import train_and_evaluate

TINY = ["ldm_f8_laion", "ldm_celebahq", "ldm_lsun_churches", "ldm_lsun_bedrooms", "ldm_cin", "ldm_sr",
        "ldm_inpainting", "ldm_layout", "ldm_semantic"]
FULL = TINY + ["ldm_celebahq:ffhq", "ldm_layout:coco", "sd_v1", "sd_v2"]
FAST_COMPILE = dict(xla_backend_optimization_level=0, xla_llvm_disable_expensive_passes=True,
                    xla_cpu_use_fusion_emitters=False)
_FIRST_STAGES, _COMPILED = {}, {}


def _config(spec):
    name, _, arg = spec.partition(":")
    return importlib.import_module(f"configs.{name}").get_config(arg or None)


def _count(tree):
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))


@pytest.fixture
def shared_first_stage(monkeypatch):
    """first_stage.load, memoised on the model config: the tiny configs share two first stages."""
    real = first_stage_lib.load

    def load(cfg, mesh, **kwargs):
        if kwargs.get("abstract"):
            return real(cfg, mesh, **kwargs)
        key = (cfg.model.to_json(), tuple(mesh.devices.flat))
        if key not in _FIRST_STAGES:
            _FIRST_STAGES[key] = real(cfg, mesh, **kwargs)
        return _FIRST_STAGES[key]

    monkeypatch.setattr(first_stage_lib, "load", load)


def _unet_params(unet_cfg, latent, context_len=4):
    """Parameter count of the UNet, traced (not run) on a latent of side `latent`."""
    unet = build.unet(unet_cfg)
    ctx = None if unet_cfg.context_dim is None else jnp.zeros((1, context_len, unet_cfg.context_dim))
    y = None if unet_cfg.num_classes is None else jnp.zeros((1,), jnp.int32)
    x = jnp.zeros((1, latent, latent, unet_cfg.in_channels))
    return _count(jax.eval_shape(lambda: unet.init(jax.random.key(0), x, jnp.zeros((1,), jnp.int32),
                                                   context=ctx, y=y)))


def _tiny_for_test(name, data_dir):
    c = _config(f"{name}:tiny")
    fs = c.first_stage
    levels = len(fs.model.ch_mult) - 1          # keep the config's downsampling factor f = 2**levels
    # The config's own UNet must take its own latents (before the test shrinks it).
    _unet_params(c.unet, c.data.resolution // 2 ** levels)
    fs.workdir, fs.random_init = "", True
    fs.model.update(ch=16, ch_mult=(1,) + (2,) * levels, num_groups=4, num_res_blocks=1, resolution=32)
    if fs.model.kind == "vq":
        fs.model.n_embed = 32
    c.data.update(name="shapes", data_dir=data_dir, config="tiny", resolution=32, num_threads=1,
                  prefetch_buffer_size=8)
    c.batch_size = 8
    c.unet.update(channel_mult=(1,), attention_resolutions=())
    # Constant lr and no weight decay: a parameter changes only if a gradient reached it.
    c.optim.update(warmup_steps=0, weight_decay=0.0)
    return c


def _changed(a, b):
    return any(not np.array_equal(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


@pytest.mark.parametrize("name", TINY)
def test_tiny_variant_trains(name, shapes_data_dir, tmp_path, shared_first_stage):
    cfg = _tiny_for_test(name, shapes_data_dir)
    mesh = partitioning.make_mesh()
    key = cfg.to_json()
    task = _COMPILED[key][0] if key in _COMPILED else LDMTask(cfg, mesh, str(tmp_path))
    it = loader.make_dataset(cfg.data, cfg.data.train_split, global_batch_size=cfg.batch_size, seed=0,
                             shuffle=True, num_epochs=None, extra_transforms=task.host_transforms())
    frozen = task.frozen()
    batch = partitioning.global_batch(next(it), mesh)
    rng = jax.random.key(0)
    if key not in _COMPILED:
        init = jax.jit(task.init).lower(rng, batch, frozen).compile(FAST_COMPILE)
        step = jax.jit(task.train_step).lower(init(rng, batch, frozen), batch, rng, frozen).compile(FAST_COMPILE)
        _COMPILED[key] = (task, init, step)
    _, init, step = _COMPILED[key]
    state0 = init(rng, batch, frozen)
    # The UNet's output conv and the transformers' output projections start at zero, so a gradient
    # reaches the label embedding and the condition encoders only in the third step.
    state, losses = state0, []
    for i in range(3):
        state, metrics = step(state, batch if i == 0 else partitioning.global_batch(next(it), mesh),
                              jax.random.key(i + 1), frozen)
        losses.append(float(metrics["loss"]))
    assert all(np.isfinite(losses)), losses
    assert int(state.step) == 3
    before, after = jax.device_get(state0.params["model"]), jax.device_get(state.params["model"])
    assert _changed(before["unet"], after["unet"]), "no UNet parameter changed"
    c, z = cfg.conditioning, task.first_stage.latent_channels
    if c.crossattn != "none":
        assert _changed(before["cond"], after["cond"]), f"the {c.crossattn} encoder got no gradient"
    if c.class_label:
        assert _changed(before["unet"]["label_emb"], after["unet"]["label_emb"]), "label_emb got no gradient"
    if c.concat != "none":
        k0, k1 = before["unet"]["conv_in"]["kernel"], after["unet"]["conv_in"]["kernel"]
        assert k0.shape[2] == z + task.concat_channels()
        assert _changed(k0[:, :, z:], k1[:, :, z:]), f"the {c.concat} input got no gradient"
    if c.concat_channels:
        assert _changed(before["cond"], after["cond"]), "the concat channel map got no gradient"
    print(f"{name}: {_count(before):,} params in the test model, losses {losses}")


@pytest.mark.parametrize("spec", FULL)
def test_full_config_needs_a_dataset(spec, tmp_path):
    cfg = _config(spec)
    assert cfg.data.name == "" and cfg.dataset_hint
    with pytest.raises(ValueError, match="needs a dataset") as err:
        train_and_evaluate(cfg, str(tmp_path))
    assert cfg.dataset_hint in str(err.value)
    # The UNet fits its first stage and conditions (LDMTask's own check, without loading weights).
    fake = types.SimpleNamespace(config=cfg, first_stage=types.SimpleNamespace(
        latent_channels=cfg.first_stage.model.embed_dim))
    fake.concat_channels = lambda: LDMTask.concat_channels(fake)
    LDMTask._check_channels(fake)


def _clip_params(cfg, tmp_path):
    """The frozen CLIP's parameter count, from LDMTask's shapes-only build of the whole model."""
    task = LDMTask(cfg, partitioning.make_mesh(), str(tmp_path), abstract=True)
    return _count(task._clip_params)


def test_sd_v1_builds_with_reference_param_counts(tmp_path):
    cfg = _config("sd_v1")
    unet, text = _unet_params(cfg.unet, 8), _clip_params(cfg, tmp_path)
    print(f"SD v1: UNet {unet:,}, CLIP ViT-L/14 text encoder {text:,}")
    assert unet == 859_520_964          # diffusers UNet2DConditionModel of SD v1
    assert text == 123_060_480          # transformers CLIPTextModel of openai/clip-vit-large-patch14


def test_sd_v2_builds_with_reference_param_counts(tmp_path):
    cfg = _config("sd_v2")
    assert cfg.diffusion.prediction_type == "v"
    unet, text = _unet_params(cfg.unet, 8), _clip_params(cfg, tmp_path)
    print(f"SD v2: UNet {unet:,}, OpenCLIP ViT-H/14 text encoder (23 layers) {text:,}")
    assert unet == 865_910_724          # diffusers UNet2DConditionModel of SD 2.x
    # 23 blocks of width d: 12 d^2 + 13 d weights each, plus the embeddings and the final norm.
    d = 1024
    assert text == 23 * (12 * d * d + 13 * d) + 49408 * d + 77 * d + 2 * d


def test_laion_model_is_the_papers_1p45b():
    cfg = _config("ldm_f8_laion")
    unet = _unet_params(cfg.unet, 8)
    bert = BERTEmbedder(vocab_size=30522, max_length=int(cfg.conditioning.text.max_length),
                        **cfg.conditioning.text.model.to_dict())   # bert-base-uncased's vocabulary
    ids = jnp.zeros((1, cfg.conditioning.text.max_length), jnp.int32)
    text = _count(jax.eval_shape(lambda: bert.init(jax.random.key(0), ids)))
    total = unet + text
    print(f"LDM-KL-8 LAION: UNet {unet:,} + BERT text encoder {text:,} = {total:,}")
    assert math.isclose(total, 1.45e9, rel_tol=0.03), total
