"""The image modes of LDMGenerator (img2img, inpainting by concat and by blending, SR, layout, semantic)
on tiny random LDMs built in-process: shapes, batch-size invariance, and that each input does its job."""
import importlib
from unittest import mock

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh
from PIL import Image

from configs import ldm_common
from latent_diffusion.data import preprocess
from latent_diffusion.models import build
from latent_diffusion.sampling import outputs
from latent_diffusion.sampling.jobs import _keys, _to_global, batch_spec
from latent_diffusion.sampling.pipeline import LDMGenerator, resolve_mode
from latent_diffusion.sampling.requests import RequestError, WorkItem
from latent_diffusion.training import first_stage as first_stage_lib
from latent_diffusion.training.ldm_task import LDMTask
from tests.tiny_ldm import random_weights

SIZE, STEPS = 32, 3


def _config(name):
    c = importlib.import_module(f"configs.{name}").get_config("tiny")
    # A continuous (KL) first stage: a VQ decoder would snap small latent changes to the same codes.
    c.first_stage = ldm_common.first_stage("kl", 4, tiny=True)
    c.first_stage.model.update(ch=8, ch_mult=(1, 2), num_groups=4, num_res_blocks=1, resolution=SIZE,
                               attn_resolutions=())
    z = int(c.first_stage.model.embed_dim)
    cond = c.conditioning
    extra = {"none": 0, "lowres": 3, "inpaint": z + 1,
             "segmentation": int(cond.concat_channels) or int(cond.segmentation_classes)}[cond.concat]
    c.unet.update(in_channels=z + extra, out_channels=z, num_res_blocks=1, channel_mult=(1,), attention_resolutions=())
    cond.layout.model.update(depth=1)
    # An x0-predicting random UNet keeps the latents in range whatever its weights.
    c.diffusion.prediction_type = "x0"
    c.data.resolution = SIZE
    return c


_FIRST_STAGE = []


def _random_first_stage(cfg, mesh, abstract=False):
    """Stands in for first_stage.load: one random tiny KL autoencoder shared by every task here."""
    if not _FIRST_STAGE:
        module = build.autoencoder(cfg.model)
        init = lambda r: module.init({"params": r, "sample": r}, jnp.zeros((1, SIZE, SIZE, 3)))["params"]  # noqa: E731
        shapes = jax.eval_shape(init, jax.random.key(0))
        _FIRST_STAGE.append(first_stage_lib._describe(module, "kl", random_weights(2, shapes), 1.0))
    return _FIRST_STAGE[0]


_TASKS = {}


