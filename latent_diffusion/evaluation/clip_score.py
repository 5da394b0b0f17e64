"""CLIP score of images and their prompts (Hessel et al. 2021, as torchmetrics' `CLIPScore` computes it).

score_i = 100 * cos(image_embeds_i, text_embeds_i); the reported `clip_score` is
max(mean_i score_i, 0), which is torchmetrics' definition (it clips the mean; Hessel et al.
clip each sample, which only differs when some cosines are negative).

The model is a local transformers `CLIPModel` folder (config.json, model.safetensors or
pytorch_model.bin, the tokenizer files, optionally preprocessor_config.json), converted with
`latent_diffusion.convert.from_transformers`. Images are resized and cropped on the host with
PIL, exactly as transformers' PIL `CLIPImageProcessor` does: jax's bicubic equals PIL's
float-mode bicubic, but PIL's 8-bit path rounds and clips between its two passes, which moves
pixels by up to ~0.09 (of 1) on high-frequency images. Normalisation and both towers run jitted
and sharded over every device (features.ShardedMap).
"""
from __future__ import annotations

import concurrent.futures
import dataclasses
import json
import logging
import os
from typing import Any, Sequence

import jax.numpy as jnp
import numpy as np

from latent_diffusion.evaluation.features import ArrayRows, ShardedMap
from latent_diffusion.evaluation.images import ImageSet
from latent_diffusion.evaluation.metrics import clip_score
from latent_diffusion.models.clip_vision import CLIP_MEAN, CLIP_STD

log = logging.getLogger(__name__)
_WEIGHTS = ("model.safetensors", "pytorch_model.bin")
_INDEX = ("model.safetensors.index.json", "pytorch_model.bin.index.json")
_PIL_BICUBIC = 3  # PILImageResampling.BICUBIC, CLIP's resample


@dataclasses.dataclass(frozen=True)
class ImagePreprocess:
    """transformers' CLIPImageProcessor settings: short side -> `shortest_edge`, centre crop, normalise."""
    shortest_edge: int = 224
    crop_size: tuple[int, int] = (224, 224)
    mean: tuple[float, ...] = CLIP_MEAN
    std: tuple[float, ...] = CLIP_STD
    resample: int = _PIL_BICUBIC

    @classmethod
    def from_config(cls, cfg: dict, where: str) -> "ImagePreprocess":
        """From a preprocessor_config.json dict; settings CLIP score cannot honour are refused."""
        for flag in ("do_resize", "do_center_crop", "do_rescale", "do_normalize"):
            if cfg.get(flag, True) is not True:
                raise ValueError(f"{where}: {flag}=false is not supported for CLIP score (CLIP expects it on)")
        if abs(float(cfg.get("rescale_factor", 1 / 255)) - 1 / 255) > 1e-12:
            raise ValueError(f"{where}: rescale_factor {cfg['rescale_factor']} is not 1/255")
        size = cfg.get("size", 224)
        if isinstance(size, dict):
            if "shortest_edge" not in size:
                raise ValueError(f"{where}: size {size} is not supported; expected {{'shortest_edge': N}}")
            size = size["shortest_edge"]
        crop = cfg.get("crop_size", size)
        crop = (crop["height"], crop["width"]) if isinstance(crop, dict) else (crop, crop)
        return cls(int(size), (int(crop[0]), int(crop[1])), tuple(cfg.get("image_mean", CLIP_MEAN)),
                   tuple(cfg.get("image_std", CLIP_STD)), int(cfg.get("resample", _PIL_BICUBIC)))

    def resize_crop(self, image: np.ndarray) -> np.ndarray:
        """One uint8 HWC RGB image -> uint8 crop, as transformers' PIL backend resizes and crops."""
        from PIL import Image
        h, w = image.shape[:2]
        short, long = (w, h) if w <= h else (h, w)
        new_short, new_long = self.shortest_edge, int(self.shortest_edge * long / short)
        nh, nw = (new_long, new_short) if w <= h else (new_short, new_long)
        out = np.asarray(Image.fromarray(image).resize((nw, nh), resample=self.resample))
        ch, cw = self.crop_size
        if ch > nh or cw > nw:
            raise ValueError(f"CLIP preprocessing: crop {ch}x{cw} is larger than the resized image {nh}x{nw}")
        top, left = (nh - ch) // 2, (nw - cw) // 2
        return out[top:top + ch, left:left + cw]


