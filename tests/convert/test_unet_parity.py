"""Parity of our UNet with diffusers UNet2DConditionModel (random weights), through our converters."""
import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

import jax.numpy as jnp  # noqa: E402

from latent_diffusion.convert import from_diffusers  # noqa: E402
from latent_diffusion.convert.unet import (unet_config_from_diffusers,  # noqa: E402
                                           unet_from_compvis_state_dict)

SD1 = dict(sample_size=16, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
           down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
           up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
           cross_attention_dim=32, attention_head_dim=8, norm_num_groups=32)
# SD2 style: linear projections, per-level head counts giving one head width (8, like SD2's 64).
SD2 = dict(sample_size=16, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
           down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
           up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
           cross_attention_dim=24, attention_head_dim=[4, 8], use_linear_projection=True,
           transformer_layers_per_block=2)
CLASS = dict(sample_size=16, in_channels=3, out_channels=5, layers_per_block=2, block_out_channels=(32, 32, 64),
             down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
             up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
             cross_attention_dim=16, attention_head_dim=4, num_class_embeds=6,
             resnet_time_scale_shift="scale_shift")
ADM = dict(SD1, class_embed_type="projection", projection_class_embeddings_input_dim=6)


def randomized_unet(cfg, seed=0):
    """A diffusers UNet with every parameter random (zero-init layers would hide mapping bugs)."""
    torch.manual_seed(seed)
    return randomize(diffusers.UNet2DConditionModel(**cfg).eval())


