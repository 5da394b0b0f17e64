"""The latent diffusion model itself, for training and for sampling: first stage, conditions, UNet, sampler.

`LDMModel` turns a batch's conditions (a caption's tokens, a layout, a class label, a spatial input)
into the UNet's inputs, runs the UNet, builds the classifier-free-guided model function and runs a
sampler. The training task (training/ldm_task.py: `LDMTask`, an `LDMModel` with its objective and
optimizer) and the sampling jobs (sampling/pipeline.py: `LDMGenerator`) both work through it.
Conditions: a caption (text, through a jointly trained BERT-style encoder or a frozen CLIP), boxes
and labels (layout tokens), a class label (crossattn 'class': a jointly trained embedding that is
the cross-attention context, as in the paper's ImageNet model; or class_label: an embedding added
to the time embedding), or a spatial input concatenated to the latents (low-resolution image,
masked image + mask, segmentation map). A dropped or null class label is index num_classes.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from latent_diffusion.diffusion import objectives, schedules
from latent_diffusion.models import build, conditioning
from latent_diffusion.training import first_stage as first_stage_lib

CROSSATTN = ("none", "text", "layout", "class")
CONCAT = ("none", "lowres", "inpaint", "segmentation")


class LDMModel:
    def __init__(self, config, mesh, abstract: bool = False):
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
        self._clip, self._clip_params, self._null_context = None, None, None
        text_kwargs = None
        if c.crossattn == "text":
            from latent_diffusion.data.tokenizers import make_tokenizer
            vocab = int(c.text.get("vocab_size", 0))
            if not abstract or not vocab:  # shapes only: the tokenizer only where the vocab size is not given
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
        self._check_channels()

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
        from latent_diffusion import convert
        from latent_diffusion.convert.common import TRANSFORMERS_WEIGHTS, read_pretrained_folder
        hf_config, weights = read_pretrained_folder(text_cfg.checkpoint, TRANSFORMERS_WEIGHTS,
                                                    "conditioning.text.checkpoint")
        module, params = convert.from_transformers(hf_config, weights)
        if text_cfg.get("penultimate", False):
            module = module.clone(output_layer=-2)
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
            # The empty prompt's embedding: guidance dropout of stored text embeddings (data.latents_dir
            # with 'context') needs it without running the encoder in the step.
            out["null_context"] = self.null_context()
        return out

    def null_context(self):
        """The frozen CLIP's embedding of the empty prompt, (1, L, D), computed once."""
        if self._null_context is None:
            fn = lambda p: self.text_context(p, self.null_tokens(1))
            abstract = isinstance(jax.tree.leaves(self._clip_params)[0], jax.ShapeDtypeStruct)
            self._null_context = jax.eval_shape(fn, self._clip_params) if abstract else jax.jit(fn)(self._clip_params)
        return self._null_context

    def text_context(self, clip_params, tokens):
        """The frozen CLIP's cross-attention context for token ids (B, L)."""
        ctx, _ = self._clip.apply({"params": clip_params}, tokens)
        return jax.lax.stop_gradient(ctx)

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
            n = int(c.text.max_length)
            # An abstract model (shapes only, no tokenizer files) needs the shape, not the ids.
            empty = self.tokenizer.empty if self.tokenizer is not None else np.zeros((n,), np.int32)
            return jnp.broadcast_to(jnp.asarray(empty), (batch_size, n))
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
        if key == "tokens" and "context" in batch:
            # Stored text embeddings (scripts/precompute_latents.py): the encoder does not run.
            ctx = batch["context"].astype(jnp.float32)
            p = float(c.dropout.get("text", 0.0))
            if drop and p > 0:
                gone = jax.random.bernoulli(keys[0], p, (b,))
                ctx = jnp.where(gone[:, None, None], frozen["null_context"].astype(jnp.float32), ctx)
            out["context"] = ctx
        elif key:
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
        if "context" in raw:
            out["context"] = raw["context"]
        if "tokens" in raw:
            if c.crossattn == "text" and self._clip is not None:
                out["context"] = self.text_context(frozen["clip"], raw["tokens"])
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

    # --- sampling ---------------------------------------------------------------------------
    def guided_model_fn(self, model_params, frozen, raw_cond, raw_uncond, latent_hw, scale):
        """The sampler's model function: cond and uncond predictions in one call, mixed by `scale`."""
        from latent_diffusion.diffusion.guidance import cfg_model_fn
        cond = self.unet_inputs(model_params["cond"], frozen, raw_cond, latent_hw)
        uncond = self.unet_inputs(model_params["cond"], frozen, raw_uncond, latent_hw)
        apply = lambda x, t, inputs: self.apply_unet(model_params["unet"], x, t, inputs)
        guided = any(k in raw_cond for k in ("tokens", "context", "y", "class"))
        return cfg_model_fn(apply, cond, uncond, scale if guided else 1.0)

    def null_conditions(self, raw):
        """The unconditional counterpart of raw conditions: empty prompt / layout, null class."""
        b = jax.tree.leaves(raw)[0].shape[0] if raw else 0
        out = dict(raw)
        if "tokens" in raw or "context" in raw:
            out.pop("context", None)  # a stored embedding's null is the empty prompt, through the encoder
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
