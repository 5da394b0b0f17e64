"""Fine-tuning starts (config.init): another of our runs, a diffusers UNet, shape checks, new input channels,
and a resumed run that ignores init. Runs go through the real training loop on 8 fake devices."""
import re

import jax
import ml_collections
import numpy as np
import pytest

from latent_diffusion import config_fields
from latent_diffusion.training import init_from, partitioning
from latent_diffusion.training.loop import train_and_evaluate
from tests.tiny_ldm import text_ldm_config

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")


def tiny_config(data_dir, steps=2, **init):
    c = text_ldm_config(data_dir)
    c.data.num_threads, c.data.prefetch_buffer_size = 1, 8
    c.num_train_steps, c.log_every, c.eval_every, c.checkpoint.every = steps, 1, 1000, 1
    c.optim.warmup_steps = 0
    if init:
        c.init = ml_collections.ConfigDict(dict(config_fields.INIT, **init))
    return c


def host(tree):
    return jax.tree.map(np.asarray, jax.device_get(tree))


def assert_equal_trees(a, b):
    fa, fb = init_from._flat(host(a)), init_from._flat(host(b))
    assert sorted(fa) == sorted(fb)
    for k in fa:
        np.testing.assert_array_equal(fa[k], fb[k], err_msg=k)


def differs(a, b):
    return any(not np.array_equal(x, y) for x, y in zip(jax.tree.leaves(host(a)), jax.tree.leaves(host(b))))


@pytest.fixture(scope="module")
def run_a(shapes_data_dir, tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("run_a"))
    return workdir, train_and_evaluate(tiny_config(shapes_data_dir, steps=2), workdir)


def test_from_our_workdir_uses_ema_and_resume_ignores_init(run_a, shapes_data_dir, tmp_path, monkeypatch):
    a_dir, a = run_a
    a_ema, a_params = host(a.state.ema_params), host(a.state.params["model"])
    assert differs(a_ema, a_params)  # so loading the EMA is distinguishable from loading the params
    seen = []
    real = init_from.apply

    def spy(config, task, state):
        out = real(config, task, state)
        seen.append(host(out))  # before the first step donates it
        return out

    monkeypatch.setattr(init_from, "apply", spy)
    b_dir = str(tmp_path / "b")
    b1 = train_and_evaluate(tiny_config(shapes_data_dir, steps=1, workdir=a_dir), b_dir)
    assert len(seen) == 1 and b1.resumed_from is None
    start = seen[0]
    assert int(start.step) == 0
    assert_equal_trees(start.params["model"], a_ema)
    assert_equal_trees(start.ema_params, a_ema)
    assert all(not np.any(x) for x in jax.tree.leaves(start.opt_state))  # fresh Adam moments and counts
    b1_params = host(b1.state.params["model"])
    assert differs(b1_params, a_ema)  # B trained a step

    # Killed and restarted with another init: its own step-1 checkpoint wins, init is not re-applied.
    b2 = train_and_evaluate(tiny_config(shapes_data_dir, steps=1, workdir=a_dir, use_ema=False), b_dir)
    assert b2.resumed_from == 1 and len(seen) == 1
    assert_equal_trees(b2.state.params["model"], b1_params)


def diffusers_unet(folder, z, cross_attention_dim=32, seed=0):
    """A random diffusers UNet2DConditionModel with the tiny config's architecture, saved to `folder`."""
    torch.manual_seed(seed)
    model = diffusers.UNet2DConditionModel(
        sample_size=16, in_channels=z, out_channels=z, layers_per_block=1, block_out_channels=(32, 64),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=cross_attention_dim, attention_head_dim=4, norm_num_groups=32)
    with torch.no_grad():  # nothing zero-initialised: every leaf must visibly come from here
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    model.save_pretrained(str(folder))
    from latent_diffusion import convert
    return convert.from_diffusers({**dict(model.config), "_class_name": "UNet2DConditionModel"},
                                  model.state_dict())[1]


def latent_channels(cfg):
    return cfg.first_stage.model.embed_dim


def test_from_diffusers_unet_sharded(shapes_data_dir, tmp_path):
    cfg = tiny_config(shapes_data_dir, steps=0, diffusers_unet=str(tmp_path / "unet"))
    expected = diffusers_unet(tmp_path / "unet", latent_channels(cfg))
    cfg.mesh.update(data=4, fsdp=2)
    cfg.partitioning.min_shard_size = 256
    out = train_and_evaluate(cfg, str(tmp_path / "run"))
    model = out.state.params["model"]
    assert_equal_trees(model["unet"], expected)
    assert_equal_trees(out.state.ema_params, model)
    mesh = partitioning.make_mesh(4, 2)
    want = partitioning.tree_shardings(model, mesh, (), 256)
    got = jax.tree.map(lambda x: x.sharding, model)
    assert all(g.is_equivalent_to(w, x.ndim) for g, w, x in
               zip(jax.tree.leaves(got), jax.tree.leaves(want), jax.tree.leaves(model)))
    assert any("fsdp" in str(x.sharding.spec) for x in jax.tree.leaves(model["unet"]))


def test_shape_mismatch_names_the_path(shapes_data_dir, tmp_path):
    cfg = tiny_config(shapes_data_dir, steps=0, diffusers_unet=str(tmp_path / "unet"))
    diffusers_unet(tmp_path / "unet", latent_channels(cfg), cross_attention_dim=24)
    with pytest.raises(ValueError) as err:
        train_and_evaluate(cfg, str(tmp_path / "run"))
    msg = str(err.value)
    assert re.search(r"unet/\S+: source \(24, \d+\), model \(32, \d+\)", msg), msg
    assert "architecture" in msg