def tiny_task(name, tmp_path_factory):
    if name not in _TASKS:
        cfg = _config(name)
        with mock.patch.object(first_stage_lib, "load", _random_first_stage):
            task = LDMTask(cfg, None, str(tmp_path_factory.mktemp(name)))
        c = cfg.conditioning
        batch = {"image": np.zeros((1, SIZE, SIZE, 3), np.float32)}
        if c.crossattn == "layout":
            batch["layout"] = np.asarray(task.null_tokens(1))
        if c.concat == "lowres":
            batch["lowres"] = np.zeros((1, SIZE // 4, SIZE // 4, 3), np.float32)
        if c.concat == "inpaint":
            batch["mask"] = np.zeros((1, SIZE, SIZE, 1), np.float32)
        if c.concat == "segmentation":
            batch["segmentation"] = np.zeros((1, SIZE, SIZE, 1), np.int32)
        shapes = jax.eval_shape(task.init, jax.random.key(0), batch, task.frozen()).params["model"]
        _TASKS[name] = (task, random_weights(1, shapes), task.frozen())
    return _TASKS[name]


def generator(name, tmp_path_factory, **kw):
    task, params, frozen = tiny_task(name, tmp_path_factory)
    return LDMGenerator(task, params, frozen, image_size=SIZE, guidance=2.0, **kw)


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """Input PNGs: two photos-to-be (one not square), masks, a low-res image, class maps."""
    d = tmp_path_factory.mktemp("inputs")
    rng = np.random.default_rng(0)
    paths = {}

    def save(name, array, mode=None):
        paths[name] = str(d / f"{name}.png")
        Image.fromarray(array, mode).save(paths[name])

    yy, xx = np.mgrid[:SIZE, :SIZE]
    smooth = np.stack([yy * 8, xx * 8, (yy + xx) * 4], -1).astype(np.uint8)
    save("a", smooth)
    save("b", rng.integers(0, 256, (SIZE, SIZE, 3), np.uint8))
    save("wide", rng.integers(0, 256, (SIZE, SIZE + 16, 3), np.uint8))
    hole = np.zeros((SIZE, SIZE), np.uint8)
    hole[8:20, 4:28] = 255
    save("mask", hole)
    save("mask_wide", np.zeros((SIZE, SIZE + 16), np.uint8))
    save("mask_none", np.zeros((SIZE, SIZE), np.uint8))
    save("mask_other", 255 - hole)
    save("low", rng.integers(0, 256, (SIZE // 4, SIZE // 4, 3), np.uint8))
    save("low_b", rng.integers(0, 256, (SIZE // 4, SIZE // 4, 3), np.uint8))
    save("low_bad", rng.integers(0, 256, (SIZE // 2, SIZE // 2, 3), np.uint8))
    seg = np.zeros((SIZE, SIZE), np.uint8)
    seg[4:20, 6:26] = 5
    save("seg", seg, "L")
    save("seg_b", np.where(seg == 5, 17, 2).astype(np.uint8), "L")
    save("seg_rgb", smooth)
    return paths


def run(gen, items, steps=STEPS, mesh=None):
    """(latents, images) of `items` as one batch, split over `mesh` the way jobs.run_job splits it."""
    arrays = gen.prepare(items)
    seeds, index = np.array([it.seed for it in items], np.uint32), np.array([it.index for it in items], np.int32)
    if mesh is not None:
        spec = batch_spec(mesh)
        arrays = {k: _to_global(v, spec, k, len(items)) for k, v in arrays.items()}
        seeds, index = _to_global(seeds, spec, "seeds", len(items)), _to_global(index, spec, "index", len(items))
    return jax.tree.map(np.asarray, gen.sample_outputs(arrays, _keys(seeds, index), steps=steps))


def batch_invariant(gen, items):
    """A batch of 4 over 4 devices (as sample.py runs it) and each item alone: byte-identical images.

    On one device a batch of 4 is equal only up to float rounding: XLA:CPU blocks its convolutions
    by batch size, which moves the UNet's outputs by ~1e-6 and a few uint8 values by 1.
    """
    mesh = Mesh(np.array(jax.devices()[:len(items)]), ("data",))
    out = run(gen, items, mesh=mesh)
    assert out["images"].shape == (len(items), SIZE, SIZE, 3) and out["images"].dtype == np.uint8
    singles = [run(gen, [it]) for it in items]
    for key, value in out.items():
        np.testing.assert_array_equal(value, np.concatenate([s[key] for s in singles]), err_msg=key)
    assert len({im.tobytes() for im in out["images"]}) == len(items)
    return out


def test_resolve_mode():
    cfg = {n: _config(n).conditioning for n in ("ldm_celebahq", "ldm_sr", "ldm_inpainting", "ldm_layout",
                                                 "ldm_semantic")}
    assert resolve_mode(cfg["ldm_celebahq"]) == ("txt2img", None)
    assert resolve_mode(cfg["ldm_sr"]) == ("sr", None)
    assert resolve_mode(cfg["ldm_inpainting"]) == ("inpaint", "concat")
    assert resolve_mode(cfg["ldm_layout"]) == ("layout", None)
    assert resolve_mode(cfg["ldm_semantic"]) == ("semantic", None)
    assert resolve_mode(cfg["ldm_celebahq"], "inpaint") == ("inpaint", "blend")
    assert resolve_mode(cfg["ldm_inpainting"], "inpaint", "blend") == ("inpaint", "blend")
    assert resolve_mode(cfg["ldm_semantic"], "img2img") == ("img2img", None)
    with pytest.raises(ValueError, match="inpaint_method=blend"):
        resolve_mode(cfg["ldm_celebahq"], "inpaint", "concat")
    with pytest.raises(ValueError, match="does not fit this model.*own mode is 'sr'"):
        resolve_mode(cfg["ldm_sr"], "img2img")
    with pytest.raises(ValueError, match="does not fit"):
        resolve_mode(cfg["ldm_celebahq"], "semantic")
    with pytest.raises(ValueError, match="mode=inpaint only"):
        resolve_mode(cfg["ldm_celebahq"], "img2img", "blend")


def test_img2img_strength(inputs, tmp_path_factory):
    gen = generator("ldm_celebahq", tmp_path_factory, mode="img2img", strength=0.5)
    items = [WorkItem(0, 3, image=inputs["a"], strength=0.0), WorkItem(1, 3, image=inputs["wide"], strength=1.0),
             WorkItem(2, 3, image=inputs["b"]), WorkItem(3, 4, image=inputs["a"], strength=0.7)]
    gen.check_items(items)
    out = batch_invariant(gen, items)
    z, x0 = out["latents"], out["input_latents"]
    # Strength 0 ends exactly on the input's latents: the image is decode(encode(input)).
    np.testing.assert_array_equal(z[0], x0[0])
    # Strength 1 starts from pure noise: another input image gives the same sample.
    other = WorkItem(1, 3, image=inputs["a"], strength=1.0)
    np.testing.assert_array_equal(run(gen, [other])["images"][0], out["images"][1])
    err = [float(np.abs(z[i] - x0[i]).mean()) for i in range(4)]
    assert 0 < err[2] < err[1] and 0 < err[3] < err[1], err
    # A job whose largest strength is 0.5 starts at that step; its sample 2 matches the mixed job's.
    same = [WorkItem(2, 3, image=inputs["b"]), WorkItem(5, 3, image=inputs["a"])]
    gen.check_items(same)
    np.testing.assert_allclose(run(gen, same)["latents"][0], z[2], atol=1e-5)


def test_blend_inpainting_keeps_the_known_region(inputs, tmp_path_factory):
    gen = generator("ldm_celebahq", tmp_path_factory, mode="inpaint")
    assert gen.inpaint_method == "blend"
    items = [WorkItem(i, 9, image=inputs[im], mask=inputs[m]) for i, (im, m) in enumerate(
        [("a", "mask"), ("b", "mask_other"), ("a", "mask_none"), ("wide", "mask_wide")])]
    gen.check_items(items)
    out = batch_invariant(gen, items)
    z, x0 = out["latents"], out["input_latents"]
    keep = np.asarray(gen._latent_keep(gen.prepare(items)["mask"])).astype(bool)[..., 0]
    assert 0 < keep[0].mean() < 1 and 0 < keep[1].mean() < 1 and keep[2].all() and keep[3].all()
    for i in range(4):
        np.testing.assert_array_equal(z[i][keep[i]], x0[i][keep[i]])
    # The hole is generated, not copied.
    assert np.abs(z[0][~keep[0]] - x0[0][~keep[0]]).mean() > 0.05


def test_concat_inpainting(inputs, tmp_path_factory):
    gen = generator("ldm_inpainting", tmp_path_factory)
    assert (gen.mode, gen.inpaint_method) == ("inpaint", "concat")
    items = [WorkItem(0, 1, image=inputs["a"], mask=inputs["mask"]), WorkItem(1, 1, image=inputs["b"],
             mask=inputs["mask"]), WorkItem(2, 1, image=inputs["a"], mask=inputs["mask_other"]),
             WorkItem(3, 2, image=inputs["wide"], mask=inputs["mask_wide"])]
    images = batch_invariant(gen, items)["images"]
    # Both the masked image and the mask reach the UNet.
    for image, mask in (("b", "mask"), ("a", "mask_other")):
        moved = run(gen, [WorkItem(0, 1, image=inputs[image], mask=inputs[mask])])["images"][0]
        assert not np.array_equal(moved, images[0]), (image, mask)


def test_super_resolution(inputs, tmp_path_factory):
    gen = generator("ldm_sr", tmp_path_factory)
    assert gen.mode == "sr"
    items = [WorkItem(i, 5, image=inputs[n]) for i, n in enumerate(["low", "low_b", "a", "low"])]
    images = batch_invariant(gen, items)["images"]
    moved = run(gen, [WorkItem(0, 5, image=inputs["low_b"])])["images"][0]
    assert not np.array_equal(moved, images[0])
    # A full-size image is downsampled as in training.
    full = np.asarray(Image.open(inputs["a"]))
    np.testing.assert_allclose(gen.prepare([items[2]])["lowres"][0],
                               preprocess.lowres(preprocess.to_float(full), 4), atol=1e-6)
    with pytest.raises(RequestError, match=r"16x16.*needs a 8x8 low-res image.*--image_size=64"):
        gen.check_items([WorkItem(0, 0, image=inputs["low_bad"])])
    with pytest.raises(RequestError, match="16x16"):
        gen.prepare([WorkItem(0, 0, image=inputs["low_bad"])])


def test_layout_to_image(tmp_path_factory):
    gen = generator("ldm_layout", tmp_path_factory)
    assert gen.mode == "layout"
    box = lambda label, *b: (label, tuple(b))  # noqa: E731
    layouts = [(box(1, 0.1, 0.1, 0.6, 0.5),), (box(7, 0.2, 0.3, 0.9, 0.9), box(2, 0.0, 0.0, 0.3, 0.3)), (),
               (box(1, 0.1, 0.1, 0.6, 0.5),)]
    items = [WorkItem(i, 2, layout=lay) for i, lay in enumerate(layouts)]
    images = batch_invariant(gen, items)["images"]
    moved = run(gen, [WorkItem(0, 2, layout=layouts[1])])["images"][0]
    assert not np.array_equal(moved, images[0])
    with pytest.raises(RequestError, match="at most 4"):
        gen.check_items([WorkItem(0, 0, layout=layouts[0] * 5)])
    with pytest.raises(RequestError, match="label 30 is outside"):
        gen.check_items([WorkItem(0, 0, layout=(box(30, 0, 0, 1, 1),))])
    with pytest.raises(RequestError, match="needs 'layout'"):
        gen.check_items([WorkItem(0, 0, prompt="x")])


def test_semantic_to_image(inputs, tmp_path_factory):
    gen = generator("ldm_semantic", tmp_path_factory)
    assert gen.mode == "semantic"
    items = [WorkItem(i, 6, segmentation=inputs[n]) for i, n in enumerate(["seg", "seg_b", "seg", "seg_b"])]
    images = batch_invariant(gen, items)["images"]
    moved = run(gen, [WorkItem(0, 6, segmentation=inputs["seg_b"])])["images"][0]
    assert not np.array_equal(moved, images[0])
    with pytest.raises(RequestError, match="single-channel"):
        gen.prepare([WorkItem(0, 0, segmentation=inputs["seg_rgb"])])


def test_request_errors_name_the_request(inputs, tmp_path_factory):
    gen = generator("ldm_celebahq", tmp_path_factory, mode="inpaint")
    with pytest.raises(RequestError, match=r"request 3: .*needs 'mask'"):
        gen.check_items([WorkItem(3, 0, image=inputs["a"])])
    with pytest.raises(RequestError, match=r"request 0: mask .* is 32x48 but its image is 32x32"):
        gen.check_items([WorkItem(0, 0, image=inputs["a"], mask=inputs["mask_wide"])])
    with pytest.raises(RequestError, match="'strength' applies to --mode=img2img only"):
        gen.check_items([WorkItem(0, 0, image=inputs["a"], mask=inputs["mask"], strength=0.3)])
    with pytest.raises(RequestError, match=r"request 0: .*a.png.missing' does not exist"):
        gen.prepare([WorkItem(0, 0, image=inputs["a"] + ".missing", mask=inputs["mask"])])
    with pytest.raises(RequestError, match="cannot read .* as an image"):
        gen.check_items([WorkItem(0, 0, image=__file__, mask=inputs["mask"])])
    txt = generator("ldm_celebahq", tmp_path_factory)
    with pytest.raises(RequestError, match="--mode=img2img or --mode=inpaint"):
        txt.check_items([WorkItem(0, 0, image=inputs["a"])])


def test_manifest_records_mode_and_inputs(inputs):
    spec = {"sampler": "ddim", "steps": 5, "guidance": 3.0, "mode": "img2img", "strength": 0.6}
    item = WorkItem(2, 1, prompt="x", image=inputs["a"])
    entry = outputs.manifest_entry(item, spec, 6)
    assert entry["mode"] == "img2img" and entry["image"] == inputs["a"] and entry["strength"] == 0.6
    lay = outputs.manifest_entry(WorkItem(0, 1, layout=((3, (0.1, 0.2, 0.3, 0.4)),)), {"mode": "layout"}, 6)
    assert lay["layout"] == [{"label": 3, "bbox": [0.1, 0.2, 0.3, 0.4]}] and "strength" not in lay
    # Jobs of the earlier modes keep their manifest lines and request digests.
    old = outputs.manifest_entry(WorkItem(1, 7, label=1), {"sampler": "ddim", "steps": 5}, 6)
    assert set(old) == {"index", "label", "seed", "sampler", "steps", "scale", "negative_prompt", "file"}
    import hashlib
    import json
    want = hashlib.sha256(json.dumps({"index": 1, "seed": 7, "prompt": None, "negative_prompt": None, "label": 1,
                                      "guidance": None, "steps": None}, sort_keys=True).encode() + b"\n")
    assert outputs.items_digest([WorkItem(1, 7, label=1)]) == want.hexdigest()
