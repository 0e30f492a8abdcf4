"""Labels belong to the bytes they were made from.

A precompute record (`LabelStore.record_coverage`) names the shards it labelled with their digests
(`Manifest.shard_digests`). A trainer, the service and a later precompute compare those with the
manifest of the shards they read, at a cost of one comparison per shard, and refuse shards whose
bytes changed since: a rebuilt shard under the same keys would otherwise be trained on with the
labels of other pixels, or left unlabelled because its keys look done. Within a shard, the member
index checks each image's bytes as it is read (`shards.members.Member.read`).
"""

from __future__ import annotations

from shards import Manifest


def changed_since_labelled(records: list[dict], manifest: Manifest, split: str) -> dict[str, tuple[str, str]]:
    """{shard: (its digest here, the digest its labels were made from)} for every shard of `split`
    whose bytes differ from what a record names."""
    mine = manifest.shard_digests(split)
    changed = {}
    for record in records:
        for name, digest in (record.get("shards") or {}).items():
            if name in mine and mine[name] != digest:
                changed[name] = (mine[name], digest)
    return changed


def check_labelled_bytes(records: list[dict], manifest: Manifest, split: str, where: str) -> None:
    """ValueError naming the shards whose bytes are not those their labels were made from."""
    changed = changed_since_labelled(records, manifest, split)
    if not changed:
        return
    named = "; ".join(f"{name} (sha256 {here}.. here, {there}.. when labelled)" for name, (here, there) in
                      sorted(changed.items())[:5])  # fmt: skip
    more = f" and {len(changed) - 5} more" if len(changed) > 5 else ""
    raise ValueError(
        f"{where}: {len(changed)} shard(s) changed since their labels were made: {named}{more}. The stored "
        "labels belong to other pixels under the same keys: restore those shards, or label the new ones "
        "into another store"
    )