def test_new_input_channels_zero_padded(shapes_data_dir, tmp_path):
    cfg = tiny_config(shapes_data_dir, steps=0, diffusers_unet=str(tmp_path / "unet"))
    z = latent_channels(cfg)
    expected = diffusers_unet(tmp_path / "unet", z)
    cfg.conditioning.concat = "inpaint"
    cfg.unet.in_channels = 2 * z + 1  # latents + masked-image latents + mask
    with pytest.raises(ValueError, match="allow_new_input_channels"):
        train_and_evaluate(cfg, str(tmp_path / "refused"))
    cfg.init.allow_new_input_channels = True
    unet = host(train_and_evaluate(cfg, str(tmp_path / "run")).state.params["model"]["unet"])
    k, src = unet["conv_in"]["kernel"], np.asarray(expected["conv_in"]["kernel"])
    assert k.shape == src.shape[:2] + (2 * z + 1,) + src.shape[3:]
    np.testing.assert_array_equal(k[:, :, :z], src)
    assert not np.any(k[:, :, z:])
    rest = {p: v for p, v in init_from._flat(unet).items() if p != "conv_in/kernel"}
    for p, v in rest.items():
        np.testing.assert_array_equal(v, init_from._flat(host(expected))[p], err_msg=p)


def test_config_errors_and_no_init():
    state = object()
    assert init_from.apply(ml_collections.ConfigDict(dict(task="ldm")), None, state) is state
    two = ml_collections.ConfigDict(dict(task="ldm", init=dict(config_fields.INIT, workdir="a", checkpoint="b")))
    with pytest.raises(ValueError, match="exactly one init source"):
        init_from.apply(two, None, state)
    typo = ml_collections.ConfigDict(dict(task="ldm", init=dict(workdri="a")))
    with pytest.raises(ValueError, match="init.workdri"):
        init_from.apply(typo, None, state)
    ae = ml_collections.ConfigDict(dict(task="autoencoder", init=dict(workdir="a")))
    with pytest.raises(NotImplementedError, match="LDM runs"):
        init_from.apply(ae, None, state)


def test_from_compvis_checkpoint_prefers_its_ema(shapes_data_dir, tmp_path):
    import yaml
    from safetensors.numpy import save_file

    from latent_diffusion import convert
    from tests.convert.test_unet_parity import to_compvis
    cfg = tiny_config(shapes_data_dir, steps=0, checkpoint=str(tmp_path / "ldm.safetensors"),
                      compvis_config=str(tmp_path / "ldm.yaml"))
    z = latent_channels(cfg)
    diffusers_unet(tmp_path / "unet", z)
    model = diffusers.UNet2DConditionModel.from_pretrained(str(tmp_path / "unet"))
    plain = {k: v.numpy() for k, v in model.state_dict().items()}
    ema = {k: v + 1.0 for k, v in plain.items()}
    arch = {k: model.config[k] for k in ("block_out_channels", "layers_per_block", "up_block_types")}
    sd = to_compvis(plain, arch)
    # CompVis LitEma keeps its copy as buffers named after the parameter with the dots removed.
    sd.update({"model_ema." + k[len("model."):].replace(".", ""): v for k, v in to_compvis(ema, arch).items()})
    sd["model_ema.num_updates"] = np.array(7, np.int32)
    save_file(sd, str(tmp_path / "ldm.safetensors"))
    unet_yaml = dict(image_size=16, in_channels=z, out_channels=z, model_channels=32, attention_resolutions=[2],
                     num_res_blocks=1, channel_mult=[1, 2], num_heads=4, use_spatial_transformer=True,
                     transformer_depth=1, context_dim=32)
    with open(tmp_path / "ldm.yaml", "w") as f:
        yaml.safe_dump({"model": {"params": {"unet_config": {"params": unet_yaml}}}}, f)
    expected = convert.from_diffusers({**dict(model.config), "_class_name": "UNet2DConditionModel"}, ema)[1]
    out = train_and_evaluate(cfg, str(tmp_path / "run"))
    assert_equal_trees(out.state.params["model"]["unet"], expected)


def test_place_checks_a_whole_model_source():
    import jax.numpy as jnp
    target = {"unet": {"conv_in": {"kernel": jnp.zeros((3, 3, 4, 8))}}, "cond": {"text": {"w": jnp.zeros((2,))}}}
    loaded = {"unet": {"conv_in": {"kernel": np.ones((3, 3, 4, 8), np.float16)}}}
    out = init_from.place(loaded, target)  # a converted UNet: cond keeps its fresh values
    kernel = out["unet"]["conv_in"]["kernel"]
    assert kernel.dtype == jnp.float32 and kernel.sharding == target["unet"]["conv_in"]["kernel"].sharding
    np.testing.assert_array_equal(kernel, 1.0)
    assert out["cond"]["text"]["w"] is target["cond"]["text"]["w"]
    with pytest.raises(ValueError, match=r"cond/text/w: missing from the source \(model needs \(2,\)\)"):
        init_from.place(loaded, target, complete=True)  # another of our runs must cover the whole model
    with pytest.raises(ValueError, match=r"unet/conv_in/kernel: source \(3, 3, 5, 8\), model \(3, 3, 4, 8\)"):
        init_from.place({"unet": {"conv_in": {"kernel": np.ones((3, 3, 5, 8))}}}, target)
