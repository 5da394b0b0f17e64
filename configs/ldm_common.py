"""Shared pieces of the latent diffusion configs (paper Tables 12-15)."""
from __future__ import annotations

import ml_collections

from configs import autoencoder_kl, autoencoder_vq, common
from latent_diffusion import config_fields


def unet(*, in_channels, out_channels, model_channels, channel_mult, attention_resolutions, num_res_blocks=2,
         num_heads=-1, num_head_channels=-1, transformer_depth=1, context_dim=None, num_classes=None,
         dropout=0.0, use_linear_in_transformer=False, use_scale_shift_norm=False, legacy=True,
         use_spatial_transformer=True, resblock_updown=False, dtype="float32", remat="none"):
    """UNet fields; use_spatial_transformer=False gives CompVis' AttentionBlock (no cross-attention).
    remat: 'none', 'full' or 'dots' (models/unet.py REMAT_POLICIES), a str so the command line can pick one."""
    return ml_collections.ConfigDict(dict(
        in_channels=in_channels, out_channels=out_channels, model_channels=model_channels,
        channel_mult=tuple(channel_mult), attention_resolutions=tuple(attention_resolutions),
        num_res_blocks=num_res_blocks, num_heads=num_heads, num_head_channels=num_head_channels,
        transformer_depth=transformer_depth,
        context_dim=ml_collections.FieldReference(context_dim, field_type=int),
        num_classes=ml_collections.FieldReference(num_classes, field_type=int),
        dropout=dropout, use_linear_in_transformer=use_linear_in_transformer,
        use_scale_shift_norm=use_scale_shift_norm, legacy=legacy, use_spatial_transformer=use_spatial_transformer,
        resblock_updown=resblock_updown, dtype=dtype, param_dtype="float32", remat=remat,
        # None: XLA's attention; 'cudnn': the fused flash kernel on NVIDIA GPUs (bfloat16/float16 dtype).
        attention_impl=ml_collections.FieldReference(None, field_type=str)))


def first_stage(kind: str, f: int, *, tiny: bool = False, scale_factor: float = 0.0, workdir: str = ""):
    """Where the frozen autoencoder comes from; `model` is used for converted checkpoints and tests."""
    if tiny:
        model = (autoencoder_kl if kind == "kl" else autoencoder_vq).get_config(f"tiny,f={f}").model
    else:
        model = (autoencoder_kl if kind == "kl" else autoencoder_vq).model(f)
    return ml_collections.ConfigDict(dict(
        workdir=workdir,            # a stage-1 workdir (params + scale factor), or
        checkpoint="",              # a diffusers folder / CompVis .ckpt or .safetensors (then set scale_factor)
        use_ema=True, scale_factor=scale_factor, random_init=False, model=model))


def conditioning(crossattn="none", concat="none", class_label=False):
    return ml_collections.ConfigDict(dict(
        crossattn=crossattn,        # 'none' | 'text' | 'layout'
        concat=concat,              # 'none' | 'lowres' | 'inpaint' | 'segmentation'
        class_label=class_label,    # label embedding added to the time embedding (unet.num_classes)
        concat_channels=0,          # >0: learned 1x1 map of the concatenated input to this many channels
        lowres_factor=4, segmentation_classes=31,
        text=ml_collections.ConfigDict(dict(
            encoder="bert", tokenizer="builtin:shapes", max_length=77, checkpoint="", penultimate=False,
            vocab_size=0,           # 0: the tokenizer's; set it to describe a model without its tokenizer
            model=ml_collections.ConfigDict(dict(width=1280, depth=32, heads=8, head_dim=64)))),
        layout=ml_collections.ConfigDict(dict(
            num_classes=30, bins=64, max_objects=4,
            model=ml_collections.ConfigDict(dict(width=512, depth=16, heads=8, head_dim=64)))),
        # Probability of replacing each condition by its null version (classifier-free guidance).
        dropout=ml_collections.ConfigDict(dict(text=0.1, layout=0.1, class_label=0.1)),
    ))


