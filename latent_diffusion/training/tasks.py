"""What the training loop trains: one task per stage, chosen by `config.task`.

`Task` is all the loop (loop.py) asks of one: pure functions to jit and host-side pieces.
AutoencoderTask (stage 1) and LDMTask (stage 2) provide it.
"""
from __future__ import annotations

from typing import Any, Protocol, Sequence

from latent_diffusion.training.state import TrainState


class Task(Protocol):
    config: Any

    def init(self, rng, batch: dict, frozen: dict) -> TrainState:
        """The fresh train state (params, optimizer state, EMA) for batches shaped like `batch`."""

    def train_step(self, state: TrainState, batch: dict, rng, frozen: dict) -> tuple[TrainState, dict]:
        """One pure update: (the new state, scalar metrics including 'loss' and 'grad_norm')."""

    def eval_step(self, state: TrainState, batch: dict, rng, frozen: dict) -> dict:
        """Scalar metrics of one held-out batch (means over the batch)."""

    def frozen(self) -> dict:
        """Arrays the steps take as inputs but do not train (LPIPS, the first stage, a frozen CLIP)."""

    def host_transforms(self) -> Sequence:
        """Extra per-example loader transforms (e.g. tokenization), run on the host before batching."""

    def summary_images(self, state: TrainState, batch: dict, frozen: dict, rng) -> dict:
        """Images for TensorBoard after an evaluation: name -> (1, H, W, 3) in [0, 1]; may be empty."""

    def sample_scores(self, state: TrainState, frozen: dict) -> tuple[dict, dict]:
        """(scalars, images) of an evaluation that samples the model instead of reading the eval split,
        e.g. the prompt-following score of a shapes text-to-image run; ({}, {}) where there is none."""

    def checkpoint_meta(self, state: TrainState, frozen: dict) -> dict:
        """JSON values stored beside each checkpoint (the stage, its scale factor, ...)."""


def build(config, mesh, workdir: str) -> Task:
    if config.task == "autoencoder":
        from latent_diffusion.training.autoencoder_task import AutoencoderTask
        return AutoencoderTask(config, mesh)
    if config.task == "ldm":
        from latent_diffusion.training.ldm_task import LDMTask
        return LDMTask(config, mesh, workdir)
    raise ValueError(f"config.task must be 'autoencoder' or 'ldm', got {config.task!r}")
