"""Stage 2: the latent diffusion model (paper Sec. 3.2-3.3), trained by the same loop as stage 1.

The first stage is frozen (see first_stage.py). Conditions come from the batch: a caption
(text, through a jointly trained BERT-style encoder or a frozen CLIP), boxes and labels
(layout tokens), a class label (crossattn 'class': a jointly trained embedding that is the
cross-attention context, as in the paper's ImageNet model; or class_label: an embedding added to
the time embedding), or a spatial input concatenated to the latents (low-resolution image,
masked image + mask, segmentation map). Each condition can be dropped per example for
classifier-free guidance; a dropped class label becomes the null class (index num_classes).
With data.latents_dir the batches hold the first stage's stored posterior (scripts/precompute_latents.py)
and x0 is sampled from it, with the same key, instead of encoding the image every step.
"""
from __future__ import annotations


import jax
import jax.numpy as jnp
import numpy as np
import optax

from latent_diffusion.data import preprocess
from latent_diffusion.diffusion import objectives, schedules
from latent_diffusion.models import build, conditioning
from latent_diffusion.training import first_stage as first_stage_lib
from latent_diffusion.training.optimizers import did_update, make_optimizer
from latent_diffusion.training.state import TrainState, ema_step

CROSSATTN = ("none", "text", "layout", "class")
CONCAT = ("none", "lowres", "inpaint", "segmentation")
NUM_BUCKETS = 10


class HostConditions:
    """Per-example host work: tokenize captions, tokenize layouts, make low-res inputs and masks."""

    def __init__(self, cond_cfg, tokenizer, image_key: str = "image"):
        self.cfg = cond_cfg
        self.tokenizer = tokenizer
        self.image_key = image_key

    def random_map(self, element: dict, rng: np.random.Generator) -> dict:
        cfg = self.cfg
        out = dict(element)
        if cfg.crossattn == "text":
            out["tokens"] = self.tokenizer([str(element["caption"])])[0]
        if cfg.crossattn == "layout":
            obj = element["objects"]
            out["layout"] = conditioning.layout_tokens(
                obj["bbox"][None], obj["label"][None], obj["mask"][None], num_classes=cfg.layout.num_classes,
                bins=cfg.layout.bins, max_objects=cfg.layout.max_objects)[0]
        if cfg.concat == "lowres":
            out["lowres"] = preprocess.lowres(element[self.image_key], int(cfg.lowres_factor)).astype(np.float32)
        if cfg.concat == "inpaint":
            image = element[self.image_key]
            out["mask"] = preprocess.random_inpaint_mask(rng, image.shape[0], image.shape[1])
        for key in ("caption", "objects"):
            out.pop(key, None)
        return out


