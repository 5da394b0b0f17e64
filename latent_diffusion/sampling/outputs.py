"""The files of a sampling job folder, each written atomically (temporary file + os.replace).

    job.json         the job spec and a digest of its work items; guards the folder against a different job
    000123.png       one PNG per sample, named by its zero-padded global index
    manifest.jsonl   one line per finished sample, ordered by index once the job completes
    samples.npz      optional: arr_0, uint8 NHWC, ordered by index (the ADM / guided-diffusion format)

A sample is done when its PNG exists and ends with the IEND chunk. The manifest is appended per
batch while the job runs, and rebuilt from the work items of the finished samples at start and end,
so a kill never leaves a torn or duplicated line in the final file.
"""
from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import os
import re
import zipfile
from typing import Any, Iterable, Sequence

import numpy as np
from PIL import Image

from latent_diffusion.sampling.requests import INPUT_FIELDS, WorkItem

JOB_FILE = "job.json"
MANIFEST = "manifest.jsonl"
NPZ = "samples.npz"
MIN_DIGITS = 6
_PNG_END = b"\x00\x00\x00\x00IEND\xaeB`\x82"
_TMP = re.compile(r"^\..*\.tmp\.\d+$")
_SAMPLE = re.compile(r"^\d+\.png$")


def num_digits(num_items: int) -> int:
    return max(MIN_DIGITS, len(str(max(num_items - 1, 0))))


def sample_name(index: int, digits: int) -> str:
    return f"{index:0{digits}d}.png"


def atomic_write(path: str, data: bytes) -> None:
    """Write `data` to `path` so that readers (and a rerun after a kill) see all of it or nothing."""
    tmp = os.path.join(os.path.dirname(path), f".{os.path.basename(path)}.tmp.{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def encode_png(image: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(image, mode="RGB").save(buf, format="PNG")
    return buf.getvalue()


def png_complete(path: str) -> bool:
    """True if `path` is a PNG that was written to the end (not torn, not empty)."""
    try:
        with open(path, "rb") as f:
            if f.read(8) != b"\x89PNG\r\n\x1a\n":
                return False
            f.seek(-len(_PNG_END), os.SEEK_END)
            return f.read() == _PNG_END
    except OSError:
        return False


def read_png(path: str) -> np.ndarray:
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"))


def canonical_spec(job_spec: dict) -> dict:
    """The job spec as JSON will hold it; refuses values that cannot round-trip."""
    try:
        return json.loads(json.dumps(job_spec, sort_keys=True))
    except (TypeError, ValueError) as e:
        raise ValueError(f"job_spec must hold only JSON values (str, numbers, bools, lists, dicts): {e}") from None


def items_digest(items: Sequence[WorkItem]) -> str:
    h = hashlib.sha256()
    for item in items:
        fields = dataclasses.asdict(item)
        for key in INPUT_FIELDS:  # added later: left out while unset, so older jobs keep their digest
            if fields[key] is None:
                del fields[key]
        h.update(json.dumps(fields, sort_keys=True).encode())
        h.update(b"\n")
    return h.hexdigest()


def job_record(job_spec: dict, items: Sequence[WorkItem]) -> dict:
    return {"job": canonical_spec(job_spec), "num_items": len(items), "requests_sha256": items_digest(items)}


def _differences(old: dict, new: dict, prefix: str = "") -> list[str]:
    out = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key, "<missing>"), new.get(key, "<missing>")
        if isinstance(a, dict) and isinstance(b, dict):
            out += _differences(a, b, f"{prefix}{key}.")
        elif a != b:
            out.append(f"{prefix}{key}: {a!r} -> {b!r}")
    return out


def sample_files(outdir: str) -> list[str]:
    return sorted(n for n in os.listdir(outdir) if _SAMPLE.match(n))


def clear_outputs(outdir: str) -> None:
    """Remove the files a job writes (and nothing else) so a forced new job starts clean."""
    for name in os.listdir(outdir):
        if _SAMPLE.match(name) or _TMP.match(name) or name in (MANIFEST, NPZ, JOB_FILE):
            os.remove(os.path.join(outdir, name))


def remove_stale_tmp(outdir: str) -> None:
    for name in os.listdir(outdir):
        if _TMP.match(name):
            os.remove(os.path.join(outdir, name))


