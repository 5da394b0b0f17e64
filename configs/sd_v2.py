"""Stable Diffusion v2 768-v (Stability-AI v2-inference-v.yaml) for imported weights.

  --config=configs/sd_v2.py   v-prediction; KL-f8 first stage (scale 0.18215); UNet 320 channels,
                              mult 1,2,4,4, cross-attention at factors 4,2,1 with 64 channels per
                              head and linear projections in the transformers, non-legacy heads;
                              context 1024 from OpenCLIP ViT-H/14's penultimate text layer;
                              768x768 images (96x96x4 latents).

There is no shapes variant. Point it at the released weights:
  --config.first_stage.checkpoint=<sd-2 folder>/vae   (diffusers AutoencoderKL folder, or the
                                                       CompVis-style 768-v-ema.ckpt / .safetensors)
  --config.conditioning.text.checkpoint=<sd-2 folder>/text_encoder
  --config.conditioning.text.tokenizer=clip:<sd-2 folder>
diffusers' text_encoder folder stores only the first 23 of OpenCLIP's 24 layers, so its last layer
already is the penultimate one: keep conditioning.text.penultimate=False for it, and set it True
for a full 24-layer transformers CLIPTextModel of ViT-H/14. For the 512x512 eps model (v2-base),
use --config.diffusion.prediction_type=eps --config.data.resolution=512.
"""
from configs import common, ldm_common, sd_v1


def get_config(arg=None):
    common.parse_arg(arg, {})
    c = sd_v1.get_config()
    c.diffusion.prediction_type = "v"
    c.data.resolution = 768
    c.unet = ldm_common.unet(in_channels=4, out_channels=4, model_channels=320, channel_mult=(1, 2, 4, 4),
                             attention_resolutions=(4, 2, 1), num_res_blocks=2, num_head_channels=64,
                             transformer_depth=1, context_dim=1024, use_linear_in_transformer=True,
                             legacy=False, remat="full")
    c.conditioning.text.update(tokenizer="", checkpoint="", penultimate=False)
    c.conditioning.text.model = sd_v1.clip_text_model(width=1024, layers=23, heads=16, mlp_dim=4096,
                                                      hidden_act="gelu")
    c.sample.guidance_scale = 9.0
    return c