def randomize(model):
    """Every parameter of a torch model random, norms' affine params around (1, 0); in place."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 1 and "norm" in name:  # non-trivial affine norms
                p.copy_((1.0 if name.endswith("weight") else 0.0) + 0.3 * torch.randn_like(p))
            elif p.ndim == 1:
                p.copy_(0.3 * torch.randn_like(p))
            else:
                p.copy_(torch.randn_like(p) / max(1, p[0].numel()) ** 0.5)
    return model


def inputs(cfg, seed=1):
    g = torch.Generator().manual_seed(seed)
    s = cfg["sample_size"]
    x = torch.randn(2, cfg["in_channels"], s, s, generator=g)
    t = torch.tensor([3.0, 701.0])
    ctx = torch.randn(2, 7, cfg["cross_attention_dim"], generator=g)
    y = None
    if cfg.get("num_class_embeds"):
        y = torch.tensor([1, cfg["num_class_embeds"] - 1])  # a class and the null (last) label
    elif cfg.get("class_embed_type") == "projection":
        y = torch.randn(2, cfg["projection_class_embeddings_input_dim"], generator=g)
    return x, t, ctx, y


def ours(module, params, x, t, ctx, y):
    out = module.apply({"params": params}, jnp.asarray(x.numpy().transpose(0, 2, 3, 1)),
                       jnp.asarray(t.numpy()), context=jnp.asarray(ctx.numpy()),
                       y=None if y is None else jnp.asarray(y.numpy()))
    return np.asarray(out).transpose(0, 3, 1, 2)


def check_parity(cfg, module, params, model):
    x, t, ctx, y = inputs(cfg)
    with torch.no_grad():
        ref = model(x, t, encoder_hidden_states=ctx, class_labels=y).sample.numpy()
    out = ours(module, params, x, t, ctx, y)
    assert out.shape == ref.shape
    scale = max(1.0, float(np.abs(ref).max()))
    assert np.abs(out - ref).max() <= 1e-4 * scale, (np.abs(out - ref).max(), scale)


def diffusers_config(model):
    return {**dict(model.config), "_class_name": "UNet2DConditionModel"}


@pytest.mark.parametrize("cfg, expect", [
    (SD1, dict(attention_resolutions=(1,), num_heads=8, num_head_channels=-1, channel_mult=(1, 2))),
    (SD2, dict(attention_resolutions=(1, 2), num_heads=-1, num_head_channels=8, transformer_depth=2,
               use_linear_in_transformer=True)),
    (CLASS, dict(attention_resolutions=(2, 4), num_heads=4, num_classes=5, use_scale_shift_norm=True,
                 num_res_blocks=2)),
    (ADM, dict(adm_in_channels=6)),
], ids=["sd1", "sd2", "class_scale_shift", "projection"])
def test_from_diffusers_parity(cfg, expect):
    model = randomized_unet(cfg)
    module, params = from_diffusers(diffusers_config(model), model.state_dict())
    for field, value in expect.items():
        assert getattr(module, field) == value, field
    check_parity(cfg, module, params, model)


def test_sd2_head_width_matches_diffusers():
    model = diffusers.UNet2DConditionModel(**SD2)
    module = from_diffusers(diffusers_config(model), model.state_dict())[0]
    for level, ch in enumerate(SD2["block_out_channels"]):
        attn = model.down_blocks[level].attentions[0].transformer_blocks[0].attn1
        assert module.heads_for(ch) == (attn.heads, ch // attn.heads)


def to_compvis(state_dict, cfg):
    """Rename a diffusers UNet state dict to CompVis `model.diffusion_model.*` keys (written for this test)."""
    n, nrb = len(cfg["block_out_channels"]), cfg["layers_per_block"]
    res = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1",
           "norm2": "out_layers.0", "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}
    names = {"time_embedding.linear_1": "time_embed.0", "time_embedding.linear_2": "time_embed.2",
             "class_embedding": "label_emb", "conv_in": "input_blocks.0.0",
             "conv_norm_out": "out.0", "conv_out": "out.2"}
    idx = 1
    for level in range(n):
        for i in range(nrb):
            names[f"down_blocks.{level}.resnets.{i}"] = f"input_blocks.{idx}.0"
            names[f"down_blocks.{level}.attentions.{i}"] = f"input_blocks.{idx}.1"
            idx += 1
        names[f"down_blocks.{level}.downsamplers.0.conv"] = f"input_blocks.{idx}.0.op"
        idx += 1
    for i in range(2):
        names[f"mid_block.resnets.{i}"] = f"middle_block.{2 * i}"
    names["mid_block.attentions.0"] = "middle_block.1"
    for j in range(n):
        attn = cfg["up_block_types"][j].startswith("CrossAttn")
        for i in range(nrb + 1):
            k = j * (nrb + 1) + i
            names[f"up_blocks.{j}.resnets.{i}"] = f"output_blocks.{k}.0"
            names[f"up_blocks.{j}.attentions.{i}"] = f"output_blocks.{k}.1"
        names[f"up_blocks.{j}.upsamplers.0.conv"] = f"output_blocks.{k}.{2 if attn else 1}.conv"
    out = {}
    for key, value in state_dict.items():
        mod = max((m for m in names if key.startswith(m + ".")), key=len)
        rest = key[len(mod) + 1:]
        if ".resnets." in mod:
            head, _, tail = rest.partition(".")
            rest = res[head] + "." + tail
        out["model.diffusion_model." + names[mod] + "." + rest] = value
    return out


def test_compvis_state_dict_parity():
    model = randomized_unet(CLASS, seed=3)
    sd = model.state_dict()
    compvis = to_compvis(sd, CLASS)
    # The renaming is checked against diffusers' own CompVis -> diffusers converter.
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint
    back = convert_ldm_unet_checkpoint(dict(compvis), dict(model.config))
    assert set(back) == set(sd)
    assert all(torch.equal(back[k], sd[k]) for k in sd)
    compvis["first_stage_model.decoder.conv_in.weight"] = torch.zeros(1)  # other parts are ignored
    module, params = unet_from_compvis_state_dict(compvis, unet_config_from_diffusers(model.config))
    check_parity(CLASS, module, params, model)


def test_unexpected_and_missing_keys_are_reported():
    model = diffusers.UNet2DConditionModel(**SD1)
    sd = dict(model.state_dict())
    with pytest.raises(ValueError, match="unexpected key"):
        from_diffusers(diffusers_config(model), {**sd, "down_blocks.0.extra.weight": torch.zeros(1)})
    sd.pop("mid_block.attentions.0.proj_out.weight")
    with pytest.raises(KeyError, match="proj_out.weight"):
        from_diffusers(diffusers_config(model), sd)


@pytest.mark.parametrize("change, message", [
    (dict(cross_attention_dim=None), "cross_attention_dim"),
    (dict(class_embed_type="timestep"), "class_embed_type"),
    (dict(attention_head_dim=[8, 4]), "attention_head_dim"),
    (dict(up_block_types=("CrossAttnUpBlock2D", "UpBlock2D")), "same levels"),
    (dict(layers_per_block=[1, 2]), "layers_per_block"),
    (dict(norm_num_groups=16), "norm_num_groups"),
    (dict(mid_block_type="UNetMidBlock2D"), "mid_block_type"),
])
def test_refuses_unrepresentable_configs(change, message):
    with pytest.raises(ValueError, match=message):
        unet_config_from_diffusers({**SD1, **change})
