"""diffusers AutoencoderKL / VQModel vs ours through the converters; CompVis checkpoint loading."""
import re

import jax
import numpy as np
import pytest
import torch

from latent_diffusion import convert
from latent_diffusion.convert import compvis
from latent_diffusion.convert.common import to_numpy

diffusers = pytest.importorskip("diffusers")

KL_CONFIG = dict(
    _class_name="AutoencoderKL", in_channels=3, out_channels=3, block_out_channels=(32, 64),
    down_block_types=("DownEncoderBlock2D", "AttnDownEncoderBlock2D"),
    up_block_types=("AttnUpDecoderBlock2D", "UpDecoderBlock2D"),
    layers_per_block=1, norm_num_groups=8, latent_channels=4, sample_size=32)
VQ_CONFIG = dict(
    _class_name="VQModel", in_channels=3, out_channels=3, block_out_channels=(32, 64),
    down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
    up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
    layers_per_block=1, norm_num_groups=8, latent_channels=3, vq_embed_dim=4,
    num_vq_embeddings=32, sample_size=32)
# What the same models are called in a CompVis yaml (ddconfig + embed_dim).
KL_DDCONFIG = dict(double_z=True, z_channels=4, resolution=32, in_channels=3, out_ch=3, ch=32,
                   ch_mult=[1, 2], num_res_blocks=1, attn_resolutions=[16], dropout=0.0)


def _torch_model(config, seed=0):
    torch.manual_seed(seed)
    cls = getattr(diffusers, config["_class_name"])
    model = cls(**{k: v for k, v in config.items() if not k.startswith("_")}).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:  # default GroupNorm affine is identity: make it count
                p.add_(0.2 * torch.randn_like(p))
            elif name.endswith("embedding.weight"):  # well-separated codes: no argmin near-ties
                p.copy_(torch.randn_like(p))
    return model


def _nhwc(t):
    return np.transpose(to_numpy(t), (0, 2, 3, 1))


def _assert_close(ours, ref, tol=1e-4):
    ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
    assert ours.shape == ref.shape, (ours.shape, ref.shape)
    err = np.max(np.abs(ours - ref))
    assert err <= tol * max(1.0, np.max(np.abs(ref))), f"max abs diff {err}"


def _image(seed=1, size=32):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(2, 3, size, size, generator=g) * 2 - 1


@pytest.fixture(scope="module")
def kl():
    model = _torch_model(KL_CONFIG)
    module, params = convert.from_diffusers(KL_CONFIG, model.state_dict())
    return model, module, params


@pytest.fixture(scope="module")
def vq():
    model = _torch_model(VQ_CONFIG)
    module, params = convert.from_diffusers(VQ_CONFIG, model.state_dict())
    return model, module, params


def test_kl_encode_decode_match_diffusers(kl):
    model, module, params = kl
    assert module.attn_resolutions == (16,) and module.ch_mult == (1, 2)
    x = _image()
    with torch.no_grad():
        dist = model.encode(x).latent_dist
        z = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(2))
        rec = model.decode(z).sample
    post = module.apply({"params": params}, _nhwc(x), method="encode")
    _assert_close(post.mean, _nhwc(dist.mean))
    _assert_close(post.logvar, _nhwc(dist.logvar))
    ours = module.apply({"params": params}, _nhwc(z), method="decode")
    _assert_close(ours, _nhwc(rec))


def test_kl_without_quant_convs_and_mid_attention():
    config = dict(KL_CONFIG, use_quant_conv=False, use_post_quant_conv=False,
                  mid_block_add_attention=False,
                  down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2)
    model = _torch_model(config, seed=3)
    module, params = convert.from_diffusers(config, model.state_dict())
    assert "quant_conv" not in params and "mid_attn_1" not in params["encoder"]
    x = _image(seed=4)
    with torch.no_grad():
        ref = model(x, sample_posterior=False).sample
    ours, _ = module.apply({"params": params}, _nhwc(x), sample_posterior=False)
    _assert_close(ours, _nhwc(ref))


