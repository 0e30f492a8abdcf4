"""The member index (shards/index.py): what `shards build` writes so that no reader walks tar headers."""

from __future__ import annotations

import json
import pickle

import numpy as np
import pytest
from conftest import copy_shards, flip_bit, last_json, run_cli

from shards import AugmentPolicy, Manifest, ShardStream, SkipCounter, StreamOptions, iter_shard
from shards.index import IndexMismatch, ShardIndex, SplitIndex
from shards.members import Member

POLICY = AugmentPolicy(input_size=32, scale=(0.5, 1.0), hflip=0.0, auto_augment=None, re_prob=0.0)


@pytest.mark.unit
def test_the_index_says_where_every_sample_is(demo_shards):
    m = Manifest.load(demo_shards)
    for split in ("train", "val"):
        index = SplitIndex.open(demo_shards, split, m)
        raws = [r for s in m.shards(split) for r in iter_shard(demo_shards / s.name, SkipCounter())]
        assert len(index) == len(raws) == m.num_samples(split)
        assert list(index.iter_keys()) == [r.key for r in raws]  # stored order
        for row, raw in enumerate(raws):
            assert index.find(raw.key) == row and index.label[row] == raw.label
            assert index.member(row).read() == raw.data
            assert index.shards[index.shard_of(row)] == raw.shard
    assert index.find("digits/3/no-such") is None and index.get("") is None
    both = ShardIndex.load(demo_shards, ["train", "val", "test"])  # a split the set lacks is left out
    assert len(both) == 1797 and both.get(raws[7].key) == index.member(7)


@pytest.mark.unit
def test_an_index_goes_to_worker_processes_by_path(demo_shards):
    index = SplitIndex.open(demo_shards, "train", Manifest.load(demo_shards))
    state = pickle.dumps(index)
    assert len(state) < 1000  # the path, not the table: the worker maps the same file
    again = pickle.loads(state)
    assert list(again.iter_keys()) == list(index.iter_keys()) and again.member(100) == index.member(100)


def test_shards_without_an_index_are_refused_and_shards_index_writes_it(demo_shards, tmp_path):
    """Every reader needs the index; shards built before it are refused with one message that
    says how to write it, by every reader (the stream, precompute's and the service's load)."""
    from shards import ShardStream

    legacy = copy_shards(demo_shards, tmp_path / "legacy", index=False)
    assert not Manifest.load(legacy).indexes
    for read in (lambda: SplitIndex.load(legacy, "train"), lambda: ShardStream(legacy, "train", POLICY, 16)):
        with pytest.raises(IndexMismatch, match=f"has no member index .*`python -m shards index {legacy}`"):
            read()
    s = last_json(run_cli("shards", "index", legacy).stdout)
    assert s["indexes"]["train"]["samples"] == 1437 and s["verified"]
    # the same bytes `shards build` wrote, and the manifest lists them as the build's did
    assert (legacy / "train.index").read_bytes() == (demo_shards / "train.index").read_bytes()
    assert Manifest.load(legacy).indexes == Manifest.load(demo_shards).indexes


