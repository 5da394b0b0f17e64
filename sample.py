"""Sample a trained latent diffusion model as a resumable batch job.

  python sample.py --workdir=runs/ldm_tiny --prompts=prompts.txt --outdir=samples/
  python sample.py --workdir=runs/cin --classes=0,1,2 --num_samples=50 --outdir=samples/
  python sample.py --workdir=runs/celeba --num_samples=50000 --outdir=samples/ --npz
  python sample.py --workdir=runs/sr --prompts=inputs.jsonl --outdir=samples/            # --mode=auto: sr
  python sample.py --workdir=runs/ldm_tiny --prompts=edits.jsonl --mode=img2img --strength=0.6 --outdir=...

Modes (--mode, default auto = the model's own): txt2img, img2img, inpaint (--inpaint_method=concat for
models trained with concat 'inpaint', blend for any model), sr, layout, semantic. Their inputs are
fields of a JSONL prompts file: "image", "mask" (white = fill), "strength", "segmentation" (paths,
relative to the JSONL file), "layout" ([{"label": 3, "bbox": [ymin, xmin, ymax, xmax]}] in [0, 1]).

One PNG per sample named by its index, manifest.jsonl and job.json in --outdir; a killed job
rerun with the same flags makes only the missing samples. Every host of a multi-host job runs
the same command.
"""
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")  # before TensorFlow is first imported

from absl import app, flags  # noqa: E402

flags.DEFINE_string("workdir", None, "LDM training workdir (its latest checkpoint is used).")
flags.DEFINE_string("outdir", None, "Output folder.")
flags.DEFINE_string("prompts", None, "Prompts file: one prompt per line, or JSONL with prompt, label, seed, "
                    "guidance, negative_prompt, steps, image, mask, strength, layout, segmentation.")
flags.DEFINE_string("classes", None, "Class ids for a class-conditional model: '1,2,3' or a file.")
flags.DEFINE_integer("num_samples", None, "Samples per prompt / class, or the count for an unconditional model.")
flags.DEFINE_enum("sampler", "ddim", ["ddim", "plms", "dpm_solver_pp_2m"], "Sampler.")
flags.DEFINE_integer("steps", 50, "Sampling steps.")
flags.DEFINE_float("guidance", 5.0, "Classifier-free guidance scale (1 = no guidance).")
flags.DEFINE_float("eta", 0.0, "DDIM eta (0 = deterministic).")
flags.DEFINE_enum("mode", "auto", ["auto", "txt2img", "img2img", "inpaint", "sr", "layout", "semantic"],
                  "Sampling mode; auto picks the model's own (sr, inpaint, semantic, layout or txt2img).")
flags.DEFINE_float("strength", 0.75, "img2img: share of the schedule run from the noised input (0 keeps the "
                   "input, 1 ignores it); a request's own 'strength' wins.")
flags.DEFINE_enum("inpaint_method", None, ["concat", "blend"], "inpaint: concat (models trained for inpainting, "
                  "the default for them) or blend (latent blending, any model; the default otherwise).")
flags.DEFINE_string("negative_prompt", "", "Default negative prompt (the unconditional half of guidance).")
flags.DEFINE_integer("seed", 0, "Job seed; sample i uses fold_in(key(seed), i).")
flags.DEFINE_integer("batch_size", 0, "Global batch size (default: 8 per device).")
flags.DEFINE_integer("image_size", 0, "Image size (default: the training resolution).")
flags.DEFINE_bool("use_ema", True, "Use the EMA weights.")
flags.DEFINE_enum("attention_impl", None, ["xla", "cudnn"], "Attention kernel (default: the run's config): "
                  "cudnn is the fused kernel for bfloat16/float16 UNets on NVIDIA GPUs.")
flags.DEFINE_bool("npz", False, "Also write samples.npz (arr_0, uint8 NHWC) for evaluators.")
flags.DEFINE_bool("force", False, "Replace a different job's samples in --outdir.")
flags.DEFINE_bool("distributed", False, "Call jax.distributed.initialize() (multi-host).")
flags.mark_flags_as_required(["workdir", "outdir"])
FLAGS = flags.FLAGS


def main(argv):
    del argv
    from latent_diffusion import cli
    cli.start(FLAGS.distributed)
    from latent_diffusion.sampling import jobs, requests
    from latent_diffusion.sampling.pipeline import LDMGenerator, load_ldm
    from latent_diffusion.training import partitioning
    if not 1 <= FLAGS.steps <= 1000:
        raise app.UsageError(f"--steps must be in [1, 1000], got {FLAGS.steps}")
    if not 0 <= FLAGS.guidance <= 50:
        raise app.UsageError(f"--guidance must be in [0, 50], got {FLAGS.guidance}")
    mesh = partitioning.make_mesh()
    task, params, frozen, meta = load_ldm(FLAGS.workdir, mesh, use_ema=FLAGS.use_ema,
                                          attention_impl=FLAGS.attention_impl)
    size = FLAGS.image_size or int(task.config.data.resolution)
    try:
        gen = LDMGenerator(task, params, frozen, image_size=size, sampler=FLAGS.sampler, guidance=FLAGS.guidance,
                           eta=FLAGS.eta, negative_prompt=FLAGS.negative_prompt, mode=FLAGS.mode,
                           strength=FLAGS.strength, inpaint_method=FLAGS.inpaint_method, mesh=mesh)
        num_classes = task.num_classes
        items = requests.build_requests(seed=FLAGS.seed, prompts=FLAGS.prompts, classes=FLAGS.classes,
                                        num_samples=FLAGS.num_samples, num_classes=num_classes)
        gen.check_items(items)
    except ValueError as e:  # RequestError included: a bad flag or request, reported without a traceback
        raise app.UsageError(str(e)) from None
    spec = dict(model=os.path.abspath(FLAGS.workdir), checkpoint_step=meta.get("step"), ema=FLAGS.use_ema,
                sampler=FLAGS.sampler, steps=FLAGS.steps, guidance=FLAGS.guidance, eta=FLAGS.eta,
                negative_prompt=FLAGS.negative_prompt, seed=FLAGS.seed, image_size=size)
    # txt2img jobs keep the job.json they had before the other modes existed, so they still resume.
    if gen.mode != "txt2img":
        spec["mode"] = gen.mode
    if gen.mode == "img2img":
        spec["strength"] = FLAGS.strength
    if gen.inpaint_method is not None:
        spec["inpaint_method"] = gen.inpaint_method
    result = jobs.run_job(gen, items, FLAGS.outdir, global_batch_size=FLAGS.batch_size or 8 * mesh.size,
                          job_spec=spec, mesh=mesh, force=FLAGS.force, write_npz=FLAGS.npz)
    print(f"{result.num_generated} new samples ({result.num_items} in all) in {result.outdir}: "
          f"{result.images_per_second:.2f} images/s")


if __name__ == "__main__":
    app.run(main)