@dataclasses.dataclass
class CLIPScorer:
    """Both CLIP towers, the tokenizer and the image preprocessing of one model folder."""
    text_module: Any
    text_params: Any
    vision_module: Any
    vision_params: Any
    tokenizer: Any
    preprocess: ImagePreprocess
    description: str

    def image_embeds(self, images: ImageSet, batch_size: int = 64, devices: Sequence[Any] | None = None,
                     progress: bool = True, num_workers: int = 8) -> np.ndarray:
        """L2-normalised image embeddings (N, projection_dim), float32, in set order."""
        module, pre = self.vision_module, self.preprocess
        mean, std = jnp.asarray(pre.mean, jnp.float32), jnp.asarray(pre.std, jnp.float32)

        def embed(params, x):
            x = (x.astype(jnp.float32) / 255.0 - mean) / std
            _, pooled = module.apply({"params": params}, x)
            return {"embeds": _normalise(pooled)}

        pool = concurrent.futures.ThreadPoolExecutor(num_workers)  # PIL resizes without the GIL

        def host_fn(batch):
            return np.stack(list(pool.map(pre.resize_crop, batch)))

        runner = ShardedMap(embed, self.vision_params, batch_size, devices, progress)
        try:
            out = runner(images, "clip images", row_shape=(*pre.crop_size, 3), row_dtype=np.uint8,
                         host_fn=host_fn)
        finally:
            pool.shutdown()
        return out["embeds"]

    def text_embeds(self, prompts: Sequence[str], batch_size: int = 64, devices: Sequence[Any] | None = None,
                    progress: bool = True) -> np.ndarray:
        """L2-normalised text embeddings (N, projection_dim); each distinct prompt is encoded once."""
        unique, inverse = np.unique(np.asarray(list(prompts), dtype=object), return_inverse=True)
        ids = self.tokenizer(list(unique))
        module = self.text_module

        def embed(params, x):
            _, pooled = module.apply({"params": params}, x)
            return {"embeds": _normalise(pooled)}

        runner = ShardedMap(embed, self.text_params, batch_size, devices, progress)
        out = runner(ArrayRows(ids), "clip prompts", row_shape=ids.shape[1:], row_dtype=ids.dtype)
        return out["embeds"][inverse.reshape(-1)]

    def __call__(self, images: ImageSet, prompts: Sequence[str], batch_size: int = 64,
                 devices: Sequence[Any] | None = None, progress: bool = True) -> dict[str, float]:
        """{'clip_score', 'clip_score_std', 'clip_score_num'} of images paired with prompts."""
        if len(prompts) != len(images):
            raise ValueError(f"CLIP score: {len(images)} images but {len(prompts)} prompts; the manifest must "
                             "list every image with its prompt")
        img = self.image_embeds(images, batch_size, devices, progress)
        txt = self.text_embeds(prompts, batch_size, devices, progress)
        return clip_score(img, txt)


def _normalise(x):
    x = x.astype(jnp.float32)
    return x / jnp.linalg.norm(x, axis=-1, keepdims=True)


def _load_weights(model_dir: str) -> dict:
    from latent_diffusion.convert.common import load_state_dict
    for name in _WEIGHTS:
        path = os.path.join(model_dir, name)
        if os.path.isfile(path):
            return load_state_dict(path)
    for name in _INDEX:  # a checkpoint sharded over several files
        path = os.path.join(model_dir, name)
        if os.path.isfile(path):
            with open(path) as f:
                shards = sorted(set(json.load(f)["weight_map"].values()))
            sd: dict = {}
            for shard in shards:
                sd.update(load_state_dict(os.path.join(model_dir, shard)))
            return sd
    raise FileNotFoundError(f"--clip_model {model_dir}: no weights found (expected one of {_WEIGHTS + _INDEX}). "
                            "Save the model with CLIPModel.save_pretrained(dir) on a machine that has it.")


def load_clip(model_dir: str) -> CLIPScorer:
    """A CLIPScorer from a local transformers CLIPModel folder (no download)."""
    from latent_diffusion.convert import from_transformers
    from latent_diffusion.data.tokenizers import make_tokenizer
    config_path = os.path.join(model_dir, "config.json")
    if not os.path.isfile(config_path):
        raise FileNotFoundError(f"--clip_model {model_dir}: no config.json; expected a folder written by "
                                "transformers' CLIPModel.save_pretrained (with the tokenizer's files), e.g. a "
                                "local copy of openai/clip-vit-large-patch14")
    with open(config_path) as f:
        config = json.load(f)
    if config.get("model_type") != "clip":
        raise ValueError(f"--clip_model {model_dir}: config.json has model_type {config.get('model_type')!r}; "
                         "CLIP score needs a full CLIPModel (model_type 'clip') with both towers")
    sd = _load_weights(model_dir)
    text_module, text_params = from_transformers(config, sd, tower="text")
    vision_module, vision_params = from_transformers(config, sd, tower="vision")
    pre_path = os.path.join(model_dir, "preprocessor_config.json")
    preprocess = ImagePreprocess()
    if os.path.isfile(pre_path):
        with open(pre_path) as f:
            preprocess = ImagePreprocess.from_config(json.load(f), pre_path)
    if preprocess.crop_size != (vision_module.image_size,) * 2:
        raise ValueError(f"{model_dir}: the processor crops {preprocess.crop_size} but the vision tower takes "
                         f"{vision_module.image_size}x{vision_module.image_size} images")
    tokenizer = make_tokenizer(f"clip:{model_dir}", max_length=text_module.max_length)
    return CLIPScorer(text_module, text_params, vision_module, vision_params, tokenizer, preprocess,
                      description=os.path.abspath(model_dir))