class LDMTask:
    def __init__(self, config, mesh, workdir: str, abstract: bool = False):
        """`abstract`: the first stage (and a frozen CLIP) as shapes only, for describing the model."""
        self.config = config
        c = config.conditioning
        if c.crossattn not in CROSSATTN or c.concat not in CONCAT:
            raise ValueError(f"conditioning.crossattn must be one of {CROSSATTN} and conditioning.concat one "
                             f"of {CONCAT}; got {c.crossattn!r} / {c.concat!r}")
        self.first_stage = first_stage_lib.load(config.first_stage, mesh, abstract=abstract)
        self.unet = build.unet(config.unet)
        d = config.diffusion
        self.schedule = schedules.make_schedule(d.schedule, d.num_timesteps, d.beta_start, d.beta_end)
        self.prediction_type = objectives.canonical_prediction_type(d.prediction_type)
        self.tokenizer = None
        self._clip, self._clip_params = None, None
        text_kwargs = None
        if c.crossattn == "text":
            from latent_diffusion.data.tokenizers import make_tokenizer
            vocab = int(c.text.get("vocab_size", 0))
            if abstract and not vocab:
                raise ValueError("describing a model without its tokenizer needs conditioning.text.vocab_size")
            if not abstract:
                self.tokenizer = make_tokenizer(c.text.tokenizer, int(c.text.max_length))
                if vocab and vocab != self.tokenizer.vocab_size:
                    raise ValueError(f"conditioning.text.vocab_size is {vocab} but the tokenizer "
                                     f"{c.text.tokenizer!r} has {self.tokenizer.vocab_size} tokens")
                vocab = self.tokenizer.vocab_size
            if c.text.encoder == "bert":
                text_kwargs = dict(c.text.model.to_dict(), vocab_size=vocab, max_length=int(c.text.max_length))
            elif c.text.encoder == "clip":
                self._clip, self._clip_params = self._load_clip(c.text, mesh, abstract)
            else:
                raise ValueError(f"conditioning.text.encoder must be 'bert' or 'clip', got {c.text.encoder!r}")
        layout_kwargs = None
        if c.crossattn == "layout":
            layout_kwargs = dict(c.layout.model.to_dict(), max_length=1 + 5 * int(c.layout.max_objects),
                                 vocab_size=conditioning.layout_vocab_size(c.layout.num_classes, c.layout.bins))
        class_kwargs = None
        if c.crossattn == "class":
            class_kwargs = dict(num_classes=int(c.get("num_classes", 0) or 0),
                                features=int(c.get("class_embed_dim", 0) or 0))
        dtype = build.dtype_of(config.unet.dtype)
        self.cond_module = conditioning.Conditioner(
            text=text_kwargs, layout=layout_kwargs, classes=class_kwargs,
            concat_channels=int(c.concat_channels) or None, dtype=dtype)
        self.tx = make_optimizer(config.optim)
        self._check_channels()
        self.latents_dir = str(config.data.get("latents_dir", "") or "")
        if self.latents_dir and c.concat in ("lowres", "inpaint"):
            raise ValueError(f"data.latents_dir is not supported yet for conditioning.concat={c.concat!r} (its "
                             "condition is computed from the image every step): set --config.data.latents_dir=")
        self._latents_checked = False
        self._sample_batch = None
        self._sample_fn = None

    # --- set-up -----------------------------------------------------------------------------
    @staticmethod
    def _load_clip(text_cfg, mesh, abstract=False):
        from latent_diffusion.training import partitioning
        if abstract:
            module = build.clip_text_encoder(text_cfg.model)
            ids = jnp.zeros((1, module.max_length), jnp.int32)
            return module, jax.eval_shape(lambda r: module.init(r, ids), jax.random.key(0))["params"]
        if not text_cfg.checkpoint:
            raise ValueError("a frozen CLIP text encoder needs weights: set conditioning.text.checkpoint to a "
                             "transformers CLIPTextModel folder (config.json + model.safetensors), or use "
                             "conditioning.text.encoder='bert' to train a text encoder jointly")
        import json
        import os
        from latent_diffusion import convert
        folder = text_cfg.checkpoint
        with open(os.path.join(folder, "config.json")) as f:
            hf_config = json.load(f)
        weights = next(os.path.join(folder, n) for n in ("model.safetensors", "pytorch_model.bin")
                       if os.path.exists(os.path.join(folder, n)))
        module, params = convert.from_transformers(hf_config, weights)
        if text_cfg.get("penultimate", False):
            module = module.replace(output_layer=-2)
        params = jax.device_put(params, jax.tree.map(lambda _: partitioning.replicated(mesh), params))
        return module, params

    def concat_channels(self) -> int:
        c = self.config.conditioning
        if c.concat == "none":
            return 0
        if c.concat_channels:
            return int(c.concat_channels)
        return {"lowres": 3, "inpaint": self.first_stage.latent_channels + 1,
                "segmentation": int(c.segmentation_classes)}[c.concat]

    def _check_channels(self):
        need = self.first_stage.latent_channels + self.concat_channels()
        if self.config.unet.in_channels != need:
            raise ValueError(f"unet.in_channels is {self.config.unet.in_channels} but the latents have "
                             f"{self.first_stage.latent_channels} channels and the concatenated condition "
                             f"{self.concat_channels()}: set --config.unet.in_channels={need}")
        if self.config.unet.out_channels != self.first_stage.latent_channels:
            raise ValueError(f"unet.out_channels must be the latent channels "
                             f"{self.first_stage.latent_channels}, got {self.config.unet.out_channels}")
        c, unet = self.config.conditioning, self.config.unet
        if c.class_label and not unet.num_classes:
            raise ValueError("conditioning.class_label needs unet.num_classes")
        if c.crossattn == "class":
            if c.class_label:
                raise ValueError("conditioning.crossattn='class' and conditioning.class_label both condition on "
                                 "the label: set one (class_label=False for the paper's cross-attention model)")
            if not c.get("num_classes") or not c.get("class_embed_dim"):
                raise ValueError("conditioning.crossattn='class' needs conditioning.num_classes (the labels, "
                                 "without the null class) and conditioning.class_embed_dim (the context width)")
            if unet.context_dim != c.class_embed_dim:
                raise ValueError(f"unet.context_dim is {unet.context_dim} but the class embedding has "
                                 f"conditioning.class_embed_dim={c.class_embed_dim}: set "
                                 f"--config.unet.context_dim={c.class_embed_dim}")

    def _check_latents(self):
        """Refuses stored latents (config.data.latents_dir) made by another first stage or at another size."""
        from latent_diffusion.data import latents
        d = self.config.data
        identity = latents.first_stage_identity(self.first_stage, self.config.first_stage)
        for split in dict.fromkeys((d.train_split, d.eval_split)):
            meta = latents.read_metadata(self.latents_dir, split)
            where = latents.split_dir(self.latents_dir, split)
            latents.check_first_stage(meta, identity, where)
            res = d.get("resolution")
            want = [res // self.first_stage.downsample] * 2 + [self.first_stage.latent_channels] if res else None
            if want and list(meta["latent_shape"]) != want:
                raise ValueError(f"the latents in {where} have shape {meta['latent_shape']}, this run needs {want} "
                                 f"(data.resolution={res}): precompute them at this resolution")

    @property
    def num_classes(self):
        """The number of real class labels of a class-conditional model (the null class is this index)."""
        c = self.config.conditioning
        if c.crossattn == "class":
            return int(c.num_classes)
        return int(self.config.unet.num_classes) if c.class_label else None

    def frozen(self):
        out = {"first_stage": self.first_stage.params}
        if self._clip is not None:
            out["clip"] = self._clip_params
        return out

    def host_transforms(self):
        # Only the training loop asks for loader transforms, so the stored latents are checked here, before
        # the first batch, and not when sample.py rebuilds the task from a run's config.
        if self.latents_dir and not self._latents_checked:
            self._check_latents()
            self._latents_checked = True
        return (HostConditions(self.config.conditioning, self.tokenizer, "image"),)

    # --- conditions -------------------------------------------------------------------------
    @staticmethod
    def batch_size_of(batch):
        return jax.tree.leaves(batch)[0].shape[0]

    def batch_latent_size(self, batch):
        """The latent grid of a batch of images, or of stored latents (data.latents_dir)."""
        for key in ("z_mean", "z"):
            if key in batch:
                return tuple(batch[key].shape[1:3])
        return self.latent_size(batch["image"].shape[1:3])

    def latents_of(self, frozen, batch, rng):
        """Scaled x0 for the diffusion model: encoded from the image, or sampled from stored moments."""
        fs = self.first_stage
        if "z_mean" in batch:  # the same draw as DiagonalGaussian.sample with the same key
            mean = batch["z_mean"].astype(jnp.float32)
            z = mean + batch["z_std"].astype(jnp.float32) * jax.random.normal(rng, mean.shape, mean.dtype)
            return z * fs.scale_factor
        if "z" in batch:
            return batch["z"].astype(jnp.float32) * fs.scale_factor
        return fs.encode(frozen["first_stage"], batch["image"], rng)

    def latent_size(self, image_hw):
        f = self.first_stage.downsample
        return image_hw[0] // f, image_hw[1] // f

    def null_tokens(self, batch_size):
        c = self.config.conditioning
        if c.crossattn == "text":
            return jnp.broadcast_to(jnp.asarray(self.tokenizer.empty), (batch_size, int(c.text.max_length)))
        if c.crossattn == "layout":
            empty = np.zeros((1 + 5 * int(c.layout.max_objects),), np.int32)
            empty[0] = 1
            return jnp.broadcast_to(jnp.asarray(empty), (batch_size, empty.shape[0]))
        return None

    def raw_conditions(self, batch, frozen, rng, drop: bool):
        """The batch's condition inputs (tokens, labels, concat), with CFG dropout when `drop`."""
        c = self.config.conditioning
        b = self.batch_size_of(batch)
        keys = jax.random.split(rng, 4)
        out = {}
        key = {"text": "tokens", "layout": "layout"}.get(c.crossattn)
        if key:
            tokens = batch[key]
            p = float(c.dropout.get(c.crossattn, 0.0))
            if drop and p > 0:
                gone = jax.random.bernoulli(keys[0], p, (b,))
                tokens = jnp.where(gone[:, None], self.null_tokens(b), tokens)
            out["tokens"] = tokens
        if c.class_label or c.crossattn == "class":
            y = batch["label"].astype(jnp.int32)
            p = float(c.dropout.get("class_label", 0.0))
            if drop and p > 0:
                y = jnp.where(jax.random.bernoulli(keys[1], p, (b,)), self.num_classes, y)
            # 'y' goes to the UNet's time embedding, 'class' through the class embedder to cross-attention.
            out["y" if c.class_label else "class"] = y
        if c.concat == "lowres":
            out["spatial"] = batch["lowres"]
        elif c.concat == "inpaint":
            mask = batch["mask"]
            masked = batch["image"] * (1.0 - mask)
            z_masked = self.first_stage.encode(frozen["first_stage"], masked, keys[2])
            lat = z_masked.shape[1:3]
            m = jax.image.resize(mask, (b,) + tuple(lat) + (1,), method="nearest")
            out["spatial"] = jnp.concatenate([z_masked, m], axis=-1)
        elif c.concat == "segmentation":
            seg = batch["segmentation"][..., 0].astype(jnp.int32)
            out["spatial"] = jax.nn.one_hot(seg, int(c.segmentation_classes), dtype=jnp.float32)
        return out

    def unet_inputs(self, cond_params, frozen, raw, latent_hw):
        """Raw conditions -> {'context', 'y', 'concat'} as the UNet takes them."""
        c = self.config.conditioning
        out = {}
        if "tokens" in raw:
            if c.crossattn == "text" and self._clip is not None:
                ctx, _ = self._clip.apply({"params": frozen["clip"]}, raw["tokens"])
                out["context"] = jax.lax.stop_gradient(ctx)
            elif c.crossattn == "text":
                out["context"] = self.cond_module.apply({"params": cond_params}, raw["tokens"],
                                                        method="encode_text")
            else:
                out["context"] = self.cond_module.apply({"params": cond_params}, raw["tokens"],
                                                        method="encode_layout")
        if "class" in raw:
            out["context"] = self.cond_module.apply({"params": cond_params}, raw["class"], method="encode_class")
        if "y" in raw:
            out["y"] = raw["y"]
        if "spatial" in raw:
            sp = raw["spatial"]
            if c.concat == "inpaint" and not c.concat_channels:
                out["concat"] = sp  # already on the latent grid
            else:
                out["concat"] = self.cond_module.apply({"params": cond_params}, sp, tuple(latent_hw),
                                                       method="rescale")
        return out

    def apply_unet(self, unet_params, x_t, t, inputs, deterministic=True, rng=None):
        x = x_t
        if "concat" in inputs:
            x = jnp.concatenate([x_t, inputs["concat"].astype(x_t.dtype)], axis=-1)
        rngs = {"dropout": rng} if rng is not None else None
        return self.unet.apply({"params": unet_params}, x, t, context=inputs.get("context"),
                               y=inputs.get("y"), deterministic=deterministic, rngs=rngs)

    # --- pure functions ----------------------------------------------------------------------
    def init(self, rng, batch, frozen):
        r_unet, r_cond, r_raw = jax.random.split(rng, 3)
        small = jax.tree.map(lambda a: a[:1], batch)
        raw = self.raw_conditions(small, frozen, r_raw, drop=False)
        lat = self.batch_latent_size(small)
        tok = raw.get("tokens")
        is_layout = self.config.conditioning.crossattn == "layout"
        cond_vars = self.cond_module.init(r_cond, tokens=None if is_layout else tok,
                                          layout=tok if is_layout else None, labels=raw.get("class"),
                                          spatial=raw.get("spatial"), size=lat)
        cond_params = cond_vars.get("params", {})
        inputs = self.unet_inputs(cond_params, frozen, raw, lat)
        z = jnp.zeros((1,) + tuple(lat) + (self.first_stage.latent_channels,), jnp.float32)
        unet_params = self.unet.init(r_unet, jnp.concatenate([z, inputs["concat"]], -1) if "concat" in inputs
                                     else z, jnp.zeros((1,), jnp.int32), context=inputs.get("context"),
                                     y=inputs.get("y"))["params"]
        params = {"model": {"unet": unet_params, "cond": cond_params}}
        ema = jax.tree.map(jnp.copy, params["model"]) if self.config.ema.enabled else None
        return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=self.tx.init(params),
                          ema_params=ema, model_state={})

    def loss_terms(self, params, batch, rng, frozen, t, noise_rng, drop, deterministic):
        """Per-example diffusion loss (B,) of model params {unet, cond} at timesteps t."""
        r_enc, r_cond, r_drop = jax.random.split(rng, 3)
        x0 = jax.lax.stop_gradient(self.latents_of(frozen, batch, r_enc))
        raw = self.raw_conditions(batch, frozen, r_cond, drop=drop)
        inputs = self.unet_inputs(params["cond"], frozen, raw, x0.shape[1:3])
        noise = jax.random.normal(noise_rng, x0.shape, x0.dtype)
        x_t = objectives.q_sample(self.schedule, x0, t, noise)
        out = self.apply_unet(params["unet"], x_t, t, inputs, deterministic=deterministic, rng=r_drop)
        d = self.config.diffusion
        return objectives.diffusion_loss(self.schedule, out, x0, noise, t, self.prediction_type,
                                         d.weighting, float(d.snr_gamma))

    def _bucket_metrics(self, per_example, t):
        bucket = (t * NUM_BUCKETS) // self.schedule.num_timesteps
        out = {}
        for k in range(NUM_BUCKETS):
            inside = (bucket == k).astype(jnp.float32)
            n = jnp.sum(inside)
            out[f"loss_t{k}"] = jnp.where(n > 0, jnp.sum(per_example * inside) / jnp.maximum(n, 1), jnp.nan)
        return out

    def train_step(self, state, batch, rng, frozen):
        r_t, r_noise, r_rest = jax.random.split(rng, 3)
        b = self.batch_size_of(batch)
        t = objectives.sample_timesteps(r_t, b, self.schedule.num_timesteps)

        def loss_fn(params):
            per = self.loss_terms(params["model"], batch, r_rest, frozen, t, r_noise, drop=True,
                                   deterministic=False)
            return jnp.mean(per), per

        (loss, per), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
        updates, opt_state = self.tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        ema = ema_step(state.ema_params, params["model"], state.step,
                       did_update(opt_state, int(self.config.optim.get("grad_accum_steps", 1))), self.config.ema)
        metrics = dict(loss=loss, grad_norm=optax.global_norm(grads), **self._bucket_metrics(per, t))
        return state.replace(step=state.step + 1, params=params, opt_state=opt_state, ema_params=ema), metrics

    def model_params(self, state):
        return state.ema_params if state.ema_params is not None else state.params["model"]

    def eval_step(self, state, batch, rng, frozen):
        """The loss on held-out data at timesteps spread evenly over [0, T)."""
        b = self.batch_size_of(batch)
        t = ((jnp.arange(b) + 0.5) * self.schedule.num_timesteps / b).astype(jnp.int32)
        r_noise, r_rest = jax.random.split(rng)
        per = self.loss_terms(self.model_params(state), batch, r_rest, frozen, t, r_noise, drop=False,
                               deterministic=True)
        return {"loss": jnp.mean(per)}

    # --- sampling ---------------------------------------------------------------------------
    def guided_model_fn(self, model_params, frozen, raw_cond, raw_uncond, latent_hw, scale):
        """The sampler's model function: cond and uncond predictions in one call, mixed by `scale`."""
        from latent_diffusion.diffusion.guidance import cfg_model_fn
        cond = self.unet_inputs(model_params["cond"], frozen, raw_cond, latent_hw)
        uncond = self.unet_inputs(model_params["cond"], frozen, raw_uncond, latent_hw)
        apply = lambda x, t, inputs: self.apply_unet(model_params["unet"], x, t, inputs)
        guided = any(k in raw_cond for k in ("tokens", "y", "class"))
        return cfg_model_fn(apply, cond, uncond, scale if guided else 1.0)

    def null_conditions(self, raw):
        """The unconditional counterpart of raw conditions: empty prompt / layout, null class."""
        b = jax.tree.leaves(raw)[0].shape[0] if raw else 0
        out = dict(raw)
        if "tokens" in raw:
            out["tokens"] = self.null_tokens(b)
        for key in ("y", "class"):
            if key in raw:
                out[key] = jnp.full((b,), self.num_classes, jnp.int32)
        return out

    def run_sampler(self, model_fn, x_T, *, sampler="ddim", steps=50, eta=0.0, ddim_noise=None, start_step=0,
                    blend_fn=None):
        """The final latent; `start_step` / `blend_fn` (image-to-image, inpainting) as in diffusion/samplers.py."""
        from latent_diffusion.diffusion import samplers
        if sampler not in samplers.SAMPLERS:
            raise ValueError(f"sampler must be one of {sorted(samplers.SAMPLERS)}, got {sampler!r}")
        kw = dict(prediction_type=self.prediction_type, start_step=start_step, blend_fn=blend_fn)
        if sampler == "ddim":
            kw.update(eta=eta, noise=ddim_noise)
        return samplers.SAMPLERS[sampler](model_fn, self.schedule, x_T, steps, **kw)

    def sample(self, model_params, frozen, batch, rng, *, sampler="ddim", steps=50, guidance_scale=1.0):
        """Images (B, H, W, 3) in [-1, 1] for the conditions in `batch` (guidance against the null ones)."""
        b = self.batch_size_of(batch)
        lat = self.batch_latent_size(batch)
        raw = self.raw_conditions(batch, frozen, rng, drop=False)
        model_fn = self.guided_model_fn(model_params, frozen, raw, self.null_conditions(raw), lat, guidance_scale)
        x_T = jax.random.normal(rng, (b,) + tuple(lat) + (self.first_stage.latent_channels,))
        z = self.run_sampler(model_fn, x_T, sampler=sampler, steps=steps)
        return jnp.clip(self.first_stage.decode(frozen["first_stage"], z), -1, 1)

    def summary_images(self, state, batch, frozen, rng):
        s = self.config.sample
        if not s.steps:
            return {}
        n = min(int(s.num_images), self.batch_size_of(batch))
        small = jax.tree.map(lambda a: a[:n], batch)
        if "image" in small:
            data = small["image"]
        else:  # stored latents: show the first stage's reconstruction of the posterior mean
            z = small["z_mean"] if "z_mean" in small else small["z"]
            data = jnp.clip(self.first_stage.decode(frozen["first_stage"], z * self.first_stage.scale_factor), -1, 1)
        if self._sample_fn is None:
            self._sample_fn = jax.jit(lambda p, f, bt, r, g: self.sample(p, f, bt, r, sampler=s.sampler,
                                                                         steps=int(s.steps), guidance_scale=g))
        images = self._sample_fn(self.model_params(state), frozen, small, rng, jnp.float32(s.guidance_scale))
        from latent_diffusion.training.autoencoder_task import image_grid
        return {"data_and_samples": image_grid([data, images])}

    def checkpoint_meta(self, state, frozen):
        fs = self.first_stage
        return {"stage": "ldm", "scale_factor": fs.scale_factor, "first_stage_kind": fs.kind,
                "first_stage_downsample": fs.downsample}
