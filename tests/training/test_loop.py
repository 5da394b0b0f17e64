"""The training loop: sharding, resume, checkpoint restore into other meshes, NaN guard, bad input."""
import os

import jax
import numpy as np
import pytest

from latent_diffusion.training import checkpointing, partitioning
from latent_diffusion.training.loop import NonFiniteError, train_and_evaluate
from tests.training.helpers import params_close, tiny_ae_config


def test_sharded_step_matches_single_device(shapes_data_dir, tmp_path):
    cfg = tiny_ae_config(shapes_data_dir, steps=3, sgd=True)
    cfg.mesh.data, cfg.mesh.fsdp = 4, 2
    cfg.partitioning.min_shard_size = 64   # so the fsdp axis really shards parameters
    eight = train_and_evaluate(cfg, str(tmp_path / "eight"))
    one_cfg = tiny_ae_config(shapes_data_dir, steps=3, sgd=True)
    one = train_and_evaluate(one_cfg, str(tmp_path / "one"), devices=jax.devices()[:1])
    assert eight.step == one.step == 3
    sharded = [x for x in jax.tree.leaves(eight.state.params) if not x.sharding.is_fully_replicated]
    assert sharded, "expected some parameters to be sharded over the fsdp axis"
    # Same math, different reduction order: equal to float32 rounding.
    params_close(eight.state.params, one.state.params, rtol=1e-5, atol=1e-6)
    assert eight.eval_metrics["psnr"] == pytest.approx(one.eval_metrics["psnr"], abs=1e-3)


def test_resume_is_bit_identical(shapes_data_dir, tmp_path):
    straight = train_and_evaluate(tiny_ae_config(shapes_data_dir, steps=4), str(tmp_path / "a"))
    first = train_and_evaluate(tiny_ae_config(shapes_data_dir, steps=2), str(tmp_path / "b"))
    assert first.resumed_from is None and first.step == 2
    second = train_and_evaluate(tiny_ae_config(shapes_data_dir, steps=4), str(tmp_path / "b"))
    assert second.resumed_from == 2 and second.step == 4
    params_close(straight.state.params, second.state.params)          # bit-identical
    params_close(straight.state.opt_state, second.state.opt_state)
    params_close(straight.state.ema_params, second.state.ema_params)


def test_restore_into_another_mesh(shapes_data_dir, tmp_path):
    cfg = tiny_ae_config(shapes_data_dir, steps=2)
    run = train_and_evaluate(cfg, str(tmp_path / "w"))
    state = jax.device_get(run.state)
    for data, fsdp, n in [(1, 1, 1), (2, 2, 4), (1, 8, 8)]:
        mesh = partitioning.make_mesh(data, fsdp, jax.devices()[:n])
        shardings = partitioning.tree_shardings(state, mesh, (), min_shard_size=64)
        mngr = checkpointing.make_manager(str(tmp_path / "w"), async_save=False, with_data=False)
        restored, meta, step = checkpointing.restore(mngr, checkpointing.abstract_like(state, shardings))
        mngr.close()
        assert step == 2 and meta["stage"] == "autoencoder" and meta["scale_factor"] > 0
        params_close(state.params, restored.params)
        leaf = restored.params["model"]["decoder"]["conv_out"]["kernel"]
        assert leaf.sharding.mesh.devices.size == n


def test_checkpoint_with_mismatched_shapes_is_refused(shapes_data_dir, tmp_path):
    cfg = tiny_ae_config(shapes_data_dir, steps=2)
    train_and_evaluate(cfg, str(tmp_path / "w"))
    other = tiny_ae_config(shapes_data_dir, steps=4)
    other.model.ch = 32
    with pytest.raises(ValueError, match="does not match the model"):
        train_and_evaluate(other, str(tmp_path / "w"))


def test_nan_guard_stops_with_intact_checkpoint(shapes_data_dir, tmp_path):
    cfg = tiny_ae_config(shapes_data_dir, steps=2)
    train_and_evaluate(cfg, str(tmp_path / "w"))
    before = checkpointing.read_meta(str(tmp_path / "w"))
    bad = tiny_ae_config(shapes_data_dir, steps=6)
    bad.optim.lr = float("nan")
    with pytest.raises(NonFiniteError, match="last intact checkpoint is step 2"):
        train_and_evaluate(bad, str(tmp_path / "w"))
    after = checkpointing.read_meta(str(tmp_path / "w"))
    assert after["step"] == before["step"] == 2


def test_vq_autoencoder_trains(shapes_data_dir, tmp_path):
    run = train_and_evaluate(tiny_ae_config(shapes_data_dir, kind="vq", steps=3), str(tmp_path / "vq"))
    assert run.step == 3
    assert np.isfinite(run.train_metrics["loss"]) and "codebook_loss" in run.train_metrics
    assert "d_loss" in run.train_metrics and run.train_metrics["disc_factor"] > 0


def test_tensorboard_logs_written(shapes_data_dir, tmp_path):
    train_and_evaluate(tiny_ae_config(shapes_data_dir, steps=2), str(tmp_path / "w"))
    events = [f for f in os.listdir(tmp_path / "w" / "logs") if "tfevents" in f]
    assert events


def test_missing_data_dir_is_a_clear_error(tmp_path):
    from configs import autoencoder_kl
    cfg = autoencoder_kl.get_config("tiny")
    cfg.data.name = "imagenet2012"
    cfg.data.data_dir = str(tmp_path / "nothing_here")
    with pytest.raises(Exception, match="imagenet2012"):
        train_and_evaluate(cfg, str(tmp_path / "w"))
