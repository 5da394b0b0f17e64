"""Sampling requests: prompts files, class lists or a sample count, parsed into numbered work items.

Every item gets a global index (its position in the job) and a seed; its noise key is
`fold_in(key(seed), index)` (see `sample_key`), so an image depends only on the request and
never on device count, batch size or restarts.

Prompts files: plain text holds one prompt per line; JSONL (a `.jsonl` file, or any file whose
first non-blank line starts with '{') holds one object per line with the fields of `JSON_FIELDS`:
the text / class conditions, per-request sampling options, and the inputs of the image modes
("image", "mask", "segmentation": paths, relative to the JSONL file's folder; "layout": a list of
{"label": int, "bbox": [ymin, xmin, ymax, xmax]} in [0, 1]; "strength": img2img, in [0, 1]).
Blank lines are skipped with one warning that counts them and names their line numbers, because
trailing and separating blank lines are common and harmless; everything else that is wrong is an
error naming the line.
"""
from __future__ import annotations

import dataclasses
import json
import os
import re
import warnings
from typing import Iterable, Sequence

import jax

GUIDANCE_RANGE = (0.0, 50.0)
STEPS_RANGE = (1, 1000)
SEED_LIMIT = 2 ** 32  # seeds are uint32 so that a seed means the same key on every platform
JSON_FIELDS = ("prompt", "negative_prompt", "label", "seed", "guidance", "steps", "image", "mask", "strength",
               "layout", "segmentation")
INPUT_FIELDS = ("image", "mask", "strength", "layout", "segmentation")  # WorkItem fields of the image modes


class RequestError(ValueError):
    """A request the user wrote that cannot be sampled."""


@dataclasses.dataclass(frozen=True)
class WorkItem:
    """One sample to generate; None fields take the job's defaults."""
    index: int
    seed: int
    prompt: str | None = None
    negative_prompt: str | None = None
    label: int | None = None
    guidance: float | None = None
    steps: int | None = None
    image: str | None = None          # init image (img2img), image to inpaint, or low-res input (SR)
    mask: str | None = None           # PNG, white = region to fill
    strength: float | None = None     # img2img
    layout: tuple | None = None       # ((label, (ymin, xmin, ymax, xmax)), ...)
    segmentation: str | None = None   # PNG class map


def sample_key(seed: int, index: int) -> jax.Array:
    """The per-sample noise key, the single definition the job machinery follows."""
    return jax.random.fold_in(jax.random.key(seed), index)


def _where(source: str, line: int | None) -> str:
    return f"{source}, line {line}" if line is not None else source


def check_seed(seed, where: str = "seed") -> int:
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < SEED_LIMIT:
        raise RequestError(f"{where}: seed must be an integer in [0, 2**32), got {seed!r}")
    return seed


def check_guidance(scale, where: str) -> float:
    lo, hi = GUIDANCE_RANGE
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not lo <= scale <= hi:
        raise RequestError(f"{where}: guidance scale must be a number in [{lo:g}, {hi:g}] "
                           f"(1 = no guidance, 7.5 is typical), got {scale!r}")
    return float(scale)


def check_steps(steps, where: str) -> int:
    lo, hi = STEPS_RANGE
    if isinstance(steps, bool) or not isinstance(steps, int) or not lo <= steps <= hi:
        raise RequestError(f"{where}: steps must be an integer in [{lo}, {hi}], got {steps!r}")
    return steps


def check_label(label, num_classes: int | None, where: str) -> int:
    if isinstance(label, bool) or not isinstance(label, int):
        raise RequestError(f"{where}: class label must be an integer, got {label!r}")
    if num_classes is not None and not 0 <= label < num_classes:
        raise RequestError(f"{where}: class id {label} is outside [0, {num_classes}) for this "
                           f"{num_classes}-class model")
    return label


def _number(items: Iterable[dict], seed: int, samples_per_item: int) -> list[WorkItem]:
    if isinstance(samples_per_item, bool) or not isinstance(samples_per_item, int) or samples_per_item < 1:
        raise RequestError(f"samples per item must be a positive integer, got {samples_per_item!r}")
    check_seed(seed, "job seed")
    out = []
    for fields in items:
        fields = dict(fields)
        item_seed = fields.pop("seed", None)
        for _ in range(samples_per_item):
            out.append(WorkItem(index=len(out), seed=seed if item_seed is None else item_seed, **fields))
    return out


