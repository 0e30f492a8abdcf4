"""The torch renderer: timm's random choices, PIL's pixel semantics, and crops that depend on
(policy, key, seed) only, not on the batch, the position in it, the thread count or the process."""

from __future__ import annotations

import io
import random
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from shards import AugmentPolicy, augment
from shards.augment import prepare
from shards.render import (
    INCREASING_OPS,
    _apply_op,
    _resized_crop_box,
    draw_params,
    hash_normal,
    render_batch,
    to_uint8_chw,
)

TORCH = AugmentPolicy(input_size=64, renderer="torch")


@pytest.fixture(scope="module")
def photos() -> list[Image.Image]:
    """The two photographs scikit-learn ships, cut down so the module stays fast."""
    from sklearn.datasets import load_sample_images

    return [Image.fromarray(a).resize((160, 120), Image.BICUBIC) for a in load_sample_images().images]


@pytest.mark.unit
def test_the_renderer_is_part_of_the_policy_id():
    assert AugmentPolicy(renderer="torch").policy_id != AugmentPolicy().policy_id
    assert AugmentPolicy.from_json(TORCH.to_json()) == TORCH
    with pytest.raises(ValueError, match="renderer"):
        AugmentPolicy(renderer="cv2")
    with pytest.raises(ValueError, match="color jitter"):
        AugmentPolicy(renderer="torch", auto_augment=None, color_jitter=0.4)
    with pytest.raises(ValueError, match="inc1"):
        AugmentPolicy(renderer="torch", auto_augment="rand-m9-mstd0.5")


@pytest.mark.unit
def test_a_crop_does_not_depend_on_its_batch_position_or_threads(photos):
    items = [(photos[i % 2], f"img{i}", i % 5) for i in range(24)]
    alone = [augment(im, key, seed, TORCH) for im, key, seed in items]
    prepared = [prepare(im, key, seed, TORCH) for im, key, seed in items]
    threads = torch.get_num_threads()
    try:
        for n_threads, order in ((2, list(range(24))), (1, list(reversed(range(24)))), (3, list(range(0, 24, 3)))):
            torch.set_num_threads(n_threads)
            regions, params = zip(*(prepared[i] for i in order))
            batch = render_batch(list(regions), list(params), TORCH)
            for j, i in enumerate(order):
                assert torch.equal(batch[j], alone[i]), (i, n_threads)
    finally:
        torch.set_num_threads(threads)
    # and the ops were exercised: geometric, colour and erasing in this set
    drawn = {name for _, p in prepared for name, _ in p.ops}
    assert drawn & {"Rotate", "ShearX", "ShearY", "TranslateXRel", "TranslateYRel"}
    assert len(drawn) >= 6 and any(p.erase for _, p in prepared)


def test_a_crop_is_the_same_in_another_process(photos, tmp_path):
    photos[0].save(tmp_path / "a.png")
    here = augment(photos[0].copy(), "a", 3, TORCH)
    code = (
        "import sys, torch; from PIL import Image; from shards import AugmentPolicy, augment; "
        "torch.set_num_threads(1); "
        f"p = AugmentPolicy.from_json({TORCH.to_json()!r}); "
        f"torch.save(augment(Image.open({str(tmp_path / 'a.png')!r}).convert('RGB'), 'a', 3, p), sys.argv[1])"
    )
    subprocess.run([sys.executable, "-c", code, str(tmp_path / "out.pt")], check=True, timeout=120)
    assert torch.equal(torch.load(tmp_path / "out.pt"), here)


@pytest.mark.unit
def test_the_crop_box_is_timms_for_the_same_random_stream():
    from timm.data.transforms import RandomResizedCropAndInterpolation

    img = Image.new("RGB", (500, 375))
    for s in range(200):
        random.seed(s)
        theirs = RandomResizedCropAndInterpolation.get_params(img, (0.08, 1.0), (3 / 4, 4 / 3))
        assert _resized_crop_box(random.Random(s), 500, 375, (0.08, 1.0), (3 / 4, 4 / 3)) == tuple(theirs)


@pytest.mark.unit
def test_randaugment_draws_follow_timm_semantics():
    """rand-m9-mstd0.5-inc1: 2 ops from the 15, each applied with p=0.5, magnitude ~ N(9, 0.5)."""
    n = 4000
    draws = [draw_params(AugmentPolicy(renderer="torch"), s, 500, 375) for s in range(n)]
    counts = {name: 0 for name in INCREASING_OPS}
    for p in draws:
        for name, _ in p.ops:
            counts[name] += 1
    applied = sum(counts.values())
    assert abs(applied / (2 * n) - 0.5) < 0.03  # each of the 2 layers applies with p = 0.5
    expected = applied / len(INCREASING_OPS)
    assert all(abs(c - expected) < 0.25 * expected for c in counts.values()), counts
    rotations = [a for p in draws for name, a in p.ops if name == "Rotate"]
    assert max(abs(a) for a in rotations) <= 30.0 and abs(np.mean(np.abs(rotations)) - 27.0) < 0.5
    assert 0.4 < np.mean([a > 0 for a in rotations]) < 0.6  # random sign
    assert abs(np.mean([bool(p.erase) for p in draws]) - 0.25) < 0.03
    assert np.mean([p.flip for p in draws]) == pytest.approx(0.5, abs=0.03)


