"""The render fingerprint: a hash of a few fixed training crops of the data set, rendered with a
run's policy, decoder and device.

A policy id names what the code means to render; it cannot name what a machine actually renders
(another decoder build, another CPU's vector unit, a library that changed under the same
version). Whoever makes labels (precompute, the service's engines) stores a fingerprint with them;
a trainer renders the same crops before its first batch and refuses labels whose fingerprint
differs from its own, saying which crops differ and what differs between the two machines.

The crops: the first images of the split (in shard order) under a few seeds each; for the torch
renderer the seeds are chosen so that together they draw every RandAugment op, a flip and an
erasing. The record names its (key, seed) pairs, so a verifier renders exactly those.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import platform
from pathlib import Path

import torch

from .augment import AugmentPolicy, augment, cut_crop, draw_for_device_decode, sample_seed
from .decode import decode_image, image_header
from .device_decode import is_jpeg
from .index import SplitIndex
from .manifest import Manifest
from .params import draw_params
from .policy import INCREASING_OPS
from .render import render_items

IMAGES = 8  # images of the split in a fingerprint
SEEDS = 2  # crops of each
CANDIDATE_SEEDS = 64  # seeds tried per image for the torch renderer's op coverage


class FingerprintMismatch(ValueError):
    """This machine renders the labels' crops differently from the machine that made them."""


def _images(directory: Path, manifest: Manifest, split: str, keys: list[str] | None) -> list[tuple[str, bytes]]:
    """(key, encoded bytes) of the first IMAGES images of the split, or of `keys`, in their order."""
    from .members import OpenFiles

    files = OpenFiles()
    try:
        index = SplitIndex.load(directory, split, manifest)
        if keys is None:
            rows = range(min(IMAGES, len(index)))
            return [(index.key(r), index.member(r).read(files)) for r in rows]
        found = {k: index.member(row, k) for k, row in zip(keys, index.find_many(keys)) if row is not None}
        missing = [k for k in keys if found.get(k) is None]
        if missing:
            raise FingerprintMismatch(
                f"the labels' fingerprint crops are of images this data set does not have ({', '.join(missing[:3])}); "
                "these labels were made for other shards"
            )
        return [(k, found[k].read(files)) for k in keys]
    finally:
        files.close()


def _seeds(data: bytes, key: str, policy: AugmentPolicy, wanted: set[str]) -> list[int]:
    """SEEDS seeds of an image: for the torch renderer the ones that draw the most of `wanted`
    (op names, "flip", "erase"; what they draw is taken out of it), else 0 .. SEEDS - 1."""
    if policy.renderer != "torch":
        return list(range(SEEDS))
    width, height = image_header(data)

    def draws(seed: int) -> set[str]:
        p = draw_params(policy, sample_seed(policy.policy_id, key, seed), width, height)
        return {name for name, _ in p.ops} | ({"flip"} if p.flip else set()) | ({"erase"} if p.erase else set())

    chosen = []
    for _ in range(SEEDS):
        best = max((s for s in range(CANDIDATE_SEEDS) if s not in chosen), key=lambda s: len(draws(s) & wanted))
        chosen.append(best)
        wanted -= draws(best)
    return chosen


def _render(samples: list[tuple[str, bytes, int]], policy: AugmentPolicy, device: torch.device) -> list[torch.Tensor]:
    """The float crops the teacher sees: in the loader's workers (the CPU) unless `device` renders."""
    if policy.renderer != "torch" or device.type == "cpu" and policy.decoder != "nvjpeg":
        return [augment(decode_image(data), key, seed, policy) for key, data, seed in samples]
    items = []
    for key, data, seed in samples:
        if policy.decoder == "nvjpeg" and is_jpeg(data):
            items.append(draw_for_device_decode(data, key, seed, policy))
        else:
            items.append(cut_crop(decode_image(data), key, seed, policy))
    return list(render_items(items, policy, device).cpu())


def _version(pkg: str) -> str:
    try:
        return importlib.metadata.version(pkg)
    except importlib.metadata.PackageNotFoundError:  # pragma: no cover
        return "absent"


def decoder_backend(policy: AugmentPolicy, device: torch.device) -> dict:
    """What decodes the images, beyond the policy's decoder name: the library (and its version),
    and on a GPU the CUDA version and the compute capability. nvJPEG's output depends on both:
    A100, H100 and H200 decode baseline JPEGs in hardware, other GPUs in a CUDA software
    decoder, progressive JPEGs take another path again. So nvJPEG labels belong to one GPU family
    (and one library and CUDA build); libjpeg labels (Pillow) to every machine."""
    if policy.renderer == "torch" and policy.decoder == "nvjpeg":
        from .device_decode import device_decoder_library

        library = device_decoder_library()
    else:
        library = "pillow"
    out = {"library": f"{library} {_version(library)}"}
    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        out.update(cuda=torch.version.cuda, compute_capability=f"{major}.{minor}")
    return out


def machine(device: torch.device) -> str:
    """Where crops were rendered, in words: the GPU's name, or the CPU's architecture and the
    vector instructions torch uses on it."""
    if device.type == "cuda":
        return f"{device} ({torch.cuda.get_device_name(device)})"
    return f"cpu ({platform.machine()} {torch.backends.cpu.get_cpu_capability()})"


