"""Layout-to-image LDMs (paper Table 15, "Layout-to-Image"; Sec. 4.3.1).

  --config=configs/ldm_layout.py        OpenImages: z 64x64x3 (VQ f=4, 8192 codes), 128 channels,
                                        mult 1,2,3,4, cross-attention at 32,16,8 (32 channels per head),
                                        transformer depth 3, context 512 from a 16-layer transformer over
                                        the layout tokens; batch 24, lr 4.8e-5, 4.4M steps.
  --config=configs/ldm_layout.py:coco   COCO: z 32x32x4 (VQ f=8, 16384 codes), 192 channels, mult 1,2,4,
                                        cross-attention at 32,16,8 with 1 head, transformer depth 2,
                                        dropout 0.1; batch 48, lr 4.8e-5, 170k steps.
  --config=configs/ldm_layout.py:tiny   boxes + labels of 64x64 shapes (30 classes) on a CPU; needs a
                                        tiny VQ stage-1 run (configs/autoencoder_vq.py:tiny) in
                                        --config.first_stage.workdir (default runs/ae_vq_tiny).

A layout is a token sequence [BOS, (label, x0, y0, x1, y1) per box] (models/conditioning.py:
layout_tokens) with coordinates quantised to conditioning.layout.bins; the reference tokenises
boxes differently (3 tokens per box), so its checkpoints do not load. Set
conditioning.layout.num_classes to the dataset's box classes. The OpenImages head size follows
the released layout2img-openimages256 model (Table 15 prints 1 head).

First stage (full size): --config.first_stage.checkpoint=<CompVis vq-f4 model.ckpt; vq-f8 for :coco>
--config.first_stage.scale_factor=1.0, or --config.first_stage.workdir=<a configs/autoencoder_vq.py:f=4
(f=8) run of ours> (its scale factor comes with it). Without one the run stops at start naming these options.
"""
from configs import common, ldm_common


def _layout_encoder(c, *, num_classes, max_objects, bins, width, depth, heads, head_dim):
    c.conditioning = ldm_common.conditioning(crossattn="layout")
    c.conditioning.layout.update(num_classes=num_classes, max_objects=max_objects, bins=bins)
    c.conditioning.layout.model.update(width=width, depth=depth, heads=heads, head_dim=head_dim)
    c.data.max_objects = max_objects


def get_config(arg=None):
    a = common.parse_arg(arg, {"tiny": False, "coco": False})
    if a["tiny"]:
        c = ldm_common.tiny_task("vq", keys=("objects",))
        z = c.first_stage.model.embed_dim
        c.unet = ldm_common.tiny_unet(z, z, context_dim=64, dropout=0.1 if a["coco"] else 0.0)
        _layout_encoder(c, num_classes=30, max_objects=4, bins=32, width=64, depth=2, heads=4, head_dim=16)
        return c
    if a["coco"]:
        c = ldm_common.base(lr=4.8e-5, batch_size=48, num_train_steps=170_000, tiny=False)
        c.dataset_hint = "COCO 2017 (TFDS coco/2017) with 'image' and 'objects' (bbox, label) features"
        c.first_stage = ldm_common.first_stage("vq", 8)
        c.unet = ldm_common.unet(in_channels=4, out_channels=4, model_channels=192, channel_mult=(1, 2, 4),
                                 attention_resolutions=ldm_common.attention_factors(32, (32, 16, 8)),
                                 num_res_blocks=2, num_heads=1, transformer_depth=2, context_dim=512,
                                 dropout=0.1)
        num_classes = 80
    else:
        c = ldm_common.base(lr=4.8e-5, batch_size=24, num_train_steps=4_400_000, tiny=False)
        c.dataset_hint = ("OpenImages boxes (TFDS open_images_v4) with 'image' and 'objects' (bbox, label) "
                          "features")
        c.first_stage = ldm_common.first_stage("vq", 4)
        c.unet = ldm_common.unet(in_channels=3, out_channels=3, model_channels=128, channel_mult=(1, 2, 3, 4),
                                 attention_resolutions=ldm_common.attention_factors(64, (32, 16, 8)),
                                 num_res_blocks=2, num_head_channels=32, transformer_depth=3, context_dim=512)
        num_classes = 601
    c.data.keys = ("objects",)
    c.diffusion = ldm_common.compvis_diffusion(beta_end=0.0205)
    # The reference layout encoder: 16 x-transformers layers of width 512 (8 heads of 64).
    _layout_encoder(c, num_classes=num_classes, max_objects=30, bins=64, width=512, depth=16, heads=8,
                    head_dim=64)
    return c
