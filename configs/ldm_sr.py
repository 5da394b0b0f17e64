"""4x super-resolution LDM-VQ-4 on ImageNet, 64 -> 256 (paper Table 15, "Super Resolution"; Sec. 4.4).

  --config=configs/ldm_sr.py       z 64x64x3 (VQ f=4, 8192 codes); the bicubic (anti-aliased) 4x
                                   downsampled image is concatenated to the latents (in_channels 3+3);
                                   160 channels, mult 1,2,2,4, self-attention (CompVis AttentionBlock)
                                   at the 8x8 level with 32 channels per head; batch 64, lr 6.4e-5,
                                   860k steps. UNet 113.6M parameters: Table 15's 169M is the UNet
                                   plus the 55.3M VQ-f4 first stage.
  --config=configs/ldm_sr.py:tiny  16x16 -> 64x64 shapes on a CPU; needs a tiny VQ stage-1 run
                                   (configs/autoencoder_vq.py:tiny) in --config.first_stage.workdir
                                   (default runs/ae_vq_tiny).

The reference (bsr_sr) lists attention at factors 16 and 8; with 4 levels only 8 exists.

First stage (full size): --config.first_stage.checkpoint=<CompVis vq-f4 model.ckpt>
--config.first_stage.scale_factor=1.0, or --config.first_stage.workdir=<a configs/autoencoder_vq.py:f=4
run of ours> (its scale factor comes with it). Without one the run stops at start naming these options.
"""
from configs import common, ldm_common


def get_config(arg=None):
    a = common.parse_arg(arg, {"tiny": False})
    if a["tiny"]:
        c = ldm_common.tiny_task("vq")
        z = c.first_stage.model.embed_dim
        c.unet = ldm_common.tiny_unet(z + 3, z, use_spatial_transformer=False)
        c.conditioning = ldm_common.conditioning(concat="lowres")
        return c
    c = ldm_common.base(lr=6.4e-5, batch_size=64, num_train_steps=860_000, tiny=False)
    c.dataset_hint = ("ImageNet (TFDS imagenet2012) with an 'image' feature; the paper drops images "
                      "with a shorter side below 256 px")
    c.data.keys = ()
    c.data.random_crop = True
    c.diffusion = ldm_common.compvis_diffusion(beta_end=0.0155)
    c.first_stage = ldm_common.first_stage("vq", 4)
    c.unet = ldm_common.unet(in_channels=6, out_channels=3, model_channels=160, channel_mult=(1, 2, 2, 4),
                             attention_resolutions=(8,), num_res_blocks=2, num_head_channels=32,
                             use_spatial_transformer=False)
    c.conditioning = ldm_common.conditioning(concat="lowres")
    c.conditioning.lowres_factor = 4
    return c