def _timm_op(name: str, arg: float):
    from timm.data import auto_augment

    from shards.augment import _patch_timm_posterize

    _patch_timm_posterize()
    fn = auto_augment.NAME_TO_OP[name]
    fill = (124, 116, 104)
    if name in ("AutoContrast", "Equalize", "Invert"):
        return lambda im: fn(im)
    if name in ("Rotate", "ShearX", "ShearY", "TranslateXRel", "TranslateYRel"):
        return lambda im: fn(im, arg, fillcolor=fill, resample=Image.BICUBIC)
    return lambda im: fn(im, int(arg) if name.startswith(("Posterize", "Solarize")) else arg)


@pytest.mark.unit
@pytest.mark.parametrize(
    "name,arg,tolerance",
    [
        ("AutoContrast", 0, 1),
        ("Equalize", 0, 0),
        ("Invert", 0, 0),
        ("PosterizeIncreasing", 2, 0),
        ("PosterizeIncreasing", 0, 0),
        ("SolarizeIncreasing", 100, 0),
        ("SolarizeAdd", 99, 0),
        ("ColorIncreasing", 1.8, 1),
        ("ContrastIncreasing", 0.2, 1),
        ("BrightnessIncreasing", 1.7, 1),
        ("SharpnessIncreasing", 1.9, 1),
        ("Rotate", -25.0, None),
        ("ShearX", 0.27, None),
        ("ShearY", -0.27, None),
        ("TranslateXRel", 0.4, None),
        ("TranslateYRel", -0.4, None),
    ],
)
def test_each_op_renders_what_pil_renders(photos, name, arg, tolerance):
    """Pointwise ops agree with timm's PIL op to one grey level; a geometric op (bicubic with
    different kernels) agrees on the mean, and its fill lands where PIL's does."""
    im = photos[1].resize((96, 96), Image.BICUBIC)
    theirs = torch.from_numpy(np.array(_timm_op(name, arg)(im))).permute(2, 0, 1).float()
    fill = torch.tensor([124.0, 116.0, 104.0]).view(1, 3, 1, 1)
    ours = _apply_op(name, to_uint8_chw(im).float().unsqueeze(0), [arg], fill)[0]
    diff = (ours - theirs).abs()
    if tolerance is not None:
        assert diff.max() <= tolerance, (name, diff.max())
    else:
        assert diff.mean() < 4.0, (name, diff.mean())
        assert (diff > 40).float().mean() < 0.02, name


@pytest.mark.unit
def test_erasing_noise_is_standard_normal_and_a_function_of_the_key():
    a = hash_normal(7, (3, 64, 64), "cpu")
    assert torch.equal(a, hash_normal(7, (3, 64, 64), "cpu"))
    assert not torch.equal(a, hash_normal(8, (3, 64, 64), "cpu"))
    big = hash_normal(123, (200_000,), "cpu")
    assert abs(big.mean()) < 0.01 and abs(big.std() - 1) < 0.01
    assert torch.equal(hash_normal(123, (10,), "cpu"), big[:10])  # element i depends on i only


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device here: CPU vs CUDA is checked on a GPU")
def test_cuda_agrees_with_the_cpu(photos):
    prepared = [prepare(photos[i % 2], f"k{i}", i, TORCH) for i in range(16)]
    regions, params = zip(*prepared)
    cpu = render_batch(list(regions), list(params), TORCH, "cpu")
    gpu = render_batch(list(regions), list(params), TORCH, "cuda").cpu()
    assert torch.equal(render_batch(list(regions), list(params), TORCH, "cuda").cpu(), gpu)
    std = torch.tensor(TORCH.std).view(1, 3, 1, 1)
    levels = ((gpu - cpu).abs() * std * 255).amax()
    assert levels <= 2.0, levels  # the resize and warp round differently; a level or two at most


@pytest.mark.unit
def test_jpegs_left_encoded_for_the_device_decode_to_the_same_crops(photos):
    """The label engine's CUDA layout (workers read only JPEG headers; the batch is decoded where
    it renders), here on the CPU, whose batched decoder is libjpeg like PIL's: the same crops."""
    from shards.augment import prepare_encoded
    from shards.render import render_prepared

    jpegs = []
    for i in range(6):
        buf = io.BytesIO()
        photos[i % 2].rotate(7 * i).save(buf, format="JPEG", quality=90)
        jpegs.append(buf.getvalue())
    items = [prepare_encoded(j, f"k{i}", i, TORCH) for i, j in enumerate(jpegs)]
    assert all(isinstance(data, bytes) for data, _ in items)
    expected = torch.stack(
        [augment(Image.open(io.BytesIO(j)).convert("RGB"), f"k{i}", i, TORCH) for i, j in enumerate(jpegs)]
    )
    assert torch.equal(render_prepared(items, TORCH, "cpu"), expected)
    huge = io.BytesIO()
    Image.new("RGB", (9000, 8000)).save(huge, format="JPEG", quality=10)
    with pytest.raises(ValueError, match="too large"):
        prepare_encoded(huge.getvalue(), "huge", 0, TORCH)
