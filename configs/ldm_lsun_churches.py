"""Unconditional LDM-KL-8 on LSUN-Churches at 256x256 (paper Table 12, third column).

  --config=configs/ldm_lsun_churches.py       z 32x32x4 (KL f=8), 192 channels, mult 1,2,2,4,4, self-attention
                                              (CompVis AttentionBlock) at 32,16,8,4, 8 heads (24 channels per
                                              head at the first level), scale-shift norm, ResBlock up/down-
                                              sampling (294M parameters); batch 96, lr 5e-5, 500k steps.
  --config=configs/ldm_lsun_churches.py:tiny  unconditional 64x64 shapes on a CPU; needs a tiny KL stage-1
                                              run (configs/autoencoder_kl.py:tiny) in
                                              --config.first_stage.workdir (default runs/ae_kl_tiny).

The full config wants a trained KL-f8 first stage: --config.first_stage.workdir (its scale factor is
stored with it) or --config.first_stage.checkpoint=<kl-f8 model.ckpt> plus
--config.first_stage.scale_factor (the reference scales by the latents' std; 0.18215 for the
public KL-f8). The UNet is the reference's (lsun_churches-ldm-kl-8.yaml), so its checkpoint loads.
"""
from configs import common, ldm_common


def get_config(arg=None):
    a = common.parse_arg(arg, {"tiny": False})
    if a["tiny"]:
        c = ldm_common.tiny_task("kl")
        z = c.first_stage.model.embed_dim
        c.unet = ldm_common.tiny_unet(z, z, use_scale_shift_norm=True, use_spatial_transformer=False,
                                      resblock_updown=True)
        return c
    c = ldm_common.base(lr=5e-5, batch_size=96, num_train_steps=500_000, tiny=False)
    c.dataset_hint = "LSUN churches (TFDS lsun/church_outdoor) with an 'image' feature"
    c.data.keys = ()
    c.diffusion = ldm_common.compvis_diffusion(beta_end=0.0155)
    c.first_stage = ldm_common.first_stage("kl", 8)
    c.unet = ldm_common.unet(in_channels=4, out_channels=4, model_channels=192, channel_mult=(1, 2, 2, 4, 4),
                             attention_resolutions=ldm_common.attention_factors(32, (32, 16, 8, 4)),
                             num_res_blocks=2, num_heads=8, use_scale_shift_norm=True, resblock_updown=True,
                             use_spatial_transformer=False)
    c.conditioning = ldm_common.conditioning()
    return c
