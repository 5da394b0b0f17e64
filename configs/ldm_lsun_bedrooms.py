"""Unconditional LDM-VQ-4 on LSUN-Bedrooms at 256x256 (paper Table 12, fourth column).

  --config=configs/ldm_lsun_bedrooms.py       z 64x64x3 (VQ f=4, 8192 codes), 224 channels, mult 1,2,3,4,
                                              self-attention at 32,16,8, 32 channels per head; batch 48,
                                              lr 9.6e-5, 1.9M steps.
  --config=configs/ldm_lsun_bedrooms.py:tiny  unconditional 64x64 shapes on a CPU; needs a tiny VQ stage-1
                                              run (configs/autoencoder_vq.py:tiny) in
                                              --config.first_stage.workdir (default runs/ae_vq_tiny).

First stage (full size): --config.first_stage.checkpoint=<CompVis vq-f4 model.ckpt>
--config.first_stage.scale_factor=1.0, or --config.first_stage.workdir=<a configs/autoencoder_vq.py:f=4
run of ours> (its scale factor comes with it). Without one the run stops at start naming these options.
"""
from configs import ldm_celebahq, common, ldm_common


def get_config(arg=None):
    a = common.parse_arg(arg, {"tiny": False})
    if a["tiny"]:
        c = ldm_common.tiny_task("vq")
        z = c.first_stage.model.embed_dim
        c.unet = ldm_common.tiny_unet(z, z, use_spatial_transformer=False)
        return c
    c = ldm_common.base(lr=9.6e-5, batch_size=48, num_train_steps=1_900_000, tiny=False)
    c.dataset_hint = "LSUN bedrooms (TFDS lsun/bedroom) with an 'image' feature"
    return ldm_celebahq.unconditional_vq_f4(c)
