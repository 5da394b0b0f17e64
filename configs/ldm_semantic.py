"""Semantic-map-to-image LDM-VQ-8 on Landscapes (paper Table 15, "Semantic-Map-to-Image"; Sec. 4.3.2).

  --config=configs/ldm_semantic.py       z 32x32x4 (VQ f=8, 16384 codes); the one-hot segmentation
                                         (182 COCO-Stuff classes) is resized to the latent grid, mapped to
                                         3 channels by a learned 1x1 conv and concatenated to the latents
                                         (in_channels 4+3); 128 channels, mult 1,4,8, self-attention (CompVis
                                         AttentionBlock) in the middle block, 8 heads (UNet 215M parameters,
                                         as Table 15); batch 48, lr 4.8e-5, 360k steps. Trained at
                                         256x256; samples at larger sizes convolutionally.
  --config=configs/ldm_semantic.py:tiny  64x64 shapes from their segmentation maps (31 values: background
                                         and 30 classes) on a CPU; needs a tiny VQ stage-1 run
                                         (configs/autoencoder_vq.py:tiny) in --config.first_stage.workdir
                                         (default runs/ae_vq_tiny).

The released semantic_synthesis256 model uses the VQ-f4 first stage (in_channels 3+3); Table 15
lists f=8, which this config follows, and 1 head, where the released model has 8 (kept here).
The reference resizes the map bilinearly; ours uses nearest.

First stage (full size): --config.first_stage.checkpoint=<CompVis vq-f8 model.ckpt>
--config.first_stage.scale_factor=1.0, or --config.first_stage.workdir=<a configs/autoencoder_vq.py:f=8
run of ours> (its scale factor comes with it). Without one the run stops at start naming these options.
"""
from configs import common, ldm_common


def get_config(arg=None):
    a = common.parse_arg(arg, {"tiny": False})
    if a["tiny"]:
        c = ldm_common.tiny_task("vq", keys=("segmentation",))
        z = c.first_stage.model.embed_dim
        c.unet = ldm_common.tiny_unet(z + 3, z, use_spatial_transformer=False)
        c.conditioning = ldm_common.conditioning(concat="segmentation")
        c.conditioning.update(segmentation_classes=31, concat_channels=3)
        return c
    c = ldm_common.base(lr=4.8e-5, batch_size=48, num_train_steps=360_000, tiny=False)
    c.dataset_hint = ("Flickr landscapes with COCO-Stuff label maps: a TFDS dataset with 'image' and "
                      "'segmentation' (uint8 HxWx1, class ids 0..181) features")
    c.data.keys = ("segmentation",)
    c.data.random_crop = True
    c.diffusion = ldm_common.compvis_diffusion(beta_end=0.0205)
    c.first_stage = ldm_common.first_stage("vq", 8)
    c.unet = ldm_common.unet(in_channels=7, out_channels=4, model_channels=128, channel_mult=(1, 4, 8),
                             attention_resolutions=(), num_res_blocks=2, num_heads=8, use_spatial_transformer=False)
    c.conditioning = ldm_common.conditioning(concat="segmentation")
    c.conditioning.update(segmentation_classes=182, concat_channels=3)
    return c
