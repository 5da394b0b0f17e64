"""Our UNet with CompVis AttentionBlocks and ResBlock resampling vs diffusers UNet2DModel (random weights).

diffusers' UNet2DModel is the class its CompVis unconditional LDM conversions use. Its time
embedding is configured as the CompVis one (flip_sin_to_cos=True, freq_shift=0: [cos, sin]).
CompVis-format keys are written from the diffusers state dict here; the fused `qkv` layout is
checked against a PyTorch transcription of the reference's AttentionBlock before we load it.
"""
import math

import jax
import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

import jax.numpy as jnp  # noqa: E402

from latent_diffusion.convert import from_compvis  # noqa: E402
from latent_diffusion.convert.unet import abstract_params, from_diffusers, unet_config_from_diffusers  # noqa: E402
from latent_diffusion.models.unet import UNet  # noqa: E402
from tests.convert.test_unet_parity import randomize  # noqa: E402

COMPVIS_TIME = dict(flip_sin_to_cos=True, freq_shift=0)
# Conv resampling, attention at the second level, 4 heads of 16 channels there and in the middle.
CONV = dict(sample_size=16, in_channels=3, out_channels=3, layers_per_block=1, block_out_channels=(32, 64),
            down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D"),
            attention_head_dim=16, **COMPVIS_TIME)
# ResBlock resampling (resblock_updown), scale-shift norm, attention at factors 1 and 4, labels.
RESNET = dict(sample_size=16, in_channels=7, out_channels=3, layers_per_block=2, block_out_channels=(32, 32, 64),
              down_block_types=("AttnDownBlock2D", "ResnetDownsampleBlock2D", "AttnDownBlock2D"),
              up_block_types=("AttnUpBlock2D", "ResnetUpsampleBlock2D", "AttnUpBlock2D"),
              downsample_type="resnet", upsample_type="resnet", resnet_time_scale_shift="scale_shift",
              attn_norm_num_groups=32, attention_head_dim=8, num_class_embeds=5, **COMPVIS_TIME)


def reference(cfg, seed=0):
    torch.manual_seed(seed)
    return randomize(diffusers.UNet2DModel(**cfg).eval())


def diffusers_config(model):
    return {**dict(model.config), "_class_name": "UNet2DModel"}


def inputs(cfg, seed=1):
    g = torch.Generator().manual_seed(seed)
    s = cfg["sample_size"]
    x = torch.randn(2, cfg["in_channels"], s, s, generator=g)
    y = torch.tensor([1, cfg["num_class_embeds"] - 1]) if cfg.get("num_class_embeds") else None
    return x, torch.tensor([3.0, 701.0]), y


def check_parity(cfg, module, params, model):
    x, t, y = inputs(cfg)
    with torch.no_grad():
        ref = model(x, t, class_labels=y).sample.numpy()
    out = module.apply({"params": params}, jnp.asarray(x.numpy().transpose(0, 2, 3, 1)), jnp.asarray(t.numpy()),
                       y=None if y is None else jnp.asarray(y.numpy()))
    out = np.asarray(out).transpose(0, 3, 1, 2)
    assert out.shape == ref.shape
    scale = max(1.0, float(np.abs(ref).max()))
    err = float(np.abs(out - ref).max())
    assert err <= 1e-4 * scale, (err, scale)
    return err / scale


@pytest.mark.parametrize("cfg, expect", [
    (CONV, dict(attention_resolutions=(2,), num_heads=-1, num_head_channels=16, resblock_updown=False,
                use_scale_shift_norm=False)),
    (RESNET, dict(attention_resolutions=(1, 4), num_head_channels=8, resblock_updown=True,
                  use_scale_shift_norm=True, num_classes=4, num_res_blocks=2)),
], ids=["conv_default", "resnet_scale_shift"])
def test_from_diffusers_parity(cfg, expect):
    import latent_diffusion.convert as convert
    model = reference(cfg)
    # Through the public entry point, which dispatches on _class_name.
    module, params = convert.from_diffusers(diffusers_config(model), model.state_dict())
    assert module.use_spatial_transformer is False and module.context_dim is None
    for field, value in expect.items():
        assert getattr(module, field) == value, field
    assert set(params["mid_attn"]) == {"norm", "to_q", "to_k", "to_v", "to_out"}
    if module.resblock_updown:
        assert "in_conv" in params["down_0_downsample"] and "in_conv" in params["up_1_upsample"]
    check_parity(cfg, module, params, model)


def test_pre_0_14_attention_names_load():
    """Old diffusers checkpoints name the attention query/key/value/proj_attn."""
    model = reference(CONV, seed=2)
    sd = {}
    for k, v in model.state_dict().items():
        for new, old in (("to_q", "query"), ("to_k", "key"), ("to_v", "value"), ("to_out.0", "proj_attn")):
            k = k.replace(f".attentions.0.{new}.", f".attentions.0.{old}.")
        sd[k] = v
    assert any(".query." in k for k in sd)
    module, params = from_diffusers(diffusers_config(model), sd)
    check_parity(CONV, module, params, model)


