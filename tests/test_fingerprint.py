"""The render fingerprint: stored with the labels by whoever makes them, checked by every trainer
before its first batch; a machine or a decoder that renders other crops is refused, saying what
differs."""

from __future__ import annotations

import json
import sqlite3

import pytest
from conftest import last_json, open_loader, run_cli, run_precompute, student_argv

from labels.namespace import RecordFormat
from labels.store import open_existing, open_store
from shards import Manifest
from shards.augment import sample_seed
from shards.decode import image_header
from shards.fingerprint import FingerprintMismatch, check, difference, render_fingerprint, validate
from shards.index import SplitIndex
from shards.params import draw_params
from shards.policy import INCREASING_OPS

EPOCHS = ("--epochs", "1", "--repeated-aug", "1", "--batch-size", "64", "--workers", "1")


@pytest.mark.unit
@pytest.mark.parametrize("renderer", ["pil", "torch"])
def test_a_fingerprint_is_reproduced_from_its_own_record(demo_shards, renderer):
    policy = Manifest.load(demo_shards).policy(renderer)
    fp = render_fingerprint(demo_shards, policy, "cpu", made_by="test")
    assert len(fp["pairs"]) == len(fp["crops"]) == 16 and fp["policy_id"] == policy.policy_id
    assert validate(json.loads(json.dumps(fp))) == fp  # survives a store's JSON
    again = render_fingerprint(demo_shards, policy, "cpu", pairs=fp["pairs"])
    assert again["sha256"] == fp["sha256"] and difference(fp, again) is None
    assert check(fp, demo_shards, policy, "cpu", "here")["sha256"] == fp["sha256"]


@pytest.mark.parametrize("renderer", ["pil", "torch"])
def test_a_fingerprint_is_the_same_in_another_process_and_changes_with_a_crop(demo_shards, renderer):
    """The fingerprint another process renders (a verifier is always another process) is this
    one; a render made to differ in one crop (a level of one pixel) gives another, and the
    difference names it. (A constant fingerprint would pass a same-process comparison.)"""
    import subprocess
    import sys

    import shards.fingerprint as fingerprint

    policy = Manifest.load(demo_shards).policy(renderer)
    here = render_fingerprint(demo_shards, policy, "cpu")
    code = (
        "import json, sys; from shards import Manifest; from shards.fingerprint import render_fingerprint; "
        "p = Manifest.load(sys.argv[1]).policy(sys.argv[2]); print(json.dumps(render_fingerprint(sys.argv[1], p)))"
    )
    argv = [sys.executable, "-c", code, str(demo_shards), renderer]
    there = json.loads(subprocess.run(argv, capture_output=True, text=True, check=True).stdout)
    assert there["sha256"] == here["sha256"] and there["crops"] == here["crops"] and difference(there, here) is None
    render = fingerprint._render

    def one_level_off(samples, policy, device):
        crops = render(samples, policy, device)
        crops[5] = crops[5].clone()
        crops[5][0, 0, 0] += 1 / 255
        return crops

    with pytest.MonkeyPatch.context() as m:
        m.setattr(fingerprint, "_render", one_level_off)
        off = render_fingerprint(demo_shards, policy, "cpu", pairs=here["pairs"])
    assert off["sha256"] != here["sha256"] and [a != b for a, b in zip(off["crops"], here["crops"])].count(True) == 1
    assert "1 of 16 fixed crops render differently" in difference(here, off)


@pytest.mark.unit
def test_the_fingerprint_names_the_decoder_library_cuda_and_compute_capability(demo_shards):
    """nvJPEG's pixels depend on the GPU (hardware decoder on A100/H100/H200, software elsewhere),
    the CUDA build and the library: the record carries them, and a mismatch names each."""
    policy = Manifest.load(demo_shards).policy("torch")
    fp = render_fingerprint(demo_shards, policy, "cpu")
    assert fp["decoder_backend"]["library"].startswith("pillow ")
    gpu = {"library": "torchcodec 0.17.0", "cuda": "12.8", "compute_capability": "9.0"}
    there = {**fp, "sha256": "d" * 32, "crops": ["0" * 16, *fp["crops"][1:]], "decoder_backend": gpu}
    mine = {**fp, "decoder_backend": {"library": "torchvision 0.29.1", "cuda": "12.8", "compute_capability": "8.0"}}
    problem = difference(there, mine)
    assert "decoder library torchcodec 0.17.0 there, torchvision 0.29.1 here" in problem
    assert "compute capability 9.0 there, 8.0 here" in problem and "CUDA" not in problem


@pytest.mark.unit
def test_the_torch_renderers_fingerprint_draws_every_op(demo_shards):
    """Its seeds are chosen so that its crops exercise every RandAugment op, a flip and erasing."""
    policy = Manifest.load(demo_shards).policy("torch", hflip=0.5, re_prob=0.25)
    fp = render_fingerprint(demo_shards, policy, "cpu")
    index = SplitIndex.load(demo_shards, "train")
    drawn = set()
    for key, seed in fp["pairs"]:
        width, height = image_header(index.get(key).read())
        p = draw_params(policy, sample_seed(policy.policy_id, key, seed), width, height)
        drawn |= {name for name, _ in p.ops} | ({"flip"} if p.flip else set()) | ({"erase"} if p.erase else set())
    assert drawn == set(INCREASING_OPS) | {"flip", "erase"}


