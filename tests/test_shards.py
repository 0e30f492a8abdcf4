import io
import random
import tarfile
import textwrap

import numpy as np
import pytest
import torch
from conftest import PY, copy_shards, last_json, run_cli

from shards import AugmentPolicy, Manifest, ShardStream, StreamOptions, augment, decode_image, iter_shard
from shards.augment import to_pil
from shards.stream import Regions, Share, SkipCounter, batch_sizes, images_on_device, plan_epoch

POLICY = AugmentPolicy(input_size=32, scale=(0.35, 1.0), hflip=0.5)


def first_sample(shards_dir):
    m = Manifest.load(shards_dir)
    return next(iter_shard(shards_dir / m.shards("train")[0].name, SkipCounter()))


@pytest.mark.unit
def test_manifest_describes_the_demo(demo_shards):
    m = Manifest.load(demo_shards)
    assert m.classes == [str(i) for i in range(10)]
    assert m.num_samples("train") + m.num_samples("val") == 1797
    assert m.num_samples("val") == 360
    assert all(len(s.sha256) == 64 for s in m.shards("train"))
    keys = [r.key for s in m.shards("train") for r in iter_shard(demo_shards / s.name, SkipCounter())]
    assert len(keys) == len(set(keys)) == 1437
    assert all("." not in k for k in keys)


def test_same_key_seed_identical_in_two_processes(demo_shards):
    raw = first_sample(demo_shards)
    script = textwrap.dedent(f"""
        import sys, hashlib
        from shards import AugmentPolicy, augment, decode_image, Manifest, iter_shard
        from shards.stream import SkipCounter
        from pathlib import Path
        d = Path({str(demo_shards)!r}); m = Manifest.load(d)
        raw = next(iter_shard(d / m.shards("train")[0].name, SkipCounter()))
        p = AugmentPolicy(input_size=32, scale=(0.35, 1.0), hflip=0.5)
        for seed in (0, 1, 7):
            t = augment(decode_image(raw.data), raw.key, seed, p)
            print(hashlib.sha256(t.numpy().tobytes()).hexdigest())
    """)
    import subprocess

    outs = [
        subprocess.run([PY, "-c", script], capture_output=True, text=True, check=True).stdout.split() for _ in range(2)
    ]
    assert outs[0] == outs[1] and len(outs[0]) == 3
    assert len(set(outs[0])) == 3, "different seeds must give different crops"
    import hashlib

    here = hashlib.sha256(augment(decode_image(raw.data), raw.key, 0, POLICY).numpy().tobytes()).hexdigest()
    assert here == outs[0][0]


@pytest.mark.unit
def test_augment_leaves_caller_rng_untouched(demo_shards):
    raw = first_sample(demo_shards)
    random.seed(123)
    np.random.seed(123)
    torch.manual_seed(123)
    expected = (random.random(), np.random.rand(), torch.rand(1).item())
    random.seed(123)
    np.random.seed(123)
    torch.manual_seed(123)
    augment(decode_image(raw.data), raw.key, 3, POLICY)
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == expected


@pytest.mark.unit
def test_policy_id_changes_with_parameters():
    assert AugmentPolicy().policy_id == AugmentPolicy().policy_id
    assert AugmentPolicy().policy_id != AugmentPolicy(re_prob=0.0).policy_id
    assert AugmentPolicy.from_dict(AugmentPolicy(input_size=64).to_dict()) == AugmentPolicy(input_size=64)
    with pytest.raises(ValueError):
        AugmentPolicy.from_dict({"bogus": 1})


@pytest.mark.unit
@pytest.mark.parametrize("n,nb,b", [(20, 2, 10), (11, 2, 10), (10, 2, 10), (7, 1, 8), (100, 13, 8)])
def test_batch_sizes_exact(n, nb, b):
    sizes = batch_sizes(n, nb, b)
    assert len(sizes) == nb and sum(sizes) == n and max(sizes) <= b and min(sizes) > 0


@pytest.mark.unit
def test_batch_sizes_rejects_impossible():
    with pytest.raises(ValueError):
        batch_sizes(21, 2, 10)


