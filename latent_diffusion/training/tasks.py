"""What the training loop trains: one task per stage, chosen by `config.task`.

A task provides pure functions for the loop:
  init(rng, batch, frozen) -> TrainState
  train_step(state, batch, rng, frozen) -> (state, metrics)
  eval_step(state, batch, rng, frozen) -> metrics (means over the batch)
and host-side pieces: frozen() (arrays that are inputs but not trained, e.g. LPIPS or the
first stage), host_transforms() (extra loader transforms, e.g. tokenization),
summary_images(...) and checkpoint_meta(...) (JSON stored beside each checkpoint).
"""
from __future__ import annotations


def build(config, mesh, workdir: str):
    if config.task == "autoencoder":
        from latent_diffusion.training.autoencoder_task import AutoencoderTask
        return AutoencoderTask(config, mesh)
    if config.task == "ldm":
        from latent_diffusion.training.ldm_task import LDMTask
        return LDMTask(config, mesh, workdir)
    raise ValueError(f"config.task must be 'autoencoder' or 'ldm', got {config.task!r}")