def claim_outdir(outdir: str, record: dict, force: bool) -> None:
    """Create `outdir` for this job, or check that it already belongs to this same job."""
    os.makedirs(outdir, exist_ok=True)
    path = os.path.join(outdir, JOB_FILE)
    old = None
    if os.path.exists(path):
        try:
            with open(path, encoding="utf-8") as f:
                old = json.load(f)
        except (OSError, ValueError):
            old = {"job": "<unreadable job.json>"}
    if old == record:
        return
    if not force:
        if old is not None:
            diff = _differences(old if isinstance(old, dict) else {}, record)
            raise FileExistsError(
                f"{outdir} holds samples of a different job ({'; '.join(diff[:10])}). Use a new output "
                "folder, rerun with the original settings to finish that job, or pass force=True "
                "(--force) to delete its samples and start this job there")
        if sample_files(outdir):
            raise FileExistsError(
                f"{outdir} already holds {len(sample_files(outdir))} sample PNGs but no {JOB_FILE}, so "
                "they cannot be checked against this job. Use a new output folder or pass force=True "
                "(--force) to delete them")
    clear_outputs(outdir)
    atomic_write(path, (json.dumps(record, indent=2, sort_keys=True) + "\n").encode())


def manifest_entry(item: WorkItem, job_spec: dict, digits: int) -> dict:
    """The manifest line of `item`: what was asked for, with the job's defaults filled in."""
    entry = {"index": item.index}
    if job_spec.get("mode") is not None:
        entry["mode"] = job_spec["mode"]
    if item.prompt is not None:
        entry["prompt"] = item.prompt
    if item.label is not None:
        entry["label"] = item.label
    for key in ("image", "mask", "segmentation"):
        if getattr(item, key) is not None:
            entry[key] = getattr(item, key)
    if item.layout is not None:
        entry["layout"] = [{"label": label, "bbox": list(box)} for label, box in item.layout]
    if item.strength is not None or job_spec.get("strength") is not None:
        entry["strength"] = item.strength if item.strength is not None else job_spec["strength"]
    entry.update(
        seed=item.seed, sampler=job_spec.get("sampler"),
        steps=item.steps if item.steps is not None else job_spec.get("steps"),
        scale=item.guidance if item.guidance is not None else job_spec.get("guidance"),
        negative_prompt=(item.negative_prompt if item.negative_prompt is not None
                         else job_spec.get("negative_prompt")),
        file=sample_name(item.index, digits))
    return entry


def manifest_lines(items: Iterable[WorkItem], job_spec: dict, digits: int) -> bytes:
    return b"".join(json.dumps(manifest_entry(it, job_spec, digits)).encode() + b"\n" for it in items)


def append_manifest(outdir: str, data: bytes) -> None:
    """One write per batch; a torn last line is repaired by `rebuild_manifest` on the next start."""
    with open(os.path.join(outdir, MANIFEST), "ab") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def rebuild_manifest(outdir: str, done_items: Sequence[WorkItem], job_spec: dict, digits: int) -> None:
    ordered = sorted(done_items, key=lambda it: it.index)
    atomic_write(os.path.join(outdir, MANIFEST), manifest_lines(ordered, job_spec, digits))


def write_npz(outdir: str, items: Sequence[WorkItem], digits: int) -> str:
    """samples.npz with arr_0 = all samples by index, streamed from the PNGs (memory: one image)."""
    ordered = sorted(items, key=lambda it: it.index)
    first = read_png(os.path.join(outdir, sample_name(ordered[0].index, digits)))
    shape = (len(ordered),) + first.shape
    path = os.path.join(outdir, NPZ)
    tmp = os.path.join(outdir, f".{NPZ}.tmp.{os.getpid()}")
    # A fixed timestamp keeps the archive byte-identical between runs (np.savez stamps the clock).
    info = zipfile.ZipInfo("arr_0.npy", date_time=(1980, 1, 1, 0, 0, 0))
    with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as zf:
        with zf.open(info, "w", force_zip64=True) as f:
            np.lib.format.write_array_header_2_0(
                f, {"descr": np.lib.format.dtype_to_descr(np.dtype(np.uint8)), "fortran_order": False,
                    "shape": shape})
            for item in ordered:
                image = read_png(os.path.join(outdir, sample_name(item.index, digits)))
                if image.shape != first.shape:
                    raise ValueError(f"sample {item.index} has shape {image.shape}, sample "
                                     f"{ordered[0].index} has {first.shape}; cannot stack them into {NPZ}")
                f.write(np.ascontiguousarray(image, np.uint8).tobytes())
    with open(tmp, "rb+") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return path


def load_manifest(outdir: str) -> list[dict[str, Any]]:
    with open(os.path.join(outdir, MANIFEST), encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]
