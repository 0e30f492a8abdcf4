"""What a DeiT or timm user reaches for, run for real on the demo digits: model EMA that resumes,
--eval on a checkpoint, fine-tuning at another resolution, timm's optimizer and scheduler flags,
TensorBoard event files, and DeiT's own teacher weights by name."""

import json

import pytest
import torch
from conftest import TINY, last_json, run_cli
from pydantic import ValidationError

from distill_core import load_training_checkpoint


def tiny(shards, out, **fields):
    """TrainConfig of the tests' student (TINY, 32 px) on the demo digits: 12 steps an epoch."""
    from student_trainer import TrainConfig

    base = dict(
        shards=str(shards), out=str(out), model="deit_tiny_distilled_patch16_224", model_kwargs=TINY, epochs=2,
        batch_size=128, repeated_aug=1, workers=0, warmup_epochs=0, mixup=0.0, cutmix=0.0, drop_path=0.0,
        lr=4e-3, progress=False,
    )  # fmt: skip
    return TrainConfig(**{**base, **fields})


def train(cfg) -> dict:
    from student_trainer.train import train as run

    return run(cfg)


def metrics(out) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.learning
def test_model_ema_resumes_exactly_and_eval_reports_the_checkpoint(demo_shards, tmp_path):
    """An EMA run stopped after one epoch and resumed ends with the EMA of one that never stopped,
    bit for bit; --eval on its checkpoint reports what the run's last evaluation did; a checkpoint
    of another architecture, and --eval without one, are refused before any work."""
    ema = {"model_ema": True, "model_ema_decay": 0.9}  # DeiT's 0.99996 barely moves in 24 steps
    whole = train(tiny(demo_shards, tmp_path / "whole", **ema))
    cut = tmp_path / "cut"
    first = train(tiny(demo_shards, cut, max_steps=12, **ema))
    assert first["epochs_done"] == 1
    resumed = train(tiny(demo_shards, cut, resume="auto", **ema))
    a, b = load_training_checkpoint(tmp_path / "whole" / "last.pt"), load_training_checkpoint(cut / "last.pt")
    assert a["model_ema"].keys() == a["model"].keys()
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
        assert torch.equal(a["model_ema"][k], b["model_ema"][k]), k
    moved = [k for k, v in a["model"].items() if v.is_floating_point() and not torch.equal(v, a["model_ema"][k])]
    assert "pos_embed" in moved  # the average lags the model
    assert resumed["ema_val_top1"] == whole["ema_val_top1"] and resumed["val_top1"] == whole["val_top1"]
    assert "ema_val_top1_fused" in metrics(cut)[-1]
    assert (cut / "model_ema.safetensors").exists()

    lines = len(metrics(cut))
    r = run_cli("student_trainer", "train", "--shards", demo_shards, "--eval", "--resume", cut / "last.pt",
                "--workers", "0", step="student_trainer eval")  # fmt: skip
    s = last_json(r.stdout)
    assert s["epochs_trained"] == 2 and s["steps"] == 24 and s["model"] == "deit_tiny_distilled_patch16_224"
    for k in ("val_top1_cls", "val_top1_dist", "val_top1_fused", "val_top1_fused_probs", "val_top1", "ema_val_top1"):
        assert s[k] == resumed[k], k
    assert len(metrics(cut)) == lines  # nothing trained, nothing written

    r = run_cli("student_trainer", "train", "--shards", demo_shards, "--eval", check=False)
    assert r.returncode == 2 and "--eval needs a checkpoint" in r.stderr
    with pytest.raises(ValueError, match="other --model-kwargs"):
        train(tiny(demo_shards, cut, resume="auto", model_kwargs={**TINY, "depth": 3}, **ema))


