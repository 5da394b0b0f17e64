"""The shapes text-to-image job end to end (end_to_end.py): both stages, held-out samples, scores, a grid.

Each part is resumable on its own: training resumes from its checkpoints, sampling jobs keep the
PNGs they already wrote, and scoring reads the PNGs back, so a rerun only does what is missing.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import time

import numpy as np

log = logging.getLogger(__name__)


@dataclasses.dataclass
class Result:
    workdir: str
    scores: dict          # {'g3': {'single': {...}, 'two': {...}, 'shapes_fid': ...}, ...}
    grid_path: str
    scores_path: str
    seconds: dict         # wall time of each stage in this invocation
    autoencoder_eval: dict
    ldm_eval: dict


def _atomic_write(path: str, data: bytes) -> None:
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


def _train(config, workdir: str) -> dict:
    from latent_diffusion.training.loop import train_and_evaluate
    result = train_and_evaluate(config, workdir)
    if not result.eval_metrics:  # already finished earlier: nothing was trained or evaluated now
        return _last_eval(workdir)
    return result.eval_metrics


def _last_eval(workdir: str) -> dict:
    """The eval metrics a finished run logged last (from its TensorBoard events), or {}."""
    try:
        from tensorboard.backend.event_processing import event_accumulator
    except ImportError:
        return {}
    acc = event_accumulator.EventAccumulator(os.path.join(workdir, "logs"), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag.split("/", 1)[1]: acc.Scalars(tag)[-1].value for tag in acc.Tags().get("scalars", [])
            if tag.startswith("eval/")}


def _sample(gen, captions, outdir: str, *, guidance: float, steps: int, seed: int, mesh, spec: dict) -> np.ndarray:
    """uint8 samples of `captions` (in order), made by a resumable sampling job in `outdir`."""
    from PIL import Image

    from latent_diffusion.sampling import jobs, outputs
    from latent_diffusion.sampling.requests import WorkItem
    items = [WorkItem(index=i, seed=seed, prompt=c) for i, c in enumerate(captions)]
    batch = max(mesh.size, min(32, len(items)) // mesh.size * mesh.size)
    jobs.run_job(gen, items, outdir, global_batch_size=batch, mesh=mesh, progress=False,
                 job_spec=dict(spec, guidance=guidance, steps=steps, seed=seed, sampler="ddim", eta=0.0))
    digits = outputs.num_digits(len(items))
    return np.stack([np.asarray(Image.open(os.path.join(outdir, outputs.sample_name(i, digits))).convert("RGB"))
                     for i in range(len(items))])


def _test_split(data_cfg, n: int):
    """The first n (image uint8, caption) pairs of the shapes test split, as the dataset stores them."""
    from latent_diffusion.data import shapes
    res = int(data_cfg.resolution)
    builder = shapes.ensure_built(data_cfg.get("data_dir"),
                                  data_cfg.get("config") or (str(res) if res in (32, 64, 128, 256) else "64"))
    source = builder.as_data_source("test")
    n = min(n, len(source))
    rows = [source[i] for i in range(n)]
    caption = lambda c: c.decode() if isinstance(c, bytes) else str(c)
    return np.stack([r["image"] for r in rows]), [caption(r["caption"]) for r in rows], builder


def run(ae_config, ldm_config, workdir: str, *, data_dir: str | None = None, num_prompts: int = 64,
        guidance=(3.0,), sample_steps: int = 50, fid_samples: int = 256, seed: int = 0) -> Result:
    """Trains both stages (or resumes them), samples held-out prompts and scores them; see end_to_end.py."""
    import jax

    from latent_diffusion.evaluation import shapes_classifier, shapes_eval, shapes_prompts
    from latent_diffusion.sampling.pipeline import LDMGenerator, load_ldm
    from latent_diffusion.training import partitioning

    if ldm_config.conditioning.crossattn != "text" or not str(ldm_config.data.name).startswith("shapes"):
        raise ValueError("end_to_end runs a text-conditional LDM on the shapes dataset; got "
                         f"conditioning.crossattn={ldm_config.conditioning.crossattn!r}, "
                         f"data.name={ldm_config.data.name!r}")
    os.makedirs(workdir, exist_ok=True)
    if data_dir:
        ae_config.data.data_dir = data_dir
        ldm_config.data.data_dir = data_dir
    ae_dir, ldm_dir = os.path.join(workdir, "autoencoder"), os.path.join(workdir, "ldm")
    seconds = {}
    t = time.perf_counter()
    log.info("stage 1: autoencoder in %s", ae_dir)
    ae_eval = _train(ae_config, ae_dir)
    seconds["stage1"] = time.perf_counter() - t

    t = time.perf_counter()
    ldm_config.first_stage.workdir = ae_dir
    log.info("stage 2: text-conditional LDM in %s", ldm_dir)
    ldm_eval = _train(ldm_config, ldm_dir)
    seconds["stage2"] = time.perf_counter() - t

    t = time.perf_counter()
    mesh = partitioning.make_mesh()
    task, params, frozen, meta = load_ldm(ldm_dir, mesh)
    real, test_captions, builder = _test_split(ldm_config.data, fid_samples or 1)
    suite = shapes_eval.PromptSuite.make(num_prompts, num_prompts, builder.info.splits["train"].num_examples,
                                         seed=seed)
    judge = shapes_classifier.ShapesJudge.load()
    res = int(ldm_config.data.resolution)
    spec = dict(model=os.path.abspath(ldm_dir), checkpoint_step=meta.get("step"), ema=True, image_size=res,
                negative_prompt="")
    scores, grid_images = {}, None
    for g in guidance:
        gen = LDMGenerator(task, params, frozen, image_size=res, guidance=g, mesh=mesh)
        images = {name: _sample(gen, [p["caption"] for p in prompts],
                                os.path.join(workdir, "samples", f"{name}_g{g:g}"),
                                guidance=g, steps=sample_steps, seed=seed, mesh=mesh, spec=spec)
                  for name, prompts in suite.sets().items()}
        scores[f"g{g:g}"] = shapes_eval.evaluate(judge, images, suite)
        if fid_samples:
            fake = _sample(gen, test_captions, os.path.join(workdir, "samples", f"test_g{g:g}"), guidance=g,
                           steps=sample_steps, seed=seed, mesh=mesh, spec=spec)
            scores[f"g{g:g}"]["shapes_fid"] = shapes_prompts.shapes_fid(judge.features(real), judge.features(fake))
        if grid_images is None:
            k = min(8, num_prompts)
            grid_images = (np.concatenate([images["single"][:k], images["two"][:k]]),
                           [p["caption"] for p in suite.single[:k] + suite.two[:k]])
    seconds["sample_and_score"] = time.perf_counter() - t

    grid_path, scores_path = os.path.join(workdir, "grid.png"), os.path.join(workdir, "scores.json")
    if jax.process_index() == 0:
        import io

        from PIL import Image
        buf = io.BytesIO()
        Image.fromarray(shapes_eval.caption_grid(*grid_images)).save(buf, format="PNG")
        _atomic_write(grid_path, buf.getvalue())
        record = dict(scores=scores, sample_steps=sample_steps, num_prompts=num_prompts, seed=seed,
                      ldm_step=meta.get("step"), autoencoder_eval=ae_eval, ldm_eval=ldm_eval, seconds=seconds,
                      prompts={"single": [p["caption"] for p in suite.single],
                               "two": [p["caption"] for p in suite.two]})
        _atomic_write(scores_path, json.dumps(record, indent=1).encode())
    return Result(workdir=workdir, scores=scores, grid_path=grid_path, scores_path=scores_path, seconds=seconds,
                  autoencoder_eval=ae_eval, ldm_eval=ldm_eval)


def report(result: Result) -> str:
    """The closing lines of end_to_end.py: scores per guidance scale and where the grid is."""
    lines = [f"autoencoder: held-out PSNR {result.autoencoder_eval.get('psnr', float('nan')):.2f} dB; "
             f"LDM: held-out loss {result.ldm_eval.get('loss', float('nan')):.4f}"]
    for g, s in result.scores.items():
        for name in ("single", "two"):
            r = s[name]
            lines.append(f"guidance {g[1:]}, {name}-shape prompts ({r['num_prompts']}): all right {r['all']:.1%} | "
                         + " ".join(f"{a} {r[a]:.1%}" for a in ("position", "kind", "color", "size", "count")))
        if "shapes_fid" in s:
            lines.append(f"guidance {g[1:]}: shapes-FID {s['shapes_fid']:.2f}")
    took = ", ".join(f"{k} {v / 60:.1f} min" for k, v in result.seconds.items())
    lines.append(f"time in this run: {took}")
    lines.append(f"scores: {result.scores_path}")
    lines.append(f"grid of held-out prompts: {result.grid_path}")
    return "\n".join(lines)
