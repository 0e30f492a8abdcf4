"""`manifest.json`: what a shard directory holds (shards, counts, checksums, classes, splits)."""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

from .flags import policy_overrides
from .policy import SMALL_INPUT, AugmentPolicy

MANIFEST_NAME = "manifest.json"
MANIFEST_VERSION = 1


@dataclass
class ShardInfo:
    name: str
    samples: int
    bytes: int
    sha256: str


@dataclass
class Manifest:
    classes: list[str]
    splits: dict[str, list[ShardInfo]] = field(default_factory=dict)
    source: str = ""
    policy_hint: dict = field(default_factory=dict)  # suggested augmentation policy fields
    indexes: dict[str, ShardInfo] = field(default_factory=dict)  # split -> its member index file (index.py)
    # where the val split came from: {"from": "folder", "source": DIR} (the official val set),
    # {"from": "holdout", "fraction": F} (hashed out of train), {"from": "fixed", ...} (the demo),
    # {"from": "none"}; {} in manifests made before it was recorded
    val_from: dict = field(default_factory=dict)
    version: int = MANIFEST_VERSION

    def shards(self, split: str) -> list[ShardInfo]:
        if split not in self.splits:
            raise KeyError(f"split {split!r} not in manifest (has {sorted(self.splits)})")
        return self.splits[split]

    def num_samples(self, split: str) -> int:
        return sum(s.samples for s in self.shards(split))

    def policy(self, renderer: str | None = None, decoder: str | None = None, /, **overrides):
        """The augmentation policy: DeiT defaults, then the manifest's hints, then overrides, then
        `renderer` and `decoder` (a command's --renderer and --decoder flags) if given. An override
        of None is a value, not "unset": `{"auto_augment": null}` turns RandAugment off. A hinted
        padded crop is DeiT's for inputs of 32 px or less: an override to a larger input (a
        fine-tune at a higher resolution) takes RandomResizedCrop instead, as DeiT's code does."""
        given = policy_overrides(overrides, renderer, decoder)
        fields = {**self.policy_hint, **given}
        if "crop" not in given and fields.get("crop") == "padded" and fields.get("input_size", 224) > SMALL_INPUT:
            fields["crop"] = "resized"
        return AugmentPolicy.from_dict(fields)

    def shard_digests(self, split: str, names: set[str] | None = None) -> dict[str, str]:
        """{shard name: the first 16 hex digits of its sha256} of a split's shards (those in `names`):
        what labels made from these shards record about the bytes they were made from."""
        return {s.name: s.sha256[:16] for s in self.shards(split) if names is None or s.name in names}

    def changed_shards(self, split: str, recorded: dict[str, str]) -> list[str]:
        """The split's shards whose bytes are not those `recorded` (`shard_digests` of an earlier
        manifest) names: the same name, another digest. Shards not recorded are not compared."""
        mine = self.shard_digests(split)
        return sorted(name for name, digest in recorded.items() if name in mine and mine[name] != digest)

    def to_dict(self) -> dict:
        return {
            "version": self.version,
            "source": self.source,
            "classes": self.classes,
            "policy_hint": self.policy_hint,
            "splits": {k: [asdict(s) for s in v] for k, v in self.splits.items()},
            "indexes": {k: asdict(v) for k, v in self.indexes.items()},
            "val_from": self.val_from,
        }

    def save(self, directory: str | os.PathLike) -> Path:
        path = Path(directory) / MANIFEST_NAME
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(self.to_dict(), indent=1))
        os.replace(tmp, path)
        return path

    @classmethod
    def load(cls, directory: str | os.PathLike) -> Manifest:
        path = Path(directory) / MANIFEST_NAME
        if not path.exists():
            raise FileNotFoundError(f"no {MANIFEST_NAME} in {directory}: build shards first (python -m shards build)")
        d = json.loads(path.read_text())
        if d.get("version") != MANIFEST_VERSION:
            raise ValueError(f"{path}: manifest version {d.get('version')} unsupported (want {MANIFEST_VERSION})")
        return cls(
            classes=list(d["classes"]),
            splits={k: [ShardInfo(**s) for s in v] for k, v in d["splits"].items()},
            source=d.get("source", ""),
            policy_hint=d.get("policy_hint", {}),
            indexes={k: ShardInfo(**v) for k, v in d.get("indexes", {}).items()},
            val_from=d.get("val_from", {}),
        )


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def cut_short(shard: ShardInfo, readable: int) -> str | None:
    """What is wrong when a shard yields `readable` images where its manifest entry lists more, or
    None. tarfile ends its iteration quietly at a damaged header: `shards index` compares what its
    walk of the tar headers read with the manifest here."""
    if readable == shard.samples:
        return None
    return f"{shard.name}: {readable} images readable, the manifest says {shard.samples}"


def wrong_size(directory: str | os.PathLike, shard: ShardInfo) -> str | None:
    """What is wrong with a file's presence or size against its manifest entry, or None: the
    check that costs a stat, before any byte is read."""
    p = Path(directory) / shard.name
    if not p.exists():
        return f"{shard.name} missing"
    size = p.stat().st_size
    if size != shard.bytes:
        return f"{shard.name} has {size} bytes, manifest says {shard.bytes} (truncated?)"
    return None


def verify_shard(directory: str | os.PathLike, shard: ShardInfo) -> str | None:
    """What is wrong with one shard against its manifest entry (missing, resized, modified), or None."""
    if problem := wrong_size(directory, shard):
        return problem
    p = Path(directory) / shard.name
    digest = sha256_file(p)
    if digest != shard.sha256:
        return f"{shard.name} sha256 {digest[:12]}.. != manifest {shard.sha256[:12]}.. (modified)"
    return None


def verify(directory: str | os.PathLike, manifest: Manifest | None = None) -> list[str]:
    """Problems found (missing, resized or modified shards and member indexes); empty when
    everything matches."""
    manifest = manifest or Manifest.load(directory)
    problems = []
    for split, shards in manifest.splits.items():
        for s in [*shards, *([manifest.indexes[split]] if split in manifest.indexes else [])]:
            problem = verify_shard(directory, s)
            if problem:
                problems.append(f"{split}: {problem}")
    return problems
