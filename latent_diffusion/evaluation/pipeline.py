"""Offline evaluation: samples vs a reference (images or stats file) -> FID / KID / IS / precision-recall,
and CLIP score of samples against their prompts (sample.py's manifest.jsonl)."""
from __future__ import annotations

import dataclasses
import json
import logging
import os
from typing import Any

import numpy as np

from latent_diffusion.evaluation import metrics as M
from latent_diffusion.evaluation.features import FeatureExtractor
from latent_diffusion.evaluation.images import ArraySet, SetInfo, open_image_set, prompts_of
from latent_diffusion.evaluation.stats import Stats, check_resolution, is_stats_file, load_stats, save_stats
from latent_diffusion.models.inception import FEATURE_DIM

log = logging.getLogger(__name__)
METRICS = ("fid", "kid", "is", "pr", "clip")
NEEDS_REFERENCE = ("fid", "kid", "pr")
NEEDS_INCEPTION = ("fid", "kid", "is", "pr")


@dataclasses.dataclass
class EvalOptions:
    samples: str | None = None
    reference: str | None = None
    metrics: tuple[str, ...] = ("fid",)
    inception_weights: str | None = None
    clip_model: str | None = None
    allow_random_inception_for_tests: bool = False
    batch_size: int = 64
    image_size: int | None = None
    save_stats: str | None = None
    save_features: bool = False
    allow_resolution_mismatch: bool = False
    kid_subsets: int = 100
    kid_subset_size: int = 1000
    is_splits: int = 10
    pr_k: int = 3
    seed: int = 2020
    tfds_data_dir: str | None = None
    progress: bool = True


def load_inception(weights: str | None, allow_random: bool):
    """(module, params, description): converted weights, or random ones behind the test-only switch."""
    from latent_diffusion.convert import inception as conv
    if allow_random:
        log.warning("RANDOM Inception weights (--allow_random_inception_for_tests): numbers are meaningless")
        module = conv.build_model()
        params = conv.random_params(module, seed=0)
        return module, params, "RANDOM (test only)"
    path = conv.resolve_path(weights)
    module, params = conv.load_params(path)
    return module, params, path


def _check_metrics(opts: EvalOptions, have_clip: bool = False) -> tuple[str, ...]:
    names = tuple(m.strip().lower() for m in opts.metrics if m.strip())
    unknown = [m for m in names if m not in METRICS]
    if unknown:
        raise ValueError(f"unknown metric(s) {unknown}; choose from {list(METRICS)}")
    if opts.samples is None:
        if not opts.save_stats or not opts.reference:
            raise ValueError("nothing to do: pass --samples (and --reference) to compute metrics, or "
                             "--reference with --save_stats to precompute reference statistics")
        return ()
    if opts.reference is None and any(m in NEEDS_REFERENCE for m in names):
        raise ValueError(f"metrics {[m for m in names if m in NEEDS_REFERENCE]} need --reference "
                         "(a folder, an .npz of images, a stats .npz or tfds:NAME/SPLIT)")
    if "clip" in names:
        if opts.samples is None:
            raise ValueError("--metrics=clip scores --samples against their prompts; pass --samples")
        if opts.clip_model is None and not have_clip:
            raise ValueError("--metrics=clip needs --clip_model=DIR: a local transformers CLIPModel folder "
                             "(config.json, model.safetensors or pytorch_model.bin, tokenizer files), e.g. "
                             "openai/clip-vit-large-patch14 saved with save_pretrained; nothing is downloaded")
    return names


def _set_report(info: SetInfo) -> dict:
    return {"source": info.description, "num_images": info.num_images,
            "resolution": list(info.resolution) if info.resolution else None,
            "converted_to_rgb": info.converted_to_rgb, "resized": info.resized, "warnings": list(info.warnings)}


def evaluate(opts: EvalOptions, extractor: FeatureExtractor | None = None, clip_scorer=None) -> dict[str, Any]:
    """Compute the requested metrics; returns a JSON-ready dict.

    `extractor` overrides the Inception, `clip_scorer` (a clip_score.CLIPScorer) the --clip_model.
    """
    names = _check_metrics(opts, have_clip=clip_scorer is not None)
    prompts = None
    if "clip" in names:  # prompts and model first: fail before any compute
        prompts = prompts_of(opts.samples)
        if clip_scorer is None:
            from latent_diffusion.evaluation.clip_score import load_clip
            clip_scorer = load_clip(opts.clip_model)
    inception = _Inception(opts, extractor)

    results: dict[str, Any] = {"metrics": {}}
    sample_feats = sample_info = sample_set = None
    if opts.samples is not None:
        sample_set = open_image_set(opts.samples, "samples", opts.image_size, opts.tfds_data_dir)
        sample_info = sample_set.info
        if any(m in NEEDS_INCEPTION for m in names) or opts.save_stats:
            sample_feats = inception(sample_set, "samples")

    ref_stats = ref_feats = None
    if opts.reference is not None and (any(m in NEEDS_INCEPTION for m in names) or opts.save_stats):
        ref_stats, ref_feats, ref_info = _reference(opts, names, sample_info, inception)
        results["reference"] = _set_report(ref_info)

    sample_stats = None
    if sample_feats is not None and ("fid" in names or (opts.save_stats and ref_feats is None)):
        sample_stats = M.gaussian_stats(sample_feats["pool3"])

    out = results["metrics"]
    if "clip" in names:
        out.update(clip_scorer(sample_set, prompts, opts.batch_size, progress=opts.progress))
        results["clip_model"] = clip_scorer.description
    if "fid" in names:
        out["fid"] = M.frechet_distance(*sample_stats, ref_stats.mu, ref_stats.sigma)
    if "kid" in names:
        out.update(M.kernel_inception_distance(sample_feats["pool3"], ref_feats["pool3"], opts.kid_subsets,
                                               opts.kid_subset_size, seed=opts.seed))
    if "is" in names:
        if "logits_unbiased" not in sample_feats:
            raise ValueError("Inception Score needs the classifier (fc) weights, which these Inception "
                             "weights lack; convert the full pytorch-fid / torch-fidelity .pth file")
        out.update(M.inception_score(sample_feats["logits_unbiased"], opts.is_splits, seed=opts.seed))
    if "pr" in names:
        out.update(M.precision_recall(sample_feats["pool3"], ref_feats["pool3"], k=opts.pr_k))

    if sample_info is not None:  # after the reads: TFDS counts conversions while reading
        results["samples"] = _set_report(sample_info)
    if opts.save_stats:
        _save_stats(opts, results, sample_feats, sample_info, sample_stats, ref_stats, ref_feats)
    if inception.extractor is not None:
        results["inception_weights"] = inception.description
    results["options"] = {k: v for k, v in dataclasses.asdict(opts).items() if k != "progress"}
    return results