def test_finetune_from_32_to_48_px(demo_shards, tmp_path):
    """DeiT's fine-tuning: the position embedding resampled by timm's function to the new grid,
    every other weight as trained; heads of another class count reset; other architectures refused."""
    import timm
    from safetensors.torch import load_file
    from timm.layers import resample_abs_pos_embed

    from student_trainer.weights import finetune_from

    base = train(tiny(demo_shards, tmp_path / "base", epochs=1, eval_every=0))
    assert base["steps"] == 12
    weights = tmp_path / "base" / "model.safetensors"
    s = train(tiny(demo_shards, tmp_path / "ft", epochs=1, input_size=48, finetune=str(weights)))
    assert json.loads(json.dumps(s["started_from"]["pos_embed_resampled"])) == [[1, 18, 64], [1, 38, 64]]
    assert s["steps"] == 12 and s["val_images"] == 360  # it trains and evaluates at 48 px

    src = load_file(str(weights))
    model = timm.create_model("deit_tiny_distilled_patch16_224", num_classes=10, img_size=48, **TINY)
    finetune_from(model, str(weights), "deit_tiny_distilled_patch16_224", {**TINY, "img_size": 48})
    own = model.state_dict()
    expected = resample_abs_pos_embed(src["pos_embed"], new_size=[6, 6], num_prefix_tokens=2)
    assert torch.equal(own["pos_embed"], expected)
    assert all(torch.equal(own[k], src[k]) for k in src if k != "pos_embed")

    five = timm.create_model("deit_tiny_distilled_patch16_224", num_classes=5, img_size=32, **TINY)
    fresh = {k: v.clone() for k, v in five.state_dict().items()}
    info = finetune_from(five, str(weights), "deit_tiny_distilled_patch16_224", TINY)
    assert info["heads_reset"] == ["head.weight", "head.bias", "head_dist.weight", "head_dist.bias"]
    assert torch.equal(five.state_dict()["head.weight"], fresh["head.weight"])
    assert torch.equal(five.state_dict()["blocks.0.attn.qkv.weight"], src["blocks.0.attn.qkv.weight"])

    with pytest.raises(ValueError, match="other --model-kwargs"):
        other = {**TINY, "patch_size": 4}
        train(tiny(demo_shards, tmp_path / "x", epochs=1, finetune=str(weights), model_kwargs=other))
    with pytest.raises(ValueError, match="holds a deit_tiny_distilled_patch16_224, not --model vit_tiny_patch16_224"):
        train(tiny(demo_shards, tmp_path / "x", epochs=1, finetune=str(weights), model="vit_tiny_patch16_224"))
    bare = tmp_path / "bare.pt"  # a state dict with no metadata: its keys and shapes tell
    torch.save({k: v for k, v in src.items() if not k.startswith("blocks.1.")}, bare)
    with pytest.raises(ValueError, match=r"does not fit this model: missing \['blocks.1"):
        train(tiny(demo_shards, tmp_path / "x", epochs=1, finetune=str(bare)))


def test_sgd_and_cosine_with_cooldown_from_timms_factories(demo_shards, tmp_path):
    """--opt sgd is timm's SGD (Nesterov momentum); the cosine schedule ends --cooldown-epochs
    before --epochs, which then run at --min-lr (here stepped every step and scaled like every lr
    by batch/512, so that the floor is reached within the epochs)."""
    out = tmp_path / "sgd"
    schedule = {"epochs": 3, "cooldown_epochs": 1, "warmup_epochs": 1, "lr": 0.4, "min_lr": 4e-3}
    schedule |= {"sched_on_epochs": False, "scale_min_lr": True}
    s = train(tiny(demo_shards, out, opt="sgd", eval_every=0, **schedule))
    assert s["steps"] == 36
    lrs = [m["lr"] for m in metrics(out)]
    floor = 4e-3 * 128 / 512
    assert lrs[0] > 10 * floor and lrs[1] == pytest.approx(floor) and lrs[2] == pytest.approx(floor)
    group = load_training_checkpoint(out / "last.pt")["optimizer"]["param_groups"][0]
    assert group["momentum"] == 0.9 and group["nesterov"] is True and "betas" not in group
    with pytest.raises(ValidationError, match="did you mean adamax"):
        tiny(demo_shards, out, opt="adamx")
    with pytest.raises(ValidationError, match="leaves no schedule"):
        tiny(demo_shards, out, epochs=2, cooldown_epochs=2)
    # DeiT's recipe by default: AdamW with eps 1e-8, weight decay 0.05, none on the tokens
    adamw = tiny(demo_shards, out)
    assert (adamw.opt, adamw.opt_eps, adamw.weight_decay, adamw.sched) == ("adamw", 1e-8, 0.05, "cosine")