def test_vq_encode_quantize_decode_match_diffusers(vq):
    model, module, params = vq
    x = _image(seed=5)
    with torch.no_grad():
        h = model.encode(x).latents
        quant, ref_loss, (_, _, ref_idx) = model.quantize(h)
        rec = model.decode(h).sample
        rec_raw = model.decode(h, force_not_quantize=True).sample
    v = {"params": params}
    ours_h = module.apply(v, _nhwc(x), method="encode")
    _assert_close(ours_h, _nhwc(h))
    z_q, aux = module.apply(v, _nhwc(h), method="quantize")
    np.testing.assert_array_equal(np.asarray(aux["indices"]).reshape(-1), ref_idx.numpy().reshape(-1))
    _assert_close(z_q, _nhwc(quant))
    _assert_close(aux["codebook_loss"], ref_loss.numpy())
    _assert_close(module.apply(v, _nhwc(h), method="decode"), _nhwc(rec))
    _assert_close(module.apply(v, _nhwc(h), force_not_quantize=True, method="decode"), _nhwc(rec_raw))
    # The full forward pass is encode -> quantise -> decode.
    xrec, aux = module.apply(v, _nhwc(x))
    _assert_close(xrec, _nhwc(rec))


def test_old_diffusers_attention_names_load(kl):
    model, module, params = kl
    renamed = {re.sub(r"\.to_q\.", ".query.", re.sub(r"\.to_out\.0\.", ".proj_attn.", k)): v
               for k, v in model.state_dict().items()}
    _, old = convert.from_diffusers(KL_CONFIG, renamed)
    jax.tree.map(np.testing.assert_array_equal, old, params)


def test_unexpected_and_missing_diffusers_keys_are_named(kl):
    model, _, _ = kl
    sd = dict(model.state_dict())
    sd["encoder.extra_layer.weight"] = torch.zeros(3)
    with pytest.raises(ValueError, match="encoder.extra_layer.weight"):
        convert.from_diffusers(KL_CONFIG, sd)
    sd = dict(model.state_dict())
    del sd["decoder.up_blocks.0.attentions.0.to_k.bias"]
    with pytest.raises(ValueError, match="missing key.*decoder.up_blocks.0.attentions.0.to_k.bias"):
        convert.from_diffusers(KL_CONFIG, sd)
    with pytest.raises(ValueError, match="unsupported key"):
        convert.from_diffusers(dict(KL_CONFIG, new_option=1), model.state_dict())


# ---- CompVis layout -------------------------------------------------------------------------

def _diffusers_to_compvis(sd, levels):
    """An independent rename of a diffusers AE state dict into CompVis' names."""
    out = {}
    for k, v in sd.items():
        v = to_numpy(v)
        k = re.sub(r"down_blocks\.(\d+)\.resnets\.(\d+)", r"down.\1.block.\2", k)
        k = re.sub(r"down_blocks\.(\d+)\.attentions\.(\d+)", r"down.\1.attn.\2", k)
        k = re.sub(r"down_blocks\.(\d+)\.downsamplers\.0", r"down.\1.downsample", k)
        k = re.sub(r"up_blocks\.(\d+)\.resnets\.(\d+)",
                   lambda m: f"up.{levels - 1 - int(m[1])}.block.{m[2]}", k)
        k = re.sub(r"up_blocks\.(\d+)\.attentions\.(\d+)",
                   lambda m: f"up.{levels - 1 - int(m[1])}.attn.{m[2]}", k)
        k = re.sub(r"up_blocks\.(\d+)\.upsamplers\.0", lambda m: f"up.{levels - 1 - int(m[1])}.upsample", k)
        k = k.replace("mid_block.resnets.0", "mid.block_1").replace("mid_block.resnets.1", "mid.block_2")
        k = k.replace("mid_block.attentions.0", "mid.attn_1").replace("conv_shortcut", "nin_shortcut")
        k = k.replace("conv_norm_out", "norm_out").replace("group_norm", "norm")
        k = k.replace("to_q", "q").replace("to_k", "k").replace("to_v", "v").replace("to_out.0", "proj_out")
        if re.search(r"\.(q|k|v|proj_out)\.weight$", k):
            v = v[:, :, None, None]  # CompVis uses 1x1 convs
        out[k] = v
    return out


def test_compvis_first_stage_checkpoint(kl):
    model, module, params = kl
    sd = _diffusers_to_compvis(model.state_dict(), 2)
    sd["loss.discriminator.main.0.weight"] = np.zeros((4, 3, 4, 4), np.float32)  # training loss: ignored
    found = convert.from_compvis(sd, {"target": "ldm.models.autoencoder.AutoencoderKL",
                                      "params": {"embed_dim": 4, "ddconfig": KL_DDCONFIG,
                                                 "lossconfig": {"target": "x"}}})
    cv_module, cv_params = found["first_stage"]
    assert set(found) == {"first_stage"}
    assert cv_module.attn_resolutions == module.attn_resolutions
    jax.tree.map(np.testing.assert_array_equal, cv_params, params)
    # Round trip back to the CompVis names and layouts.
    back = compvis.first_stage_to_compvis(cv_module, cv_params)
    del sd["loss.discriminator.main.0.weight"]
    assert set(back) == set(sd)
    for k in sd:
        np.testing.assert_array_equal(back[k], sd[k], err_msg=k)


