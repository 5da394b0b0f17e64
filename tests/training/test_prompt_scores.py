"""A shapes text-to-image run logs its prompt-following score and a grid of held-out prompts at each evaluation."""
import numpy as np

from latent_diffusion.training.loop import train_and_evaluate
from tests.tiny_ldm import text_ldm_config


def test_eval_writes_prompt_scores_and_grid(shapes_data_dir, tmp_path):
    c = text_ldm_config(shapes_data_dir)
    c.num_train_steps = c.eval_every = c.checkpoint.every = c.log_every = 2
    c.sample.prompt_score.update(num_prompts=2, steps=2, guidance=3.0)
    run = train_and_evaluate(c, str(tmp_path / "ldm"))
    m = run.eval_metrics
    for name in ("single", "two"):
        for a in ("all", "position", "kind", "color", "size", "count"):
            assert 0.0 <= m[f"prompts/{name}/{a}"] <= 1.0, (name, a, m)

    from tensorboard.backend.event_processing import event_accumulator
    acc = event_accumulator.EventAccumulator(str(tmp_path / "ldm" / "logs"), size_guidance={"tensors": 0})
    acc.Reload()
    tags = acc.Tags()
    assert "prompts_grid" in tags["images"] + tags["tensors"], tags
    assert np.isfinite(m["loss"])