def render_fingerprint(
    directory: str | Path,
    policy: AugmentPolicy,
    device: str | torch.device = "cpu",
    *,
    split: str = "train",
    pairs: list[list] | None = None,
    made_by: str = "",
) -> dict:
    """The fingerprint of `policy` rendered on `device` ("cpu": in the loader's workers): of the
    (key, seed) `pairs` of a stored fingerprint, or of the split's first images."""
    directory = Path(directory)
    device = torch.device(device)
    manifest = Manifest.load(directory)
    if pairs is None:
        images = _images(directory, manifest, split, None)
        wanted = set(INCREASING_OPS) | {"flip", "erase"}
        samples = [(k, data, s) for k, data in images for s in _seeds(data, k, policy, wanted)]
    else:
        images = dict(_images(directory, manifest, split, list(dict.fromkeys(k for k, _ in pairs))))
        samples = [(k, images[k], int(s)) for k, s in pairs]
    crops = _render(samples, policy, device)
    digests = [hashlib.sha256(c.contiguous().numpy().tobytes()).hexdigest()[:16] for c in crops]
    return {
        "sha256": hashlib.sha256("".join(digests).encode()).hexdigest()[:32],
        "split": split,
        "pairs": [[k, s] for k, _, s in samples],
        "crops": digests,
        "policy_id": policy.policy_id,
        "policy": policy.to_dict(),
        "renderer": policy.renderer,
        "decoder": policy.decoder if policy.renderer == "torch" else "libjpeg",
        "decoder_backend": decoder_backend(policy, device),
        "device": machine(device),
        "versions": {p: _version(p) for p in ("torch", "torchvision", "pillow", "timm")},
        "made_by": made_by,
    }


def validate(record) -> dict:
    """A fingerprint record read from outside (a label file), checked for the fields a verifier
    reads; ValueError when it is not one."""
    ok = (
        isinstance(record, dict)
        and isinstance(record.get("sha256"), str)
        and isinstance(record.get("crops"), list)
        and isinstance(record.get("pairs"), list)
        and len(record["pairs"]) == len(record["crops"])
        and all(
            isinstance(p, list) and len(p) == 2 and isinstance(p[0], str) and type(p[1]) is int and p[1] >= 0
            for p in record["pairs"]
        )
    )
    if not ok:
        raise ValueError("not a render fingerprint record (sha256, crops and their [key, seed] pairs)")
    return record


def adopt(store, record: dict | None, where: str) -> None:
    """Give a store's namespace the render fingerprint of labels copied into it; FingerprintMismatch
    when it holds labels of other crops already."""
    if not record:
        return
    stored = store.claim_fingerprint(validate(record))
    problem = difference(stored, record)
    if problem:
        raise FingerprintMismatch(f"{where}: the labels there were made from other crops than these: {problem}")


def difference(stored: dict, mine: dict) -> str | None:
    """None when the two fingerprints match; else what differs, for a person to read."""
    if stored.get("sha256") == mine.get("sha256"):
        return None
    theirs, ours = stored.get("crops", []), mine.get("crops", [])
    differ = [pair for pair, a, b in zip(stored.get("pairs", []), theirs, ours) if a != b]
    what = [
        f"{name}: {stored.get(name)!r} there, {mine.get(name)!r} here"
        for name in ("policy_id", "decoder", "device")
        if stored.get(name) != mine.get(name)
    ]
    sv, mv = stored.get("versions", {}), mine.get("versions", {})
    what += [f"{p} {sv.get(p)} there, {mv.get(p)} here" for p in sorted(set(sv) | set(mv)) if sv.get(p) != mv.get(p)]
    sb, mb = stored.get("decoder_backend") or {}, mine.get("decoder_backend") or {}
    names = {"library": "decoder library", "cuda": "CUDA", "compute_capability": "compute capability"}
    what += [f"{names.get(k, k)} {sb.get(k)} there, {mb.get(k)} here" for k in names if sb.get(k) != mb.get(k)]
    example = f" (e.g. image {differ[0][0]} seed {differ[0][1]})" if differ else ""
    return (
        f"{len(differ)} of {len(theirs)} fixed crops render differently{example}: fingerprint {stored.get('sha256')} "
        f"(made by {stored.get('made_by') or '?'} on {stored.get('device')}) vs {mine.get('sha256')} here on "
        f"{mine.get('device')}; " + ("; ".join(what) if what else "same policy, decoder, device and versions")
    )


def check(stored: dict | None, directory: str | Path, policy: AugmentPolicy, device, where: str) -> dict | None:
    """Render the stored fingerprint's crops here; FingerprintMismatch when they differ. None (and
    nothing checked) when the labels carry no fingerprint."""
    if not stored:
        return None
    mine = render_fingerprint(directory, policy, device, split=stored.get("split", "train"), pairs=stored["pairs"])
    problem = difference(stored, mine)
    if problem:
        raise FingerprintMismatch(
            f"{where}: the labels were made from crops this run would not see: {problem}. Train where the "
            "crops render the same (the device, decoder and libraries the labels name), or make labels here"
        )
    return mine
