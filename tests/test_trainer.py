import json
import os
import signal
import subprocess

import pytest
import torch
import torch.nn.functional as F
from conftest import PY, TINY, last_json, learned, run_cli, run_precompute, student_argv, wait_until

from distill_core import load_training_checkpoint
from labels.namespace import Namespace, RecordFormat, classes_digest
from labels.store import open_store
from shards import Manifest, SkipCounter, iter_shard
from student_trainer.loss import DistillationLoss, TeacherTargets
from student_trainer.targets import TeacherTargetBuilder, target_distribution


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


@pytest.mark.unit
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


@pytest.mark.unit
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


class FixedTeacher:
    """A stand-in online teacher whose logits say class 7 (the builder only needs `logits`)."""

    def __init__(self):
        self.seen = 0

    def logits(self, x):
        self.seen += len(x)
        return F.one_hot(torch.full((len(x),), 7), 10).float() * 5


def labeled_batch(classes, present):
    present = torch.tensor(present)
    return {
        "teacher_classes": torch.tensor(classes).reshape(-1, 1),
        "present": present,
        "teacher_missing": int((~present).sum()),
    }


@pytest.mark.unit
def test_target_builder_on_missing_policies_and_mixup():
    x = torch.zeros(4, 3, 8, 8)
    batch = labeled_batch([1, 2, -1, 4], [True, True, False, True])
    # online: the teacher labels only the missing crop; every row then carries a target
    teacher = FixedTeacher()
    online = TeacherTargetBuilder("store", "online", "hard", 10, teacher)(batch, x, None)
    assert teacher.seen == 1 and online.weight is None
    assert online.dist.argmax(1).tolist() == [1, 2, 7, 4]
    # skip: the missing row is masked out of the distillation loss
    skip = TeacherTargetBuilder("store", "skip", "hard", 10)(batch, x, None)
    assert skip.weight.tolist() == [1, 1, 0, 1]
    # mixup: targets mixed with the images' lambda and pairing (a batch with its reverse)
    full = labeled_batch([1, 2, 3, 4], [True] * 4)
    mixed = TeacherTargetBuilder("store", "error", "hard", 10)(full, x, 0.75)
    assert mixed.dist[0, 1] == 0.75 and mixed.dist[0, 4] == 0.25 and mixed.weight is None
    # no label was missing: the builder never asks for the online teacher
    untouched = FixedTeacher()
    TeacherTargetBuilder("store", "online", "hard", 10, untouched)(full, x, None)
    assert untouched.seen == 0
    # online mode: the teacher on the (mixed) images; no labels: no targets
    assert TeacherTargetBuilder("online", "error", "hard", 10, teacher)(full, x, 0.5).logits.shape == (4, 10)
    assert TeacherTargetBuilder("none", "error", "none", 10)(full, x, None) is None


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


def torchrun(*args, check=True, measured_s: float = 30.0):
    """`torchrun --standalone --nproc_per_node=2 -m student_trainer train ARGS` within its budget."""
    return run_cli(
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=2",
        "-m",
        "student_trainer",
        "train",
        *args,
        check=check,
        measured_s=measured_s,
        step="torchrun student_trainer train",
    )


def student_args(shards, out, *extra):
    return [*student_argv(shards, out), *map(str, extra)]


# The learning test's student: one token per 16 px patch learns the 32 px digits in 15 epochs to
# 66-76% (seeds 0-4) where TINY's patch 8 stalls near 50% (48-52% under three kernel sets, the
# test's old bound of 50% inside that range), and it is the cheaper of the two.
LEARNER = {"patch_size": 16, "embed_dim": 64, "depth": 2, "num_heads": 2}


