"""The shapes judge: its accuracy on held-out renders, and the prompt-following score built on it."""
import numpy as np
import pytest

from latent_diffusion.data import shapes
from latent_diffusion.evaluation import shapes_classifier as sc
from latent_diffusion.evaluation import shapes_prompts as sp


@pytest.fixture(scope="module")
def judge():
    return sc.ShapesJudge.load()


def _test_split(n):
    scenes = [shapes.sample_scene(np.random.default_rng(shapes.example_seed("test", i))) for i in range(n)]
    return scenes, np.stack([shapes.render_scene(s, 64)["image"] for s in scenes])


def test_packaged_weights_match_the_renderer():
    assert sc.load_meta(sc.DEFAULT_WEIGHTS)["renderer"] == sc.renderer_fingerprint(), (
        "the renderer changed since the judge was trained: rerun scripts/train_shapes_classifier.py")


def test_judge_reads_held_out_renders(judge):
    scenes, images = _test_split(500)
    acc = sc.accuracy_on_renders(judge, images, scenes)
    assert acc["objects"] >= 0.98 and acc["images"] >= 0.98, acc
    # Renders of another resolution are read after resizing, float images in [-1, 1] too.
    big = np.stack([shapes.render_scene(s, 128)["image"] for s in scenes[:64]])
    acc_big = sc.accuracy_on_renders(judge, big.astype(np.float32) / 127.5 - 1, scenes[:64])
    assert acc_big["objects"] >= 0.95, acc_big


def test_score_is_exact_on_ground_truth_readings():
    exclude = sp.train_captions(200)
    prompts = sp.heldout_prompts("single", 20, exclude) + sp.heldout_prompts("two", 20, exclude)
    assert not {p["caption"] for p in prompts} & exclude
    t = [sc.objects_targets(p["objects"]) for p in prompts]
    stack = {k: np.stack([x[k] for x in t]) for k in t[0]}
    reading = sc.Reading(presence=stack["presence"] > 0, kind=np.maximum(stack["kind"], 0),
                         color=np.maximum(stack["color"], 0), size=np.maximum(stack["size"], 0),
                         embedding=np.zeros((40, 9, sc.EMBED_DIM)), presence_logit=stack["presence"])
    perfect = sp.score(reading, prompts)
    assert perfect["all"] == 1.0 and perfect["count"] == 1.0
    # A wrong colour everywhere: colour and 'all' drop to zero, the rest stays right.
    wrong = sc.Reading(**{**reading.__dict__, "color": (reading.color + 1) % len(shapes.COLOR_NAMES)})
    r = sp.score(wrong, prompts)
    assert r["color"] == 0.0 and r["all"] == 0.0 and r["kind"] == 1.0 and r["position"] == 1.0
    # One-shape prompts drawn one cell off: position wrong, attributes still read from the shape that is there.
    single = prompts[:20]
    moved = sc.Reading(**{k: np.roll(v[:20], 1, axis=1) for k, v in reading.__dict__.items()})
    r = sp.score(moved, single)
    assert r["position"] == 0.0 and r["kind"] == 1.0 and r["color"] == 1.0 and r["all"] == 0.0


def test_training_learns_from_renders():
    params = sc.train(steps=150, batch_size=16, lr=3e-3, seed=1, log_every=150, log=lambda s: None)
    x, targets = sc.render_batch(np.random.default_rng(5), 32, augment=False)
    _, metrics = sc.loss_fn(params, x, targets)
    assert metrics["presence_acc"] > 0.9 and metrics["color_acc"] > 0.5, metrics
