"""The training loop: sharding, resume, checkpoint restore into other meshes, NaN guard, bad input."""
import os
import shutil

import jax
import numpy as np
import pytest

from latent_diffusion.training import checkpointing, partitioning
from latent_diffusion.training.loop import NonFiniteError, train_and_evaluate
from tests.training.helpers import params_close, tiny_ae_config


@pytest.fixture(scope="module")
def straight(shapes_data_dir, tmp_path_factory):
    """One uninterrupted 4-step run (checkpoints at steps 2 and 4), shared by several tests."""
    workdir = str(tmp_path_factory.mktemp("straight"))
    return workdir, train_and_evaluate(tiny_ae_config(shapes_data_dir, steps=4), workdir)


def _copy(workdir, tmp_path):
    dst = str(tmp_path / "copy")
    shutil.copytree(workdir, dst)
    return dst


def test_sharded_step_matches_single_device(shapes_data_dir, tmp_path):
    cfg = tiny_ae_config(shapes_data_dir, steps=3, sgd=True)
    cfg.mesh.data, cfg.mesh.fsdp = 4, 2
    cfg.partitioning.min_shard_size = 64   # so the fsdp axis really shards parameters
    eight = train_and_evaluate(cfg, str(tmp_path / "eight"))
    one = train_and_evaluate(tiny_ae_config(shapes_data_dir, steps=3, sgd=True), str(tmp_path / "one"),
                             devices=jax.devices()[:1])
    assert eight.step == one.step == 3
    sharded = [x for x in jax.tree.leaves(eight.state.params) if not x.sharding.is_fully_replicated]
    assert sharded, "expected some parameters to be sharded over the fsdp axis"
    # Same math, different reduction order: equal to float32 rounding.
    params_close(eight.state.params, one.state.params, rtol=1e-5, atol=1e-6)
    assert eight.eval_metrics["psnr"] == pytest.approx(one.eval_metrics["psnr"], abs=1e-3)


def test_resume_is_bit_identical(straight, shapes_data_dir, tmp_path):
    first = train_and_evaluate(tiny_ae_config(shapes_data_dir, steps=2), str(tmp_path / "b"))
    assert first.resumed_from is None and first.step == 2
    second = train_and_evaluate(tiny_ae_config(shapes_data_dir, steps=4), str(tmp_path / "b"))
    assert second.resumed_from == 2 and second.step == 4
    run = straight[1]
    params_close(run.state.params, second.state.params)          # bit-identical
    params_close(run.state.opt_state, second.state.opt_state)
    params_close(run.state.ema_params, second.state.ema_params)
    params_close(run.state.model_state, second.state.model_state)


def test_restore_into_another_mesh(straight):
    workdir, run = straight
    state = jax.device_get(run.state)
    for data, fsdp, n in [(1, 1, 1), (2, 2, 4), (1, 8, 8)]:
        mesh = partitioning.make_mesh(data, fsdp, jax.devices()[:n])
        shardings = partitioning.tree_shardings(state, mesh, (), min_shard_size=64)
        mngr = checkpointing.make_manager(workdir, async_save=False, with_data=False)
        restored, meta, step = checkpointing.restore(mngr, checkpointing.abstract_like(state, shardings))
        mngr.close()
        assert step == 4 and meta["stage"] == "autoencoder" and meta["scale_factor"] > 0
        params_close(state.params, restored.params)
        leaf = restored.params["model"]["decoder"]["conv_out"]["kernel"]
        assert leaf.sharding.mesh.devices.size == n
        if fsdp > 1:
            assert any(not x.sharding.is_fully_replicated for x in jax.tree.leaves(restored.params))


def test_checkpoint_with_mismatched_shapes_is_refused(straight, shapes_data_dir, tmp_path):
    other = tiny_ae_config(shapes_data_dir, steps=6)
    other.model.ch = 32
    with pytest.raises(ValueError, match="does not match the model"):
        train_and_evaluate(other, _copy(straight[0], tmp_path))


def test_nan_guard_stops_with_intact_checkpoint(straight, shapes_data_dir, tmp_path):
    workdir = _copy(straight[0], tmp_path)
    bad = tiny_ae_config(shapes_data_dir, steps=8)
    bad.optim.lr = float("nan")
    with pytest.raises(NonFiniteError, match="last intact checkpoint is step 4"):
        train_and_evaluate(bad, workdir)
    assert checkpointing.read_meta(workdir)["step"] == 4
    # The intact checkpoint still resumes with a sane config.
    good = train_and_evaluate(tiny_ae_config(shapes_data_dir, steps=5), workdir)
    assert good.resumed_from == 4 and good.step == 5


def test_tensorboard_logs_and_scale_factor(straight):
    workdir, run = straight
    events = [f for f in os.listdir(os.path.join(workdir, "logs")) if "tfevents" in f]
    assert events
    assert np.isfinite(run.eval_metrics["psnr"]) and "d_loss" in run.train_metrics
    assert run.train_metrics["disc_factor"] > 0   # the GAN switched on at step 2
    assert checkpointing.read_meta(workdir)["scale_factor"] > 0


