"""CLIP score against torchmetrics' CLIPScore (random small CLIPModel, PIL preprocessing), the CLIPModel
loader, the `tower=` switch of from_transformers, and evaluate.py's --metrics=kid,clip path."""
import importlib.util
import json
import os

import jax
import numpy as np
import pytest
from PIL import Image

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from latent_diffusion import convert  # noqa: E402
from latent_diffusion.evaluation import metrics as M  # noqa: E402
from latent_diffusion.evaluation import pipeline  # noqa: E402
from latent_diffusion.evaluation.clip_score import ImagePreprocess, load_clip  # noqa: E402
from latent_diffusion.evaluation.images import ArraySet, open_image_set, prompts_of  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
LETTERS = "abcdefghijklmnopqrstuvwxyz"
WORDS = ["a", "red", "blue", "circle", "square", "on", "the", "left", "photo", "of", "cat"]
PROMPTS = ["a red circle on the left", "a photo of a cat", "blue square", "a red circle on the left",
           "the cat on a blue square", "photo"]


def _write_tokenizer(path):
    """A CLIP BPE vocabulary (letters + a few whole words) that spells any lowercase text."""
    pieces = list(LETTERS) + [c + "</w>" for c in LETTERS] + [w + "</w>" for w in WORDS if len(w) > 1]
    merges = []
    for w in WORDS:  # merge left to right: r e -> re, re d</w> -> red</w>
        if len(w) > 1:
            left = w[0]
            for i, c in enumerate(w[1:], 1):
                right = c + ("</w>" if i == len(w) - 1 else "")
                merges.append(f"{left} {right}")
                left = left + right
                if left not in pieces:
                    pieces.append(left)
    vocab = {"!": 0, **{p: i + 1 for i, p in enumerate(dict.fromkeys(pieces))}}
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    (path / "vocab.json").write_text(json.dumps(vocab))
    (path / "merges.txt").write_text("#version: 0.2\n" + "\n".join(dict.fromkeys(merges)) + "\n")
    return vocab


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    """A random small CLIPModel saved as transformers writes it, with tokenizer and PIL image processor."""
    path = tmp_path_factory.mktemp("clip")
    vocab = _write_tokenizer(path)
    text = dict(vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                num_attention_heads=2, max_position_embeddings=77, bos_token_id=vocab["<|startoftext|>"],
                eos_token_id=2, pad_token_id=vocab["<|endoftext|>"])  # eos 2: the legacy rule, as OpenAI's
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                  image_size=224, patch_size=32)
    torch.manual_seed(0)
    model = transformers.CLIPModel(transformers.CLIPConfig(text_config=text, vision_config=vision,
                                                           projection_dim=16)).eval()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        # A shared LayerNorm bias and projection give image and text embeddings a common direction, so
        # the mean cosine is clearly positive (the score is not clipped to 0) and still input-dependent.
        bias = 0.7 * torch.randn(32, generator=g)
        model.text_model.final_layer_norm.bias.copy_(bias)
        model.vision_model.post_layernorm.bias.copy_(bias)
        model.text_projection.weight.copy_(model.visual_projection.weight)
    model.save_pretrained(str(path))
    tokenizer = transformers.CLIPTokenizer.from_pretrained(str(path))
    processor = transformers.CLIPProcessor(image_processor=transformers.CLIPImageProcessorPil(),
                                           tokenizer=tokenizer)
    processor.save_pretrained(str(path))
    return path, model, processor


class _TorchmetricsCLIP(transformers.CLIPModel):
    """transformers >= 5 returns model outputs from get_*_features; torchmetrics (1.9) expects the tensor."""

    def get_image_features(self, *args, **kwargs):
        out = super().get_image_features(*args, **kwargs)
        return getattr(out, "pooler_output", out)

    def get_text_features(self, *args, **kwargs):
        out = super().get_text_features(*args, **kwargs)
        return getattr(out, "pooler_output", out)


def _images(n, h, w, seed):
    """Half noise (where PIL's 8-bit resize differs most from a float one), half smooth gradients."""
    rng = np.random.RandomState(seed)
    out = rng.randint(0, 256, (n, h, w, 3)).astype(np.uint8)
    yy, xx = np.mgrid[0:h, 0:w]
    for i in range(0, n, 2):
        phase = rng.uniform(0, 6, 3)
        out[i] = (127.5 + 127 * np.sin(xx[..., None] / 7 + yy[..., None] / 11 + phase)).astype(np.uint8)
    return out