# ---- CompVis keys --------------------------------------------------------------------------------

_RES = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1",
        "norm2": "out_layers.0", "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}


def fuse_qkv(q, k, v, heads, new_order):
    """The reference's fused qkv rows: (q/k/v, head, width) with the new order, else (head, q/k/v, width)."""
    parts = [m.reshape(heads, -1, *m.shape[1:]) for m in (q, k, v)]
    stacked = torch.stack(parts, 0 if new_order else 1)
    return stacked.reshape(-1, *q.shape[1:])


def compvis_attention(x, p, heads, new_order):
    """A transcription of the reference's AttentionBlock (QKVAttentionLegacy / QKVAttention), NCHW."""
    b, c, hgt, wid = x.shape
    flat = x.reshape(b, c, -1)
    h = torch.nn.functional.group_norm(flat, 32, p["norm.weight"], p["norm.bias"], 1e-5)
    qkv = torch.nn.functional.conv1d(h, p["qkv.weight"], p["qkv.bias"])
    ch = c // heads
    if new_order:
        q, k, v = (a.reshape(b * heads, ch, -1) for a in qkv.chunk(3, dim=1))
    else:
        q, k, v = qkv.reshape(b * heads, 3 * ch, -1).split(ch, dim=1)
    scale = 1 / math.sqrt(math.sqrt(ch))
    w = torch.softmax(torch.einsum("bct,bcs->bts", q * scale, k * scale), dim=-1)
    a = torch.einsum("bts,bcs->bct", w, v).reshape(b, c, -1)
    return (flat + torch.nn.functional.conv1d(a, p["proj_out.weight"], p["proj_out.bias"])).reshape(x.shape)


def to_compvis(model, cfg, new_order=False):
    """CompVis `model.diffusion_model.*` keys for a diffusers UNet2DModel (written for this test)."""
    n, nrb = len(cfg["block_out_channels"]), cfg["layers_per_block"]
    names = {"time_embedding.linear_1": "time_embed.0", "time_embedding.linear_2": "time_embed.2",
             "class_embedding": "label_emb", "conv_in": "input_blocks.0.0", "conv_norm_out": "out.0",
             "conv_out": "out.2", "mid_block.resnets.0": "middle_block.0", "mid_block.attentions.0": "middle_block.1",
             "mid_block.resnets.1": "middle_block.2"}
    idx = 1
    for level in range(n):
        for i in range(nrb):
            names[f"down_blocks.{level}.resnets.{i}"] = f"input_blocks.{idx}.0"
            names[f"down_blocks.{level}.attentions.{i}"] = f"input_blocks.{idx}.1"
            idx += 1
        names[f"down_blocks.{level}.downsamplers.0.conv"] = f"input_blocks.{idx}.0.op"
        names[f"down_blocks.{level}.downsamplers.0"] = f"input_blocks.{idx}.0"  # a ResBlock(down=True)
        idx += 1
    for j in range(n):
        sub = 2 if cfg["up_block_types"][j].startswith("Attn") else 1
        for i in range(nrb + 1):
            k = j * (nrb + 1) + i
            names[f"up_blocks.{j}.resnets.{i}"] = f"output_blocks.{k}.0"
            names[f"up_blocks.{j}.attentions.{i}"] = f"output_blocks.{k}.1"
        names[f"up_blocks.{j}.upsamplers.0.conv"] = f"output_blocks.{k}.{sub}.conv"
        names[f"up_blocks.{j}.upsamplers.0"] = f"output_blocks.{k}.{sub}"  # a ResBlock(up=True)
    out, attn = {}, {}
    for key, value in model.state_dict().items():
        mod = max((m for m in names if key.startswith(m + ".")), key=len)
        rest = key[len(mod) + 1:]
        if ".attentions." in mod:
            attn.setdefault(mod, {})[rest] = value
            continue
        if ".resnets." in mod or mod.endswith("samplers.0"):
            head, _, tail = rest.partition(".")
            rest = _RES[head] + "." + tail
        out[f"model.diffusion_model.{names[mod]}.{rest}"] = value
    blocks = {}
    for mod, a in attn.items():
        heads = model.get_submodule(mod).heads
        qkv = {kind: fuse_qkv(a[f"to_q.{kind}"], a[f"to_k.{kind}"], a[f"to_v.{kind}"], heads, new_order)
               for kind in ("weight", "bias")}
        p = {"norm.weight": a["group_norm.weight"], "norm.bias": a["group_norm.bias"],
             "qkv.weight": qkv["weight"][..., None], "qkv.bias": qkv["bias"],
             "proj_out.weight": a["to_out.0.weight"][..., None], "proj_out.bias": a["to_out.0.bias"]}
        blocks[mod] = (heads, p)
        out.update({f"model.diffusion_model.{names[mod]}.{k}": v for k, v in p.items()})
    return out, blocks