def test_vq_autoencoder_trains(shapes_data_dir, tmp_path):
    run = train_and_evaluate(tiny_ae_config(shapes_data_dir, kind="vq", steps=3), str(tmp_path / "vq"))
    assert run.step == 3
    assert np.isfinite(run.train_metrics["loss"]) and "codebook_loss" in run.train_metrics
    assert "d_loss" in run.train_metrics and run.train_metrics["disc_factor"] > 0


def test_missing_data_dir_is_a_clear_error(tmp_path):
    from configs import autoencoder_kl
    cfg = autoencoder_kl.get_config("tiny")
    cfg.data.name = "imagenet2012"
    cfg.data.data_dir = str(tmp_path / "nothing_here")
    with pytest.raises(FileNotFoundError, match="imagenet2012.*never downloads"):
        train_and_evaluate(cfg, str(tmp_path / "w"))


def test_unknown_config_key_names_the_key(tmp_path):
    import subprocess
    import sys
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    proc = subprocess.run([sys.executable, os.path.join(root, "train.py"), "--config=configs/autoencoder_kl.py:tiny",
                           f"--workdir={tmp_path}", "--config.optim.learning_rate=1e-3"],
                          cwd=root, capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0 and "learning_rate" in proc.stderr


def test_ldm_step_with_fsdp_matches_one_device(shapes_data_dir, tmp_path):
    """The frozen first stage and text encoder are laid out as the step declares them (fsdp > 1 used
    to stop at the first step on a sharding mismatch), and the sharded run computes the same losses."""
    from tests.tiny_ldm import text_ldm_config

    def config():
        c = text_ldm_config(shapes_data_dir)
        c.num_train_steps, c.log_every, c.eval_every = 2, 1, 2
        c.checkpoint.every = 2
        return c

    cfg = config()
    cfg.mesh.data, cfg.mesh.fsdp = 2, 4
    cfg.partitioning.min_shard_size = 64   # so frozen and trained arrays really shard over fsdp
    sharded = train_and_evaluate(cfg, str(tmp_path / "fsdp"))
    one = train_and_evaluate(config(), str(tmp_path / "one"), devices=jax.devices()[:1])
    assert any(not x.sharding.is_fully_replicated for x in jax.tree.leaves(sharded.state.params))
    assert sharded.train_metrics["loss"] == pytest.approx(one.train_metrics["loss"], rel=1e-4)
    assert sharded.eval_metrics["loss"] == pytest.approx(one.eval_metrics["loss"], rel=1e-4)
    params_close(sharded.state.params, one.state.params, rtol=1e-3, atol=1e-5)


def test_ldm_bfloat16_compute_keeps_float32_masters(shapes_data_dir):
    """unet.dtype=bfloat16 (UNet and jointly trained text encoder): the layers compute in bfloat16 from
    float32 master weights; the loss is float32's within bfloat16 rounding, and parameters and optimizer
    state stay float32 after a step."""
    from latent_diffusion.data import loader
    from latent_diffusion.diffusion import objectives
    from latent_diffusion.training.ldm_task import LDMTask
    from tests.tiny_ldm import text_ldm_config
    mesh = partitioning.make_mesh()
    losses = {}
    for dtype in ("float32", "bfloat16"):
        cfg = text_ldm_config(shapes_data_dir)
        cfg.unet.dtype = dtype
        task = LDMTask(cfg, mesh, "")
        frozen = task.frozen()
        it = loader.make_dataset(cfg.data, "train", global_batch_size=8, seed=0,
                                 extra_transforms=task.host_transforms())
        batch = partitioning.global_batch(next(it), mesh)
        state = jax.jit(task.init)(jax.random.key(0), batch, frozen)
        t = objectives.sample_timesteps(jax.random.key(1), 8, task.schedule.num_timesteps)
        # The UNet's zero-initialised output layer would make the loss independent of the dtype: perturb.
        leaves, tree = jax.tree.flatten(state.params["model"])
        keys = jax.random.split(jax.random.key(9), len(leaves))
        params = jax.tree.unflatten(tree, [p + 0.05 * jax.random.normal(k, p.shape, p.dtype)
                                           for p, k in zip(leaves, keys)])
        losses[dtype] = np.asarray(jax.jit(lambda p: task.loss_terms(
            p, batch, jax.random.key(2), frozen, t, jax.random.key(3), drop=False, deterministic=True))(params))
        new, metrics = jax.jit(task.train_step)(state, batch, jax.random.key(4), frozen)
        assert np.isfinite(metrics["loss"]) and np.isfinite(metrics["grad_norm"])
        assert {str(x.dtype) for x in jax.tree.leaves((new.params, new.opt_state)) if x.ndim} == {"float32"}
    np.testing.assert_allclose(losses["bfloat16"], losses["float32"], rtol=5e-2)
    assert not np.array_equal(losses["bfloat16"], losses["float32"])  # the dtype really reaches the layers
