"""VQ-regularised autoencoders (paper Sec. 3.1, Table 8; CompVis models/first_stage_models/vq-f*).

Usage: --config=configs/autoencoder_vq.py:f=4   (f in 4, 8, 16)
       --config=configs/autoencoder_vq.py:tiny
"""
import ml_collections

from configs import autoencoder_kl, common

# f -> (z_channels = embed_dim, n_embed, ch_mult, attn_resolutions, disc_start, disc_num_layers)
VQ_MODELS = {
    4: (3, 8192, (1, 2, 4), (), 0, 3),
    8: (4, 16384, (1, 2, 2, 4), (32,), 250001, 2),
    16: (8, 16384, (1, 1, 2, 2, 4), (16,), 250001, 3),
}


def model(f: int, *, ch=128, num_res_blocks=2, resolution=256, n_embed=None, dtype="float32"):
    if f not in VQ_MODELS:
        raise ValueError(f"autoencoder_vq: f must be one of {sorted(VQ_MODELS)}, got {f}")
    z_ch, n, ch_mult, attn, _, _ = VQ_MODELS[f]
    return ml_collections.ConfigDict(dict(
        kind="vq", ch=ch, ch_mult=ch_mult, num_res_blocks=num_res_blocks, attn_resolutions=attn,
        z_channels=z_ch, embed_dim=z_ch, n_embed=n_embed or n, beta=0.25, resolution=resolution,
        in_channels=3, out_ch=3, dropout=0.0, double_z=False, num_groups=32, dtype=dtype,
        param_dtype="float32", remat=False))


def get_config(arg=None):
    a = common.parse_arg(arg, {"f": 4, "tiny": False})
    c = autoencoder_kl.get_config("tiny" if a["tiny"] else None)
    if a["f"] not in VQ_MODELS:
        raise ValueError(f"autoencoder_vq: f must be one of {sorted(VQ_MODELS)}, got {a['f']}")
    _, _, _, _, disc_start, disc_layers = VQ_MODELS[a["f"]]
    if a["tiny"]:
        c.model = model(a["f"], ch=32, num_res_blocks=1, resolution=64, n_embed=256)
        c.model.num_groups = 8
        c.loss = autoencoder_kl.loss(disc_start=100000, disc_weight=0.75)
    else:
        c.model = model(a["f"])
        c.loss = autoencoder_kl.loss(disc_start=disc_start, disc_weight=0.75, disc_num_layers=disc_layers)
    return c
