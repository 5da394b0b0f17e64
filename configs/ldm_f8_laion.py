"""Text-to-image LDM-KL-8 on LAION (paper Table 15, first column; the 1.45B model).

  --config=configs/ldm_f8_laion.py      full size: 320 channels, mult 1,2,4,4, attention at 32,16,8,
                                        8 heads, context 1280 from a 32-layer BERT-style encoder
                                        trained jointly; batch 680, lr 1e-4.
  --config=configs/ldm_f8_laion.py:tiny the same model family, small, on the shapes captions;
                                        needs a tiny stage-1 run (configs/autoencoder_kl.py:tiny)
                                        in --config.first_stage.workdir (default runs/ae_kl_tiny).

First stage (full size): --config.first_stage.checkpoint=<CompVis kl-f8 model.ckpt>
--config.first_stage.scale_factor=0.18215, or a diffusers AutoencoderKL folder (config.json +
diffusion_pytorch_model.safetensors, e.g. <sd-v1>/vae) with the same scale factor, or
--config.first_stage.workdir=<a configs/autoencoder_kl.py:f=8 run of ours> (its scale factor comes with
it). Without one the run stops at start naming these options.
"""
from configs import common, ldm_common


def get_config(arg=None):
    a = common.parse_arg(arg, {"tiny": False})
    if a["tiny"]:
        # The recipe measured in BENCHMARKS.md ("Text-to-image on shapes"): v-prediction (an eps loss barely
        # weighs the high-noise steps where the caption decides the layout), lr 1e-3 with cosine decay, EMA
        # 0.999, a third UNet level (4x4) and attention at every level, 2000 steps.
        steps = 2000
        c = ldm_common.base(lr=1e-3, batch_size=16, num_train_steps=steps, tiny=True)
        c.optim.update(warmup_steps=200, schedule="cosine", decay_steps=steps - 200, end_lr_factor=0.05)
        c.ema.decay = 0.999
        c.diffusion.prediction_type = "v"
        c.first_stage = ldm_common.first_stage("kl", 4, tiny=True, workdir="runs/ae_kl_tiny")
        z = c.first_stage.model.embed_dim
        c.unet = ldm_common.tiny_unet(z, z, context_dim=64, channel_mult=(1, 2, 4), attention_resolutions=(1, 2, 4))
        c.conditioning = ldm_common.conditioning(crossattn="text")
        c.conditioning.text.model.update(width=64, depth=2, heads=4, head_dim=16)
        c.data.resolution = 64
        c.eval_every, c.checkpoint.every = 1000, 500
        c.sample.prompt_score.num_prompts = 16  # prompt-following score and grid in TensorBoard
        return c
    c = ldm_common.base(lr=1e-4, batch_size=680, num_train_steps=390_000, tiny=False)
    c.dataset_hint = ("LAION-400M image-caption pairs: img2dataset shards read in place (data.source, data.shards) "
                      "or a TFDS dataset with 'image' and 'caption' features")
    c.data.keys = ("caption",)
    c.first_stage = ldm_common.first_stage("kl", 8, scale_factor=0.18215)
    c.unet = ldm_common.unet(in_channels=4, out_channels=4, model_channels=320, channel_mult=(1, 2, 4, 4),
                             attention_resolutions=(4, 2, 1), num_res_blocks=2, num_heads=8,
                             transformer_depth=1, context_dim=1280, legacy=False, remat="full")
    c.conditioning = ldm_common.conditioning(crossattn="text")
    c.conditioning.text.tokenizer = "bert:bert-base-uncased"
    c.conditioning.text.vocab_size = 30522
    c.conditioning.text.model.update(width=1280, depth=32, heads=8, head_dim=64)
    return c
