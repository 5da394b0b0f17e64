"""from_compvis on a full LDM / Stable Diffusion checkpoint: first stage + UNet + text encoder in one call."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from latent_diffusion.convert import from_compvis  # noqa: E402
from latent_diffusion.convert.compvis import first_stage_to_compvis  # noqa: E402
from latent_diffusion.models.autoencoder import AutoencoderKL  # noqa: E402
from tests.convert.test_unet_parity import SD1, check_parity, randomized_unet, to_compvis  # noqa: E402

AE = dict(ch=32, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(), z_channels=4, embed_dim=4,
          resolution=32, in_channels=3, out_ch=3, double_z=True, dropout=0.0)
YAML = {"model": {"target": "ldm.models.diffusion.ddpm.LatentDiffusion", "params": {
    "scale_factor": 0.18215,
    "unet_config": {"target": "ldm.modules.diffusionmodules.openaimodel.UNetModel", "params": {
        "image_size": 16, "in_channels": 4, "out_channels": 4, "model_channels": 32,
        "attention_resolutions": [1], "num_res_blocks": 1, "channel_mult": [1, 2], "num_heads": 8,
        "use_spatial_transformer": True, "transformer_depth": 1, "context_dim": 32,
        "use_checkpoint": True, "legacy": False}},
    "first_stage_config": {"target": "ldm.models.autoencoder.AutoencoderKL", "params": {
        "embed_dim": 4, "ddconfig": {k: (list(v) if isinstance(v, tuple) else v)
                                     for k, v in AE.items() if k != "embed_dim"}}},
}}}


@pytest.fixture(scope="module")
def checkpoint():
    unet = randomized_unet(SD1, seed=5)
    sd = dict(to_compvis(unet.state_dict(), SD1))
    ae = AutoencoderKL(**AE)
    ae_params = jax.jit(ae.init)({"params": jax.random.key(0), "sample": jax.random.key(1)},
                                 jnp.zeros((1, 32, 32, 3)))["params"]
    sd.update(first_stage_to_compvis(ae, ae_params, prefix="first_stage_model."))
    torch.manual_seed(0)
    # Width 64: the CompVis layout does not store the head count, which is width // 64 for CLIP.
    clip_cfg = transformers.CLIPTextConfig(vocab_size=100, hidden_size=64, intermediate_size=128,
                                           num_hidden_layers=2, num_attention_heads=1, max_position_embeddings=16,
                                           bos_token_id=98, eos_token_id=99, pad_token_id=1)
    clip = transformers.CLIPTextModel(clip_cfg).eval()
    sd.update({"cond_stage_model.transformer." + k: v for k, v in clip.state_dict().items()})
    sd["betas"] = torch.zeros(1000)  # DDPM buffers are part of real checkpoints
    sd["model_ema.decay"] = torch.tensor(0.9999)
    return sd, unet, ae_params, clip


def test_full_ldm_checkpoint_loads_every_component(checkpoint):
    sd, unet, ae_params, clip = checkpoint
    parts = from_compvis(sd, YAML)
    assert set(parts) == {"first_stage", "unet", "text_encoder"}
    module, params = parts["unet"]
    assert module.remat and module.context_dim == 32
    check_parity(SD1, module, params, unet)
    fs_module, fs_params = parts["first_stage"]
    for a, b in zip(jax.tree.leaves(fs_params), jax.tree.leaves(jax.device_get(ae_params))):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    text_module, text_params = parts["text_encoder"]
    ids = np.array([[0, 5, 7, 99, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1]])
    ours = np.asarray(text_module.apply({"params": text_params}, jnp.asarray(ids))[0])
    with torch.no_grad():
        ref = clip(torch.tensor(ids)).last_hidden_state.numpy()
    np.testing.assert_allclose(ours, ref, atol=1e-4 * max(1.0, np.abs(ref).max()))


def test_unknown_and_missing_keys_are_named(checkpoint):
    sd = dict(checkpoint[0])
    sd["some_adapter.weight"] = torch.zeros(3)
    with pytest.raises(ValueError, match="some_adapter.weight"):
        from_compvis(sd, YAML)
    sd = dict(checkpoint[0])
    sd.pop("model.diffusion_model.out.2.weight")
    with pytest.raises(KeyError, match="model.diffusion_model.out.2.weight"):
        from_compvis(sd, YAML)
    sd = dict(checkpoint[0])
    sd["model.diffusion_model.extra.weight"] = torch.zeros(3)
    with pytest.raises(ValueError, match="extra.weight"):
        from_compvis(sd, YAML)


def test_unet_needs_the_yaml(checkpoint):
    with pytest.raises(ValueError, match="unet_config"):
        from_compvis(checkpoint[0], None)


def test_class_embedder_of_the_imagenet_model():
    # cin256-v2 keeps its label table at cond_stage_model.embedding.weight (last row: null class).
    emb = torch.nn.Embedding(11, 8)
    sd = {"cond_stage_model.embedding.weight": emb.weight.detach()}
    module, params = from_compvis(sd)["class_embedder"]
    assert (module.num_classes, module.features) == (10, 8)
    labels = torch.tensor([0, 3, 10])
    ours = module.apply({"params": params}, labels.numpy())
    assert ours.shape == (3, 1, 8)
    np.testing.assert_array_equal(np.asarray(ours)[:, 0], emb(labels).detach().numpy())
