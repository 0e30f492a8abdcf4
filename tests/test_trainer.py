import json
import os
import signal
import subprocess
import time

import pytest
import torch
import torch.nn.functional as F
from conftest import PY, last_json, run_cli, run_precompute

from shards import Manifest, SkipCounter, iter_shard
from student_trainer.labels import target_distribution
from student_trainer.loss import DistillationLoss, TeacherTargets
from teacher_service.namespace import Namespace, RecordFormat, classes_digest
from teacher_service.store import open_store

TINY = {"patch_size": 8, "embed_dim": 64, "depth": 2, "num_heads": 2}


def official_deit_loss(outputs, labels, teacher_outputs, base, dtype, alpha, tau):
    """facebookresearch/deit losses.py DistillationLoss.forward, verbatim semantics."""
    outputs, outputs_kd = outputs
    base_loss = base(outputs, labels)
    if dtype == "none":
        return base_loss
    if dtype == "soft":
        T = tau
        distillation_loss = (
            F.kl_div(
                F.log_softmax(outputs_kd / T, dim=1),
                F.log_softmax(teacher_outputs / T, dim=1),
                reduction="sum",
                log_target=True,
            )
            * (T * T)
            / outputs_kd.numel()
        )
    else:
        distillation_loss = F.cross_entropy(outputs_kd, teacher_outputs.argmax(dim=1))
    return base_loss * (1 - alpha) + distillation_loss * alpha


@pytest.mark.parametrize(
    "dtype,alpha,tau",
    [("none", 0.5, 1.0), ("hard", 0.5, 1.0), ("hard", 0.3, 1.0), ("soft", 0.5, 1.0), ("soft", 0.7, 3.0)],
)
def test_loss_matches_official_deit(dtype, alpha, tau):
    g = torch.Generator().manual_seed(0)
    cls, kd, teacher = (torch.randn(16, 10, generator=g) for _ in range(3))
    labels = torch.randint(0, 10, (16,), generator=g)
    base = torch.nn.CrossEntropyLoss()
    ours = DistillationLoss(base, dtype, alpha, tau)((cls, kd), labels, TeacherTargets(logits=teacher))
    ref = official_deit_loss((cls, kd), labels, teacher, base, dtype, alpha, tau)
    torch.testing.assert_close(ours, ref)
    if dtype == "hard":  # cached hard labels as one-hot distributions give the same loss
        dist = target_distribution(teacher.argmax(1, keepdim=True), None, 10)
        torch.testing.assert_close(
            DistillationLoss(base, dtype, alpha, tau)((cls, kd), labels, TeacherTargets(dist=dist)), ref
        )
    if dtype == "soft":  # cached full probabilities give the same loss as the logits
        k = 10
        p, c = teacher.softmax(1).topk(k)
        dist = target_distribution(c, p, 10)
        torch.testing.assert_close(
            DistillationLoss(base, dtype, alpha, tau)((cls, kd), labels, TeacherTargets(dist=dist)),
            ref,
            rtol=1e-4,
            atol=1e-5,
        )


def test_masked_targets_ignore_missing():
    cls, kd = torch.randn(4, 5), torch.randn(4, 5)
    labels = torch.tensor([0, 1, 2, 3])
    dist = target_distribution(torch.tensor([[1], [2], [3], [4]]), None, 5)
    loss = DistillationLoss(torch.nn.CrossEntropyLoss(), "hard", 0.5)
    full = loss((cls[:2], kd[:2]), labels[:2], TeacherTargets(dist=dist[:2]))
    base_all = torch.nn.CrossEntropyLoss()(cls, labels)
    masked = loss((cls, kd), labels, TeacherTargets(dist=dist, weight=torch.tensor([1.0, 1.0, 0.0, 0.0])))
    expect = 0.5 * base_all + 0.5 * F.cross_entropy(kd[:2], torch.tensor([1, 2]))
    torch.testing.assert_close(masked, expect)
    assert not torch.isclose(full, masked)


def put_labels(store_url, shards, fn, seeds, fmt=RecordFormat()):
    """Write labels fn(true_class) for every train image and seed, in the namespace the trainer expects."""
    m = Manifest.load(shards)
    policy = m.policy()
    ns = Namespace("test-teacher@perm", policy.policy_id, fmt, len(m.classes), classes_digest(m.classes))
    raws = [r for s in m.shards("train") for r in iter_shard(shards / s.name, SkipCounter())]
    with open_store(store_url, ns) as st:
        keys = [r.key for r in raws for _ in seeds]
        ss = [s for _ in raws for s in seeds]
        st.put(keys, ss, [fn(r.label) for r in raws for _ in seeds])
    return ns


def torchrun(*args, check=True, timeout=600):
    return run_cli(
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=2",
        "-m",
        "student_trainer",
        "train",
        *args,
        check=check,
        timeout=timeout,
    )


def student_args(shards, out, *extra):
    return [
        "--shards",
        shards,
        "--out",
        out,
        "--model",
        "deit_tiny_distilled_patch16_224",
        "--model-kwargs",
        json.dumps(TINY),
        "--batch-size",
        "64",
        "--repeated-aug",
        "1",
        "--workers",
        "1",
        "--threads",
        "1",
        "--warmup-epochs",
        "0",
        "--lr",
        "4e-3",
        "--drop-path",
        "0",
        "--no-progress",
        *extra,
    ]


