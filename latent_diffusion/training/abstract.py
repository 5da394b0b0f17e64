"""A latent diffusion config's train step as shapes only: the task with an abstract first stage (and
frozen CLIP), an abstract batch, and the state `jax.eval_shape` gives. Nothing is allocated, so a
full-size model can be described (scripts/describe_model.py) or compiled for hardware this machine
does not have (scripts/compile_for.py)."""
from __future__ import annotations

import jax
import jax.numpy as jnp


def abstract_batch(config, batch_size: int, image_size: int) -> dict:
    """ShapeDtypeStructs of the batch the LDM train step reads (images, tokens, labels, concat inputs)."""
    b, size = int(batch_size), int(image_size)
    batch = {"image": jax.ShapeDtypeStruct((b, size, size, 3), jnp.float32)}
    c = config.conditioning
    if c.crossattn == "text":
        batch["tokens"] = jax.ShapeDtypeStruct((b, int(c.text.max_length)), jnp.int32)
    if c.crossattn == "layout":
        batch["layout"] = jax.ShapeDtypeStruct((b, 1 + 5 * int(c.layout.max_objects)), jnp.int32)
    if c.class_label or c.crossattn == "class":
        batch["label"] = jax.ShapeDtypeStruct((b,), jnp.int32)
    if c.concat == "lowres":
        f = int(c.lowres_factor)
        batch["lowres"] = jax.ShapeDtypeStruct((b, size // f, size // f, 3), jnp.float32)
    if c.concat == "inpaint":
        batch["mask"] = jax.ShapeDtypeStruct((b, size, size, 1), jnp.float32)
    if c.concat == "segmentation":
        batch["segmentation"] = jax.ShapeDtypeStruct((b, size, size, 1), jnp.int32)
    return batch


def abstract_ldm(config, mesh, batch_size: int, image_size: int = 0):
    """(task, batch, frozen, state) of an LDM config, all abstract; image_size 0: data.resolution."""
    from latent_diffusion.training.ldm_task import LDMTask
    if config.task != "ldm":
        raise ValueError(f"config.task is {config.task!r}: only latent diffusion configs (task 'ldm') are "
                         "described or compiled from shapes")
    task = LDMTask(config, mesh, workdir="", abstract=True)
    batch = abstract_batch(config, batch_size, image_size or int(config.data.resolution))
    frozen = task.frozen()
    state = jax.eval_shape(task.init, jax.random.key(0), batch, frozen)
    return task, batch, frozen, state
