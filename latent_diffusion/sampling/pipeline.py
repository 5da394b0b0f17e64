"""A trained latent diffusion model as a `Generator` for batch jobs (see jobs.py).

Modes (sample.py --mode; 'auto' picks from the model's conditioning):
  txt2img   text-, class- or unconditional generation
  layout    boxes + labels (crossattn 'layout' models)
  semantic  a class map (concat 'segmentation' models)
  sr        a low-resolution image (concat 'lowres' models)
  inpaint   an image and a mask (white = fill): 'concat' feeds the masked image's latents and the
            mask to a model trained for it (concat 'inpaint'); 'blend' works with any model by
            pinning the known region to the input's latents, re-noised to the current timestep
            after every step, and to the clean latents after the last
  img2img   an init image noised to the timestep that `strength` picks, then denoised

Every random draw comes from the sample's own key (x_T and the img2img / blending noise from
fold_in(key, 0), DDIM's eta noise from 1, the masked-image encoding of concat inpainting from 2,
the input image's encoding from 3), so an image does not depend on the batch it is sampled in.
The conditions a model needs (prompt, label, layout, class map) are always read from the request,
whatever the mode.
"""
from __future__ import annotations

import json
import logging
from typing import Sequence

import jax
from jax.sharding import PartitionSpec as P
import jax.numpy as jnp
import ml_collections
import numpy as np
from PIL import Image, UnidentifiedImageError

from latent_diffusion.data import preprocess
from latent_diffusion.diffusion import objectives, samplers
from latent_diffusion.models import conditioning
from latent_diffusion.sampling.ldm_model import LDMModel
from latent_diffusion.sampling.requests import RequestError, WorkItem, check_strength
from latent_diffusion.training import checkpointing, partitioning

log = logging.getLogger(__name__)

MODES = ("auto", "txt2img", "img2img", "inpaint", "sr", "layout", "semantic")
INPAINT_METHODS = ("concat", "blend")
# Strengths travel as integer millionths, so the start step is exact integer arithmetic on host and device.
STRENGTH_UNIT = 10 ** 6


def load_ldm(workdir: str, mesh, *, use_ema: bool = True, step: int | None = None,
             attention_impl: str | None = None):
    """(task, model params, frozen params, meta) of an LDM training workdir; the task is the run's LDMTask.

    `attention_impl` overrides the run's `unet.attention_impl` (e.g. 'cudnn' on NVIDIA GPUs).
    """
    from latent_diffusion.training.ldm_task import LDMTask
    try:
        meta = checkpointing.read_meta(workdir, step)
    except FileNotFoundError as e:
        raise FileNotFoundError(f"{e}. sample.py needs a workdir with a finished LDM checkpoint "
                                "(python train.py --config=configs/ldm_f8_laion.py:tiny --workdir=...)") from e
    if meta.get("stage") != "ldm":
        raise ValueError(f"{workdir} holds a {meta.get('stage')!r} run; sample.py needs a latent diffusion "
                         "(stage 2) workdir")
    config = ml_collections.ConfigDict(json.loads(meta["config"]))
    if attention_impl:
        config.unet.attention_impl = attention_impl
    task = LDMTask(config, mesh, workdir)
    repl = lambda tree: jax.tree.map(lambda _: partitioning.replicated(mesh), tree)
    state, meta = checkpointing.restore_state_tree(workdir, repl, step)
    ema = state.get("ema_params")
    params = ema if (use_ema and ema is not None) else state["params"]["model"]
    log.info("loaded %s weights of step %s from %s", "EMA" if params is ema else "raw", meta.get("step"),
             workdir)
    return task, params, task.frozen(), meta