def diffusion(schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, prediction_type="eps"):
    return ml_collections.ConfigDict(dict(
        schedule=schedule, beta_start=beta_start, beta_end=beta_end, num_timesteps=1000,
        prediction_type=prediction_type, weighting="simple", snr_gamma=5.0))


def base(*, lr: float, batch_size: int, num_train_steps: int, tiny: bool):
    c = common.base("ldm")
    c.diffusion = diffusion()
    c.ema.enabled = True
    c.sample = ml_collections.ConfigDict(dict(sampler="ddim", steps=20, guidance_scale=3.0, num_images=8))
    # Shapes text-to-image runs: held-out prompts sampled and read by the shapes judge at each evaluation
    # (latent_diffusion/evaluation/shapes_eval.py); num_prompts of each kind (one shape, two shapes), 0 = off.
    c.sample.prompt_score = ml_collections.ConfigDict(dict(num_prompts=0, steps=20, guidance=3.0))
    # CompVis trains with AdamW (torch default weight decay 0.01) and 10k warm-up steps.
    c.optim = common.optimizer(lr, name="adamw", weight_decay=0.01, warmup_steps=100 if tiny else 10_000)
    c.batch_size = batch_size
    c.num_train_steps = num_train_steps
    if tiny:
        c.eval_batch_size, c.num_eval_batches = 16, 2
        c.log_every, c.eval_every, c.checkpoint.every = 50, 500, 500
        c.data.keys = ("caption", "label", "objects", "segmentation")
    else:
        c.eval_batch_size, c.num_eval_batches = batch_size, 10
        c.log_every, c.eval_every, c.checkpoint.every = 100, 10_000, 5_000
        c.data = common.data(name="", resolution=256, random_crop=False)
    # Fine-tuning: a fresh run starts from imported weights (ignored when a run resumes its own checkpoint).
    c.init = config_fields.config_dict(config_fields.INIT, "init")
    return c


def tiny_unet(in_channels, out_channels, **kw):
    """A UNet small enough to train on 16x16 shape latents on a CPU."""
    args = dict(model_channels=32, channel_mult=(1, 2), attention_resolutions=(2,), num_res_blocks=1,
                num_head_channels=16)
    args.update(kw)
    return unet(in_channels=in_channels, out_channels=out_channels, **args)


# --- helpers for the per-task configs (configs/ldm_*.py, sd_v*.py) ---------------------------

def attention_factors(latent_size: int, resolutions) -> tuple:
    """The paper's attention resolutions (pixels of the latent grid) as the UNet's downsample factors."""
    out = []
    for r in resolutions:
        if latent_size % r:
            raise ValueError(f"attention resolution {r} does not divide the latent size {latent_size}")
        out.append(latent_size // r)
    return tuple(sorted(out))


def compvis_diffusion(beta_end=0.0195, prediction_type="eps"):
    """The CompVis 'linear' schedule (sqrt-linear = our 'scaled_linear') from 0.0015, as the LDM configs use."""
    return diffusion(schedule="scaled_linear", beta_start=0.0015, beta_end=beta_end,
                     prediction_type=prediction_type)


def tiny_task(kind: str, keys=(), *, lr=2e-4, num_train_steps=3000, batch_size=16):
    """A shapes-sized LDM run: 64x64 shapes, the tiny stage-1 run of `kind` ('kl' or 'vq') as first stage.

    The first stage is f=4 (16x16 latents) whatever f the full config uses: train it with
    configs/autoencoder_kl.py:tiny (runs/ae_kl_tiny) or configs/autoencoder_vq.py:tiny (runs/ae_vq_tiny).
    """
    c = base(lr=lr, batch_size=batch_size, num_train_steps=num_train_steps, tiny=True)
    c.first_stage = first_stage(kind, 4, tiny=True, workdir=f"runs/ae_{kind}_tiny")
    c.data.resolution = 64
    c.data.keys = tuple(keys)
    c.conditioning = conditioning()
    return c
