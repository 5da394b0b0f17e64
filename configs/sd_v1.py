"""Stable Diffusion v1 (CompVis v1-inference.yaml) for imported weights: sampling and fine-tuning.

  --config=configs/sd_v1.py   KL-f8 first stage (scale 0.18215), UNet 320 channels, mult 1,2,4,4,
                              cross-attention at factors 4,2,1 with 8 heads, context 768 from the
                              frozen CLIP ViT-L/14 text encoder; 512x512 images (64x64x4 latents).

There is no shapes variant: the model only makes sense with the released weights. Point it at them:
  --config.first_stage.checkpoint=<sd-v1 folder>/vae    (a diffusers AutoencoderKL folder, or the
                                                         CompVis sd-v1-*.ckpt / .safetensors)
  --config.conditioning.text.checkpoint=<sd-v1 folder>/text_encoder   (transformers CLIPTextModel)
  --config.conditioning.text.tokenizer=clip:<sd-v1 folder>            (or the default hub id, if cached)
The UNet's own weights come through latent_diffusion.convert (from_diffusers / from_compvis).
conditioning.text.model describes the encoder those weights must hold (the loaded config.json wins).
For fine-tuning, --config.data.name/data_dir name an image-caption dataset; the optimiser defaults
are fine-tuning values (SD v1 itself was trained with lr 1e-4 at batch 2048).
"""
import ml_collections

from configs import common, ldm_common


def clip_text_model(*, width, layers, heads, mlp_dim, hidden_act, output_layer=-1):
    """The CLIPTextTransformer fields of a frozen CLIP text encoder (models/text_encoders.py)."""
    return ml_collections.ConfigDict(dict(
        vocab_size=49408, max_length=77, width=width, layers=layers, heads=heads, mlp_dim=mlp_dim,
        hidden_act=hidden_act, output_layer=output_layer))


def get_config(arg=None):
    common.parse_arg(arg, {})
    c = ldm_common.base(lr=1e-5, batch_size=32, num_train_steps=10_000, tiny=False)
    c.optim.warmup_steps = 500
    c.dataset_hint = "image-caption pairs for fine-tuning: a TFDS dataset with 'image' and 'caption' features"
    c.data.keys = ("caption",)
    c.data.resolution = 512
    c.diffusion = ldm_common.diffusion(schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    c.first_stage = ldm_common.first_stage("kl", 8, scale_factor=0.18215)
    c.unet = ldm_common.unet(in_channels=4, out_channels=4, model_channels=320, channel_mult=(1, 2, 4, 4),
                             attention_resolutions=(4, 2, 1), num_res_blocks=2, num_heads=8,
                             transformer_depth=1, context_dim=768, legacy=False, remat="full")
    c.conditioning = ldm_common.conditioning(crossattn="text")
    c.conditioning.text.update(encoder="clip", tokenizer="clip:openai/clip-vit-large-patch14", checkpoint="",
                               penultimate=False, max_length=77)
    c.conditioning.text.vocab_size = 49408      # CLIP's BPE vocabulary; checked against the tokenizer
    c.conditioning.text.model = clip_text_model(width=768, layers=12, heads=12, mlp_dim=3072,
                                                hidden_act="quick_gelu")
    c.sample.update(steps=50, guidance_scale=7.5, num_images=4)
    return c