def resolve_mode(cond, mode: str = "auto", inpaint_method: str | None = None) -> tuple[str, str | None]:
    """(mode, inpaint method) for a model's `config.conditioning`; refuses pairs that cannot work."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    own = {"lowres": "sr", "inpaint": "inpaint", "segmentation": "semantic"}.get(
        cond.concat, "layout" if cond.crossattn == "layout" else "txt2img")
    if mode == "auto":
        mode = own
    what = f"conditioning.crossattn={cond.crossattn!r}, concat={cond.concat!r}"
    # The 'image' of a request is the low-res input of SR models and the image to inpaint of
    # inpainting models, so those models have no other mode.
    ok = {"txt2img": own == "txt2img", "sr": own == "sr", "semantic": own == "semantic", "layout": own == "layout",
          "img2img": own in ("txt2img", "layout", "semantic"),
          "inpaint": own in ("txt2img", "layout", "semantic", "inpaint")}[mode]
    if not ok:
        also = "" if own in ("sr", "inpaint") else "; img2img and inpainting (blend) also work"
        raise ValueError(f"--mode={mode} does not fit this model ({what}); its own mode is {own!r} "
                         f"(--mode=auto){also}")
    if mode != "inpaint":
        if inpaint_method is not None:
            raise ValueError(f"--inpaint_method applies to --mode=inpaint only, not {mode}")
        return mode, None
    if inpaint_method is None:
        inpaint_method = "concat" if own == "inpaint" else "blend"
    if inpaint_method not in INPAINT_METHODS:
        raise ValueError(f"inpaint_method must be one of {INPAINT_METHODS}, got {inpaint_method!r}")
    if inpaint_method == "concat" and own != "inpaint":
        raise ValueError(f"--inpaint_method=concat needs a model trained for inpainting (conditioning.concat="
                         f"'inpaint'); this one has {what}: use --inpaint_method=blend")
    return mode, inpaint_method


def start_step(steps, strength_ppm):
    """The img2img start step (numpy or jax ints): int(steps * strength) steps are run, as diffusers does."""
    return steps - (steps * strength_ppm) // STRENGTH_UNIT


# --- host-side inputs ---------------------------------------------------------------------------
def _open(path: str, where: str, load: bool = True) -> Image.Image:
    """The image at `path`, pixels read (or only its header, without `load`)."""
    try:
        with Image.open(path) as im:
            if load:
                im.load()
            return im
    except FileNotFoundError:
        raise RequestError(f"{where}: {path!r} does not exist") from None
    except (UnidentifiedImageError, OSError, ValueError) as e:
        raise RequestError(f"{where}: cannot read {path!r} as an image ({e}); expected a PNG or JPEG "
                           "file") from None


def _size(path: str, where: str) -> tuple[int, int]:
    """(height, width) from the file header."""
    width, height = _open(path, where, load=False).size
    return height, width


def load_image(path: str, size: int, where: str) -> np.ndarray:
    """float32 (size, size, 3) in [-1, 1]: shorter side resized to `size`, then centre-cropped."""
    image = np.asarray(_open(path, where).convert("RGB"))
    return preprocess.to_float(preprocess.center_crop(image, size))


def check_mask_hw(mask_hw, image_hw, path: str, where: str) -> None:
    if tuple(mask_hw) != tuple(image_hw):
        raise RequestError(f"{where}: mask {path!r} is {mask_hw[0]}x{mask_hw[1]} but its image is "
                           f"{image_hw[0]}x{image_hw[1]}; the mask must match the image pixel for pixel")


def load_mask(path: str, image_hw: tuple[int, int], size: int, where: str) -> np.ndarray:
    """float32 (size, size, 1), 1 = fill: binarised at half intensity, cropped like its image."""
    im = _open(path, where)
    check_mask_hw((im.size[1], im.size[0]), image_hw, path, where)
    mask = (np.asarray(im.convert("L")) > 127).astype(np.uint8)
    return preprocess.center_crop(mask, size, "nearest").astype(np.float32)[..., None]


def lowres_size(size: int, factor: int) -> int:
    return size // factor


def check_lowres_hw(hw, size: int, factor: int, path: str, where: str) -> None:
    small = lowres_size(size, factor)
    if tuple(hw) not in ((small, small), (size, size)):
        raise RequestError(f"{where}: the SR input {path!r} is {hw[0]}x{hw[1]}; for image_size {size} this "
                           f"{factor}x model needs a {small}x{small} low-res image (or a {size}x{size} image, "
                           f"which is downsampled as in training). Resize it, or pass --image_size="
                           f"{hw[0] * factor if hw[0] == hw[1] else '<side x factor>'}")


def load_lowres(path: str, size: int, factor: int, where: str) -> np.ndarray:
    """float32 (size / factor, size / factor, 3) in [-1, 1]; a full-size image is downsampled first."""
    image = np.asarray(_open(path, where).convert("RGB"))
    check_lowres_hw(image.shape[:2], size, factor, path, where)
    image = preprocess.to_float(image)
    return image if image.shape[0] != size else preprocess.lowres(image, factor).astype(np.float32)


def load_segmentation(path: str, size: int, num_classes: int, where: str) -> np.ndarray:
    """int32 (size, size, 1) class ids, resized and cropped with nearest neighbours."""
    im = _open(path, where)
    if im.mode not in ("L", "P", "I", "I;16"):
        raise RequestError(f"{where}: segmentation {path!r} has PIL mode {im.mode}; expected a single-channel "
                           "PNG of class ids (mode L or P), not a colour rendering")
    seg = np.asarray(im).astype(np.int32)
    if seg.min() < 0 or seg.max() >= num_classes:
        bad = seg.min() if seg.min() < 0 else seg.max()
        raise RequestError(f"{where}: segmentation {path!r} holds class id {bad}, outside [0, {num_classes}) "
                           f"for this {num_classes}-class model")
    return preprocess.center_crop(seg, size, "nearest")[..., None]


def _blend_fn(schedule, x0, noise, keep, t_start):
    """Pins `keep` (inpainting) and, while t >= t_start (B,), the whole sample (img2img) to x0."""
    def blend(x, t):
        before_start = (t >= t_start).astype(x.dtype)[:, None, None, None]
        mask = jnp.maximum(keep, before_start)
        return samplers.inpaint_blend_fn(schedule, x0, mask, noise)(x, t)
    return blend


class LDMGenerator:
    """Samples a latent diffusion model in one of `MODES`, with classifier-free guidance where it has a
    cross-attention or class condition; follows `sampling.jobs.Generator`. `task` is the model's
    `LDMModel` (an `LDMTask` is one): its conditions, guided model function and sampler run here.

    Call `check_items` with the whole job first: it reports every bad request before anything runs,
    and lets img2img start at the job's largest strength (without it, every img2img batch runs all
    steps). A sample with a smaller strength than the job's largest is held at its noised input
    until its own start step: exactly its own img2img run with DDIM; PLMS and DPM-Solver++ carry
    the model outputs of those held steps into their multistep history.
    """

    def __init__(self, task: LDMModel, params, frozen, *, image_size: int, sampler: str = "ddim", guidance: float = 5.0,
                 eta: float = 0.0, negative_prompt: str = "", mode: str = "auto", strength: float = 0.75,
                 inpaint_method: str | None = None, mesh=None):
        self.task, self.params, self.frozen = task, params, frozen
        self.mesh = mesh
        self.sampler, self.guidance, self.eta = sampler, float(guidance), float(eta)
        self.negative_prompt = negative_prompt
        self.cond = c = task.config.conditioning
        self.mode, self.inpaint_method = resolve_mode(c, mode, inpaint_method)
        # Class-conditional either way: a label embedding as the context (crossattn 'class', the
        # paper's ImageNet model) or added to the time embedding (class_label).
        self.num_classes = task.num_classes
        self.condition = ("text" if c.crossattn == "text" else "layout" if c.crossattn == "layout" else
                          "class" if self.num_classes is not None else "unconditional")
        self.strength = check_strength(strength, "strength")
        self._max_strength_ppm = STRENGTH_UNIT
        f = task.first_stage.downsample
        if image_size % f:
            raise ValueError(f"image_size {image_size} must be a multiple of the first stage's factor {f}")
        if self.mode == "sr" and image_size % int(c.lowres_factor):
            raise ValueError(f"image_size {image_size} must be a multiple of the SR factor {c.lowres_factor}")
        self.image_size = image_size
        self.latent_shape = (image_size // f, image_size // f, task.first_stage.latent_channels)
        self._fn = jax.jit(self._generate if mesh is None else self._per_device,
                           static_argnames=("steps", "max_strength_ppm"))

    @property
    def blends(self) -> bool:
        return self.mode == "img2img" or self.inpaint_method == "blend"

    # --- requests -------------------------------------------------------------------------------
    def _needs(self) -> dict[str, str]:
        """Request field -> why this mode / model needs it."""
        c, need = self.cond, {}
        if c.crossattn == "text":
            need["prompt"] = "this is a text-to-image model"
        if self.condition == "class":
            need["label"] = "this is a class-conditional model"
        if c.crossattn == "layout":
            need["layout"] = "this is a layout-to-image model"
        if c.concat == "segmentation":
            need["segmentation"] = "this is a semantic-map-to-image model"
        if self.mode in ("img2img", "inpaint", "sr"):
            need["image"] = f"--mode={self.mode} needs an input image"
        if self.mode == "inpaint":
            need["mask"] = "--mode=inpaint needs a mask (white = region to fill)"
        return need

    def _check_fields(self, item: WorkItem) -> None:
        where = f"request {item.index}"
        for key, why in self._needs().items():
            if getattr(item, key) is None:
                example = {"prompt": "a prompt", "label": 3, "layout": [{"label": 1, "bbox": [0.1, 0.1, 0.6, 0.5]}]
                           }.get(key, f"{key}.png")
                raise RequestError(f"{where}: {why}: every request needs {key!r} (write a JSONL prompts file "
                                   f"with lines like {{{json.dumps(key)}: {json.dumps(example)}}})")
        if self.condition == "class" and not 0 <= item.label < self.num_classes:
            # Index num_classes is the null class of guidance, not a label to ask for.
            raise RequestError(f"{where}: class id {item.label} is outside [0, {self.num_classes}) for this "
                               f"{self.num_classes}-class model")
        if item.strength is not None and self.mode != "img2img":
            raise RequestError(f"{where}: 'strength' applies to --mode=img2img only; this job is {self.mode}")
        for key in ("image", "mask", "segmentation", "layout"):
            if getattr(item, key) is not None and key not in self._needs():
                hint = " (pass --mode=img2img or --mode=inpaint)" if key in ("image", "mask") else ""
                raise RequestError(f"{where}: this {self.mode} job does not use {key!r}{hint}")
        if item.layout is not None:
            lay = self.cond.layout
            if len(item.layout) > int(lay.max_objects):
                raise RequestError(f"{where}: the layout has {len(item.layout)} boxes; this model takes at most "
                                   f"{lay.max_objects} (conditioning.layout.max_objects)")
            bad = [label for label, _ in item.layout if label >= int(lay.num_classes)]
            if bad:
                raise RequestError(f"{where}: layout label {bad[0]} is outside [0, {lay.num_classes}) for this "
                                   f"model's {lay.num_classes} box classes")

    def check_items(self, items: Sequence[WorkItem]) -> None:
        """Validates every request against the mode and model (input files by their headers only)."""
        size, factor = self.image_size, int(self.cond.lowres_factor)
        for item in items:
            self._check_fields(item)
            where = f"request {item.index}"
            if self.mode == "sr":
                check_lowres_hw(_size(item.image, where), size, factor, item.image, where)
            elif item.image is not None:
                hw = _size(item.image, where)
                if item.mask is not None:
                    check_mask_hw(_size(item.mask, where), hw, item.mask, where)
            if item.segmentation is not None:
                _size(item.segmentation, where)
        if self.mode == "img2img":
            self._max_strength_ppm = max(self._strength_ppm(it) for it in items)

    def _strength_ppm(self, item: WorkItem) -> int:
        return int(round((self.strength if item.strength is None else item.strength) * STRENGTH_UNIT))

    def prepare(self, items: Sequence[WorkItem]) -> dict:
        for item in items:
            self._check_fields(item)
        c, size = self.cond, self.image_size
        out = {"guidance": np.array([self.guidance if it.guidance is None else it.guidance for it in items],
                                    np.float32)}
        if c.crossattn == "text":
            tok = self.task.tokenizer
            out["tokens"] = tok([it.prompt for it in items])
            out["neg_tokens"] = tok([it.negative_prompt if it.negative_prompt is not None else self.negative_prompt
                                     for it in items])
        if self.condition == "class":
            out["label"] = np.array([it.label for it in items], np.int32)
        if c.crossattn == "layout":
            out["layout"] = np.concatenate([self._layout_tokens(it.layout) for it in items])
        if c.concat == "segmentation":
            out["segmentation"] = np.stack([load_segmentation(it.segmentation, size, int(c.segmentation_classes),
                                                              f"request {it.index}") for it in items])
        if self.mode == "sr":
            out["lowres"] = np.stack([load_lowres(it.image, size, int(c.lowres_factor), f"request {it.index}")
                                      for it in items])
        if self.mode in ("img2img", "inpaint"):
            out["image"] = np.stack([load_image(it.image, size, f"request {it.index}") for it in items])
        if self.mode == "inpaint":
            out["mask"] = np.stack([load_mask(it.mask, _size(it.image, f"request {it.index}"), size,
                                              f"request {it.index}") for it in items])
        if self.mode == "img2img":
            out["strength"] = np.array([self._strength_ppm(it) for it in items], np.int32)
        return out

    def _layout_tokens(self, layout) -> np.ndarray:
        lay = self.cond.layout
        n = len(layout)
        bbox = np.array([box for _, box in layout], np.float32).reshape(1, n, 4)
        labels = np.array([label for label, _ in layout], np.int32).reshape(1, n)
        return conditioning.layout_tokens(bbox, labels, np.ones((1, n), bool), num_classes=int(lay.num_classes),
                                          bins=int(lay.bins), max_objects=int(lay.max_objects))

    # --- device side ----------------------------------------------------------------------------
    def _raw_conditions(self, frozen, arrays, keys):
        """The task's own condition preparation, run per sample so its randomness is per sample."""
        task, c = self.task, self.cond
        names = {"tokens": c.crossattn == "text", "layout": c.crossattn == "layout", "label": self.condition == "class",
                 "lowres": c.concat == "lowres", "segmentation": c.concat == "segmentation",
                 "image": c.concat == "inpaint", "mask": c.concat == "inpaint"}
        batch = {k: arrays[k] for k, used in names.items() if used}
        if not batch:
            return {}

        def one(example, key):
            single = jax.tree.map(lambda a: a[None], example)
            raw = task.raw_conditions(single, frozen, jax.random.fold_in(key, 2), drop=False)
            return jax.tree.map(lambda a: a[0], raw)

        return jax.vmap(one)(batch, keys)

    def _encode(self, frozen, images, keys):
        fs = self.task.first_stage
        return jax.vmap(lambda x, k: fs.encode(frozen["first_stage"], x[None], jax.random.fold_in(k, 3))[0])(
            images, keys)

    def _latent_keep(self, mask):
        """1 where a latent cell has no pixel to fill: only wholly known cells are pinned."""
        b, h, w, _ = mask.shape
        f = self.task.first_stage.downsample
        fill = mask.reshape(b, h // f, f, w // f, f, 1).max(axis=(2, 4))
        return 1.0 - fill

    def _timesteps(self, steps: int) -> np.ndarray:
        """The sampler's timesteps with -1 (clean) appended; index k = the x the k-th step starts from."""
        T = self.task.schedule.num_timesteps
        ts = samplers.dpm_timesteps(steps, T) if self.sampler == "dpm_solver_pp_2m" else \
            samplers.ddim_timesteps(steps, T)
        return np.append(ts, -1)

    def _generate(self, params, frozen, arrays, keys, steps, max_strength_ppm):
        task = self.task
        shape = self.latent_shape
        b = keys.shape[0]
        noise = jax.vmap(lambda k: jax.random.normal(jax.random.fold_in(k, 0), shape))(keys)
        raw = self._raw_conditions(frozen, arrays, keys)
        raw_u = task.null_conditions(raw)
        if "neg_tokens" in arrays:
            raw_u["tokens"] = arrays["neg_tokens"]
        model_fn = task.guided_model_fn(params, frozen, raw, raw_u, shape[:2], arrays["guidance"])
        x_T, start, blend = noise, 0, None
        if self.blends:
            x0 = self._encode(frozen, arrays["image"], keys)
            table = self._timesteps(steps)
            if self.mode == "img2img":
                starts = start_step(steps, arrays["strength"])
                start = min(int(start_step(steps, max_strength_ppm)), steps - 1)
                t_start = jnp.asarray(table, jnp.int32)[starts]
                noised = objectives.q_sample(task.schedule, x0, jnp.full((b,), int(table[start]), jnp.int32), noise)
                # Full strength starts from pure noise, exactly as text-to-image does.
                x_T = jnp.where((starts == 0)[:, None, None, None], noise, noised)
                keep = jnp.zeros(x0.shape[:3] + (1,), x0.dtype)
            else:
                t_start = jnp.full((b,), task.schedule.num_timesteps, jnp.int32)
                keep = self._latent_keep(arrays["mask"])
            blend = _blend_fn(task.schedule, x0, noise, keep, t_start)
        ddim_noise = None
        if self.sampler == "ddim" and self.eta > 0:
            ddim_noise = jax.vmap(lambda k: jax.random.normal(jax.random.fold_in(k, 1), (steps,) + shape))(keys)
            ddim_noise = jnp.swapaxes(ddim_noise, 0, 1)[start:]
        z = task.run_sampler(model_fn, x_T, sampler=self.sampler, steps=steps, eta=self.eta, ddim_noise=ddim_noise,
                             start_step=start, blend_fn=blend)
        images = task.first_stage.decode(frozen["first_stage"], z)
        out = {"images": jnp.round((jnp.clip(images, -1, 1) + 1) * 127.5).astype(jnp.uint8), "latents": z}
        if self.blends:
            out["input_latents"] = x0
        return out

    def _per_device(self, params, frozen, arrays, keys, steps, max_strength_ppm):
        """Each device samples its own rows (shard_map): every device runs the same single-device
        program whatever the device count, so images are byte-identical across device counts (tested:
        8 devices with one row each and 1 device with three). GSPMD partitioning of one global program
        may instead split an op differently per layout and round differently."""
        spec = P(tuple(self.mesh.axis_names))
        body = lambda a, k: self._generate(params, frozen, a, k, steps, max_strength_ppm)
        return jax.shard_map(body, mesh=self.mesh, in_specs=(spec, spec), out_specs=spec,
                             check_vma=False)(arrays, keys)

    def sample_outputs(self, arrays, keys, *, steps) -> dict:
        """uint8 'images', final 'latents' and, for img2img / blend inpainting, the input's 'input_latents'."""
        return self._fn(self.params, self.frozen, arrays, keys, steps=int(steps),
                        max_strength_ppm=self._max_strength_ppm)

    def __call__(self, arrays, keys, *, steps):
        return self.sample_outputs(arrays, keys, steps=steps)["images"]
