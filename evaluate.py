"""Score saved samples offline: FID, KID, Inception Score, precision/recall, CLIP score.

  python evaluate.py --samples=samples/ --reference=ref_stats.npz --metrics=fid,kid,is,pr --out=results.json
  python evaluate.py --samples=samples/ --metrics=clip --clip_model=clip-vit-large-patch14/   # vs the prompts
  python evaluate.py --reference=tfds:cifar10/train --save_stats=cifar10_train.npz   # precompute a reference

--samples / --reference: a folder of PNG/JPEG (sample.py output with manifest.jsonl included), an
.npz with uint8 NHWC `arr_0`, a statistics .npz (`mu`, `sigma`: ours, pytorch-fid's or an ADM
reference batch), or tfds:NAME/SPLIT. CLIP score reads each image's prompt from sample.py's
manifest.jsonl (in the folder, or beside samples.npz) and needs a local transformers CLIPModel folder.
"""
import sys

from absl import app, flags, logging

from latent_diffusion.evaluation import pipeline

_SAMPLES = flags.DEFINE_string("samples", None, "Generated images: folder, .npz (arr_0) or tfds:NAME/SPLIT.")
_REFERENCE = flags.DEFINE_string("reference", None,
                                 "Reference: folder, .npz of images, stats .npz (mu/sigma) or tfds:NAME/SPLIT.")
_METRICS = flags.DEFINE_list("metrics", ["fid"], f"Comma-separated, from {list(pipeline.METRICS)}. "
                             "clip: CLIP score against the manifest's prompts (needs --clip_model).")
_OUT = flags.DEFINE_string("out", None, "Write the results as JSON here (atomically).")
_WEIGHTS = flags.DEFINE_string("inception_weights", None,
                               "Converted FID Inception weights (.npz, or the original .pth). Default: "
                               "$LDM_INCEPTION_WEIGHTS or ~/.cache/latent_diffusion/inception-2015-12-05.npz.")
_CLIP_MODEL = flags.DEFINE_string("clip_model", None,
                                  "Local transformers CLIPModel folder for --metrics=clip (config.json, "
                                  "model.safetensors or pytorch_model.bin, vocab.json, merges.txt; optional "
                                  "preprocessor_config.json), e.g. openai/clip-vit-large-patch14 (torchmetrics' "
                                  "default) saved with save_pretrained. Never downloaded.")
_RANDOM = flags.DEFINE_bool("allow_random_inception_for_tests", False,
                            "TESTS ONLY: use randomly initialised Inception weights; the numbers are meaningless.")
_BATCH = flags.DEFINE_integer("batch_size", 64, "Global batch (rounded up to a multiple of the device count).")
_IMAGE_SIZE = flags.DEFINE_integer("image_size", None,
                                   "Center-crop and resize images of another size to NxN (with a warning). "
                                   "Default: images of mixed sizes are an error.")
_SAVE_STATS = flags.DEFINE_string("save_stats", None,
                                  "Write mu/sigma (+ metadata) of --reference when it is computed from images, "
                                  "else of --samples.")
_SAVE_FEATURES = flags.DEFINE_bool("save_features", False,
                                   "Also store the pool3 features in --save_stats (needed for KID / PR later).")
_ALLOW_RES = flags.DEFINE_bool("allow_resolution_mismatch", False,
                               "Compute FID against stats of another image resolution (warns instead of failing).")
_KID_SUBSETS = flags.DEFINE_integer("kid_subsets", 100, "KID: number of random subsets.")
_KID_SUBSET_SIZE = flags.DEFINE_integer("kid_subset_size", 1000, "KID: subset size (clamped to the set size).")
_IS_SPLITS = flags.DEFINE_integer("is_splits", 10, "Inception Score: number of splits.")
_PR_K = flags.DEFINE_integer("pr_k", 3, "Precision/recall: k of the k-NN radii.")
_SEED = flags.DEFINE_integer("seed", 2020, "Seed of the KID subsets and the IS shuffle (torch-fidelity's default).")
_TFDS_DIR = flags.DEFINE_string("tfds_data_dir", None, "TFDS data_dir for tfds: references.")
_PROGRESS = flags.DEFINE_bool("progress", True, "Show progress bars.")


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    opts = pipeline.EvalOptions(
        samples=_SAMPLES.value, reference=_REFERENCE.value, metrics=tuple(_METRICS.value),
        inception_weights=_WEIGHTS.value, clip_model=_CLIP_MODEL.value, allow_random_inception_for_tests=_RANDOM.value,
        batch_size=_BATCH.value, image_size=_IMAGE_SIZE.value, save_stats=_SAVE_STATS.value,
        save_features=_SAVE_FEATURES.value, allow_resolution_mismatch=_ALLOW_RES.value,
        kid_subsets=_KID_SUBSETS.value, kid_subset_size=_KID_SUBSET_SIZE.value, is_splits=_IS_SPLITS.value,
        pr_k=_PR_K.value, seed=_SEED.value, tfds_data_dir=_TFDS_DIR.value, progress=_PROGRESS.value)
    try:
        results = pipeline.evaluate(opts)
    except (ValueError, KeyError, FileNotFoundError) as e:
        logging.error("%s", e)
        sys.exit(f"evaluate.py: {e}")
    print(pipeline.format_table(results))
    if _OUT.value:
        pipeline.write_json(_OUT.value, results)
        print(f"wrote {_OUT.value}")


if __name__ == "__main__":
    app.run(main)
