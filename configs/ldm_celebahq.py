"""Unconditional LDM-VQ-4 on CelebA-HQ or FFHQ at 256x256 (paper Table 12, first two columns).

  --config=configs/ldm_celebahq.py            CelebA-HQ: z 64x64x3 (VQ f=4, 8192 codes), 224 channels,
                                              mult 1,2,3,4, self-attention (CompVis AttentionBlock) at
                                              32,16,8, 32 channels per head (274M parameters); batch 48,
                                              lr 9.6e-5, 410k steps.
  --config=configs/ldm_celebahq.py:ffhq       FFHQ: the same model; batch 42, lr 8.4e-5, 635k steps.
  --config=configs/ldm_celebahq.py:tiny       unconditional generation of 64x64 shapes on a CPU; needs a
                                              tiny VQ stage-1 run (configs/autoencoder_vq.py:tiny) in
                                              --config.first_stage.workdir (default runs/ae_vq_tiny).

The full configs want a trained VQ-f4 first stage: --config.first_stage.workdir=<stage-1 workdir>
(configs/autoencoder_vq.py:f=4) or --config.first_stage.checkpoint=<CompVis vq-f4 model.ckpt> with
--config.first_stage.scale_factor=1.0 (the CompVis VQ models are not rescaled).
Learning rates are the paper's effective rates (CompVis base rate 2e-6 times the batch size).
"""
from configs import common, ldm_common


def get_config(arg=None):
    a = common.parse_arg(arg, {"tiny": False, "ffhq": False})
    if a["tiny"]:
        c = ldm_common.tiny_task("vq")
        z = c.first_stage.model.embed_dim
        c.unet = ldm_common.tiny_unet(z, z, use_spatial_transformer=False)
        return c
    if a["ffhq"]:
        c = ldm_common.base(lr=8.4e-5, batch_size=42, num_train_steps=635_000, tiny=False)
        c.dataset_hint = "FFHQ 256x256 images as a TFDS dataset with an 'image' feature"
    else:
        c = ldm_common.base(lr=9.6e-5, batch_size=48, num_train_steps=410_000, tiny=False)
        c.dataset_hint = "CelebA-HQ 256x256 images as a TFDS dataset with an 'image' feature"
    return unconditional_vq_f4(c)


def unconditional_vq_f4(c):
    """The unconditional LDM-VQ-4 of Table 14 (CelebA-HQ, FFHQ, LSUN-Bedrooms share it)."""
    c.data.keys = ()
    c.diffusion = ldm_common.compvis_diffusion(beta_end=0.0195)
    c.first_stage = ldm_common.first_stage("vq", 4)
    c.unet = ldm_common.unet(in_channels=3, out_channels=3, model_channels=224, channel_mult=(1, 2, 3, 4),
                             attention_resolutions=ldm_common.attention_factors(64, (32, 16, 8)),
                             num_res_blocks=2, num_head_channels=32, use_spatial_transformer=False)
    c.conditioning = ldm_common.conditioning()
    return c