def test_clip_score_matches_torchmetrics(clip_dir):
    tm_clip = pytest.importorskip("torchmetrics.multimodal.clip_score")
    from torchmetrics.functional.multimodal.clip_score import _clip_score_update
    path, _, processor = clip_dir
    model = _TorchmetricsCLIP.from_pretrained(str(path)).eval()
    scorer = load_clip(str(path))
    assert scorer.preprocess == ImagePreprocess()  # read from preprocessor_config.json: CLIP's defaults
    images = _images(len(PROMPTS), 150, 190, seed=0)  # non-square, downscaled: resize + crop both matter
    as_torch = [torch.from_numpy(im).permute(2, 0, 1) for im in images]

    ours = scorer(ArraySet(images, "test"), PROMPTS, batch_size=4, progress=False)
    with torch.no_grad():
        per_sample, _ = _clip_score_update(as_torch, PROMPTS, model, processor)
        metric = tm_clip.CLIPScore(model_name_or_path=lambda: (model, processor))
        metric.update(as_torch[:4], PROMPTS[:4])
        metric.update(as_torch[4:], PROMPTS[4:])
        ref = float(metric.compute())
    per_sample = per_sample.numpy()
    assert per_sample.mean() > 5 and per_sample.std() > 0.1  # not clipped, not constant
    img = scorer.image_embeds(ArraySet(images, "test"), batch_size=4, progress=False)
    txt = scorer.text_embeds(PROMPTS, batch_size=4, progress=False)
    np.testing.assert_allclose(100 * np.sum(img * txt, -1), per_sample, rtol=0,
                               atol=1e-4 * np.abs(per_sample).max())
    assert ours["clip_score"] == pytest.approx(ref, rel=1e-4)
    assert ours["clip_score_num"] == len(PROMPTS)
    assert ours["clip_score_std"] == pytest.approx(per_sample.std(), rel=1e-3)


def test_preprocess_is_pils_not_jax(clip_dir):
    """The host-side resize reproduces transformers' PIL processor pixel for pixel (jax's bicubic does not)."""
    _, _, processor = clip_dir
    pre = ImagePreprocess()
    for h, w in ((150, 190), (64, 64), (300, 240)):
        im = _images(1, h, w, seed=h)[0]
        want = processor.image_processor(images=[im], return_tensors="np")["pixel_values"][0].transpose(1, 2, 0)
        got = (pre.resize_crop(im) / 255.0 - np.array(pre.mean)) / np.array(pre.std)
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-5)


def test_clip_score_metric_and_errors(tmp_path, clip_dir):
    a = np.eye(3)[[0, 1, 2]]
    assert M.clip_score(a, a)["clip_score"] == pytest.approx(100.0)
    assert M.clip_score(a, -a)["clip_score"] == 0.0  # torchmetrics clips the mean at 0
    with pytest.raises(ValueError, match="paired"):
        M.clip_score(a, a[:2])
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_clip(str(tmp_path))
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "clip_text_model"}))
    with pytest.raises(ValueError, match="full CLIPModel"):
        load_clip(str(tmp_path))
    path, _, _ = clip_dir
    scorer = load_clip(str(path))
    with pytest.raises(ValueError, match="2 images but 1 prompts"):
        scorer(ArraySet(np.zeros((2, 8, 8, 3), np.uint8), "x"), ["a"], progress=False)


def test_from_transformers_tower_switch(clip_dir):
    path, model, _ = clip_dir
    config = json.loads((path / "config.json").read_text())
    assert config["architectures"] == ["CLIPModel"]
    sd = model.state_dict()
    with pytest.raises(ValueError, match="tower='text' or tower='vision'"):
        convert.from_transformers(config, sd)
    text, _ = convert.from_transformers(config, sd, tower="text")
    vision, _ = convert.from_transformers(config, sd, tower="vision")
    assert text.projection_dim == 16 and vision.projection_dim == 16 and vision.image_size == 224
    tower_cfg = dict(model.text_model.config.to_dict(), architectures=["CLIPTextModel"])
    tower_sd = {k[len("text_model."):]: v for k, v in sd.items() if k.startswith("text_model.")}
    module, _ = convert.from_transformers(tower_cfg, tower_sd)  # single towers work as before
    assert module.projection_dim is None
    with pytest.raises(ValueError, match="tower='vision'"):
        convert.from_transformers(tower_cfg, tower_sd, tower="vision")


def _sample_folder(path, images, prompts):
    """A folder as sample.py writes it: 000000.png ... and manifest.jsonl with `file` and `prompt`."""
    path.mkdir()
    with open(path / "manifest.jsonl", "w") as f:
        for i, (im, p) in enumerate(zip(images, prompts)):
            Image.fromarray(im).save(path / f"{i:06d}.png")
            f.write(json.dumps({"index": i, "prompt": p, "seed": i, "sampler": "ddim", "steps": 5, "scale": 5.0,
                                "negative_prompt": "", "file": f"{i:06d}.png"}) + "\n")
    return str(path)