@pytest.mark.unit
def test_plan_covers_every_position_once_with_equal_batches():
    shard_samples = [128] * 11 + [29]
    seen = []
    for rank in range(3):
        counts = 0
        for w in range(2):
            p = plan_epoch(shard_samples, 32, epoch=4, share=Share(rank, 3, w, 2), repeats=2)
            seen.extend(range(p.start, p.stop))
            counts += len(p.sizes)
        assert counts == 30  # ceil(ceil(1437 * 2 / 3) / 32)
    assert sorted(seen) == list(range(sum(shard_samples) * 2))


def test_stream_two_ranks_two_workers_each_sample_once(demo_shards):
    m = Manifest.load(demo_shards)
    keys, batches_per_rank = [], []
    for rank in range(2):
        stream = ShardStream(
            demo_shards,
            "train",
            POLICY,
            options=StreamOptions(rank=rank, world_size=2, shuffle_buffer=50),
            batch_size=64,
        )
        stream.set_epoch(1)
        loader = torch.utils.data.DataLoader(stream, batch_size=None, num_workers=2)
        n = 0
        for batch in loader:
            assert batch["image"].shape[1:] == (3, 32, 32)
            assert (batch["seed"] == 1).all()  # seed schedule: epoch 1, repeat 0, repeats 1
            keys.extend(batch["key"])
            n += 1
        assert n == len(stream)
        batches_per_rank.append(n)
    assert batches_per_rank[0] == batches_per_rank[1]
    assert len(keys) == m.num_samples("train") == len(set(keys))


def test_a_stream_rendering_on_the_device_gives_the_workers_crops(demo_shards):
    """The trainer's CUDA layout (workers decode, draw and cut uint8 crops; `images_on_device` draws the
    pixels where the model runs), run on the CPU: the same batches, bit for bit, as crops rendered
    in the workers; the crops cross the loader as one uint8 tensor."""
    policy = AugmentPolicy(input_size=32, scale=(0.35, 1.0), renderer="torch")
    streams = [
        ShardStream(demo_shards, "train", policy, 48, options=StreamOptions(render_on_device=d)) for d in (False, True)
    ]
    loaders = [torch.utils.data.DataLoader(s, batch_size=None, num_workers=1) for s in streams]
    n = 0
    for in_workers, to_render in zip(*loaders, strict=True):
        regions = to_render["image"]
        assert isinstance(regions, Regions) and regions.crops.shape == (regions.plan.size, 3, 32, 32)
        assert regions.crops.dtype == torch.uint8 and regions.plan.packed.dtype == torch.int64
        assert to_render["key"] == in_workers["key"] and torch.equal(to_render["seed"], in_workers["seed"])
        assert torch.equal(images_on_device(to_render, policy, torch.device("cpu")), in_workers["image"])
        n += 1
    assert n == len(streams[0])
    with pytest.raises(ValueError, match="torch renderer"):
        ShardStream(demo_shards, "train", POLICY, 48, options=StreamOptions(render_on_device=True))