def test_deits_epoch_schedule_and_unscaled_min_lr_by_default(demo_shards, tmp_path):
    """By default the lr steps as DeiT's loop does (epoch e at the value for e - 1, warm-up epoch 0
    at --warmup-lr) and --min-lr is kept as given, as DeiT's main.py does; --no-sched-on-epochs
    steps it every optimizer step and --scale-min-lr scales the minimum like the lr."""
    warm = dict(epochs=3, warmup_epochs=1, warmup_lr=1e-6, eval_every=0)
    train(tiny(demo_shards, tmp_path / "epochs", **warm))
    lrs = [m["lr"] for m in metrics(tmp_path / "epochs")]
    assert lrs[0] == pytest.approx(1e-6) and lrs[1] == pytest.approx(1e-6) and lrs[2] > 100 * 1e-6
    train(tiny(demo_shards, tmp_path / "steps", **warm, sched_on_epochs=False))
    assert [m["lr"] for m in metrics(tmp_path / "steps")][1] > 100 * 1e-6  # warm after epoch 0's steps
    floor = dict(epochs=2, cooldown_epochs=1, min_lr=1e-5, eval_every=0, sched_on_epochs=False)  # no lag
    train(tiny(demo_shards, tmp_path / "floor", **floor))
    assert metrics(tmp_path / "floor")[-1]["lr"] == pytest.approx(1e-5)  # not 1e-5 * 128 / 512
    train(tiny(demo_shards, tmp_path / "scaled", **floor, scale_min_lr=True))
    assert metrics(tmp_path / "scaled")[-1]["lr"] == pytest.approx(1e-5 * 128 / 512)


def test_tensorboard_files_hold_the_metrics(demo_shards, tmp_path):
    """TensorBoard's own reader finds every figure of metrics.jsonl, epoch by epoch."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "tb"
    train(tiny(demo_shards, out, tensorboard=True))
    acc = EventAccumulator(str(out / "tensorboard"))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    lines = metrics(out)
    assert {"train_loss", "lr", "val_top1", "images_per_s", "labels_missing"} <= tags
    for k in tags:
        events = acc.Scalars(k)
        assert [e.step for e in events] == [m["epoch"] for m in lines], k
        assert [e.value for e in events] == pytest.approx([m[k] for m in lines], rel=1e-6), k
    assert not (tmp_path / "plain" / "tensorboard").exists()


@pytest.mark.unit
def test_deits_teacher_by_name():
    """--pretrained regnety_160 is the RegNetY-16GF DeiT distilled from (timm's deit_in1k tag, the
    file DeiT published), not timm's default tag for the name; a tag given is kept."""
    import timm

    from labels.teacher import pretrained_name

    assert pretrained_name("regnety_160") == "regnety_160.deit_in1k"
    cfg = timm.models.get_pretrained_cfg("regnety_160.deit_in1k")
    assert cfg.url == "https://dl.fbaipublicfiles.com/deit/regnety_160-a5fe301d.pth"
    assert timm.models.get_pretrained_cfg("regnety_160").tag != "deit_in1k"  # why the name is resolved
    assert pretrained_name("regnety_160.sw_in12k_ft_in1k") == "regnety_160.sw_in12k_ft_in1k"
    assert pretrained_name("regnety_002") == "regnety_002"


def test_pretrained_weights_are_recorded_by_tag_and_digest(tmp_path):
    """Hub weights (here a local copy, as an offline cluster has them) name their tag and the
    digest of what was loaded in the teacher id, and so in every namespace of their labels."""
    import timm
    from safetensors.torch import save_file

    from labels.namespace import RecordFormat
    from labels.teacher import Teacher, TeacherSettings, weights_digest

    torch.manual_seed(1)
    hub = timm.create_model("regnety_160")  # DeiT's teacher's architecture, 1000 classes, random weights
    save_file(hub.state_dict(), str(tmp_path / "regnety_160.safetensors"))
    digest = weights_digest(hub.state_dict())
    del hub
    t = Teacher(
        TeacherSettings(pretrained=True, pretrained_file=str(tmp_path / "regnety_160.safetensors")), device="cpu"
    )
    assert t.teacher_id == f"regnety_160.deit_in1k@w:{digest[:16]}"
    ns = t.namespace("p" * 16, RecordFormat())
    assert ns.meta()["teacher_id"] == t.teacher_id
    with pytest.raises(ValueError, match="give --pretrained too"):
        TeacherSettings(pretrained_file="x.safetensors", checkpoint="y").check_source()


