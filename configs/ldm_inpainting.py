"""Inpainting LDM-VQ-4 on Places at 256x256 (paper Table 15, "Inpainting"; Sec. 4.5).

  --config=configs/ldm_inpainting.py       z 64x64x3 (VQ f=4, 8192 codes); the latents of the masked
                                           image and the mask (resized to 64x64) are concatenated to the
                                           noisy latents (in_channels 3+3+1); 128 channels, mult 1,4,8,
                                           self-attention (CompVis AttentionBlock) in the middle block,
                                           1 head (UNet 215M parameters, as Table 15); batch 128,
                                           lr 1e-6 (as Table 15 prints it), 360k steps.
  --config=configs/ldm_inpainting.py:tiny  inpainting 64x64 shapes on a CPU, with random box and stroke
                                           masks; needs a tiny VQ stage-1 run (configs/autoencoder_vq.py:tiny)
                                           in --config.first_stage.workdir (default runs/ae_vq_tiny).

Table 15 prints 1e-6 here, where the other columns print the effective rate (the CompVis base rate
times the batch size): if 1e-6 is the base rate, the effective one is 1.28e-4
(--config.optim.lr=1.28e-4). Masks are drawn on the host (data/preprocess.random_inpaint_mask).

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
        c.unet = ldm_common.tiny_unet(2 * z + 1, z, use_spatial_transformer=False)
        c.conditioning = ldm_common.conditioning(concat="inpaint")
        return c
    c = ldm_common.base(lr=1e-6, batch_size=128, num_train_steps=360_000, tiny=False)
    c.dataset_hint = "Places365 (TFDS places365_small, 256x256) with an 'image' feature"
    c.data.keys = ()
    c.data.random_crop = True
    c.diffusion = ldm_common.compvis_diffusion(beta_end=0.0205)
    c.first_stage = ldm_common.first_stage("vq", 4)
    # Table 15 lists no attention resolutions for the concat models: only the middle block attends.
    c.unet = ldm_common.unet(in_channels=7, out_channels=3, model_channels=128, channel_mult=(1, 4, 8),
                             attention_resolutions=(), num_res_blocks=2, num_heads=1, use_spatial_transformer=False)
    c.conditioning = ldm_common.conditioning(concat="inpaint")
    return c