def compvis_yaml(cfg, **extra):
    chans = cfg["block_out_channels"]
    unet = dict(image_size=cfg["sample_size"], in_channels=cfg["in_channels"], out_channels=cfg["out_channels"],
                model_channels=chans[0], num_res_blocks=cfg["layers_per_block"],
                channel_mult=[c // chans[0] for c in chans],
                attention_resolutions=[2 ** i for i, t in enumerate(cfg["down_block_types"]) if t.startswith("Attn")],
                num_head_channels=cfg["attention_head_dim"],
                use_scale_shift_norm=cfg.get("resnet_time_scale_shift") == "scale_shift",
                resblock_updown=cfg.get("downsample_type") == "resnet", **extra)
    if cfg.get("num_class_embeds"):
        unet["num_classes"] = cfg["num_class_embeds"]
    return {"model": {"target": "ldm.models.diffusion.ddpm.LatentDiffusion",
                      "params": {"unet_config": {"target": "ldm.modules.diffusionmodules.openaimodel.UNetModel",
                                                 "params": unet}}}}


@pytest.mark.parametrize("new_order", [False, True], ids=["legacy_qkv", "new_attention_order"])
def test_compvis_keys_load(new_order):
    model = reference(RESNET, seed=3)
    sd, blocks = to_compvis(model, RESNET, new_order)
    # The fused layout written above computes what diffusers' attention computes.
    g = torch.Generator().manual_seed(4)
    for mod, (heads, p) in blocks.items():
        x = torch.randn(2, p["norm.weight"].shape[0], 4, 4, generator=g)
        with torch.no_grad():
            np.testing.assert_allclose(compvis_attention(x, p, heads, new_order).numpy(),
                                       model.get_submodule(mod)(x).numpy(), rtol=1e-5, atol=1e-5)
    yaml = compvis_yaml(RESNET, **({"use_new_attention_order": True} if new_order else {}))
    module, params = from_compvis(sd, yaml)["unet"]
    assert not module.use_spatial_transformer and module.resblock_updown and module.num_classes == 4
    check_parity(RESNET, module, params, model)


def test_compvis_wrong_head_count_is_reported():
    model = reference(RESNET, seed=3)
    sd, _ = to_compvis(model, RESNET)
    yaml = compvis_yaml(RESNET)
    yaml["model"]["params"]["unet_config"]["params"]["num_head_channels"] = 7
    with pytest.raises(ValueError, match="num_head_channels"):
        from_compvis(sd, yaml)


# ---- configs and parameter counts ---------------------------------------------------------------

@pytest.mark.parametrize("change, message", [
    (dict(flip_sin_to_cos=False), "flip_sin_to_cos"),
    (dict(freq_shift=1), "freq_shift"),
    (dict(attn_norm_num_groups=None), "attn_norm_num_groups"),
    (dict(down_block_types=("AttnDownBlock2D", "DownBlock2D", "AttnDownBlock2D")), "resample"),
    (dict(up_block_types=("UpBlock2D", "ResnetUpsampleBlock2D", "AttnUpBlock2D")), "same levels"),
    (dict(attention_head_dim=12), "attention_head_dim"),
    (dict(resnet_time_scale_shift="spatial"), "resnet_time_scale_shift"),
])
def test_refuses_unrepresentable_configs(change, message):
    with pytest.raises(ValueError, match=message):
        unet_config_from_diffusers({**RESNET, **change, "_class_name": "UNet2DModel"})


def _count(module):
    return sum(int(np.prod(p.shape)) for p in jax.tree_util.tree_leaves(abstract_params(module)))


@pytest.mark.parametrize("cfg", [
    # diffusers' default UNet2DModel is the CelebA-HQ / FFHQ / LSUN-Bedrooms LDM-VQ-4 (paper: 274M).
    dict(in_channels=3, out_channels=3, attention_head_dim=32),
    # LSUN-Churches LDM-KL-8 (paper: 294M); a head count does not change the count.
    dict(in_channels=4, out_channels=4, block_out_channels=(192, 384, 384, 768, 768), attention_head_dim=24,
         down_block_types=("AttnDownBlock2D",) * 4 + ("DownBlock2D",),
         up_block_types=("ResnetUpsampleBlock2D",) + ("AttnUpBlock2D",) * 4,
         downsample_type="resnet", upsample_type="resnet", resnet_time_scale_shift="scale_shift",
         attn_norm_num_groups=32),
], ids=["celebahq", "churches"])
def test_parameter_count_matches_diffusers(cfg):
    with torch.device("meta"):
        ref = sum(p.numel() for p in diffusers.UNet2DModel(**cfg).parameters())
    module = UNet(**unet_config_from_diffusers({**cfg, "_class_name": "UNet2DModel"}))
    assert _count(module) == ref