def test_sample_folder_manifest_and_prompts(tmp_path):
    images = _images(4, 16, 16, seed=3)
    folder = _sample_folder(tmp_path / "s", images, PROMPTS[:4])
    got = np.concatenate(list(open_image_set(folder, "samples").batches(3)))
    np.testing.assert_array_equal(got, images)
    assert prompts_of(folder) == PROMPTS[:4]
    # samples.npz beside the manifest: prompts by index, whatever the manifest's line order.
    lines = (tmp_path / "s" / "manifest.jsonl").read_text().splitlines()
    (tmp_path / "s" / "manifest.jsonl").write_text("\n".join(lines[::-1]) + "\n")
    np.savez(tmp_path / "s" / "samples.npz", arr_0=images)
    assert prompts_of(str(tmp_path / "s" / "samples.npz")) == PROMPTS[:4]
    # Slices (one host's share) read just their images.
    part = open_image_set(folder, "samples").slice(1, 3)
    assert len(part) == 2
    np.testing.assert_array_equal(np.concatenate(list(part.batches(8))), images[[2, 1]])  # reversed manifest
    (tmp_path / "s" / "manifest.jsonl").write_text(lines[0][:-5] + "\n")
    with pytest.raises(ValueError, match="not a JSON line"):
        open_image_set(folder, "samples")
    plain = tmp_path / "plain"
    plain.mkdir()
    Image.fromarray(images[0]).save(plain / "x.png")
    with pytest.raises(ValueError, match="no manifest.jsonl"):
        prompts_of(str(plain))


@pytest.fixture(scope="module")
def evaluate_main():
    spec = importlib.util.spec_from_file_location("evaluate_script", os.path.join(ROOT, "evaluate.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_evaluate_main_kid_and_clip(tmp_path, clip_dir, evaluate_main, monkeypatch, capsys):
    """evaluate.py's flags -> pipeline -> JSON, on a sample.py-style folder (small random Inception)."""
    from absl import flags
    from latent_diffusion.convert import inception as inception_conv
    from latent_diffusion.models.inception import InceptionV3

    def small_inception(weights, allow_random):
        assert allow_random  # the test-only switch is what lets random weights through
        module = InceptionV3(resize_to=None)  # 75x75 inputs: fast to compile
        return module, inception_conv.random_params(module, seed=0), "RANDOM (test only)"

    monkeypatch.setattr(pipeline, "load_inception", small_inception)
    path, _, _ = clip_dir
    samples = _images(len(PROMPTS), 75, 75, seed=5)
    folder = _sample_folder(tmp_path / "samples", samples, PROMPTS)
    np.savez(tmp_path / "ref.npz", arr_0=_images(8, 75, 75, seed=6))
    out = tmp_path / "results.json"
    argv = ["evaluate.py", f"--samples={folder}", f"--reference={tmp_path / 'ref.npz'}", "--metrics=kid,clip",
            f"--clip_model={path}", "--allow_random_inception_for_tests", "--batch_size=4", "--kid_subsets=3",
            f"--out={out}", "--noprogress"]
    flags.FLAGS(argv)
    try:
        evaluate_main.main(argv[:1])
    finally:
        flags.FLAGS.unparse_flags()
    results = json.loads(out.read_text())
    m = results["metrics"]
    assert set(m) == {"kid_mean", "kid_std", "kid_subset_size", "clip_score", "clip_score_std", "clip_score_num"}
    assert np.isfinite(m["kid_mean"]) and m["clip_score_num"] == len(PROMPTS)
    scorer = load_clip(str(path))
    want = scorer(ArraySet(samples, "s"), PROMPTS, batch_size=8, devices=jax.devices()[:1], progress=False)
    assert m["clip_score"] == pytest.approx(want["clip_score"], rel=1e-5)  # device count does not matter
    assert results["clip_model"] == os.path.abspath(path)
    assert results["inception_weights"] == "RANDOM (test only)"
    assert results["samples"]["num_images"] == len(PROMPTS)
    assert "clip_score" in capsys.readouterr().out

    with pytest.raises(ValueError, match="--clip_model"):
        pipeline.evaluate(pipeline.EvalOptions(samples=folder, metrics=("clip",)))
    # CLIP alone needs no reference, and runs no Inception even when one is given.
    res = pipeline.evaluate(pipeline.EvalOptions(samples=folder, reference=str(tmp_path / "ref.npz"),
                                                 metrics=("clip",), progress=False), clip_scorer=scorer)
    assert res["metrics"]["clip_score"] == pytest.approx(m["clip_score"], rel=1e-5)
    assert "inception_weights" not in res