@pytest.mark.learning
def test_cached_labels_are_learned_by_the_distillation_head(demo_shards, tmp_path):
    """Store labels = a fixed permutation of the true classes: the distillation head learns them, the
    class head the true ones. The bounds are what the mechanism guarantees, far from what training
    reaches: on seeds 0-4, and for seed 0 under the kernel sets AVX-512, AVX2 and scalar
    (ATEN_CPU_CAPABILITY), 1 or 2 threads per rank and flushed denormals, each head agreed with its
    own target on 66-76% of the validation digits and with the other head's on at most 4.2%
    (chance: 10%)."""
    store = str(tmp_path / "perm.db")
    perm = lambda c: (c + 3) % 10  # noqa: E731
    put_labels(store, demo_shards, perm, range(0, 15))
    r = torchrun(
        *student_args(
            demo_shards,
            tmp_path / "run",
            "--model-kwargs",
            json.dumps(LEARNER),
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
            "2e-2",
            "--eval-every",
            "15",
        ),
        measured_s=22,
    )
    s = last_json(r.stdout)
    assert s["world_size"] == 2 and s["labels_missing"] == 0
    assert s["labels_cached"] == 1437 * 15
    # evaluate both heads against true and permuted labels
    import timm
    from safetensors.torch import load_file

    from shards import ShardStream, StreamOptions

    model = timm.create_model("deit_tiny_distilled_patch16_224", num_classes=10, img_size=32, **LEARNER)
    model.load_state_dict(load_file(str(tmp_path / "run" / "model.safetensors")))
    model.eval()
    m = Manifest.load(demo_shards)
    b = next(iter(ShardStream(demo_shards, "val", m.policy(), 360, options=StreamOptions(mode="eval"))))
    with torch.no_grad():
        f = model.forward_features(b["image"])
        cls, dst = model.head(f[:, 0]).argmax(1), model.head_dist(f[:, 1]).argmax(1)
    y = b["label"]
    agree = {
        "dist_cached": (dst == (y + 3) % 10).float().mean().item(),
        "dist_true": (dst == y).float().mean().item(),
        "cls_true": (cls == y).float().mean().item(),
        "cls_cached": (cls == (y + 3) % 10).float().mean().item(),
    }
    learned("distillation head agrees with the cached labels", agree["dist_cached"], above=0.4)
    learned("class head agrees with the true classes", agree["cls_true"], above=0.4)
    learned("distillation head agrees with the true classes", agree["dist_true"], below=0.2)
    learned("class head agrees with the cached labels", agree["cls_cached"], below=0.2)
    assert abs(s["val_top1_cls"] - 100 * agree["cls_true"]) < 0.5  # the trainer's evaluation agrees


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
    # half its labels missing: said in the summary (and the log), though --on-missing skip allowed it
    assert "1437 of 2874 teacher labels (50.0%) were not in the store" in s["warning"]
    assert "trained without them" in s["warning"]


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
    # labels of the pil renderer do not serve a torch-renderer run: another namespace
    args = student_args(demo_shards, tmp_path / "y", "--labels", "store", "--store", store, "--epochs", "1")
    r = run_cli("student_trainer", "train", *args, "--renderer", "torch", check=False)
    assert r.returncode == 2 and "augmentation policy" in r.stderr