@pytest.mark.learning
def test_label_quality_in_precompute_and_labels_stats(demo_shards, tiny_teacher, tmp_path):
    """Precompute's summary and `labels stats --shards` say how often the teacher's hard label is
    the image's class: the same figure, equal to counting every stored label against the shard's
    class, split by the share of the image each crop covers."""
    from conftest import run_precompute

    from labels.store import list_namespaces, open_existing
    from shards import Manifest, SkipCounter, iter_shard
    from shards.augment import crop_box
    from shards.decode import image_header

    store = tmp_path / "labels.db"
    s = last_json(run_precompute(demo_shards, "0:2", store, tiny_teacher).stdout)
    q = s["label_quality"]
    assert q["labels"] == 2 * 1437 and q["images"] == 1437
    # every label, counted here from the shards themselves
    m = Manifest.load(demo_shards)
    (meta,) = list_namespaces(str(store))
    agree, by_bin = 0, {}
    with open_existing(str(store), meta["id"]) as st:
        policy = m.policy()
        for shard in m.shards("train"):
            for sample in iter_shard(demo_shards / shard.name, SkipCounter()):
                key, cls = sample.key, sample.label
                width, height = image_header(sample.data)
                got = st.get([key, key], [0, 1])
                for seed in (0, 1):
                    _, _, h, w = crop_box(policy, key, seed, width, height)
                    share = h * w / (width * height)
                    name = ["<0.25", "0.25-0.5", "0.5-0.75", ">=0.75"][sum(share >= e for e in (0.25, 0.5, 0.75))]
                    hit = int(got.top1[seed]) == cls
                    agree += hit
                    n, a = by_bin.get(name, (0, 0))
                    by_bin[name] = (n + 1, a + hit)
    assert q["agree_pct"] == round(100 * agree / (2 * 1437), 2)
    assert {k: v["labels"] for k, v in q["by_crop_scale"].items()} == {k: n for k, (n, _) in by_bin.items()}
    r = run_cli("teacher_service", "labels", "stats", store, "--shards", demo_shards, "--no-progress")
    (ns,) = last_json(r.stdout)["namespaces"]
    assert ns["label_quality"] == {k: v for k, v in q.items() if k != "seconds"}  # precompute also times it
    small = run_cli(
        "teacher_service", "labels", "stats", store, "--shards", demo_shards, "--quality-labels", "300", "--no-progress"
    )
    assert 300 <= last_json(small.stdout)["namespaces"][0]["label_quality"]["labels"] < 2 * 1437


@pytest.mark.unit
def test_crop_box_is_the_box_each_renderer_crops():
    """The box label quality bins by is the one the crop is cut from: timm's draw in the pil
    renderer's transform, draw_params' in the torch renderer's."""
    from PIL import Image
    from timm.data.transforms import RandomResizedCropAndInterpolation

    from shards import AugmentPolicy
    from shards.augment import augment, crop_box
    from shards.params import draw_params
    from shards.policy import sample_seed

    image = Image.new("RGB", (97, 61))
    pil = AugmentPolicy(input_size=32)
    seen = []
    original = RandomResizedCropAndInterpolation.get_params

    def spy(img, scale, ratio):
        seen.append(tuple(original(img, scale, ratio)))
        return seen[-1]

    RandomResizedCropAndInterpolation.get_params = staticmethod(spy)
    try:
        for seed in range(20):
            augment(image, "k", seed, pil)
    finally:
        RandomResizedCropAndInterpolation.get_params = staticmethod(original)
    assert seen == [crop_box(pil, "k", seed, 97, 61) for seed in range(20)]
    torch_policy = AugmentPolicy(input_size=32, renderer="torch")
    for seed in range(20):
        box = draw_params(torch_policy, sample_seed(torch_policy.policy_id, "k", seed), 97, 61).box
        assert box == crop_box(torch_policy, "k", seed, 97, 61)


