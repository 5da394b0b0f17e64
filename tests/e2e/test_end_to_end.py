"""README command 1 (end_to_end.py) on a cut-down budget: both stages, held-out prompts, scores, the grid;
and a rerun that continues instead of starting again."""
import json
import os

import numpy as np
import pytest
from PIL import Image

from tests.tiny_ldm import text_ldm_config


def _configs(data_dir):
    from configs import autoencoder_kl
    ae = autoencoder_kl.get_config("tiny")
    ae.model.ch, ae.model.ch_mult = 8, (1, 2, 4)
    ae.data.data_dir, ae.data.config, ae.data.resolution = data_dir, "tiny", 32
    ae.batch_size, ae.eval_batch_size, ae.num_eval_batches = 8, 8, 1
    ae.num_train_steps = ae.eval_every = ae.checkpoint.every = ae.optim.decay_steps = 4
    ae.log_every, ae.optim.warmup_steps, ae.checkpoint.async_save = 2, 0, False
    ldm = text_ldm_config(data_dir)
    ldm.first_stage.random_init = False  # end_to_end points it at the stage-1 run it trains
    ldm.num_train_steps = ldm.eval_every = ldm.checkpoint.every = 4
    ldm.log_every, ldm.optim.warmup_steps = 2, 0
    return ae, ldm


@pytest.mark.slow
def test_end_to_end_cut_down(shapes_data_dir, tmp_path):
    from latent_diffusion import end_to_end
    workdir = str(tmp_path / "job")
    kw = dict(data_dir=shapes_data_dir, num_prompts=3, guidance=[3.0], sample_steps=2, fid_samples=8, seed=0)
    first = end_to_end.run(*_configs(shapes_data_dir), workdir, **kw)
    for name in ("single", "two"):
        s = first.scores["g3"][name]
        assert s["num_prompts"] == 3 and all(0.0 <= s[a] <= 1.0 for a in ("all", "position", "kind", "color", "size"))
    assert np.isfinite(first.scores["g3"]["shapes_fid"])
    grid = np.asarray(Image.open(first.grid_path))
    assert grid.ndim == 3 and grid.shape[0] > 32
    with open(first.scores_path) as f:
        record = json.load(f)
    assert record["scores"] == first.scores and record["ldm_step"] == 4
    assert len(record["prompts"]["single"]) == 3
    report = end_to_end.report(first)
    assert first.grid_path in report and "all right" in report
    # A rerun trains nothing more and reads the samples back: the same scores.
    pngs = sorted(os.listdir(os.path.join(workdir, "samples", "single_g3")))
    second = end_to_end.run(*_configs(shapes_data_dir), workdir, **kw)
    assert second.scores == first.scores
    assert sorted(os.listdir(os.path.join(workdir, "samples", "single_g3"))) == pngs