def test_precompute_labels_exactly_what_a_deit_schedule_run_asks_for(demo_shards, tiny_teacher, tmp_path):
    """precompute --epochs 2 --repeated-aug 3 labels about E x N pairs (not E x R x N), and a run
    with that schedule finds every label it asks for; the old schedule over the same epochs is
    refused before it trains, with what to precompute."""
    from shards import RepeatSchedule

    store = str(tmp_path / "ra.db")
    flags = ("--epochs", "2", "--repeated-aug", "3", "--batch-size", "64", "--workers", "1")
    s = last_json(run_precompute(demo_shards, None, store, tiny_teacher, *flags).stdout)
    m = Manifest.load(demo_shards)
    schedule = RepeatSchedule(tuple(sh.samples for sh in m.shards("train")), 3)
    assert s["labels_computed"] == schedule.labels_for_run(2) == 2 * 1437 and s["ok"]
    assert s["repeat_mode"] == "deit" and s["repeats"] == 3 and s["epochs"] == 2
    run = ("--labels", "store", "--store", store, "--epochs", "2", "--eval-every", "0", "--repeated-aug", "3")
    t = last_json(run_cli("student_trainer", "train", *student_args(demo_shards, tmp_path / "ra", *run)).stdout)
    assert t["repeat_mode"] == "deit" and t["labels_missing"] == 0
    assert t["labels_cached"] == t["labels_needed"] == 2 * 1437
    old = run_cli(
        "student_trainer",
        "train",
        *student_args(demo_shards, tmp_path / "all", *run, "--repeat-mode", "all"),
        check=False,
    )
    assert old.returncode == 2 and "precompute with --epochs 2 --repeated-aug 3 --repeat-mode all" in old.stderr


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
    metrics = out / "metrics.jsonl"  # written after the epoch's checkpoint
    try:
        wait_until(
            "trainer: 2 epochs in metrics.jsonl",
            10,
            lambda: metrics.exists() and len(metrics.read_text().splitlines()) >= 2,
        )
    finally:
        os.killpg(p.pid, signal.SIGKILL)
        p.wait()
    ckpt = load_training_checkpoint(out / "last.pt")  # plain values only: weights_only=True
    done_epoch = ckpt["epoch"]
    assert 1 <= done_epoch < 3 and ckpt["step"] == (done_epoch + 1) * 12
    # an epoch's metrics line is written after its checkpoint, so the kill never leaves a line
    # whose checkpoint is missing (the resumed run would write that epoch's line twice)
    assert len(metrics.read_text().splitlines()) <= done_epoch + 1
    r = torchrun(
        *student_args(demo_shards, out, "--labels", "none", "--epochs", "4", "--eval-every", "0", "--resume", "auto")
    )
    s = last_json(r.stdout)
    assert "resumed from" in r.stderr
    assert s["steps"] == 4 * 12 and s["epochs_done"] == 4
    epochs = [json.loads(line)["epoch"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert epochs[-(3 - done_epoch) :] == list(range(done_epoch + 1, 4))
    # a distilled model without distillation trains its class head only (the official baseline)
    import timm
    from safetensors.torch import load_file

    torch.manual_seed(0)  # the trainer's initial draw for --seed 0
    init = timm.create_model("deit_tiny_distilled_patch16_224", num_classes=10, img_size=32, **TINY)
    trained = load_file(str(out / "model.safetensors"))
    assert torch.equal(trained["head_dist.weight"], init.head_dist.weight.detach())
    assert not torch.equal(trained["head.weight"], init.head.weight.detach())


def test_plot_groups_seeds_into_curves(tmp_path):
    for name, top1 in (("plain-s0", 80.0), ("plain-s1", 82.0), ("cached-s0", 85.0)):
        run = tmp_path / name
        run.mkdir()
        records = [{"epoch": e, "val_top1": top1 + e, "steady_images": 1000, "steady_seconds": 2.0} for e in range(3)]
        (run / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in records) + "\n")
    runs = [tmp_path / n for n in ("plain-s0", "plain-s1", "cached-s0")]
    s = last_json(run_cli("student_trainer", "plot", *runs, "--out", tmp_path / "p.png").stdout)
    assert s["curves"] == {"plain": 2, "cached": 1}
    assert (tmp_path / "p.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    bad = run_cli("student_trainer", "plot", tmp_path / "nope", check=False)
    assert bad.returncode == 2 and "metrics.jsonl not found" in bad.stderr


@pytest.mark.slow
@pytest.mark.learning
def test_demo_end_to_end_writes_table_and_picture(tmp_path, demo_shards):
    """The quick start's first command, shortened: every mode runs, cached = online exactly."""
    import shutil

    out = tmp_path / "demo"
    shutil.copytree(demo_shards, out / "shards")  # the demo reuses shards it finds
    r = run_cli(
        "distill_demo",
        "--out",
        out,
        "--teacher-epochs",
        "1",
        "--student-epochs",
        "1",
        "--student-kwargs",
        json.dumps(TINY),
        measured_s=46,
    )
    s = last_json(r.stdout)
    rows = {row["mode"]: row for row in s["results"]}
    assert set(rows) == {"plain", "cached", "online"}
    assert rows["plain"]["model"] == "deit_tiny_patch16_224"  # the baseline has no distillation token
    assert rows["cached"]["top1"] == rows["online"]["top1"]  # same crops, same labels, same weights
    assert "minus_plain" in rows["cached"] and s["labels_precomputed"] == 1437
    assert (out / "results.png").stat().st_size > 10_000
    table = (out / "results.md").read_text()
    assert "| plain |" in table and "minus plain" in table


def test_an_epochs_checkpoint_is_written_before_its_metrics_line(demo_shards, tmp_path, monkeypatch):
    """The order the resume test relies on, checked deterministically: when epoch e's checkpoint is
    saved, metrics.jsonl holds the lines of the epochs before it only, so a kill between the two
    never leaves a metrics line without its checkpoint."""
    from student_trainer import TrainConfig
    from student_trainer import train as train_module

    out = tmp_path / "run"
    seen = []
    save = train_module.save_checkpoint

    def checked(run, epoch, step):
        metrics = out / "metrics.jsonl"
        seen.append((epoch, len(metrics.read_text().splitlines()) if metrics.exists() else 0))
        save(run, epoch, step)

    monkeypatch.setattr(train_module, "save_checkpoint", checked)
    cfg = TrainConfig(
        shards=str(demo_shards), out=str(out), model="deit_tiny_distilled_patch16_224", model_kwargs=TINY,
        epochs=2, batch_size=128, repeated_aug=1, workers=0, warmup_epochs=0, eval_every=0, progress=False,
        export=False, mixup=0.0, cutmix=0.0,
    )  # fmt: skip
    train_module.train(cfg)
    assert seen == [(0, 0), (1, 1)]
