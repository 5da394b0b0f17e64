"""Stage 2: the latent diffusion model (paper Sec. 3.2-3.3), trained by the same loop as stage 1.

`LDMTask` is the model (sampling/ldm_model.py: first stage, conditions, UNet, sampler) plus what
training adds: the host-side condition work, the diffusion objective with per-condition dropout
for classifier-free guidance, the optimizer, and the loop's pure step functions (tasks.Task).
The first stage is frozen (see first_stage.py). With data.latents_dir the batches hold the first
stage's stored posterior (scripts/precompute_latents.py) and x0 is sampled from it, with the same
key, instead of encoding the image every step.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax

from latent_diffusion.data import preprocess
from latent_diffusion.diffusion import objectives
from latent_diffusion.models import conditioning
from latent_diffusion.sampling.ldm_model import LDMModel
from latent_diffusion.training.optimizers import did_update, make_optimizer
from latent_diffusion.training.state import TrainState, ema_step, eval_params

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
        if cfg.crossattn == "text" and "context" not in element:  # else stored text embeddings
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


class LDMTask(LDMModel):
    def __init__(self, config, mesh, workdir: str, abstract: bool = False):
        """`abstract`: the first stage (and a frozen CLIP) as shapes only, for describing the model."""
        super().__init__(config, mesh, abstract=abstract)
        self.tx = make_optimizer(config.optim)
        c = config.conditioning
        self.latents_dir = str(config.data.get("latents_dir", "") or "")
        if self.latents_dir and c.concat in ("lowres", "inpaint"):
            raise ValueError(f"data.latents_dir is not supported yet for conditioning.concat={c.concat!r} (its "
                             "condition is computed from the image every step): set --config.data.latents_dir=")
        self._latents_checked = False
        self._sample_fn = None
        self._prompt_monitor = None

    def _check_latents(self):
        """Refuses stored latents (config.data.latents_dir) made by another first stage or at another size."""
        from latent_diffusion.data import latents
        d = self.config.data
        identity = latents.first_stage_identity(self.first_stage, self.config.first_stage)
        for split in dict.fromkeys((d.train_split, d.eval_split)):
            meta = latents.read_metadata(self.latents_dir, split)
            where = latents.split_dir(self.latents_dir, split)
            latents.check_first_stage(meta, identity, where)
            text, text_cfg = meta.get("text"), self.config.conditioning.text
            ours = (latents.text_identity(text_cfg, self._clip_params, text["dtype"])
                    if text and self._clip is not None else None)
            latents.check_text(meta, ours, where)
            res = d.get("resolution")
            want = [res // self.first_stage.downsample] * 2 + [self.first_stage.latent_channels] if res else None
            if want and list(meta["latent_shape"]) != want:
                raise ValueError(f"the latents in {where} have shape {meta['latent_shape']}, this run needs {want} "
                                 f"(data.resolution={res}): precompute them at this resolution")

    def host_transforms(self):
        # Only the training loop asks for loader transforms, so the stored latents are checked here, before
        # the first batch, and not when sample.py rebuilds the task from a run's config.
        if self.latents_dir and not self._latents_checked:
            self._check_latents()
            self._latents_checked = True
        return (HostConditions(self.config.conditioning, self.tokenizer, "image"),)

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

    def eval_step(self, state, batch, rng, frozen):
        """The loss on held-out data at timesteps spread evenly over [0, T)."""
        b = self.batch_size_of(batch)
        t = ((jnp.arange(b) + 0.5) * self.schedule.num_timesteps / b).astype(jnp.int32)
        r_noise, r_rest = jax.random.split(rng)
        per = self.loss_terms(eval_params(state), batch, r_rest, frozen, t, r_noise, drop=False,
                               deterministic=True)
        return {"loss": jnp.mean(per)}

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
        images = self._sample_fn(eval_params(state), frozen, small, rng, jnp.float32(s.guidance_scale))
        from latent_diffusion.training.autoencoder_task import image_grid
        return {"data_and_samples": image_grid([data, images])}

    def sample_scores(self, state, frozen):
        """The prompt-following score and grid of held-out prompts (config.sample.prompt_score, shapes runs)."""
        if self._prompt_monitor is None:
            cfg = self.config.sample.get("prompt_score", None)
            if not cfg or not cfg.get("num_prompts", 0):
                return {}, {}
            from latent_diffusion.evaluation.shapes_eval import PromptFollowingMonitor
            self._prompt_monitor = PromptFollowingMonitor(self, frozen, num_prompts=int(cfg.num_prompts),
                                                          steps=int(cfg.steps), guidance=float(cfg.guidance))
        scalars, grid = self._prompt_monitor(eval_params(state))
        return scalars, {k: v.astype(np.float32) / 255.0 for k, v in grid.items()}

    def checkpoint_meta(self, state, frozen):
        fs = self.first_stage
        return {"stage": "ldm", "scale_factor": fs.scale_factor, "first_stage_kind": fs.kind,
                "first_stage_downsample": fs.downsample}
