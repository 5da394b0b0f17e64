"""Class-conditional sampling with the paper's cross-attention class embedding (configs/ldm_cin.py):
guidance against the null-class row, scale 1 = the conditional prediction, and sample.py --classes."""
import os
import subprocess
import sys
from unittest import mock

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from latent_diffusion.sampling.jobs import _keys
from latent_diffusion.sampling.pipeline import LDMGenerator
from latent_diffusion.sampling.requests import RequestError, WorkItem
from latent_diffusion.training import partitioning
from latent_diffusion.training.ldm_task import LDMTask
from tests.tiny_ldm import random_weights
from tests.training.test_class_conditioning import NUM_CLASSES, SIZE, tiny_cin_config

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture(scope="module")
def cin(tmp_path_factory):
    cfg = tiny_cin_config()
    cfg.diffusion.prediction_type = "x0"   # keeps a random UNet's latents in range
    task = LDMTask(cfg, partitioning.make_mesh(), str(tmp_path_factory.mktemp("cin")))
    frozen = task.frozen()
    batch = {"image": np.zeros((1, SIZE, SIZE, 3), np.float32), "label": np.zeros((1,), np.int32)}
    shapes = jax.eval_shape(task.init, jax.random.key(0), batch, frozen).params["model"]
    return task, random_weights(1, shapes), frozen


def test_guidance_mixes_the_label_and_the_null_class_row(cin):
    task, params, frozen = cin
    lat = (SIZE // 2, SIZE // 2)
    labels = jnp.array([1, 2, 3, 29], jnp.int32)
    raw = task.raw_conditions({"label": labels}, frozen, jax.random.key(0), drop=False)
    null = task.null_conditions(raw)
    x = jax.random.normal(jax.random.key(1), (4,) + lat + (3,))
    t = jnp.array([999, 500, 100, 10], jnp.int32)
    unet = jax.jit(lambda r: task.apply_unet(params["unet"], x, t, task.unet_inputs(params["cond"], frozen, r, lat)))
    cond, uncond = np.asarray(unet(raw)), np.asarray(unet(null))
    # The unconditional half is the null class's own embedding row as a context of length 1.
    table = params["cond"]["class_embedder"]["embedding"]
    explicit = task.apply_unet(params["unet"], x, t, {"context": jnp.broadcast_to(table[NUM_CLASSES], (4, 1, 64))})
    np.testing.assert_allclose(uncond, explicit, atol=1e-5)
    scale_of = float(np.abs(cond).max())
    assert np.abs(cond - uncond).max() > 1e-2 * scale_of, "the label does not reach the UNet"

    def guided(scale):
        fn = jax.jit(lambda s: task.guided_model_fn(params, frozen, raw, null, lat, s)(x, t))
        return np.asarray(fn(jnp.asarray(scale, jnp.float32)))

    # A traced scale runs both halves (as sample.py does); scale 1 is the conditional prediction.
    np.testing.assert_allclose(guided(np.ones(4)), cond, atol=1e-5 * scale_of)
    np.testing.assert_allclose(guided(np.zeros(4)), uncond, atol=1e-5 * scale_of)
    per_example = guided(np.array([3.0, 1.0, 0.0, 5.0]))
    want = np.stack([uncond[0] + 3 * (cond[0] - uncond[0]), cond[1], uncond[2], uncond[3] + 5 * (cond[3] - uncond[3])])
    np.testing.assert_allclose(per_example, want, atol=1e-4 * scale_of)


def _run(gen, items, steps=3):
    gen.check_items(items)
    arrays = gen.prepare(items)
    seeds, index = np.array([it.seed for it in items], np.uint32), np.array([it.index for it in items], np.int32)
    return jax.tree.map(np.asarray, gen.sample_outputs(arrays, _keys(seeds, index), steps=steps))


def test_generator_samples_classes_with_guidance(cin):
    task, params, frozen = cin
    gen = LDMGenerator(task, params, frozen, image_size=SIZE, guidance=3.0)
    assert (gen.mode, gen.condition) == ("txt2img", "class")
    items = [WorkItem(0, 5, label=1), WorkItem(1, 5, label=2), WorkItem(2, 5, label=1, guidance=1.0),
             WorkItem(3, 6, label=3)]
    out = _run(gen, items)
    assert out["images"].shape == (4, SIZE, SIZE, 3) and out["images"].dtype == np.uint8
    # Same seed, other label / other guidance scale: another image.
    assert not np.array_equal(out["latents"][0], out["latents"][1])
    assert not np.array_equal(out["latents"][0], out["latents"][2])
    for label in (NUM_CLASSES, -1):   # the null class is not a label to ask for
        with pytest.raises(RequestError, match=rf"class id {label} is outside \[0, 30\)"):
            gen.check_items([WorkItem(0, 0, label=label)])
    with pytest.raises(RequestError, match="class-conditional model.*needs 'label'"):
        gen.check_items([WorkItem(0, 0, prompt="a cat")])
    # Guidance 1 samples with the conditional prediction: the same as a model whose null class is the label.
    with mock.patch.object(task, "null_conditions", lambda raw: dict(raw)):
        same = _run(LDMGenerator(task, params, frozen, image_size=SIZE, guidance=7.0), items[2:3])
    np.testing.assert_allclose(same["latents"][0], out["latents"][2], atol=1e-4)


def _train_tiny_cin(data_dir, workdir):
    from latent_diffusion.training.loop import train_and_evaluate
    c = tiny_cin_config()
    c.data.update(data_dir=data_dir, config="tiny")
    c.batch_size, c.eval_batch_size, c.num_eval_batches = 8, 8, 1
    c.num_train_steps, c.log_every, c.eval_every, c.checkpoint.every = 2, 1, 2, 2
    c.checkpoint.async_save = False
    c.sample.steps = 0
    train_and_evaluate(c, workdir)


@pytest.mark.slow
def test_sample_py_classes_with_guidance(shapes_data_dir, tmp_path):
    workdir = str(tmp_path / "cin")
    _train_tiny_cin(shapes_data_dir, workdir)
    env = dict(os.environ, PYTHONPATH=ROOT, XLA_FLAGS="--xla_force_host_platform_device_count=2")
    base = [sys.executable, os.path.join(ROOT, "sample.py"), f"--workdir={workdir}", "--steps=3",
            "--guidance=4", "--batch_size=4"]
    out = str(tmp_path / "out")
    proc = subprocess.run(base + [f"--outdir={out}", "--classes=1,2,3", "--num_samples=2"], env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert sorted(n for n in os.listdir(out) if n.endswith(".png")) == [f"{i:06d}.png" for i in range(6)]
    proc = subprocess.run(base + [f"--outdir={out}2", f"--classes=1,{NUM_CLASSES}"], env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode != 0 and f"class id {NUM_CLASSES} is outside [0, {NUM_CLASSES})" in proc.stderr
