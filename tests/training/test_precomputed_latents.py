"""Precomputed first-stage latents (scripts/precompute_latents.py + data.latents_dir) on a tiny text LDM."""
import importlib.util
import json
import os
import shutil

import jax
import numpy as np
import pytest

from tests.tiny_ldm import text_ldm_config

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _script():
    spec = importlib.util.spec_from_file_location("precompute_latents",
                                                  os.path.join(ROOT, "scripts", "precompute_latents.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def tiny_config(data_dir, latents_dir=""):
    c = text_ldm_config(data_dir)
    assert c.data.random_flip  # the stored mirror images are part of what is tested
    c.data.latents_dir = latents_dir
    c.num_train_steps, c.log_every, c.eval_every, c.checkpoint.every = 4, 2, 4, 2
    return c


@pytest.fixture(scope="module")
def stored(shapes_data_dir, tmp_path_factory):
    from latent_diffusion.training import first_stage as first_stage_lib, partitioning
    out = str(tmp_path_factory.mktemp("latents"))
    config = tiny_config(shapes_data_dir)
    fs = first_stage_lib.load(config.first_stage, partitioning.make_mesh())
    script = _script()
    metas = {split: script.precompute(config, out, split, shard_size=24, batch_size=8, first_stage=fs)
             for split in ("train", "test")}
    return dict(out=out, fs=fs, metas=metas, script=script, data_dir=shapes_data_dir)


def test_stored_latents_equal_first_stage_encode(stored):
    from latent_diffusion.data import latents, loader
    from array_record.python import array_record_module
    meta, fs = stored["metas"]["train"], stored["fs"]
    assert meta["complete"] and meta["num_examples"] == 64 and meta["views"] == 2
    assert meta["shards"] == ["shard-00000.array_record", "shard-00001.array_record", "shard-00002.array_record"]
    assert meta["latent_shape"] == [16, 16, fs.latent_channels]
    cfg = loader.settings(tiny_config(stored["data_dir"]).data)
    _, features, source = loader.open_source(cfg, "train")
    decoder = loader.ExampleDecoder(cfg, features)
    reader = array_record_module.ArrayRecordReader(os.path.join(stored["out"], "train", meta["shards"][1]))
    records = [latents.decode_record(reader.read())[0] for _ in range(6)]
    reader.close()
    images, want = [], []
    for j, views in enumerate(records):
        for v in (0, 1):
            e = decoder.decode(source[24 + j], flip=bool(v))
            images.append(e["image"])
            assert views[v]["caption"] == e["caption"]
            want.append(views[v])
    post = jax.jit(lambda p, x: fs.module.apply({"params": p}, x, method="encode"))(fs.params, np.stack(images))
    mean = np.stack([w["z_mean"] for w in want])
    std = np.stack([w["z_std"] for w in want])
    assert mean.dtype == np.float32 and mean.shape == (12, 16, 16, fs.latent_channels)
    # Batch-1 (stored) vs batch-12 (here) convolutions: equal up to float32 summation order.
    np.testing.assert_allclose(mean, post.mean, atol=1e-5 * float(np.abs(post.mean).max()))
    np.testing.assert_allclose(std, post.std, rtol=1e-5)
    assert not np.allclose(mean[0], mean[1])  # the mirror view is a different latent


def test_loss_from_stored_latents_equals_on_the_fly(stored):
    from latent_diffusion.data import loader
    from latent_diffusion.diffusion import objectives
    from latent_diffusion.training import partitioning
    from latent_diffusion.training.ldm_task import LDMTask
    config = tiny_config(stored["data_dir"], stored["out"])
    mesh = partitioning.make_mesh()
    task = LDMTask(config, mesh, "")
    task.first_stage = stored["fs"]
    frozen = task.frozen()
    batches = []
    for latents_dir in (stored["out"], ""):
        config.data.latents_dir = latents_dir
        it = loader.make_dataset(config.data, "train", global_batch_size=8, seed=3, shuffle=True,
                                 extra_transforms=task.host_transforms())
        next(it)
        batches.append(partitioning.global_batch(next(it), mesh))
    from_latents, from_images = batches
    assert "image" not in from_latents and "z_mean" in from_latents and "image" in from_images
    # Same examples, in the same order, with the same flips: the pipelines draw the same randomness.
    np.testing.assert_array_equal(from_latents["tokens"], from_images["tokens"])
    state = jax.jit(task.init)(jax.random.key(0), from_images, frozen)
    # The UNet's output layer starts at zero, which makes the eps loss independent of x0: perturb it.
    leaves, tree = jax.tree.flatten(state.params["model"])
    keys = jax.random.split(jax.random.key(9), len(leaves))
    params = jax.tree.unflatten(tree, [p + 0.05 * jax.random.normal(k, p.shape, p.dtype)
                                       for p, k in zip(leaves, keys)])
    t = objectives.sample_timesteps(jax.random.key(1), 8, task.schedule.num_timesteps)
    loss = jax.jit(lambda b, k: task.loss_terms(params, b, k, frozen, t, jax.random.key(4), drop=True,
                                                 deterministic=False))
    a, b = np.asarray(loss(from_latents, jax.random.key(2))), np.asarray(loss(from_images, jax.random.key(2)))
    assert np.all(np.isfinite(a)) and a.std() > 0
    np.testing.assert_allclose(a, b, rtol=2e-4, atol=1e-6)
    # Not a constant: another key (fresh posterior noise, CFG and dropout draws) gives another loss.
    other = loss(from_latents, jax.random.key(5))
    assert not np.allclose(np.asarray(other), a)


def test_training_run_on_stored_latents_checkpoints(stored, tmp_path):
    from latent_diffusion.training.loop import train_and_evaluate
    workdir = str(tmp_path / "run")
    config = tiny_config(stored["data_dir"], stored["out"])
    config.sample.steps, config.sample.num_images = 2, 2  # the summary decodes stored latents (no images)
    result = train_and_evaluate(config, workdir)
    assert result.step == 4 and np.isfinite(result.train_metrics["loss"]) and np.isfinite(result.eval_metrics["loss"])
    assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["2", "4"]
    again = train_and_evaluate(tiny_config(stored["data_dir"], stored["out"]), workdir)
    assert again.resumed_from == 4


def test_record_round_trip_without_pickle():
    from latent_diffusion.data import latents
    view = {"caption": "a red star", "label": np.int32(3), "z_mean": np.ones((2, 2, 3), np.float32),
            "objects": {"bbox": np.zeros((4, 4), np.float32), "mask": np.array([1, 0, 0, 0], bool)}}
    views, corrupt = latents.decode_record(latents.encode_record([view, dict(view, caption="mirror")]))
    assert corrupt is None and [v["caption"] for v in views] == ["a red star", "mirror"]
    np.testing.assert_array_equal(views[1]["objects"]["mask"], view["objects"]["mask"])
    assert views[0]["z_mean"].dtype == np.float32 and int(views[0]["label"]) == 3
    assert latents.decode_record(latents.encode_record(None, corrupt="bad png")) == ([], "bad png")


def test_mismatched_or_unsupported_latents_are_refused(stored):
    from latent_diffusion.training import partitioning
    from latent_diffusion.training.ldm_task import LDMTask
    mesh = partitioning.make_mesh()
    config = tiny_config(stored["data_dir"], stored["out"])
    config.first_stage.scale_factor = 0.5
    with pytest.raises(ValueError, match="scale_factor"):
        LDMTask(config, mesh, "").host_transforms()  # checked when the loop asks for the loader's transforms
    config = tiny_config(stored["data_dir"], stored["out"])
    config.first_stage.model.ch = 8  # another autoencoder, same latent shape
    with pytest.raises(ValueError, match="parameters"):
        LDMTask(config, mesh, "").host_transforms()
    config = tiny_config(stored["data_dir"], stored["out"] + "_missing")
    with pytest.raises(FileNotFoundError, match="precompute_latents.py"):
        LDMTask(config, mesh, "").host_transforms()
    config = tiny_config(stored["data_dir"], stored["out"])
    config.conditioning.concat, config.conditioning.concat_channels = "lowres", 0
    config.unet.in_channels += 3
    with pytest.raises(ValueError, match="not supported yet"):
        LDMTask(config, mesh, "")
    config = tiny_config(stored["data_dir"], stored["out"])
    config.data.resolution = 64
    from latent_diffusion.data import loader
    with pytest.raises(ValueError, match="resolution"):
        loader.make_dataset(config.data, "train", global_batch_size=8, seed=0)


def test_interrupted_precompute_resumes_to_the_same_files(stored, tmp_path):
    from latent_diffusion.data import loader
    src = os.path.join(stored["out"], "train")
    out = str(tmp_path / "latents")
    dst = os.path.join(out, "train")
    shutil.copytree(src, dst)
    # A job killed while writing its last shard: metadata not complete, a partial .tmp, no shard file.
    with open(os.path.join(dst, "metadata.json")) as f:
        meta = json.load(f)
    meta["complete"] = False
    with open(os.path.join(dst, "metadata.json"), "w") as f:
        json.dump(meta, f)
    os.remove(os.path.join(dst, "shard-00002.array_record"))
    with open(os.path.join(dst, "shard-00002.array_record.tmp"), "wb") as f:
        f.write(b"partial")
    config = tiny_config(stored["data_dir"], out)
    with pytest.raises(ValueError, match="incomplete"):
        loader.make_dataset(config.data, "train", global_batch_size=8, seed=0)
    config.data.latents_dir = ""
    stored["script"].precompute(config, out, "train", shard_size=24, batch_size=8, first_stage=stored["fs"])
    assert sorted(os.listdir(dst)) == sorted(os.listdir(src))
    for name in os.listdir(src):
        with open(os.path.join(src, name), "rb") as a, open(os.path.join(dst, name), "rb") as b:
            assert a.read() == b.read(), name
    # Other settings into the same directory are refused rather than mixed in.
    config.data.resolution = 64
    with pytest.raises(ValueError, match="other settings"):
        stored["script"].precompute(config, out, "train", shard_size=24, batch_size=8, first_stage=stored["fs"])


def _clip_config(data_dir, tmp_path, latents_dir=""):
    """The tiny text LDM with a frozen (random) CLIP text encoder in place of the jointly trained one."""
    import torch
    import transformers
    from latent_diffusion.data.tokenizers import make_tokenizer
    c = tiny_config(data_dir, latents_dir)
    folder = tmp_path / "clip_text"
    if not folder.exists():
        tok = make_tokenizer(c.conditioning.text.tokenizer, int(c.conditioning.text.max_length))
        torch.manual_seed(0)
        hf = transformers.CLIPTextConfig(vocab_size=tok.vocab_size, hidden_size=32, intermediate_size=64,
                                         num_hidden_layers=1, num_attention_heads=2, bos_token_id=tok.bos_id,
                                         eos_token_id=tok.eos_id, pad_token_id=tok.pad_id,
                                         max_position_embeddings=int(c.conditioning.text.max_length))
        transformers.CLIPTextModel(hf).save_pretrained(str(folder))
    c.conditioning.text.update(encoder="clip", checkpoint=str(folder))
    return c


def test_stored_text_embeddings_train_without_the_encoder(stored, tmp_path):
    """A frozen CLIP's caption embeddings stored with the latents: equal to the encoder's, and the step
    does not run the encoder (NaN CLIP weights leave its loss unchanged)."""
    from latent_diffusion.data import latents, loader
    from latent_diffusion.diffusion import objectives
    from latent_diffusion.training import partitioning
    from latent_diffusion.training.ldm_task import LDMTask
    out = str(tmp_path / "with_text")
    config = _clip_config(stored["data_dir"], tmp_path)
    for split in ("train", "test"):
        meta = stored["script"].precompute(config, out, split, shard_size=32, batch_size=8, first_stage=stored["fs"])
    assert meta["text"]["encoder"] == "clip" and "context" in meta["fields"] and meta["text"]["dtype"] == "float16"
    config = _clip_config(stored["data_dir"], tmp_path, out)
    mesh = partitioning.make_mesh()
    task = LDMTask(config, mesh, "")
    task.first_stage = stored["fs"]
    frozen = task.frozen()
    assert frozen["null_context"].shape == (1, int(config.conditioning.text.max_length), 32)
    batches = []
    for latents_dir in (out, ""):
        config.data.latents_dir = latents_dir
        it = loader.make_dataset(config.data, "train", global_batch_size=8, seed=3, shuffle=True,
                                 extra_transforms=task.host_transforms())
        batches.append(partitioning.global_batch(next(it), mesh))
    stored_b, images_b = batches
    assert "tokens" not in stored_b and stored_b["context"].dtype == np.float16 and "tokens" in images_b
    # The stored embedding is the encoder's output for the (mirrored, where flipped) caption, in float16.
    ctx = np.asarray(task.text_context(frozen["clip"], images_b["tokens"]))
    np.testing.assert_allclose(np.asarray(stored_b["context"], np.float32), ctx, atol=2e-3 * np.abs(ctx).max())
    state = jax.jit(task.init)(jax.random.key(0), images_b, frozen)
    leaves, tree = jax.tree.flatten(state.params["model"])
    keys = jax.random.split(jax.random.key(9), len(leaves))
    params = jax.tree.unflatten(tree, [p + 0.05 * jax.random.normal(k, p.shape, p.dtype) for p, k in zip(leaves, keys)])
    t = objectives.sample_timesteps(jax.random.key(1), 8, task.schedule.num_timesteps)
    loss = jax.jit(lambda b, f: task.loss_terms(params, b, jax.random.key(2), f, t, jax.random.key(4), drop=True,
                                                 deterministic=False))
    a, b = np.asarray(loss(stored_b, frozen)), np.asarray(loss(images_b, frozen))
    assert np.all(np.isfinite(a)) and a.std() > 0
    np.testing.assert_allclose(a, b, rtol=5e-3, atol=1e-5)
    broken = dict(frozen, clip=jax.tree.map(lambda x: x * np.nan, frozen["clip"]))
    np.testing.assert_array_equal(np.asarray(loss(stored_b, broken)), a)
    # Embeddings of another encoder are refused.
    other = _clip_config(stored["data_dir"], tmp_path, out)
    other.conditioning.text.penultimate = True
    with pytest.raises(ValueError, match="another text encoder: its penultimate"):
        LDMTask(other, mesh, "").host_transforms()
    with pytest.raises(ValueError, match="trained jointly"):
        LDMTask(tiny_config(stored["data_dir"], out), mesh, "").host_transforms()
    assert latents.read_metadata(out, "test")["text"]["params_sha256"] == meta["text"]["params_sha256"]
    # The training loop on them, with guidance dropout and a sampled summary (its null prompt via the encoder).
    from latent_diffusion.training.loop import train_and_evaluate
    config = _clip_config(stored["data_dir"], tmp_path, out)
    config.first_stage.model.ch = 16  # the stored first stage (random init, seed 0) is rebuilt
    config.num_train_steps, config.eval_every, config.checkpoint.every = 2, 2, 2
    config.sample.steps, config.sample.num_images = 2, 2
    result = train_and_evaluate(config, str(tmp_path / "run"))
    assert result.step == 2 and np.isfinite(result.train_metrics["loss"]) and np.isfinite(result.eval_metrics["loss"])