@pytest.mark.unit
@pytest.mark.parametrize("renderer", ["pil", "torch"])
def test_the_padded_crop_is_deits_small_image_crop(renderer):
    """crop "padded" is what DeiT's build_transform puts first at input_size <= 32: RandomCrop(32,
    padding=4) of the unresized image, black around it (the pil renderer: torchvision's own; the
    torch renderer: the same box drawn its way, cut on the CPU or on the device). Without the other
    ops, the crop is the image shifted by crop_box's offset, and crop_box gives the part of the
    image inside it."""
    import numpy as np
    from PIL import Image
    from torchvision.transforms import RandomCrop

    from shards import AugmentPolicy
    from shards.augment import augment, crop_box, cut_crop, train_transform
    from shards.crop import crop_tensor, to_uint8_chw

    policy = AugmentPolicy(input_size=32, crop="padded", hflip=0.0, auto_augment=None, color_jitter=0.0, re_prob=0.0,
                           renderer=renderer)  # fmt: skip
    if renderer == "pil":
        first = train_transform(policy).transforms[0]
        assert isinstance(first, RandomCrop) and first.padding == 4 and first.size == (32, 32)
    pixels = np.random.default_rng(0).integers(1, 256, (32, 32, 3), dtype=np.uint8)  # no black pixel
    image = Image.fromarray(pixels)
    mean = torch.tensor(policy.mean).view(3, 1, 1)
    std = torch.tensor(policy.std).view(3, 1, 1)
    shares = set()
    for seed in range(40):
        crop = augment(image, "k", seed, policy)
        got = ((crop * std + mean) * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
        top, left, h, w = crop_box(policy, "k", seed, 32, 32)
        padded = np.zeros((40, 40, 3), np.uint8)
        padded[4:36, 4:36] = pixels
        dy, dx = (top if top > 0 else top + h - 32), (left if left > 0 else left + w - 32)  # the shift
        assert np.array_equal(got, padded[4 + dy : 36 + dy, 4 + dx : 36 + dx]), seed
        assert (got.sum(-1) > 0).sum() == h * w  # the image's part, the rest black
        shares.add(h * w)
        if renderer == "torch":  # the device's cut (nvJPEG's path) is the CPU's
            cpu, params = cut_crop(image, "k", seed, policy)
            assert torch.equal(crop_tensor(to_uint8_chw(image), params, policy), cpu)
    assert len(shares) > 5 and max(shares) <= 32 * 32 and min(shares) >= 28 * 28


@pytest.mark.unit
def test_the_crop_is_part_of_the_policy():
    from shards import AugmentPolicy

    resized = AugmentPolicy(input_size=32)
    assert AugmentPolicy(input_size=32, crop_padding=2).policy_id == resized.policy_id  # unused without "padded"
    padded = AugmentPolicy(input_size=32, crop="padded")
    assert padded.policy_id != resized.policy_id
    assert AugmentPolicy(input_size=32, crop="padded", crop_padding=2).policy_id != padded.policy_id
    assert AugmentPolicy.from_json(padded.to_json()) == padded
    with pytest.raises(ValueError, match="crop must be one of"):
        AugmentPolicy(crop="center")


@pytest.mark.unit
def test_the_fused_top1_is_the_models_own_prediction():
    """val_top1_fused is what the distilled model predicts in eval mode (the heads' logits averaged,
    DeiT's and timm's); the probability average, reported beside it, is another prediction where
    confident heads disagree."""
    import timm

    from student_trainer.train import evaluate

    torch.manual_seed(0)
    m = timm.create_model("deit_tiny_distilled_patch16_224", img_size=32, num_classes=10, **{**TINY, "depth": 2})
    m.eval()
    with torch.no_grad():  # confident heads, so that the two averages part
        m.head.weight.mul_(30)
        m.head_dist.weight.mul_(30)
        x = torch.randn(256, 3, 32, 32)
        y = m(x).argmax(1)  # the model's own prediction as the "true" class
        f = m.forward_features(x)
        probs = (m.head(f[:, 0]).softmax(1) + m.head_dist(f[:, 1]).softmax(1)).argmax(1)
    assert (probs != y).sum() > 10
    got = evaluate(m, [{"image": x[:128], "label": y[:128]}, {"image": x[128:], "label": y[128:]}],
                   torch.device("cpu"), "none", distilled_training=True)  # fmt: skip
    assert got["val_top1_fused"] == got["val_top1"] == 100.0
    assert got["val_top1_fused_probs"] == pytest.approx(100 * (probs == y).float().mean().item())
