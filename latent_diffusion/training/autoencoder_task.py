"""Stage 1: the autoencoder trained with L1 + LPIPS, KL or codebook loss and a PatchGAN (paper Sec. 3.1, App. G).

The losses follow CompVis `LPIPSWithDiscriminator` / `VQLPIPSWithDiscriminator`. One step
updates the generator (autoencoder, and the learnable logvar for KL) and then the
discriminator on the same, detached reconstructions; the reference runs a second forward
pass for the discriminator, which only costs time.
"""
from __future__ import annotations

import logging

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from latent_diffusion.models import build
from latent_diffusion.training import ae_losses
from latent_diffusion.training.optimizers import did_update, make_optimizer
from latent_diffusion.training.first_stage import encode_latents
from latent_diffusion.training.state import TrainState, ema_step, eval_params

log = logging.getLogger(__name__)


def psnr(x: jax.Array, y: jax.Array) -> jax.Array:
    """Per-image PSNR in dB of images in [-1, 1], measured on the [0, 1] scale after clipping."""
    a = (jnp.clip(x, -1, 1) + 1) / 2
    b = (jnp.clip(y, -1, 1) + 1) / 2
    mse = jnp.mean(jnp.square(a - b), axis=tuple(range(1, x.ndim)))
    return -10.0 * jnp.log10(jnp.maximum(mse, 1e-10))


def host_array(x) -> np.ndarray:
    """A (possibly multi-host sharded) array as a float32 numpy array on every host."""
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        from jax.experimental import multihost_utils
        x = multihost_utils.process_allgather(x, tiled=True)
    return np.asarray(jax.device_get(x), np.float32)


def image_grid(rows: list[jax.Array], max_images: int = 8) -> np.ndarray:
    """Rows of NHWC images in [-1, 1] -> one (1, H*rows, W*n, 3) image in [0, 1]."""
    rows = [host_array(r)[:max_images] for r in rows]
    rows = [np.concatenate(list(r), axis=1) for r in rows]
    return np.clip((np.concatenate(rows, axis=0)[None] + 1) / 2, 0, 1)


