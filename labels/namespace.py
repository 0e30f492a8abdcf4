"""Label namespaces: a label is only ever served for the teacher, policy and format it was made for.

namespace id = digest(teacher id, augmentation policy id, record format). The metadata stored with
a namespace also records the class list; opening a namespace whose stored metadata disagrees
with the caller's is an error, never a silent reuse.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass

MAX_TOPK = 10
# The longest image key, everywhere a key comes in (the service's requests, the store, label files)
MAX_KEY_LENGTH = 512
# Seeds index fixed-width slots in a row per image; 2**20 seeds is > 3000 epochs x 300 repeats.
MAX_SEED = 2**20 - 1


class NamespaceMismatch(RuntimeError):
    """The store holds this namespace id with different metadata."""


@dataclass(frozen=True)
class RecordFormat:
    """top-k classes (uint16 each) and, when `probs`, their fp16 probabilities, per (key, seed)."""

    topk: int = 1
    probs: bool = False

    def __post_init__(self):
        if not 1 <= self.topk <= MAX_TOPK:
            raise ValueError(f"topk must be in 1..{MAX_TOPK}, got {self.topk}")

    @property
    def name(self) -> str:
        return f"top{self.topk}" + ("p" if self.probs else "")

    @property
    def slot_bytes(self) -> int:
        return 2 * self.topk + (2 * self.topk if self.probs else 0)

    @classmethod
    def parse(cls, name: str) -> RecordFormat:
        """'top1' (hard labels, the default), 'top5p' (top-5 classes with probabilities), ..."""
        if not name.startswith("top"):
            raise ValueError(f"record format must look like top1 or top5p, got {name!r}")
        probs = name.endswith("p")
        return cls(topk=int(name[3:-1] if probs else name[3:]), probs=probs)


@dataclass(frozen=True)
class Namespace:
    teacher_id: str
    policy_id: str
    format: RecordFormat
    num_classes: int
    classes_digest: str = ""

    def __post_init__(self):
        if not 1 <= self.num_classes < 2**16 - 1:
            raise ValueError(f"num_classes must be in 1..65534, got {self.num_classes}")

    @property
    def id(self) -> str:
        blob = json.dumps([self.teacher_id, self.policy_id, self.format.name]).encode()
        return hashlib.sha256(blob).hexdigest()[:16]

    def meta(self) -> dict:
        return {
            "id": self.id,
            "teacher_id": self.teacher_id,
            "policy_id": self.policy_id,
            "format": self.format.name,
            "num_classes": self.num_classes,
            "classes_digest": self.classes_digest,
        }

    @classmethod
    def from_meta(cls, meta: dict) -> Namespace:
        ns = cls(
            teacher_id=meta["teacher_id"],
            policy_id=meta["policy_id"],
            format=RecordFormat.parse(meta["format"]),
            num_classes=int(meta["num_classes"]),
            classes_digest=meta.get("classes_digest", ""),
        )
        if meta.get("id") not in (None, ns.id):
            raise NamespaceMismatch(f"metadata id {meta.get('id')} does not match its fields ({ns.id})")
        return ns

    def check_against(self, stored: dict) -> None:
        mine = self.meta()
        diff = {k: (stored.get(k), v) for k, v in mine.items() if stored.get(k) != v}
        if diff:
            detail = ", ".join(f"{k}: stored {a!r} != requested {b!r}" for k, (a, b) in diff.items())
            raise NamespaceMismatch(
                f"namespace {self.id} exists with different metadata ({detail}); "
                "refusing to mix labels. Use another store or namespace."
            )


def classes_digest(classes: list[str]) -> str:
    return hashlib.sha256(json.dumps(list(classes)).encode()).hexdigest()[:16]


__all__ = ["Namespace", "NamespaceMismatch", "RecordFormat", "classes_digest", "asdict"]