@pytest.mark.unit
def test_other_crops_are_refused_with_what_differs(demo_shards):
    policy = Manifest.load(demo_shards).policy("torch")
    fp = render_fingerprint(demo_shards, policy, "cpu", made_by="precompute")
    tampered = {**fp, "crops": ["0" * 16, *fp["crops"][1:]], "sha256": "f" * 32, "device": "cuda:0 (NVIDIA H200)"}
    with pytest.raises(FingerprintMismatch) as e:
        check(tampered, demo_shards, policy, "cpu", "labels.db")
    message = str(e.value)
    assert "1 of 16 fixed crops render differently" in message and f"image {fp['pairs'][0][0]}" in message
    assert "f" * 32 in message and fp["sha256"] in message and "NVIDIA H200" in message
    # labels made for other images under the same keys' names: refused as another data set
    elsewhere = {**fp, "pairs": [["no/such/key", 0], *fp["pairs"][1:]]}
    with pytest.raises(FingerprintMismatch, match="other shards"):
        check(elsewhere, demo_shards, policy, "cpu", "here")
    # another policy renders other crops: the difference names it
    other = render_fingerprint(demo_shards, Manifest.load(demo_shards).policy("torch", re_prob=0.5), "cpu")
    assert "policy_id" in difference(fp, other)
    for bad in ({"sha256": 1}, {**fp, "pairs": [["k", -1]] * 16}, {**fp, "crops": fp["crops"][:3]}, "x"):
        with pytest.raises(ValueError, match="not a render fingerprint"):
            validate(bad)


def test_the_first_writers_fingerprint_stands_in_both_stores(store_url, demo_shards, tiny_teacher):
    from labels.teacher import Teacher, TeacherSettings

    teacher = Teacher(TeacherSettings(checkpoint=str(tiny_teacher)), device="cpu")
    m = Manifest.load(demo_shards)
    ns = teacher.namespace(m.policy().policy_id, RecordFormat(), m.classes)
    with open_store(store_url, ns) as store:
        assert store.fingerprint() is None
        first = {"sha256": "a" * 32, "crops": [], "pairs": []}
        assert store.claim_fingerprint(first) == first
        assert store.claim_fingerprint({**first, "sha256": "b" * 32}) == first  # the first one stands
        assert store.fingerprint() == first
        if store_url.startswith("redis"):
            store.drop()
            assert store.fingerprint() is None


@pytest.fixture(scope="module")
def torch_labels(demo_shards, tiny_teacher, tmp_path_factory):
    store = tmp_path_factory.mktemp("fp") / "labels.db"
    r = run_precompute(demo_shards, None, store, tiny_teacher, *EPOCHS, "--renderer", "torch", measured_s=12)
    return store, last_json(r.stdout)


def test_precompute_stores_the_fingerprint_and_trainers_check_it(demo_shards, tiny_teacher, torch_labels, tmp_path):
    made, summary = torch_labels
    store = tmp_path / "labels.db"  # a copy to tamper with
    store.write_bytes(made.read_bytes())
    with open_existing(str(store)) as st:
        stored = st.fingerprint()
    assert stored["sha256"] == summary["fingerprint"] and stored["made_by"] == "precompute"
    assert stored["decoder"] == "libjpeg" and stored["renderer"] == "torch"
    stats = last_json(run_cli("teacher_service", "labels", "stats", store, "--no-progress").stdout)
    assert stats["namespaces"][0]["fingerprint"]["sha256"] == stored["sha256"]
    # a trainer rendering on the "device" (the CUDA layout, here the CPU) or in its workers: accepted
    for on_device in (False, True):
        loader = open_loader(
            demo_shards, store, epochs=1, repeated_aug=1, workers=0, renderer="torch", render_on_device=on_device
        )
        assert loader.namespace == summary["namespace"]
    # a store whose fingerprint is not what this machine renders: the trainer refuses before a batch
    db = sqlite3.connect(store)
    (meta,) = db.execute("SELECT meta FROM namespaces").fetchone()
    meta = json.loads(meta)
    record = json.loads(meta["fingerprint"])
    record["crops"][3] = "0" * 16
    record["sha256"] = "e" * 32
    meta["fingerprint"] = json.dumps(record, sort_keys=True)
    with db:
        db.execute("UPDATE namespaces SET meta = ?", (json.dumps(meta),))
    db.close()
    with pytest.raises(FingerprintMismatch, match="1 of 16 fixed crops render differently"):
        open_loader(demo_shards, store, epochs=1, repeated_aug=1, workers=0, renderer="torch")
    argv = student_argv(demo_shards, tmp_path / "run", labels="store", store=str(store), renderer="torch", epochs=1)
    r = run_cli("student_trainer", "train", *argv, check=False)
    assert r.returncode == 2 and "render differently" in r.stderr, r.stderr[-2000:]
    # and precompute will not add labels of this machine's crops to them
    r = run_precompute(demo_shards, None, store, tiny_teacher, *EPOCHS, "--renderer", "torch", check=False)
    assert r.returncode == 2 and "renders differently" in r.stderr and "must not mix" in r.stderr


def test_a_decoder_the_labels_were_not_made_with_is_refused_by_name(demo_shards, torch_labels):
    store, _ = torch_labels
    with pytest.raises(ValueError, match="decoder: 'libjpeg' there, 'nvjpeg' here"):
        open_loader(demo_shards, store, epochs=1, repeated_aug=1, workers=0, renderer="torch",
                    decoder="nvjpeg", render_on_device=True)  # fmt: skip
