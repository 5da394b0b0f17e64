"""KL-regularised autoencoders (paper Sec. 3.1, Table 8; CompVis models/first_stage_models/kl-f*).

Usage: --config=configs/autoencoder_kl.py:f=8   (f in 4, 8, 16, 32)
       --config=configs/autoencoder_kl.py:tiny  (f=4 on 64x64 shapes, trains on one CPU)
"""
import ml_collections

from configs import common

# Downsampling factor -> (z_channels = embed_dim, ch_mult, attn_resolutions) of the reference configs.
KL_MODELS = {
    4: (3, (1, 2, 4), ()),
    8: (4, (1, 2, 4, 4), ()),
    16: (16, (1, 1, 2, 2, 4), (16,)),
    32: (64, (1, 1, 2, 2, 4, 4), (16, 8)),
}


def model(f: int, *, ch=128, num_res_blocks=2, resolution=256, z=None, dtype="float32"):
    if f not in KL_MODELS:
        raise ValueError(f"autoencoder_kl: f must be one of {sorted(KL_MODELS)}, got {f}")
    z_ch, ch_mult, attn = KL_MODELS[f]
    z_ch = z or z_ch
    return ml_collections.ConfigDict(dict(
        kind="kl", ch=ch, ch_mult=ch_mult, num_res_blocks=num_res_blocks, attn_resolutions=attn,
        z_channels=z_ch, embed_dim=z_ch, resolution=resolution, in_channels=3, out_ch=3, dropout=0.0,
        double_z=True, num_groups=32, dtype=dtype, param_dtype="float32", remat=False))


def loss(**kw):
    cfg = ml_collections.ConfigDict(dict(
        kl_weight=1e-6, logvar_init=0.0, learn_logvar=True, perceptual_weight=1.0,
        lpips_vgg="", lpips_lin="",               # files; without them the perceptual term is off
        disc_start=50001, disc_weight=0.5, disc_factor=1.0, disc_loss="hinge",
        disc_num_layers=3, disc_ndf=64, codebook_weight=1.0))
    cfg.update(kw)
    return cfg


def get_config(arg=None):
    a = common.parse_arg(arg, {"f": 0, "tiny": False})
    f = a["f"] or (4 if a["tiny"] else 8)
    c = common.base("autoencoder")
    if a["tiny"]:
        # Sized for a 2-core CPU: about 0.2 s a step, >= 28 dB held-out PSNR at f=4 on 64x64 shapes
        # in about 12 minutes (BENCHMARKS.md). GroupNorm with 4 channels a group as at full size.
        c.model = model(f, ch=16, num_res_blocks=1, resolution=64)
        c.model.num_groups = 4
        c.loss = loss(disc_start=100000)
        c.optim = common.optimizer(2e-3, name="adam", b1=0.9, b2=0.99, warmup_steps=100,
                                   schedule="cosine", decay_steps=3000, end_lr_factor=0.05)
        c.disc_optim = common.optimizer(2e-3, name="adam", b1=0.5, b2=0.9)
        c.batch_size = 8
        c.eval_batch_size = 32
        c.num_train_steps = 3000
        c.log_every = 100
        c.eval_every = 1000
        c.num_eval_batches = 8
        c.checkpoint.every = 500
        c.data.resolution = 64
    else:
        c.model = model(f)
        c.loss = loss()
        # base_learning_rate 4.5e-6 scaled by the global batch, as the reference trainer does.
        c.batch_size = 96
        c.optim = common.optimizer(4.5e-6 * c.batch_size, name="adam", b1=0.5, b2=0.9)
        c.disc_optim = common.optimizer(4.5e-6 * c.batch_size, name="adam", b1=0.5, b2=0.9)
        c.num_train_steps = 500_000
        c.eval_every = 5000
        c.log_every = 100
        c.checkpoint.every = 5000
        c.data = common.data(name="", resolution=256, random_crop=True)
        c.dataset_hint = "the paper trains its autoencoders on OpenImages at 256x256"
    return c