def check_strength(strength, where: str) -> float:
    if isinstance(strength, bool) or not isinstance(strength, (int, float)) or not 0.0 <= strength <= 1.0:
        raise RequestError(f"{where}: strength must be a number in [0, 1] (0 keeps the input image, 1 ignores "
                           f"it), got {strength!r}")
    return float(strength)


def check_layout(layout, where: str) -> tuple:
    """A JSON layout -> ((label, (ymin, xmin, ymax, xmax)), ...), boxes normalised to [0, 1]."""
    example = '[{"label": 3, "bbox": [0.1, 0.2, 0.5, 0.6]}] (bbox = ymin, xmin, ymax, xmax in [0, 1])'
    if not isinstance(layout, list):
        raise RequestError(f"{where}: 'layout' must be a list of objects like {example}, got {layout!r}")
    out = []
    for j, obj in enumerate(layout):
        if not isinstance(obj, dict) or set(obj) != {"label", "bbox"}:
            raise RequestError(f"{where}: layout object {j} must have exactly 'label' and 'bbox', like {example}; "
                               f"got {obj!r}")
        label, box = obj["label"], obj["bbox"]
        if isinstance(label, bool) or not isinstance(label, int) or label < 0:
            raise RequestError(f"{where}: layout object {j}: label must be a non-negative integer, got {label!r}")
        if (not isinstance(box, list) or len(box) != 4
                or any(isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 <= v <= 1 for v in box)
                or not (box[0] < box[2] and box[1] < box[3])):
            raise RequestError(f"{where}: layout object {j}: bbox must be [ymin, xmin, ymax, xmax] in [0, 1] with "
                               f"ymin < ymax and xmin < xmax, got {box!r}")
        out.append((label, tuple(float(v) for v in box)))
    return tuple(out)


def _input_path(value, key: str, base_dir: str | None, where: str) -> str:
    if not isinstance(value, str) or not value.strip():
        raise RequestError(f"{where}: {key!r} must be the path of an image file, got {value!r}")
    path = os.path.join(base_dir, value) if base_dir and not os.path.isabs(value) else value
    if not os.path.isfile(path):
        rel = " (relative paths are read from the JSONL file's folder)" if base_dir else ""
        raise RequestError(f"{where}: {key} file {path!r} does not exist{rel}")
    return os.path.normpath(path)


def _json_record(text: str, source: str, line: int, num_classes: int | None, base_dir: str | None = None) -> dict:
    where = _where(source, line)
    try:
        rec = json.loads(text)
    except json.JSONDecodeError as e:
        raise RequestError(f"{where}: not valid JSON ({e.msg}); JSONL files need one object per line, "
                           f'e.g. {{"prompt": "a red cube", "seed": 3}}') from None
    if not isinstance(rec, dict):
        raise RequestError(f"{where}: expected a JSON object, got {type(rec).__name__}")
    unknown = sorted(set(rec) - set(JSON_FIELDS))
    if unknown:
        raise RequestError(f"{where}: unknown field(s) {unknown}; allowed fields are {list(JSON_FIELDS)}")
    out = {}
    if "prompt" in rec:
        if not isinstance(rec["prompt"], str) or not rec["prompt"].strip():
            raise RequestError(f"{where}: 'prompt' must be a non-empty string, got {rec['prompt']!r}")
        out["prompt"] = rec["prompt"].strip()
    if "label" in rec:
        out["label"] = check_label(rec["label"], num_classes, where)
    for key in ("image", "mask", "segmentation"):
        if rec.get(key) is not None:
            out[key] = _input_path(rec[key], key, base_dir, where)
    if rec.get("layout") is not None:
        out["layout"] = check_layout(rec["layout"], where)
    if not any(k in out for k in ("prompt", "label", "image", "layout", "segmentation")):
        raise RequestError(f"{where}: a record needs a 'prompt' or a 'label' (or the 'image', 'layout' or "
                           "'segmentation' input of an image mode)")
    if "mask" in out and "image" not in out:
        raise RequestError(f"{where}: a 'mask' needs the 'image' it belongs to")
    if rec.get("negative_prompt") is not None:
        if not isinstance(rec["negative_prompt"], str):
            raise RequestError(f"{where}: 'negative_prompt' must be a string, got {rec['negative_prompt']!r}")
        out["negative_prompt"] = rec["negative_prompt"]
    if rec.get("seed") is not None:
        out["seed"] = check_seed(rec["seed"], where)
    if rec.get("guidance") is not None:
        out["guidance"] = check_guidance(rec["guidance"], where)
    if rec.get("steps") is not None:
        out["steps"] = check_steps(rec["steps"], where)
    if rec.get("strength") is not None:
        out["strength"] = check_strength(rec["strength"], where)
    return out