class AutoencoderTask:
    def __init__(self, config, mesh):
        if config.data.get("latents_dir"):
            raise ValueError("data.latents_dir is for latent diffusion runs (stored first-stage latents); an "
                             "autoencoder trains on images: unset --config.data.latents_dir")
        self.config = config
        self.kind = config.model.kind
        self.model = build.autoencoder(config.model)
        loss = config.loss
        from latent_diffusion.models.discriminator import NLayerDiscriminator
        self.disc = NLayerDiscriminator(ndf=loss.disc_ndf, n_layers=loss.disc_num_layers)
        self.gen_tx = make_optimizer(config.optim)
        self.disc_tx = make_optimizer(config.disc_optim)
        self.use_gan = float(loss.disc_weight) > 0
        self._conv_out = nn.Conv(config.model.out_ch, (3, 3), padding=1,
                                 dtype=build.dtype_of(config.model.dtype))
        self._lpips, self._lpips_params = self._load_lpips(loss)
        self._scale_batch = None

    # --- host side -------------------------------------------------------------------------
    @staticmethod
    def _load_lpips(loss):
        if float(loss.perceptual_weight) <= 0:
            return None, None
        if not loss.lpips_vgg:
            log.warning(
                "LPIPS weights not given (--config.loss.lpips_vgg=/path/to/vgg16-397923af.pth, and "
                "optionally --config.loss.lpips_lin=/path/to/lpips/weights/v0.1/vgg.pth): training runs "
                "with the perceptual term OFF. Random LPIPS weights are never used.")
            return None, None
        from latent_diffusion.convert.lpips import load_lpips_params
        from latent_diffusion.models.lpips import LPIPS
        params = load_lpips_params(loss.lpips_vgg, loss.lpips_lin or None)
        return LPIPS(), jax.tree.map(jnp.asarray, params)

    def frozen(self):
        return {"lpips": self._lpips_params} if self._lpips is not None else {}

    def host_transforms(self):
        return ()

    # --- pure functions ----------------------------------------------------------------------
    def init(self, rng, batch, frozen):
        x = batch["image"][:1]
        r_param, r_sample, r_disc = jax.random.split(rng, 3)
        variables = self.model.init({"params": r_param, "sample": r_sample, "dropout": r_sample}, x)
        disc_vars = self.disc.init(r_disc, x, train=False)
        gen = {"model": variables["params"],
               "logvar": jnp.full((), float(self.config.loss.logvar_init), jnp.float32)}
        params = dict(gen, disc=disc_vars["params"])
        opt_state = {"gen": self.gen_tx.init(gen), "disc": self.disc_tx.init(disc_vars["params"])}
        ema = jax.tree.map(jnp.copy, gen["model"]) if self.config.ema.enabled else None
        return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=opt_state,
                          ema_params=ema, model_state={"disc_batch_stats": disc_vars["batch_stats"]})

    def _perceptual(self, frozen, a, b):
        if self._lpips is None:
            return None
        return self._lpips.apply({"params": frozen["lpips"]}, a, b)

    def _rec_terms(self, frozen, x, xrec, logvar):
        """(loss term, nll used by the adaptive weight, mean L1, mean LPIPS or 0)."""
        loss = self.config.loss
        p = self._perceptual(frozen, x, xrec)
        if self.kind == "kl":
            weighted, nll, rec = ae_losses.kl_reconstruction_loss(
                x, xrec, logvar, perceptual=p, perceptual_weight=loss.perceptual_weight)
        else:
            weighted, nll, rec = ae_losses.vq_reconstruction_loss(
                x, xrec, perceptual=p, perceptual_weight=loss.perceptual_weight)
        return weighted, nll, rec, (jnp.mean(p) if p is not None else jnp.zeros(()))

    def _disc_logits(self, params, batch_stats, img):
        logits, upd = self.disc.apply({"params": params, "batch_stats": batch_stats}, img, train=True,
                                      mutable=["batch_stats"])
        return logits, upd["batch_stats"]

    def train_step(self, state, batch, rng, frozen):
        """The generator's update, then the discriminator's on the same (detached) reconstructions."""
        cfg = self.config.loss
        x = batch["image"]
        disc_factor = ae_losses.adopt_weight(float(cfg.disc_factor), state.step, int(cfg.disc_start))
        new_gen, gen_opt, xrec, metrics = self._generator_update(state, x, rng, frozen, disc_factor)
        metrics["disc_factor"] = disc_factor
        dparams, disc_opt = state.params["disc"], state.opt_state["disc"]
        dstats = state.model_state["disc_batch_stats"]
        if self.use_gan:
            dparams, disc_opt, dstats, d_metrics = self._discriminator_update(state, x, xrec, disc_factor)
            metrics.update(d_metrics)
        ema = ema_step(state.ema_params, new_gen["model"], state.step,
                       did_update(gen_opt, int(self.config.optim.get("grad_accum_steps", 1))), self.config.ema)
        new_state = state.replace(step=state.step + 1, params=dict(new_gen, disc=dparams),
                                  opt_state={"gen": gen_opt, "disc": disc_opt}, ema_params=ema,
                                  model_state={"disc_batch_stats": dstats})
        return new_state, metrics

    def _generator_update(self, state, x, rng, frozen, disc_factor):
        """(new generator params {model, logvar}, its optimizer state, reconstructions, metrics)."""
        gen = {"model": state.params["model"], "logvar": state.params["logvar"]}
        disc = (state.params["disc"], state.model_state["disc_batch_stats"])
        loss_fn = lambda g: self._generator_loss(g, x, rng, frozen, disc, disc_factor)
        (loss, (xrec, metrics)), grads = jax.value_and_grad(loss_fn, has_aux=True)(gen)
        updates, gen_opt = self.gen_tx.update(grads, state.opt_state["gen"], gen)
        metrics.update(loss=loss, grad_norm=optax.global_norm(grads["model"]),
                       psnr=jnp.mean(psnr(x, jax.lax.stop_gradient(xrec))))
        return optax.apply_updates(gen, updates), gen_opt, xrec, metrics

    def _generator_loss(self, g, x, rng, frozen, disc, disc_factor):
        """(reconstruction + KL or codebook + adaptively weighted GAN loss, (reconstructions, metrics))."""
        cfg = self.config.loss
        r_sample, r_drop = jax.random.split(rng)
        logvar = g["logvar"] if cfg.learn_logvar else jax.lax.stop_gradient(g["logvar"])
        if self.kind == "kl":
            xrec, aux = self.model.apply({"params": g["model"]}, x, sample_posterior=True, deterministic=False,
                                         rngs={"sample": r_sample, "dropout": r_drop})
        else:
            xrec, aux = self.model.apply({"params": g["model"]}, x, deterministic=False, rngs={"dropout": r_drop})
        weighted, nll, rec, p = self._rec_terms(frozen, x, xrec, logvar)
        metrics = {"rec_loss": rec, "p_loss": p, "nll_loss": nll, "logvar": logvar}
        loss = weighted
        if self.kind == "kl":
            kl = jnp.mean(aux["posterior"].kl())
            loss = loss + cfg.kl_weight * kl
            metrics["kl_loss"] = kl
        else:
            loss = loss + cfg.codebook_weight * aux["codebook_loss"]
            metrics.update(codebook_loss=aux["codebook_loss"], perplexity=aux["perplexity"],
                           codebook_usage=aux["codebook_usage"])
        if self.use_gan:
            g_loss, d_weight = self._gan_terms(g, x, xrec, aux, frozen, logvar, disc, disc_factor)
            loss = loss + d_weight * disc_factor * g_loss
            metrics.update(g_loss=g_loss, d_weight=d_weight)
        return loss, (xrec, metrics)

    def _gan_terms(self, g, x, xrec, aux, frozen, logvar, disc, disc_factor):
        """(generator GAN loss, its adaptive weight): zeros until the discriminator starts."""
        dparams, dstats = disc
        h = jax.lax.stop_gradient(aux["decoder_features"])
        last = jax.lax.stop_gradient(g["model"]["decoder"]["conv_out"])
        head = lambda w: self._conv_out.apply({"params": w}, h)
        sg_logvar = jax.lax.stop_gradient(logvar)

        def gan_on(_):
            g_loss = ae_losses.generator_loss(self._disc_logits(dparams, dstats, xrec)[0])
            d_weight = ae_losses.adaptive_disc_weight(
                lambda w: self._rec_terms(frozen, x, head(w), sg_logvar)[1],
                lambda w: ae_losses.generator_loss(self._disc_logits(dparams, dstats, head(w))[0]),
                last, float(self.config.loss.disc_weight))
            return g_loss, d_weight

        return jax.lax.cond(disc_factor > 0, gan_on, lambda _: (jnp.zeros(()), jnp.zeros(())), None)

    def _discriminator_update(self, state, x, xrec, disc_factor):
        """(new discriminator params, its optimizer state, its batch statistics, metrics)."""
        cfg = self.config.loss
        dparams, dstats = state.params["disc"], state.model_state["disc_batch_stats"]
        real, fake = jax.lax.stop_gradient(x), jax.lax.stop_gradient(xrec)
        d_loss_fn = ae_losses.hinge_d_loss if cfg.disc_loss == "hinge" else ae_losses.vanilla_d_loss

        def d_objective(dp):
            lr, bs = self._disc_logits(dp, dstats, real)
            lf, bs = self._disc_logits(dp, bs, fake)
            return disc_factor * d_loss_fn(lr, lf), (bs, jnp.mean(lr), jnp.mean(lf))

        def d_on(_):
            return jax.value_and_grad(d_objective, has_aux=True)(dparams)

        def d_off(_):
            zero = jnp.zeros(())
            return (zero, (dstats, zero, zero)), jax.tree.map(jnp.zeros_like, dparams)

        (d_loss, (new_dstats, lr_mean, lf_mean)), dgrads = jax.lax.cond(disc_factor > 0, d_on, d_off, None)
        dupd, disc_opt = self.disc_tx.update(dgrads, state.opt_state["disc"], dparams)
        metrics = dict(d_loss=d_loss, logits_real=lr_mean, logits_fake=lf_mean, d_grad_norm=optax.global_norm(dgrads))
        return optax.apply_updates(dparams, dupd), disc_opt, new_dstats, metrics

    def reconstruct(self, params, x):
        """Deterministic reconstruction: the posterior mode (KL) or the quantised code (VQ)."""
        if self.kind == "kl":
            post = self.model.apply({"params": params}, x, method="encode")
            return self.model.apply({"params": params}, post.mode(), method="decode")
        return self.model.apply({"params": params}, x)[0]

    def eval_step(self, state, batch, rng, frozen):
        x = batch["image"]
        xrec = self.reconstruct(eval_params(state), x)
        out = {"psnr": jnp.mean(psnr(x, xrec)), "rec_loss": jnp.mean(jnp.abs(x - xrec))}
        p = self._perceptual(frozen, x, jnp.clip(xrec, -1, 1))
        if p is not None:
            out["lpips"] = jnp.mean(p)
        return out

    def summary_images(self, state, batch, frozen, rng):
        x = batch["image"]
        xrec = jax.jit(self.reconstruct)(eval_params(state), x)
        self._scale_batch = x
        return {"inputs_reconstructions": image_grid([x, xrec])}

    def sample_scores(self, state, frozen):
        return {}, {}

    def checkpoint_meta(self, state, frozen):
        meta = {"stage": "autoencoder", "kind": self.kind, "model": self.config.model.to_dict()}
        if self._scale_batch is not None:
            encode = jax.jit(lambda p, x, r: encode_latents(self.model, self.kind, p, x, r))
            z = encode(eval_params(state), self._scale_batch, jax.random.key(0))
            meta["scale_factor"] = float(1.0 / jnp.std(z.astype(jnp.float32)))
        return meta