def test_compvis_full_ldm_checkpoint_prefix_and_inferred_config(kl):
    model, module, params = kl
    sd = {compvis.FIRST_STAGE_PREFIX + k: v
          for k, v in _diffusers_to_compvis(model.state_dict(), 2).items()}
    sd["alphas_cumprod"] = np.ones(10, np.float32)
    full_yaml = {"model": {"target": "ldm.models.diffusion.ddpm.LatentDiffusion", "params": {
        "first_stage_config": {"target": "ldm.models.autoencoder.AutoencoderKL",
                               "params": {"embed_dim": 4, "ddconfig": KL_DDCONFIG}}}}}
    cv_module, cv_params = compvis.first_stage_from_compvis(sd, full_yaml)
    jax.tree.map(np.testing.assert_array_equal, cv_params, params)
    # No config: the architecture is read off the weights (CompVis' 32 groups, so override here).
    inferred = compvis.infer_first_stage_config(sd, compvis.FIRST_STAGE_PREFIX)
    assert inferred["ch_mult"] == [1, 2] and inferred["kind"] == "kl" and inferred["num_res_blocks"] == 1
    mod2, params2 = compvis.first_stage_from_compvis(sd, None)
    jax.tree.map(np.testing.assert_array_equal, params2, params)
    assert (mod2.ch, mod2.ch_mult, mod2.z_channels, mod2.embed_dim) == (32, (1, 2), 4, 4)


def test_compvis_ckpt_file(kl, tmp_path):
    model, _, params = kl
    sd = _diffusers_to_compvis(model.state_dict(), 2)
    path = tmp_path / "kl.ckpt"
    torch.save({"state_dict": {k: torch.from_numpy(v) for k, v in sd.items()}, "global_step": 1}, path)
    _, cv_params = convert.from_compvis(str(path), {"kind": "kl", "embed_dim": 4, **KL_DDCONFIG})["first_stage"]
    jax.tree.map(np.testing.assert_array_equal, cv_params, params)


def test_compvis_vq_checkpoint(vq):
    model, module, params = vq
    sd = _diffusers_to_compvis(model.state_dict(), 2)
    cfg = dict(kind="vq", embed_dim=4, n_embed=32, ch=32, ch_mult=[1, 2], num_res_blocks=1,
               z_channels=3, resolution=32, attn_resolutions=[], double_z=False)
    cv_module, cv_params = convert.from_compvis(sd, cfg)["first_stage"]
    assert type(cv_module).__name__ == "VQModel"
    jax.tree.map(np.testing.assert_array_equal, cv_params, params)


def test_compvis_mismatched_checkpoint_errors(kl):
    model, _, _ = kl
    sd = _diffusers_to_compvis(model.state_dict(), 2)
    cfg = {"kind": "kl", "embed_dim": 4, **KL_DDCONFIG}
    with pytest.raises(ValueError, match="unexpected key.*encoder.down.0.block.0.nin_shortcut.weight"):
        compvis.first_stage_from_compvis({**sd, "encoder.down.0.block.0.nin_shortcut.weight":
                                          np.zeros((32, 32, 1, 1), np.float32)}, cfg)
    # One res block more per level than the checkpoint: the missing keys are named.
    with pytest.raises(ValueError, match=r"missing key\(s\) \['decoder.up.0.block.2.conv1.bias'"):
        compvis.first_stage_from_compvis(sd, {**cfg, "num_res_blocks": 2})
    with pytest.raises(ValueError, match=r"shape of .*conv_in"):
        compvis.first_stage_from_compvis(sd, {**cfg, "ch": 64, "ch_mult": [1, 2]})
    with pytest.raises(ValueError, match="holds a 'kl' first stage"):
        compvis.first_stage_from_compvis(sd, {"kind": "vq"})
    with pytest.raises(ValueError, match="no known component"):
        convert.from_compvis({"something.else.weight": np.zeros(1)}, None)
    with pytest.raises(ValueError, match="unknown first-stage config key"):
        compvis.first_stage_from_compvis(sd, {**cfg, "chanels": 3})
