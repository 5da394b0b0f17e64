"""Class-conditional LDM-VQ-4 on ImageNet at 256x256 (paper Table 15, "Class-Label-to-Image").

  --config=configs/ldm_cin.py       z 64x64x3 (VQ f=4, 8192 codes), 192 channels, mult 1,2,3,5,
                                    attention at 32,16,8 with 1 head, transformer depth 1;
                                    batch 1200, lr 1e-4, 178k steps; 1000 classes (+1 null label
                                    for classifier-free guidance).
  --config=configs/ldm_cin.py:tiny  the 30 shape classes of 64x64 shapes on a CPU; needs a tiny VQ
                                    stage-1 run (configs/autoencoder_vq.py:tiny) in
                                    --config.first_stage.workdir (default runs/ae_vq_tiny).

As in CompVis cin256-v2, the label conditions through cross-attention (conditioning.crossattn
'class'): a learned 512-d class embedding, trained with the UNet, is a context of length 1. Its
extra row (index num_classes) is the null class: conditioning.dropout.class_label of the training
labels are replaced by it, and guidance samples against it.

First stage (full size): --config.first_stage.checkpoint=<CompVis vq-f4 model.ckpt>
--config.first_stage.scale_factor=1.0, or --config.first_stage.workdir=<a configs/autoencoder_vq.py:f=4
run of ours> (its scale factor comes with it). Without one the run stops at start naming these options.
"""
from configs import common, ldm_common


def class_conditioning(num_classes: int, unet):
    c = ldm_common.conditioning(crossattn="class")
    c.num_classes = num_classes          # labels 0..num_classes-1; num_classes is the null class
    # The context width is the UNet's context_dim: one value, so overriding either changes both.
    c.class_embed_dim = unet.get_ref("context_dim")
    return c


def get_config(arg=None):
    a = common.parse_arg(arg, {"tiny": False})
    if a["tiny"]:
        c = ldm_common.tiny_task("vq", keys=("label",))
        z = c.first_stage.model.embed_dim
        c.unet = ldm_common.tiny_unet(z, z, context_dim=64)
        c.conditioning = class_conditioning(30, c.unet)
        return c
    c = ldm_common.base(lr=1e-4, batch_size=1200, num_train_steps=178_000, tiny=False)
    c.dataset_hint = "ImageNet (TFDS imagenet2012) with 'image' and 'label' features"
    c.data.keys = ("label",)
    c.diffusion = ldm_common.compvis_diffusion(beta_end=0.0195)
    c.first_stage = ldm_common.first_stage("vq", 4)
    c.unet = ldm_common.unet(in_channels=3, out_channels=3, model_channels=192, channel_mult=(1, 2, 3, 5),
                             attention_resolutions=ldm_common.attention_factors(64, (32, 16, 8)),
                             num_res_blocks=2, num_heads=1, transformer_depth=1, context_dim=512)
    c.conditioning = class_conditioning(1000, c.unet)
    return c