def _warn_blank(blank: list[int], source: str):
    if blank:
        shown = ", ".join(map(str, blank[:20])) + (", ..." if len(blank) > 20 else "")
        warnings.warn(f"{source}: skipped {len(blank)} blank line(s) (line {shown})", stacklevel=3)


def parse_prompt_lines(lines: Sequence[str], *, seed: int, num_classes: int | None = None,
                       jsonl: bool | None = None, samples_per_item: int = 1, source: str = "prompts",
                       base_dir: str | None = None) -> list[WorkItem]:
    """Work items from the lines of a prompts file; `jsonl=None` detects the format.

    Relative input paths of JSONL records are read from `base_dir` (default: the working directory).
    """
    lines = [ln.rstrip("\r\n") for ln in lines]
    if jsonl is None:
        first = next((ln for ln in lines if ln.strip()), "")
        jsonl = first.lstrip().startswith("{")
    records, blank = [], []
    for number, text in enumerate(lines, start=1):
        if not text.strip():
            blank.append(number)
        elif jsonl:
            records.append(_json_record(text, source, number, num_classes, base_dir))
        else:
            records.append({"prompt": text.strip()})
    _warn_blank(blank, source)
    if not records:
        raise RequestError(f"{source}: no prompts found; write one prompt per line (or one JSON object "
                           "per line in a .jsonl file)")
    return _number(records, seed, samples_per_item)


def parse_prompts_file(path: str, *, seed: int, num_classes: int | None = None,
                       samples_per_item: int = 1) -> list[WorkItem]:
    """Work items from a prompts file (text, or JSONL by suffix or content)."""
    if not os.path.isfile(path):
        raise RequestError(f"prompts file {path!r} does not exist; pass a text file with one prompt "
                           "per line or a .jsonl file with one request object per line")
    with open(path, encoding="utf-8") as f:
        lines = f.readlines()
    jsonl = True if path.endswith(".jsonl") else None
    return parse_prompt_lines(lines, seed=seed, num_classes=num_classes, jsonl=jsonl,
                              samples_per_item=samples_per_item, source=path, base_dir=os.path.dirname(path))


def parse_classes(spec: str, *, seed: int, num_classes: int | None,
                  samples_per_item: int = 1) -> list[WorkItem]:
    """Work items from a class list: '3,7,7' or a file of integers (comma or whitespace separated)."""
    if os.path.isfile(spec):
        with open(spec, encoding="utf-8") as f:
            rows, source = list(enumerate(f.read().splitlines(), start=1)), spec
    else:
        rows, source = [(None, spec)], "class list"
    records = []
    for number, text in rows:
        for token in filter(None, re.split(r"[,\s]+", text)):
            where = _where(source, number)
            try:
                label = int(token)
            except ValueError:
                raise RequestError(f"{where}: {token!r} is not an integer class id; pass ids like "
                                   "'1,5,9' or a file of integers") from None
            records.append({"label": check_label(label, num_classes, where)})
    if not records:
        raise RequestError(f"{source}: no class ids found in {spec!r}")
    return _number(records, seed, samples_per_item)


def unconditional_items(num_samples: int, *, seed: int) -> list[WorkItem]:
    """`num_samples` items without conditions, for unconditional models."""
    if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < 1:
        raise RequestError(f"num_samples must be a positive integer, got {num_samples!r}")
    return _number([{}], seed, num_samples)


def build_requests(*, seed: int, prompts: str | None = None, classes: str | None = None,
                   num_samples: int | None = None, num_classes: int | None = None) -> list[WorkItem]:
    """The work items of a job from exactly one of prompts / classes, or a count alone.

    With prompts or classes, `num_samples` is the number of samples per prompt / class (default 1).
    """
    if prompts is not None and classes is not None:
        raise RequestError("give either a prompts file or a class list, not both")
    per_item = 1 if num_samples is None else num_samples
    if prompts is not None:
        return parse_prompts_file(prompts, seed=seed, num_classes=num_classes, samples_per_item=per_item)
    if classes is not None:
        return parse_classes(classes, seed=seed, num_classes=num_classes, samples_per_item=per_item)
    if num_samples is None:
        raise RequestError("nothing to sample: pass a prompts file, a class list, or a number of "
                           "samples for an unconditional model")
    return unconditional_items(num_samples, seed=seed)
