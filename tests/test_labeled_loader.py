"""The public data API (`student_trainer.labeled_loader`), its examples, and labels as files."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import PY, ROOT, last_json, learned, open_loader, run_cli, run_precompute, run_step

from labels.store import open_existing
from student_trainer import DistillationLoss, MissingLabels, teacher_targets

EPOCHS = ("--epochs", "1", "--repeated-aug", "3", "--batch-size", "64", "--workers", "1")


@pytest.fixture(scope="module")
def cached(demo_shards, tiny_teacher, tmp_path_factory):
    """A file store holding every label a 1-epoch run with 3 repeats asks for."""
    store = tmp_path_factory.mktemp("cached") / "labels.db"
    run_precompute(demo_shards, None, store, tiny_teacher, *EPOCHS, measured_s=12)
    return store


def test_batches_carry_the_teacher_labels_of_their_crops(demo_shards, cached):
    loader = open_loader(demo_shards, cached, epochs=1, batch_size=100, workers=0, world_size=2, rank=1)
    loader.set_epoch(0)
    batches = list(loader)
    assert len(batches) == len(loader)  # the same number on every rank
    with open_existing(str(cached)) as store:
        for b in batches[:3]:
            assert b["image"].shape[1:] == (3, 32, 32) and b["present"].all()
            want = store.get(b["key"], b["seed"].tolist()).top1
            assert (b["teacher_label"].numpy() == want).all() and (
                b["teacher_classes"][:, 0] == b["teacher_label"]
            ).all()
    assert "teacher_probs" not in batches[0]  # a top1 namespace
    seen = [(k, s) for b in batches for k, s in zip(b["key"], b["seed"].tolist())]
    assert len(seen) == len(set(seen))  # each (image, seed) once
    assert loader.namespace and loader.schedule.repeats == 3


def test_the_loader_refuses_labels_of_another_run_and_missing_ones(demo_shards, cached):
    with pytest.raises(ValueError, match="precompute with --epochs 4 --repeated-aug 3"):
        open_loader(demo_shards, cached, epochs=4, workers=0)
    with pytest.raises(ValueError, match="augmentation policy"):
        open_loader(demo_shards, cached, epochs=1, workers=0, policy={"input_size": 48})
    loader = open_loader(demo_shards, cached, epochs=4, workers=0, on_missing="skip")
    loader.set_epoch(3)  # past what precompute labeled: present False, counted
    batch = next(iter(loader))
    assert not batch["present"].all() and batch["label_stats"]["labels_missing"] == batch["teacher_missing"] > 0
    targets = teacher_targets(batch, 10)
    assert torch.equal(targets.weight, batch["present"].float())  # no distillation loss where missing
    strict = open_loader(demo_shards, cached, epochs=1, workers=0)
    strict.stream.set_epoch(3)
    with pytest.raises(MissingLabels, match="precompute them"):
        next(iter(strict))


@pytest.mark.unit
def test_teacher_targets_mix_like_the_images():
    batch = {
        "teacher_classes": torch.tensor([[1], [2], [3], [0]]),
        "present": torch.tensor([True, True, True, False]),
        "teacher_missing": 1,
    }
    t = teacher_targets(batch, 4, lam=0.7)
    assert torch.allclose(t.dist[0], torch.tensor([0.3, 0.7, 0.0, 0.0]))  # 0.7 x class 1 + 0.3 x row 3 (class 0)
    assert torch.equal(t.weight, torch.tensor([0.0, 1.0, 1.0, 0.0]))  # row 0 mixes in the missing row 3
    loss = DistillationLoss(torch.nn.CrossEntropyLoss(), "hard")
    logits = torch.randn(4, 4)
    assert torch.isfinite(loss((logits, logits), torch.tensor([1, 2, 3, 0]), t))


@pytest.mark.learning
@pytest.mark.parametrize("example", ["plain_loop.py", "timm_task.py"])
def test_the_examples_train_from_cached_labels(demo_shards, cached, example):
    argv = [PY, ROOT / "examples" / example, "--shards", demo_shards, "--labels", cached, "--epochs", "1"]
    r = run_step([*argv, "--steps", "12", "--workers", "1"], f"examples/{example}, 12 steps", 15)
    s = last_json(r.stdout)
    assert s["steps"] == 12 and s["namespace"]
    learned(f"examples/{example}: first loss - last loss, 12 steps", s["first_loss"] - s["last_loss"], above=0)
    if example == "plain_loop.py":
        assert s["labels_used"] == 12 * 64  # every crop had its label
        assert len((ROOT / "examples" / example).read_text().splitlines()) < 80


def test_labels_export_and_import_round_trip_a_namespace(demo_shards, cached, tmp_path, redis_server):
    exported = tmp_path / "labels.npz"
    s = last_json(run_cli("teacher_service", "labels", "export", cached, exported, "--no-progress").stdout)
    assert s["labels"] == 1437 and s["images"] == 479  # one epoch: 479 images (1437 / 3), 3 crops each
    with np.load(exported, allow_pickle=False) as f:  # plain NumPy reads it
        header = json.loads(str(f["header"]))
        assert header["namespace"]["format"] == "top1" and header["coverage"]
        assert f["classes"].shape == (1437, 1) and f["keys"].shape == (479,) and f["seed"].max() == 2
    url = redis_server.url
    r = last_json(run_cli("teacher_service", "labels", "import", exported, url, "--no-progress").stdout)
    assert r["labels"] == s["labels"] and r["namespace"] == s["namespace"]
    again = tmp_path / "again.npz"
    run_cli("teacher_service", "labels", "export", url, again, "--no-progress")
    with np.load(exported) as a, np.load(again) as b:
        assert a.files == b.files and all(np.array_equal(a[n], b[n]) for n in a.files)
    # the imported store serves a run as the original does: coverage and labels
    loader = open_loader(demo_shards, url, epochs=1, batch_size=64, workers=0)
    loader.set_epoch(0)
    batch = next(iter(loader))
    with open_existing(str(cached)) as store:
        assert (batch["teacher_label"].numpy() == store.get(batch["key"], batch["seed"].tolist()).top1).all()
    bad = tmp_path / "bad.npz"
    np.savez(bad, keys=np.array(["a"]))
    r = run_cli("teacher_service", "labels", "import", bad, url, check=False)
    assert r.returncode == 2 and "not a label export" in r.stderr