class _Inception:
    """The Inception feature extractor, loaded on first use: only the metrics and stats that need it load it."""

    def __init__(self, opts: EvalOptions, extractor: FeatureExtractor | None = None):
        self.opts, self.extractor = opts, extractor
        self.description = "custom extractor"

    def __call__(self, image_set, desc: str) -> dict:
        if self.extractor is None:
            module, params, self.description = load_inception(self.opts.inception_weights,
                                                              self.opts.allow_random_inception_for_tests)
            self.extractor = FeatureExtractor(module, params, self.opts.batch_size, progress=self.opts.progress)
        return self.extractor(image_set, desc=desc)


def _reference(opts: EvalOptions, names, sample_info: SetInfo | None, inception: _Inception):
    """(Stats, features or None, SetInfo) of --reference: a stats file, or images whose features are computed."""
    if not is_stats_file(opts.reference):
        images = open_image_set(opts.reference, "reference", opts.image_size, opts.tfds_data_dir)
        ref_feats, ref_info = inception(images, "reference"), images.info
        mu, sigma = M.gaussian_stats(ref_feats["pool3"])
        if sample_info is not None and ref_info.resolution != sample_info.resolution:
            ref_info.warn(f"reference images are {ref_info.resolution} but samples are "
                          f"{sample_info.resolution}; both are resized to 299x299 by the Inception")
        return Stats(mu, sigma, ref_info.num_images, ref_info.resolution), ref_feats, ref_info
    ref_stats = load_stats(opts.reference, feature_dim=FEATURE_DIM)
    ref_info = SetInfo(f"reference stats {opts.reference}", num_images=ref_stats.num_images or 0,
                       resolution=ref_stats.resolution)
    if sample_info is not None:
        check_resolution(ref_stats, sample_info.resolution, opts.reference, opts.allow_resolution_mismatch)
    ref_feats = None
    if any(m in ("kid", "pr") for m in names):
        if ref_stats.features is not None:
            ref_feats = {"pool3": np.asarray(ref_stats.features)}
        elif ref_stats.images is not None:  # ADM reference batch: features from its arr_0
            ref_feats = inception(ArraySet(ref_stats.images, f"reference {opts.reference} (arr_0)", opts.image_size),
                                  "reference")
        else:
            raise ValueError(f"{opts.reference} holds only mu/sigma; KID and precision/recall need the "
                             "reference features or images. Use the images, or a stats file written "
                             "with --save_stats --save_features.")
    return ref_stats, ref_feats, ref_info


def _save_stats(opts, results, sample_feats, sample_info, sample_stats, ref_stats, ref_feats):
    """--save_stats writes the reference's statistics when computed from images, else the samples'."""
    if opts.reference is not None and not is_stats_file(opts.reference):
        feats, info = ref_feats, results["reference"]
        mu, sigma = ref_stats.mu, ref_stats.sigma
    elif sample_feats is not None:
        feats, info = sample_feats, results["samples"]
        mu, sigma = sample_stats
    else:
        raise ValueError("--save_stats: the reference is already a stats file and there are no samples")
    save_stats(opts.save_stats, mu, sigma, info["num_images"], tuple(info["resolution"] or ()) or None,
               features=feats["pool3"] if opts.save_features else None)
    results["saved_stats"] = {"path": opts.save_stats, "of": info["source"]}
    log.info("wrote statistics of %s to %s", info["source"], opts.save_stats)


def format_table(results: dict[str, Any]) -> str:
    rows = [("metric", "value")] + [(k, f"{v:.6g}" if isinstance(v, float) else str(v))
                                    for k, v in results["metrics"].items()]
    width = max(len(r[0]) for r in rows) + 2
    lines = [f"{a:<{width}}{b}" for a, b in rows]
    for role in ("samples", "reference"):
        if role in results:
            r = results[role]
            lines.append(f"{role}: {r['source']} ({r['num_images']} images, resolution {r['resolution']})")
    if "inception_weights" in results:
        lines.append(f"inception weights: {results['inception_weights']}")
    if "clip_model" in results:
        lines.append(f"clip model: {results['clip_model']}")
    return "\n".join(lines)


def write_json(path: str, obj: Any) -> None:
    """Write JSON atomically: a tmp file in the same folder, then rename."""
    os.makedirs(os.path.dirname(os.path.abspath(path)) or ".", exist_ok=True)
    tmp = f"{path}.tmp.{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2, sort_keys=False)
        f.write("\n")
    os.replace(tmp, path)