def test_a_damaged_or_stale_index_is_refused(demo_shards, tmp_path):
    damaged = copy_shards(demo_shards, tmp_path / "damaged")
    flip_bit(damaged / "train.index", 3000)
    with pytest.raises(IndexMismatch, match=r"train.index: sha256 .* \(modified\)"):
        SplitIndex.open(damaged, "train", Manifest.load(damaged))
    with pytest.raises(IndexMismatch, match="modified"):
        ShardStream(damaged, "train", POLICY, batch_size=64)
    r = run_cli("shards", "inspect", damaged, check=False)
    assert r.returncode == 1 and "train.index" in r.stderr

    cut = copy_shards(demo_shards, tmp_path / "cut")
    (cut / "val.index").write_bytes((cut / "val.index").read_bytes()[:-10])
    with pytest.raises(IndexMismatch, match="val.index: .* bytes, the manifest says"):
        ShardIndex.load(cut, ["train", "val"])

    (cut / "val.index").unlink()
    with pytest.raises(IndexMismatch, match="val.index, which the manifest lists, is missing: run"):
        ShardIndex.load(cut, ["train", "val"])

    # an index made for other shards (a manifest rewritten around it) is not used either
    stale = copy_shards(demo_shards, tmp_path / "stale")
    manifest = json.loads((stale / "manifest.json").read_text())
    manifest["splits"]["train"][0]["sha256"] = "0" * 64
    (stale / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(IndexMismatch, match="other shards"):
        SplitIndex.open(stale, "train", Manifest.load(stale))


@pytest.mark.unit
def test_keys_must_be_unique():
    from shards.manifest import ShardInfo

    shard = ShardInfo("train-000000.tar", 2, 0, "")
    with pytest.raises(IndexMismatch, match="'a/b' names two samples"):
        SplitIndex.encode("train", [shard], [("a/b", 512, 10, 0, b"d" * 16), ("a/b", 2048, 10, 1, b"e" * 16)])


@pytest.mark.unit
def test_keys_whose_hashes_collide_are_told_apart_by_the_key(monkeypatch, tmp_path):
    """Lookups search a table of 64-bit key hashes; keys that share a hash (here every key has one
    of two) are found by comparing the keys themselves, one at a time and many at once."""
    from shards import index as index_module
    from shards.manifest import ShardInfo

    monkeypatch.setattr(index_module, "key_hash", lambda keys: np.array([len(k) % 2 for k in keys], np.uint64))
    keys = [f"c/{i}" for i in range(7)] + ["c/10", "c/11", "c/12"]
    rows = [(k, 512 * (i + 1), 10, i % 3, bytes([i]) * 16) for i, k in enumerate(keys)]
    shard = ShardInfo("train-000000.tar", len(rows), 0, "")
    index = SplitIndex.from_bytes(tmp_path, SplitIndex.encode("train", [shard], rows))
    asked = [*reversed(keys), "c/7", "c/77", "", "c/1"]
    assert index.find_many(asked) == [*reversed(range(10)), None, None, None, 1]
    assert [index.find(k) for k in asked] == index.find_many(asked)
    assert ShardIndex({"train": index}).get_many(["c/11", "zz"]) == [index.member(8), None]


@pytest.mark.unit
def test_every_read_checks_the_image_against_its_digest(demo_shards, tmp_path):
    """The index keeps a digest of every image's bytes: a read of bytes that are not those (a shard
    rewritten in place, the same size) raises ShardChanged naming the shard and the image; an index
    of version 1 (no digests) is refused with the command that writes it again."""
    from shards.members import ShardChanged, member_digest

    index = SplitIndex.load(demo_shards, "train")
    member = index.member(5)
    assert member.digest == member_digest(member.read()) and member.key == index.key(5)
    moved = Member(member.path, member.offset + 1, member.size, member.digest, member.key)
    with pytest.raises(ShardChanged, match=f"shard {member.path} changed after it was indexed.*{member.key}"):
        moved.read()
    raw = bytearray((demo_shards / "train.index").read_bytes())
    raw[raw.index(b'"version": 2') + len(b'"version": ')] = ord("1")
    with pytest.raises(IndexMismatch, match="index version 1, this code reads 2.*python -m shards index"):
        SplitIndex.from_bytes(demo_shards, bytes(raw), str(demo_shards / "train.index"))


@pytest.mark.unit
def test_labels_name_the_shard_bytes_they_were_made_from(demo_shards):
    from labels.provenance import changed_since_labelled, check_labelled_bytes

    m = Manifest.load(demo_shards)
    digests = m.shard_digests("train")
    assert len(digests) == len(m.shards("train")) and all(len(d) == 16 for d in digests.values())
    first = next(iter(digests))
    records = [{"seeds": 2, "shards": digests}, {"seeds": 2}]  # a record before digests names nothing
    assert changed_since_labelled(records, m, "train") == {}
    records[0]["shards"] = {**digests, first: "0" * 16, "gone.tar": "1" * 16}
    assert changed_since_labelled(records, m, "train") == {first: (digests[first], "0" * 16)}
    with pytest.raises(ValueError, match=f"1 shard\\(s\\) changed since their labels were made: {first}"):
        check_labelled_bytes(records, m, "train", "here")


@pytest.mark.unit
@pytest.mark.parametrize("repeat_mode", ["deit", "all"])
def test_a_worker_reads_only_its_own_images_each_once(demo_shards, monkeypatch, repeat_mode):
    """Through the index a worker reads only its own positions' images, one seek each: every image
    a rank's batches hold was read once, and no other image was."""
    reads = []
    read = Member.read
    monkeypatch.setattr(Member, "read", lambda self, files=None: reads.append(self) or read(self, files))
    for rank in (0, 1):
        reads.clear()
        stream = ShardStream(
            demo_shards,
            "train",
            POLICY,
            options=StreamOptions(rank=rank, world_size=2, repeats=3, repeat_mode=repeat_mode, shuffle_buffer=64),
            batch_size=50,
        )
        stream.set_epoch(2)
        keys = {k for b in stream for k in b["key"]}
        assert len(reads) == len(keys) == len({(r.path, r.offset) for r in reads})