def test_deit_repeated_augmentation_streams_its_schedule(demo_shards):
    """--repeated-aug 3, DeiT's schedule, 2 ranks x 2 workers: an epoch is about N samples of about
    N/3 images, each 3 times, each (key, seed) once, the seeds the schedule gives; the selection
    is the same under another run seed."""
    m = Manifest.load(demo_shards)
    n = m.num_samples("train")
    runs = {}
    for run_seed in (0, 7):
        pairs, batches = [], []
        for rank in range(2):
            stream = ShardStream(
                demo_shards,
                "train",
                POLICY,
                64,
                options=StreamOptions(rank=rank, world_size=2, repeats=3, seed=run_seed),
            )
            stream.set_epoch(2)
            loader = torch.utils.data.DataLoader(stream, batch_size=None, num_workers=2)
            got = list(loader)
            batches.append(len(got))
            pairs += [(k, int(s)) for b in got for k, s in zip(b["key"], b["seed"])]
        assert batches[0] == batches[1] == len(stream)
        assert len(pairs) == len(set(pairs)) == stream.schedule.samples_per_epoch and n <= len(pairs) < n + 3
        assert len({k for k, _ in pairs}) == -(-n // 3)
        runs[run_seed] = sorted(pairs)
    assert runs[0] == runs[7]
    index = {
        r.key: (si, i)
        for si, s in enumerate(m.shards("train"))
        for i, r in enumerate(iter_shard(demo_shards / s.name, SkipCounter()))
    }
    schedule = stream.schedule
    for key, seed in runs[0]:
        s, i = index[key]
        assert seed // 3 == schedule.times_selected(s, i, 2)  # the image's selection count before epoch 2


def test_persistent_loader_workers_follow_set_epoch(demo_shards):
    """make_loader keeps its workers across epochs; each epoch they must read the new epoch (its
    seeds and order), not the epoch they started with."""
    from shards import make_loader

    stream = ShardStream(
        demo_shards,
        "train",
        POLICY,
        options=StreamOptions(repeats=2, shuffle_buffer=50, repeat_mode="all"),
        batch_size=128,
    )
    loader = make_loader(stream, num_workers=2)
    assert loader.persistent_workers
    seen = {}
    for epoch in (0, 1, 2):
        stream.set_epoch(epoch)
        batches = list(loader)
        seeds = torch.cat([b["seed"] for b in batches])
        assert sorted(set(seeds.tolist())) == [2 * epoch, 2 * epoch + 1]  # seeds e*R+r
        seen[epoch] = [k for b in batches for k in b["key"]]
    assert seen[0] != seen[1] != seen[2]


@pytest.mark.unit
def test_shuffle_differs_between_epochs_but_is_reproducible(demo_shards):
    def order(epoch):
        s = ShardStream(demo_shards, "train", POLICY, options=StreamOptions(shuffle_buffer=100), batch_size=200)
        s.set_epoch(epoch)
        return [k for b in s for k in b["key"]]

    assert order(0) == order(0)
    assert order(0) != order(1)


def corrupt_copy(src, dst):
    """Copy the shards; overwrite one image's bytes in place with garbage (same size, valid tar)."""
    import shutil

    shutil.copytree(src, dst)
    m = Manifest.load(dst)
    path = dst / m.shards("train")[0].name
    with tarfile.open(path) as tf:
        victim = next(ti for ti in tf.getmembers() if ti.name.endswith(".png"))
    with open(path, "r+b") as f:
        f.seek(victim.offset_data)
        f.write(b"not a png" + bytes(victim.size - 9))
    return victim.name


@pytest.mark.unit
def test_a_member_overwritten_after_indexing_stops_the_stream_by_name(demo_shards, tmp_path):
    """An image's bytes overwritten in place (same size, a valid tar): not an unreadable sample to
    skip but another image's pixels under its key, whose labels are the old image's: the stream
    stops, naming the shard and the image (it was skipped and counted, so a rewrite that still
    decoded trained on the old labels)."""
    from shards.members import ShardChanged

    d = tmp_path / "bad"
    victim = corrupt_copy(demo_shards, d)
    stream = ShardStream(d, "train", POLICY, options=StreamOptions(shuffle=False), batch_size=100)
    with pytest.raises(
        ShardChanged, match=f"train-000000.tar changed after it was indexed.*{victim.rsplit('.', 1)[0]}"
    ):
        list(stream)


@pytest.mark.unit
def test_a_sample_without_a_class_is_skipped_counted_and_refilled(demo_shards, tmp_path):
    """A sample that cannot be used as indexed (here: its class missing from the index) is skipped,
    counted and its slot refilled: batch shapes never change."""
    import shutil

    from shards.index import SplitIndex

    d = tmp_path / "noclass"
    shutil.copytree(demo_shards, d)
    stream = ShardStream(d, "train", POLICY, options=StreamOptions(shuffle=False), batch_size=100)
    index = SplitIndex.load(d, "train")
    label = np.array(index.label)
    label[3] = -1
    stream.index.label = label
    batches = list(stream)
    assert len(batches) == len(stream) == 15
    assert sum(b["skipped"] for b in batches) == 1
    keys = [k for b in batches for k in b["key"]]
    assert index.key(3) not in keys and len(keys) == 1437  # batch shapes kept: the slot is refilled


def test_inspect_detects_modified_and_truncated_shards(demo_shards, tmp_path):
    ok = run_cli("shards", "inspect", demo_shards)
    assert last_json(ok.stdout)["ok"] is True
    d = tmp_path / "bad"
    corrupt_copy(demo_shards, d)
    bad = run_cli("shards", "inspect", d, check=False)
    assert bad.returncode == 1
    assert "modified" in " ".join(last_json(bad.stdout)["problems"])
    m = Manifest.load(d)
    p = d / m.shards("val")[0].name
    p.write_bytes(p.read_bytes()[:1000])
    bad = run_cli("shards", "inspect", d, check=False)
    assert bad.returncode == 1 and "truncated" in bad.stderr


def test_show_writes_same_png_for_same_seed(demo_shards, tmp_path):
    raw = first_sample(demo_shards)
    outs = []
    for name, seed in (("a", 4), ("b", 4), ("c", 5)):
        p = tmp_path / f"{name}.png"
        r = run_cli("shards", "show", demo_shards, raw.key, "--seed", seed, "--out", p)
        assert last_json(r.stdout)["label"] == raw.label
        outs.append(p.read_bytes())
    assert outs[0] == outs[1] != outs[2]
    from PIL import Image

    assert Image.open(io.BytesIO(outs[0])).size == (32, 32)
    torch_png = tmp_path / "torch.png"
    r = run_cli("shards", "show", demo_shards, raw.key, "--seed", 4, "--out", torch_png, "--renderer", "torch")
    assert last_json(r.stdout)["renderer"] == "torch"
    policy = Manifest.load(demo_shards).policy("torch")
    crop = augment(decode_image(raw.data), raw.key, 4, policy)
    expected = io.BytesIO()
    to_pil(crop, policy).save(expected, format="PNG")
    assert torch_png.read_bytes() == expected.getvalue() != outs[0]
    missing = run_cli(
        "shards", "show", demo_shards, "no/such/key", "--seed", "1", "--out", tmp_path / "x.png", check=False
    )
    assert missing.returncode == 2 and "not found" in missing.stderr


def test_build_from_folder_keeps_original_bytes(tmp_path):
    from PIL import Image

    src = tmp_path / "src"
    originals = {}
    for cls in ("cat", "dog"):
        (src / cls).mkdir(parents=True)
        for i in range(6):
            buf = io.BytesIO()
            Image.new("RGB", (20 + i, 16), (i * 30, 100, 50)).save(buf, format="JPEG", quality=90)
            (src / cls / f"img.{i}.jpg").write_bytes(buf.getvalue())
            originals[f"{cls}/img_{i}"] = buf.getvalue()
    (src / "dog" / "broken.jpg").write_bytes(b"garbage")
    out = tmp_path / "out"
    summary = last_json(
        run_cli("shards", "build", "--src", src, "--out", out, "--shard-size", "4", "--val-fraction", "0.25").stdout
    )
    assert summary["skipped"] == 1
    m = Manifest.load(out)
    assert m.classes == ["cat", "dog"]
    got = {}
    for split in m.splits:
        for s in m.shards(split):
            for raw in iter_shard(out / s.name, SkipCounter()):
                got[raw.key] = (raw.data, raw.label)
    assert set(got) == set(originals)
    assert all(got[k][0] == originals[k] for k in originals)
    assert all(got[k][1] == (0 if k.startswith("cat") else 1) for k in got)
    assert m.num_samples("val") > 0 and m.num_samples("train") > 0


def _jpeg_folder(root, counts: dict[str, int], shade: int) -> dict:
    from PIL import Image

    made = {}
    for cls, n in counts.items():
        (root / cls).mkdir(parents=True)
        for i in range(n):
            buf = io.BytesIO()
            Image.new("RGB", (24, 20), (shade, i * 20, 60)).save(buf, format="JPEG", quality=90)
            (root / cls / f"img_{i}.JPEG").write_bytes(buf.getvalue())
            made[f"{cls}/img_{i}"] = buf.getvalue()
    return made


def test_build_takes_the_official_val_folder_as_its_val_split(tmp_path):
    """--val-src: the val split is that folder (ImageNet's val layout), train is all of --src, the
    manifest says where val came from, keys of the two never collide; a val folder of other classes
    is refused before anything is written."""
    train = _jpeg_folder(tmp_path / "train", {"cat": 5, "dog": 4}, shade=10)
    val = _jpeg_folder(tmp_path / "val", {"cat": 2, "dog": 3}, shade=200)  # the same file names as train's
    out = tmp_path / "out"
    s = last_json(run_cli("shards", "build", "--src", tmp_path / "train", "--val-src", tmp_path / "val",
                          "--out", out, "--no-progress").stdout)  # fmt: skip
    assert s["samples"] == {"train": 9, "val": 5} and s["val_from"]["from"] == "folder"
    m = Manifest.load(out)
    assert m.val_from == {"from": "folder", "source": str((tmp_path / "val").resolve())}
    got = {split: {} for split in m.splits}
    for split in m.splits:
        for shard in m.shards(split):
            for raw in iter_shard(out / shard.name, SkipCounter()):
                got[split][raw.key] = raw.data
    assert sorted(got["train"].values()) == sorted(train.values())
    assert sorted(got["val"].values()) == sorted(val.values())
    assert not set(got["train"]) & set(got["val"])  # the same relative paths, distinct keys
    assert set(got["train"]) == set(train)  # train's keys as without --val-src
    inspect = last_json(run_cli("shards", "inspect", out).stdout)
    assert inspect["val_from"]["from"] == "folder"
    # a holdout says so
    held = last_json(run_cli("shards", "build", "--src", tmp_path / "train", "--out", tmp_path / "held",
                             "--val-fraction", "0.3", "--no-progress").stdout)  # fmt: skip
    assert held["val_from"] == {"from": "holdout", "fraction": 0.3}
    # other classes: refused, nothing written
    _jpeg_folder(tmp_path / "val2", {"cat": 1, "bird": 1}, shade=90)
    r = run_cli("shards", "build", "--src", tmp_path / "train", "--val-src", tmp_path / "val2",
                "--out", tmp_path / "bad", check=False)  # fmt: skip
    assert r.returncode == 2 and "other classes than --src" in r.stderr and "bird" in r.stderr
    assert not (tmp_path / "bad" / "manifest.json").exists()
    r = run_cli("shards", "build", "--src", tmp_path / "train", "--val-src", tmp_path / "val",
                "--val-fraction", "0.1", "--out", tmp_path / "both", check=False)  # fmt: skip
    assert r.returncode == 2 and "not with --demo or --val-fraction" in r.stderr


def test_cli_help():
    for cmd in ([], ["build"], ["inspect"], ["show"]):
        r = run_cli("shards", *cmd, "--help")
        assert "usage" in r.stdout


@pytest.mark.unit
def test_a_shard_cut_short_is_counted_not_hidden(demo_shards, tmp_path):
    """A shard cut short under its index (the index was checked at open; the shard was cut later,
    under a running job): the images past the cut cannot be read, and are counted as skipped."""
    d = copy_shards(demo_shards, tmp_path / "short")
    m = Manifest.load(d)
    stream = ShardStream(d, "train", POLICY, options=StreamOptions(shuffle=False), batch_size=100)
    victim = d / m.shards("train")[0].name
    index = stream.index
    cut = index.member(index.shard_rows(0).start + 20).offset  # image 20 onwards is lost
    victim.write_bytes(victim.read_bytes()[:cut])
    batches = list(stream)
    assert len(batches) == len(stream)  # batch count kept for DDP
    assert sum(b["skipped"] for b in batches) == m.shards("train")[0].samples - 20


@pytest.mark.unit
def test_the_example_folder_builds_with_its_input_size(tmp_path):
    """`shards example-folder` writes the digits in ImageNet's layout, the first images of each class
    for train and the next for val; `build --input-size` puts the crop size in the policy hint, with
    DeiT's padded crop and whole-image eval at 32 px or less."""
    from shards import Manifest
    from shards.build import BuildConfig, build, write_example_folder

    s = write_example_folder(tmp_path / "img", train_per_class=2, val_per_class=1)
    assert s == {"out": str(tmp_path / "img"), "classes": 10, "images": {"train": 20, "val": 10}}
    assert sorted(p.name for p in (tmp_path / "img" / "train" / "3").iterdir()) == ["digit_0003.jpg", "digit_0013.jpg"]
    assert [p.name for p in (tmp_path / "img" / "val" / "3").iterdir()] == ["digit_0023.jpg"]
    build(BuildConfig(out=tmp_path / "sh", src=tmp_path / "img" / "train", val_src=tmp_path / "img" / "val",
                      input_size=24, shard_size=10, progress=False))  # fmt: skip
    m = Manifest.load(tmp_path / "sh")
    assert m.policy().input_size == 24 and m.val_from["from"] == "folder" and m.num_samples("val") == 10
    assert (m.policy().crop, m.policy().eval_crop_pct) == ("padded", 1.0)  # DeiT's transforms at <= 32 px
    assert m.policy(input_size=48).crop == "resized"  # a fine-tune above 32 px: DeiT's RandomResizedCrop
    assert m.policy(input_size=48, crop="padded").crop == "padded"  # unless asked for
    build(BuildConfig(out=tmp_path / "sh64", src=tmp_path / "img" / "train", input_size=64, progress=False))
    assert Manifest.load(tmp_path / "sh64").policy().crop == "resized"  # DeiT's RandomResizedCrop above
    with pytest.raises(ValueError, match="--input-size is for --src"):
        BuildConfig(out=tmp_path / "d", demo="digits", input_size=24, progress=False)


def test_a_build_skips_each_bad_file_with_one_line_and_goes_on(tmp_path):
    """An image folder holding what folders hold: a link that loops, one that dangles, a FIFO named
    .jpg, a JPEG cut at its tail, images smaller than the 32 px padded crop (32x16, 1x1), and CMYK,
    greyscale, palette and RGBA images. Each bad file is one line naming it, counted by its reason;
    the build goes on, ends 0 and leaves no temporary file; every image in a shard decodes (as RGB,
    as torchvision's ImageFolder loads it) and takes the hinted crop. (It aborted with a traceback
    and a train-000000.tar.tmp, hung on the FIFO, and let the cut JPEG and the small images in.)"""
    import os

    from PIL import Image

    from shards.build import write_example_folder

    src = tmp_path / "images"
    write_example_folder(src, train_per_class=2, val_per_class=1)
    bad = src / "train" / "3"
    (bad / "loop.jpg").symlink_to(bad / "loop.jpg")
    (bad / "dangling.jpg").symlink_to(bad / "nowhere.jpg")
    os.mkfifo(bad / "fifo.jpg")
    good = next(bad.glob("digit_*.jpg")).read_bytes()
    (bad / "cut.jpg").write_bytes(good[: len(good) // 2])
    Image.new("RGB", (32, 16)).save(bad / "wide.png")
    Image.new("RGB", (1, 1)).save(bad / "dot.png")
    odd = {
        "cmyk.jpg": Image.new("CMYK", (32, 32), (0, 50, 100, 0)),
        "grey.png": Image.new("L", (32, 32), 128),
        "palette.png": Image.new("P", (32, 32), 3),
        "rgba.png": Image.new("RGBA", (32, 32), (9, 9, 9, 0)),
    }
    for name, im in odd.items():
        im.save(bad / name)
    out = tmp_path / "shards"
    r = run_cli("shards", "build", "--src", src / "train", "--val-src", src / "val", "--out", out, "--input-size",
                "32", "--no-progress")  # fmt: skip
    s = last_json(r.stdout)
    assert s["skipped_by_reason"] == {"unreadable": 2, "not a regular file": 1, "undecodable": 1,
                                      "too small for the crop": 2}, s  # fmt: skip
    assert s["skipped"] == 6 and s["samples"]["train"] == 20 + len(odd)
    for name in ("loop.jpg", "dangling.jpg", "fifo.jpg", "cut.jpg", "wide.png", "dot.png"):
        assert sum(name in line for line in r.stderr.splitlines()) == 1, (name, r.stderr)
    assert "Traceback" not in r.stderr and not [p for p in os.listdir(out) if p.endswith(".tmp")]
    m = Manifest.load(out)
    policy = m.policy()
    for shard in m.shards("train"):
        for sample in iter_shard(out / shard.name, SkipCounter()):
            image = decode_image(sample.data)
            assert image.mode == "RGB"
            augment(image, sample.key, 0, policy)  # the hinted crop takes it


@pytest.mark.unit
def test_a_failed_build_leaves_no_temporary_file(tmp_path, monkeypatch):
    import shards.build as build_module
    from shards.build import BuildConfig, build, write_example_folder

    src = tmp_path / "images"
    write_example_folder(src, train_per_class=3, val_per_class=0)
    calls = []

    def failing(data):
        calls.append(1)
        if len(calls) == 5:
            raise RuntimeError("the disk went away")
        return decode_image(data)

    monkeypatch.setattr(build_module, "decode_image", failing)
    with pytest.raises(RuntimeError, match="went away"):
        build(BuildConfig(out=tmp_path / "out", src=src / "train", progress=False))
    assert [p.name for p in (tmp_path / "out").iterdir()] == []