def test_cached_labels_are_learned_by_the_distillation_head(demo_shards, tmp_path):
    """Store labels = a fixed permutation of the true classes: the dist head learns them, the class head does not."""
    store = str(tmp_path / "perm.db")
    perm = lambda c: (c + 3) % 10  # noqa: E731
    put_labels(store, demo_shards, perm, range(0, 15))
    r = torchrun(
        *student_args(
            demo_shards,
            tmp_path / "run",
            "--labels",
            "store",
            "--store",
            store,
            "--epochs",
            "15",
            "--mixup",
            "0",
            "--cutmix",
            "0",
            "--smoothing",
            "0",
            "--distillation-alpha",
            "0.5",
            "--batch-size",
            "32",
            "--lr",
            "8e-3",
            "--eval-every",
            "15",
        )
    )
    s = last_json(r.stdout)
    assert s["world_size"] == 2 and s["labels_missing"] == 0
    assert s["labels_cached"] == 1437 * 15
    # evaluate both heads against true and permuted labels
    import timm

    from shards import ShardStream

    model = timm.create_model("deit_tiny_distilled_patch16_224", num_classes=10, img_size=32, **TINY)
    from safetensors.torch import load_file

    model.load_state_dict(load_file(str(tmp_path / "run" / "model.safetensors")))
    model.eval()
    m = Manifest.load(demo_shards)
    b = next(iter(ShardStream(demo_shards, "val", m.policy(), 360, mode="eval")))
    with torch.no_grad():
        f = model.forward_features(b["image"])
        cls, dst = model.head(f[:, 0]).argmax(1), model.head_dist(f[:, 1]).argmax(1)
    y = b["label"]
    yp = (y + 3) % 10
    assert (dst == yp).float().mean() > 0.5, "distillation head did not learn the cached labels"
    assert (cls == y).float().mean() > 0.5, "class head did not learn the true labels"
    assert (cls == yp).float().mean() < 0.2 and (dst == y).float().mean() < 0.2
    assert abs(s["val_top1_cls"] - 100 * (cls == y).float().mean().item()) < 0.5  # trainer's eval agrees


def test_on_missing_policies(demo_shards, tmp_path):
    store = str(tmp_path / "half.db")
    put_labels(store, demo_shards, lambda c: c, [0])  # only epoch 0's seeds
    common = [
        "--labels",
        "store",
        "--store",
        store,
        "--epochs",
        "2",
        "--eval-every",
        "0",
        "--checkpoint-every",
        "0",
        "--no-export",
    ]
    bad = torchrun(*student_args(demo_shards, tmp_path / "a", *common), check=False)
    assert bad.returncode != 0 and "labels missing" in bad.stderr
    s = last_json(torchrun(*student_args(demo_shards, tmp_path / "b", *common, "--on-missing", "skip")).stdout)
    assert s["labels_cached"] == 1437 and s["labels_missing"] == 1437
    assert s["steps"] == 2 * 12  # ceil(ceil(1437 / 2) / 64) steps per epoch, the same on both ranks


def test_wrong_policy_is_refused(demo_shards, tmp_path):
    store = str(tmp_path / "p.db")
    put_labels(store, demo_shards, lambda c: c, [0])
    r = run_cli(
        "student_trainer",
        "train",
        *student_args(
            demo_shards,
            tmp_path / "x",
            "--labels",
            "store",
            "--store",
            store,
            "--policy",
            '{"re_prob": 0.0}',
            "--epochs",
            "1",
        ),
        check=False,
    )
    assert r.returncode == 2 and "augmentation policy" in r.stderr


def test_online_teacher_and_soft_from_topk(demo_shards, tiny_teacher, tmp_path):
    s = last_json(
        run_cli(
            "student_trainer",
            "train",
            *student_args(
                demo_shards,
                tmp_path / "on",
                "--labels",
                "online",
                "--teacher-checkpoint",
                tiny_teacher,
                "--epochs",
                "1",
                "--max-steps",
                "4",
                "--eval-every",
                "0",
                "--distillation-type",
                "soft",
            ),
        ).stdout
    )
    assert s["steps"] == 4 and s["distillation_type"] == "soft"
    store = str(tmp_path / "k.db")
    run_precompute(demo_shards, "0:1", store, tiny_teacher, "--format", "top3p")
    s = last_json(
        run_cli(
            "student_trainer",
            "train",
            *student_args(
                demo_shards,
                tmp_path / "soft",
                "--labels",
                "store",
                "--store",
                store,
                "--epochs",
                "1",
                "--max-steps",
                "4",
                "--eval-every",
                "0",
                "--distillation-type",
                "soft",
            ),
        ).stdout
    )
    assert s["labels_cached"] == 4 * 64 and s["labels_missing"] == 0


def test_resume_after_kill_continues_from_checkpoint(demo_shards, tmp_path):
    out = tmp_path / "run"
    args = [
        PY,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=2",
        "-m",
        "student_trainer",
        "train",
        *map(str, student_args(demo_shards, out, "--labels", "none", "--epochs", "4", "--eval-every", "0")),
    ]
    p = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
    deadline = time.time() + 300
    while time.time() < deadline:
        if (out / "metrics.jsonl").exists() and len((out / "metrics.jsonl").read_text().splitlines()) >= 2:
            break
        time.sleep(0.2)
    os.killpg(p.pid, signal.SIGKILL)
    p.wait()
    ckpt = torch.load(out / "last.pt", map_location="cpu", weights_only=False)
    done_epoch = ckpt["epoch"]
    assert 1 <= done_epoch < 3 and ckpt["step"] == (done_epoch + 1) * 12
    r = torchrun(
        *student_args(demo_shards, out, "--labels", "none", "--epochs", "4", "--eval-every", "0", "--resume", "auto")
    )
    s = last_json(r.stdout)
    assert "resumed from" in r.stderr
    assert s["steps"] == 4 * 12 and s["epochs_done"] == 4
    epochs = [json.loads(line)["epoch"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert epochs[-(3 - done_epoch) :] == list(range(done_epoch + 1, 4))
