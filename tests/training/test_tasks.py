"""Both stages' tasks provide the interface the training loop relies on (tasks.Task)."""
import inspect

import pytest

from latent_diffusion.training import tasks
from latent_diffusion.training.autoencoder_task import AutoencoderTask
from latent_diffusion.training.ldm_task import LDMTask

METHODS = [name for name, value in vars(tasks.Task).items() if inspect.isfunction(value) and not name.startswith("_")]


def test_the_protocol_names_what_the_loop_calls():
    assert set(METHODS) == {"init", "train_step", "eval_step", "frozen", "host_transforms", "summary_images",
                            "sample_scores", "checkpoint_meta"}


@pytest.mark.parametrize("cls", [AutoencoderTask, LDMTask])
def test_tasks_follow_the_protocol(cls):
    for name in METHODS:
        want = list(inspect.signature(getattr(tasks.Task, name)).parameters)
        assert list(inspect.signature(getattr(cls, name)).parameters) == want, name
