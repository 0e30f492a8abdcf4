"""The torch renderer: timm's random choices, Pillow's pixel semantics in integer arithmetic, and
crops that depend on (policy, key, seed) only: not on the batch, the position in it, the thread
count, the process, the resize method or the device."""

from __future__ import annotations

import io
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils._python_dispatch import TorchDispatchMode

from shards import AugmentPolicy, augment
from shards.augment import cut_crop, draw_for_device_decode
from shards.crop import crop_tensor, to_uint8_chw
from shards.device_decode import crops_on_device, decode_on_device
from shards.params import draw_params, resized_crop_box
from shards.pixel_ops import GEOMETRIC_OPS, hash_normal
from shards.policy import INCREASING_OPS
from shards.render import randaugment, render_batch, render_items
from shards.resample import resize_u8

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
from common import apply_op  # noqa: E402 (the benchmarks' helper: bench/render_ops.py measures the same ops)

TORCH = AugmentPolicy(input_size=64, renderer="torch")
NVJPEG = AugmentPolicy(input_size=64, renderer="torch", decoder="nvjpeg")
FILL = (124, 116, 104)


@pytest.fixture(scope="module")
def photos() -> list[Image.Image]:
    """The two photographs scikit-learn ships, cut down so the module stays fast."""
    from sklearn.datasets import load_sample_images

    return [Image.fromarray(a).resize((160, 120), Image.BICUBIC) for a in load_sample_images().images]


def _jpeg(image: Image.Image, quality: int = 90) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


@pytest.mark.unit
def test_the_renderer_and_the_decoder_are_part_of_the_policy_id():
    assert AugmentPolicy(renderer="torch").policy_id != AugmentPolicy().policy_id
    assert NVJPEG.policy_id != TORCH.policy_id
    assert AugmentPolicy.from_json(TORCH.to_json()) == TORCH
    assert AugmentPolicy.from_json(NVJPEG.to_json()) == NVJPEG
    with pytest.raises(ValueError, match="renderer"):
        AugmentPolicy(renderer="cv2")
    with pytest.raises(ValueError, match="decoder"):
        AugmentPolicy(renderer="torch", decoder="turbo")
    with pytest.raises(ValueError, match="pil renderer decodes with Pillow"):
        AugmentPolicy(decoder="nvjpeg")
    with pytest.raises(ValueError, match="color jitter"):
        AugmentPolicy(renderer="torch", auto_augment=None, color_jitter=0.4)
    with pytest.raises(ValueError, match="inc1"):
        AugmentPolicy(renderer="torch", auto_augment="rand-m9-mstd0.5")


@pytest.mark.unit
def test_a_crop_does_not_depend_on_its_batch_position_or_threads(photos):
    items = [(photos[i % 2], f"img{i}", i % 5) for i in range(24)]
    alone = [augment(im, key, seed, TORCH) for im, key, seed in items]
    prepared = [cut_crop(im, key, seed, TORCH) for im, key, seed in items]
    threads = torch.get_num_threads()
    try:
        for n_threads, order in ((2, list(range(24))), (1, list(reversed(range(24)))), (3, list(range(0, 24, 3)))):
            torch.set_num_threads(n_threads)
            crops, params = zip(*(prepared[i] for i in order))
            batch = render_batch(torch.stack(crops), list(params), TORCH)
            for j, i in enumerate(order):
                assert torch.equal(batch[j], alone[i]), (i, n_threads)
    finally:
        torch.set_num_threads(threads)
    # and the ops were exercised: geometric, colour and erasing in this set
    drawn = {name for _, p in prepared for name, _ in p.ops}
    assert drawn & set(GEOMETRIC_OPS)
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
        assert resized_crop_box(random.Random(s), 500, 375, (0.08, 1.0), (3 / 4, 4 / 3)) == tuple(theirs)


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


def _pillow_two_pass(image: Image.Image, size: int, interpolation: str) -> np.ndarray:
    """Pillow's resize as two explicit passes, horizontal first: one pass per call."""
    f = Image.Resampling.BICUBIC if interpolation == "bicubic" else Image.Resampling.BILINEAR
    w, h = image.size
    out = image.resize((size, h), f) if w != size else image
    return np.asarray(out.resize((size, size), f) if h != size else out)


@pytest.mark.unit
def test_the_device_resize_is_pillows_arithmetic_by_gather_and_by_matmul(photos):
    """resize_u8 (the nvJPEG path's resize) gives Pillow's bytes for the same pass order, and its
    two ways of applying the weights (int32 gathers, a float64 matrix product) agree bit for bit:
    up- and downscaling, both filters, boxes down to one pixel."""
    rng = np.random.default_rng(0)
    for trial in range(120):
        a = np.asarray(photos[trial % 2])
        h, w = int(rng.integers(1, a.shape[0])), int(rng.integers(1, a.shape[1]))
        top, left = int(rng.integers(0, a.shape[0] - h + 1)), int(rng.integers(0, a.shape[1] - w + 1))
        size = int(rng.choice([1, 7, 32, 64, 97, 224]))
        interpolation = ("bicubic", "bilinear")[trial % 2]
        region = a[top : top + h, left : left + w]
        chw = torch.from_numpy(np.ascontiguousarray(region.transpose(2, 0, 1)))
        gathered = resize_u8(chw, size, interpolation, "gather")
        assert torch.equal(gathered, resize_u8(chw, size, interpolation, "matmul")), (h, w, size)
        expected = _pillow_two_pass(Image.fromarray(region), size, interpolation)
        assert np.array_equal(gathered.permute(1, 2, 0).numpy(), expected), (h, w, size, interpolation)


def _timm_op(name: str, arg: float, interpolation: str = "bicubic"):
    from timm.data import auto_augment

    from shards.augment import posterize_any_bits

    fn = posterize_any_bits if name.startswith("Posterize") else auto_augment.NAME_TO_OP[name]
    resample = Image.Resampling.BICUBIC if interpolation == "bicubic" else Image.Resampling.BILINEAR
    if name in ("AutoContrast", "Equalize", "Invert"):
        return lambda im: fn(im)
    if name in GEOMETRIC_OPS:
        return lambda im: fn(im, arg, fillcolor=FILL, resample=resample)
    return lambda im: fn(im, int(arg) if name.startswith(("Posterize", "Solarize")) else arg)


OP_CASES = [
    # (op, argument, interpolation, most grey levels from Pillow, most of the pixels that differ)
    ("Equalize", 0, "bicubic", 0, 0.0),
    ("Invert", 0, "bicubic", 0, 0.0),
    ("PosterizeIncreasing", 2, "bicubic", 0, 0.0),
    ("PosterizeIncreasing", 0, "bicubic", 0, 0.0),
    ("SolarizeIncreasing", 100, "bicubic", 0, 0.0),
    ("SolarizeAdd", 99, "bicubic", 0, 0.0),
    # Pillow computes these in floats and truncates: a value it rounds onto an integer from below
    ("AutoContrast", 0, "bicubic", 1, 0.03),
    ("ColorIncreasing", 1.8, "bicubic", 1, 0.15),
    ("ContrastIncreasing", 0.2, "bicubic", 1, 0.2),
    ("BrightnessIncreasing", 0.45, "bicubic", 1, 0.08),
    ("SharpnessIncreasing", 1.9, "bicubic", 1, 0.05),
    # the warps: Pillow's transform in fixed point
    ("Rotate", -25.0, "bicubic", 1, 0.01),
    ("Rotate", 13.7, "bilinear", 1, 0.01),
    ("ShearX", 0.27, "bicubic", 1, 0.01),
    ("ShearY", -0.27, "bicubic", 1, 0.01),
    ("TranslateXRel", 0.4, "bicubic", 1, 0.01),
    ("TranslateYRel", -0.4, "bilinear", 1, 0.12),
]


@pytest.mark.unit
@pytest.mark.parametrize("name,arg,interpolation,levels,share", OP_CASES)
def test_each_op_renders_what_pil_renders(photos, name, arg, interpolation, levels, share):
    """Each op against timm's Pillow op on the same uint8 image, at three sizes: the integer ops
    give Pillow's bytes; the ones Pillow computes in floats differ by one level at most, on a
    bounded share of the pixels."""
    for photo in photos:
        for size in (33, 96):
            im = photo.resize((size, size), Image.BICUBIC)
            theirs = torch.from_numpy(np.array(_timm_op(name, arg, interpolation)(im))).permute(2, 0, 1).int()
            ours = apply_op(name, to_uint8_chw(im).unsqueeze(0), [arg], FILL, interpolation)[0]
            assert ours.dtype == torch.uint8
            diff = (ours.int() - theirs).abs()
            assert diff.max() <= levels, (name, size, diff.max())
            assert (diff > 0).float().mean() <= share, (name, size, (diff > 0).float().mean())


@pytest.mark.unit
@pytest.mark.parametrize("name", ["BrightnessIncreasing", "ColorIncreasing", "ContrastIncreasing"])
def test_blends_are_exactly_the_truncated_blend_with_pillows_float32_factor(photos, name):
    """The integer blend is floor(a + f (b - a)) for Pillow's float32 factor f, computed exactly
    (float64 holds these products exactly): no rounding anywhere, for factors across the range."""
    from shards.pixel_ops import _luma

    im = photos[0].resize((48, 48), Image.BICUBIC)
    x = to_uint8_chw(im).unsqueeze(0)
    b = x.numpy().astype(np.float64)
    luma = _luma(x.to(torch.int32)).numpy().astype(np.float64)
    degenerate = {
        "BrightnessIncreasing": np.zeros_like(b),
        "ColorIncreasing": np.broadcast_to(luma, b.shape),
        "ContrastIncreasing": np.full_like(b, np.floor(luma.mean() + 0.5)),
    }[name]
    for f in (0.1, 0.37, 0.45, 1.0, 1.63, 1.9):
        f32 = float(np.float32(f))
        expected = np.clip(np.floor(degenerate + f32 * (b - degenerate)), 0, 255)
        assert np.array_equal(apply_op(name, x, [f]).numpy(), expected), f


@pytest.mark.unit
def test_the_render_does_no_floating_point_arithmetic(photos):
    """Every operation the render runs, recorded: anything that computes a floating-point result
    would be free to round differently on another device. The only floats are read from tables."""
    from torch.utils._python_dispatch import TorchDispatchMode

    # moving, selecting, viewing or filling floats, and integer <-> integer arithmetic: exact anywhere
    moves = {
        "index", "index_select", "gather", "copy_", "_to_copy", "clone", "empty", "empty_strided", "zeros",
        "zeros_like", "full", "fill_", "view", "_unsafe_view", "reshape", "expand", "slice", "select", "unsqueeze",
        "squeeze", "permute", "stack", "cat", "index_put_", "lift_fresh", "detach", "alias", "as_strided", "t",
        "unbind", "split", "contiguous", "new_empty", "empty_like", "where", "scalar_tensor", "_local_scalar_dense",
        "transpose", "index_copy_", "index_copy",
    }  # fmt: skip
    floats: list[str] = []

    class Record(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            name = func.overloadpacket.__name__
            results = out if isinstance(out, tuple | list) else [out]
            if any(isinstance(t, torch.Tensor) and t.is_floating_point() for t in results) and name not in moves:
                floats.append(name)
            if name == "_to_copy" and isinstance(args[0], torch.Tensor):  # a conversion to float computes
                if not args[0].is_floating_point() and results[0].is_floating_point():
                    floats.append("int->float conversion")
            return out

    prepared = [cut_crop(photos[i % 2], f"k{i}", i, TORCH) for i in range(120)]
    crops, params = zip(*prepared)
    assert {n for p in params for n, _ in p.ops} == set(INCREASING_OPS) and any(p.erase for p in params)
    render_batch(torch.stack(crops[:1]), list(params[:1]), TORCH)  # the tables are built once, on the CPU
    with Record():
        x = render_batch(torch.stack(crops), list(params), TORCH)
        resize_u8(crops[0], 50, "bicubic", "gather")
    assert x.dtype == torch.float32
    assert not floats, sorted(set(floats))


def _every_family(prepared: list, n: int, start: int) -> list:
    """n prepared crops from `start` on, among them two rows of every op family in every layer and
    of every erasing slot, so that no family of the batch is empty."""
    from shards.pixel_ops import BLEND_CODES, LUT_CODES

    def kind(name: str) -> str:
        return "lut" if name in LUT_CODES else "blend" if name in BLEND_CODES else "warp"

    def families(p) -> set:
        drawn = {(layer, kind(name)) for layer, (name, _) in enumerate(p.ops)}
        return drawn | {("erase", s) for s in range(len(p.erase))}

    wanted = {(layer, f) for layer in range(2) for f in ("lut", "blend", "warp")} | {("erase", 0)}
    counts = dict.fromkeys(wanted, 0)
    chosen, rest = [], []
    for item in prepared[start:] + prepared[:start]:
        useful = any(counts[k] < 2 for k in families(item[1]) & wanted)
        (chosen if useful and len(chosen) < n else rest).append(item)
        for k in families(item[1]) & wanted if useful else ():
            counts[k] += 1
    assert all(c >= 2 for c in counts.values()), counts
    return (chosen + rest)[:n]


# ops that read a device value on the host: a host sync wherever the data is not on the host
SYNCING = {"_local_scalar_dense", "item", "nonzero", "bincount", "unique", "_unique2", "masked_select"}


class DispatchRecord(TorchDispatchMode):
    """Records every dispatched op's name and counts the copies from the host to the meta device."""

    def __init__(self):
        super().__init__()
        self.ops, self.uploads = [], 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.ops.append(func.overloadpacket.__name__)
        outputs = out if isinstance(out, tuple | list) else [out]
        from_host = any(isinstance(a, torch.Tensor) and a.device.type == "cpu" for a in args)
        if from_host and any(isinstance(t, torch.Tensor) and t.device.type == "meta" for t in outputs):
            self.uploads += 1
        return out


@pytest.mark.unit
def test_the_render_has_no_host_sync_and_launches_what_it_launches_whatever_the_batch(photos, monkeypatch):
    """The render on the meta device, which holds no data (an op that needs a value on the host
    cannot run there): the same operations, in the same order, for a batch of 16 and one of 128
    and for two batches that drew different ops; no sync-prone operation; and the crops and the
    plan are its only copies from the host. (On a CPU a render skips the families no row drew.)"""
    from shards.plan import BatchPlan

    prepared = [cut_crop(photos[i % 2], f"k{i}", i, TORCH) for i in range(400)]
    to_device = []  # torch.tensor(host data, device=...) is an upload no dispatched op shows

    def watch(make):
        def made(*args, device=None, **kw):
            if device is not None and torch.device(device).type != "cpu":
                to_device.append(make.__name__)
            return make(*args, device=device, **kw)

        return made

    runs = []
    for n, start in ((16, 0), (128, 0), (16, 200)):
        batch = _every_family(prepared, n, start)
        crops = torch.stack([c for c, _ in batch])
        plan = BatchPlan.build([p for _, p in batch], TORCH)
        render_batch(crops, plan, TORCH, "meta")  # the tables: built once per device
        with monkeypatch.context() as m, DispatchRecord() as record:
            m.setattr(torch, "tensor", watch(torch.tensor))
            m.setattr(torch, "as_tensor", watch(torch.as_tensor))
            out = render_batch(crops, plan, TORCH, "meta")
        assert not to_device, to_device
        assert out.shape == (n, 3, 64, 64) and out.device.type == "meta"
        assert not SYNCING & set(record.ops), SYNCING & set(record.ops)
        assert record.uploads == 2, record.uploads  # the crops and the plan
        runs.append(record.ops)
    assert runs[0] == runs[1] == runs[2]


@pytest.mark.unit
def test_erasing_noise_is_standard_normal_and_a_function_of_the_key():
    a = hash_normal(7, (3, 64, 64), "cpu")
    assert torch.equal(a, hash_normal(7, (3, 64, 64), "cpu"))
    assert not torch.equal(a, hash_normal(8, (3, 64, 64), "cpu"))
    big = hash_normal(123, (200_000,), "cpu")
    assert abs(big.mean()) < 0.01 and abs(big.std() - 1) < 0.01
    assert torch.equal(hash_normal(123, (10,), "cpu"), big[:10])  # element i depends on i only


@pytest.mark.unit
def test_normalisation_is_timms_to_the_bit(photos):
    """The lookup table gives timm's ToTensor + Normalize floats exactly."""
    from torchvision import transforms

    policy = AugmentPolicy(input_size=64, renderer="torch", re_prob=0.0, auto_augment=None, color_jitter=0.0)
    crop, params = cut_crop(photos[0], "k", 1, policy)
    ours = render_batch(crop.unsqueeze(0), [params], policy)[0]
    image = Image.fromarray(crop.permute(1, 2, 0).numpy())
    theirs = transforms.Normalize(policy.mean, policy.std)(transforms.ToTensor()(image))
    assert torch.equal(ours, theirs)


@pytest.mark.unit
def test_the_crop_is_timms_random_resized_crop_and_flip(photos):
    """The libjpeg path's crop is Pillow's crop + resize + flip for the drawn box: the pil
    renderer's first two steps, byte for byte."""
    from timm.data.transforms import RandomResizedCropAndInterpolation

    for seed in range(20):
        crop, p = cut_crop(photos[seed % 2], "k", seed, TORCH)
        top, left, h, w = p.box
        rrc = RandomResizedCropAndInterpolation(64, interpolation="bicubic")
        rrc.get_params = lambda *a, box=p.box: box  # timm's transform, our box
        theirs = rrc(photos[seed % 2])
        if p.flip:
            theirs = theirs.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        assert torch.equal(crop, to_uint8_chw(theirs)), seed


@pytest.mark.unit
def test_the_device_decode_path_cuts_and_resizes_with_pillows_arithmetic(photos):
    """The nvJPEG layout (JPEG bytes to the device, decoded there in one batch, then cut, resized
    and flipped there), run on the CPU, whose batched decoder is libjpeg like Pillow's: each crop
    is Pillow's decode, cut and two-pass resize, flipped."""
    jpegs = [_jpeg(photos[i % 2].rotate(7 * i)) for i in range(6)]
    items = [draw_for_device_decode(j, f"k{i}", i, NVJPEG) for i, j in enumerate(jpegs)]
    assert all(isinstance(data, bytes) for data, _ in items)
    decoded = decode_on_device(jpegs, torch.device("cpu"))
    for (data, p), image in zip(items, decoded):
        ours = crop_tensor(image, p, NVJPEG)
        top, left, h, w = p.box
        region = Image.open(io.BytesIO(data)).convert("RGB").crop((left, top, left + w, top + h))
        theirs = torch.from_numpy(_pillow_two_pass(region, 64, "bicubic").copy()).permute(2, 0, 1)
        assert torch.equal(ours, theirs.flip(-1) if p.flip else theirs)
    huge = io.BytesIO()
    Image.new("RGB", (9000, 8000)).save(huge, format="JPEG", quality=10)
    with pytest.raises(ValueError, match="too large"):
        draw_for_device_decode(huge.getvalue(), "huge", 0, NVJPEG)


@pytest.mark.unit
def test_an_nvjpeg_policy_without_cuda_is_a_clear_error(photos, demo_shards):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA: nvJPEG runs here")
    from shards import ShardStream

    item = draw_for_device_decode(_jpeg(photos[0]), "k", 0, NVJPEG)
    with pytest.raises(ValueError, match="nvJPEG, which runs on a CUDA device, and this machine has no CUDA"):
        render_items([item], NVJPEG, "cpu")
    with pytest.raises(ValueError, match="nvJPEG, which runs on a CUDA device"):
        augment(photos[0], "k", 0, NVJPEG)
    with pytest.raises(ValueError, match="render_on_device=True"):
        ShardStream(demo_shards, "train", NVJPEG, 16)


@pytest.mark.unit
def test_crops_in_a_batch_with_jpegs_are_the_crops_alone(photos):
    """A batch mixing crops cut in the workers and JPEGs cut on the device: each crop is what it is
    alone (the CPU stands in for the device; its decoder is libjpeg)."""
    policy = AugmentPolicy(input_size=48, renderer="torch")
    jpeg = _jpeg(photos[1])
    cut = cut_crop(photos[0], "a", 3, policy)
    encoded = draw_for_device_decode(jpeg, "b", 4, policy)
    both = crops_on_device([cut, encoded], policy, "cpu")
    assert torch.equal(both[0], cut[0])
    assert torch.equal(both[1], crops_on_device([encoded], policy, "cpu")[0])
    together = randaugment(both, [cut[1], encoded[1]], policy)
    assert torch.equal(together[1], randaugment(both[1:], [encoded[1]], policy)[0])


CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device here: CPU vs CUDA is checked on a GPU")


@CUDA
def test_cuda_renders_the_cpus_bytes(photos):
    """The same uint8 crops after RandAugment, and the same normalised floats, on CUDA as on the CPU."""
    policy = AugmentPolicy(input_size=96, renderer="torch")
    prepared = [cut_crop(photos[i % 2], f"k{i}", i, policy) for i in range(120)]
    crops, params = zip(*prepared)
    crops, params = torch.stack(crops), list(params)
    assert {n for p in params for n, _ in p.ops} == set(INCREASING_OPS)
    assert torch.equal(randaugment(crops.cuda(), params, policy).cpu(), randaugment(crops, params, policy))
    gpu = render_batch(crops, params, policy, "cuda").cpu()
    assert torch.equal(gpu, render_batch(crops, params, policy, "cpu"))
    assert torch.equal(render_batch(crops, params, policy, "cuda").cpu(), gpu)
    for method in ("gather", "matmul"):
        assert torch.equal(resize_u8(crops[0].cuda(), 57, "bicubic", method).cpu(), resize_u8(crops[0], 57, "bicubic"))


@CUDA
def test_nvjpeg_crops_do_not_depend_on_their_batch(photos):
    jpegs = [_jpeg(photos[i % 2].rotate(5 * i)) for i in range(8)]
    items = [draw_for_device_decode(j, f"k{i}", i, NVJPEG) for i, j in enumerate(jpegs)]
    batch = render_items(items, NVJPEG, "cuda").cpu()
    assert torch.equal(render_items(items, NVJPEG, "cuda").cpu(), batch)
    for i in (0, 5):
        assert torch.equal(render_items([items[i]], NVJPEG, "cuda").cpu()[0], batch[i])


@pytest.mark.unit
def test_the_posterize_fix_stays_in_our_transform(photos):
    """Pillow 13 refuses timm's 0-bit posterize; our transform answers it with a black image (as
    Pillow < 13 did), and timm's own op table, which the user's code may use, is left as it is."""
    from timm.data import auto_augment

    from shards.augment import posterize_any_bits, train_transform

    before = dict(auto_augment.NAME_TO_OP)
    transform = train_transform(AugmentPolicy())
    assert (
        auto_augment.NAME_TO_OP == before and auto_augment.NAME_TO_OP["PosterizeIncreasing"] is not posterize_any_bits
    )
    ops = [op for stage in transform.transforms for op in getattr(stage, "ops", ())]
    posterize = [op for op in ops if op.name == "PosterizeIncreasing"]
    assert posterize and all(op.aug_fn is posterize_any_bits for op in posterize)
    assert not np.asarray(posterize_any_bits(photos[0], 0)).any()


@pytest.mark.unit
def test_an_image_the_device_cannot_decode_is_named_never_decoded_by_pillow(photos, monkeypatch):
    """A JPEG the device's decoder refuses (nvJPEG refuses a CMYK JPEG that Pillow decodes): the
    batch stops with an error naming the image, whichever decoder could have decoded it; under the
    nvjpeg decoder a crop is never made of another decoder's pixels. (It fell back to Pillow's
    pixels, under the labels' nvJPEG fingerprint.) The CPU stands in for the device."""
    import shards.device_decode as render

    refused = _jpeg(photos[1], quality=50)
    decode = render.decode_on_device

    def device_decoder(datas, device):
        if refused in datas:
            raise RuntimeError("nvjpegDecode failed: unsupported JPEG (stand-in)")
        return decode(datas, device)

    monkeypatch.setattr(render, "decode_on_device", device_decoder)
    items = [
        draw_for_device_decode(_jpeg(photos[0]), "good", 0, TORCH),
        draw_for_device_decode(refused, "cmyk/0001", 1, TORCH),
    ]
    with pytest.raises(render.DeviceDecodeError, match="cannot decode image 'cmyk/0001'") as e:
        crops_on_device(items, TORCH, "cpu", keys=["good", "cmyk/0001"])
    assert e.value.index == 1 and "no image is decoded by another" in str(e.value)


@pytest.mark.unit
def test_the_device_decoder_is_called_as_torchcodec_documents(monkeypatch):
    """TorchCodec 0.17's `decoders.decode_jpeg(source, *, mode="RGB", output_dtype, device)`: a batch
    is a list of sources (1-D uint8 tensors on the CPU, even for CUDA), and a list comes back. A
    stand-in with that signature takes our call, and the fingerprint names TorchCodec as the decoder."""
    import inspect
    import sys
    import types

    import shards.device_decode as render
    from shards.fingerprint import decoder_backend

    calls = []

    def decode_jpeg(source, *, mode="RGB", output_dtype=torch.uint8, device="cpu"):
        assert isinstance(source, list) and all(isinstance(t, torch.Tensor) for t in source)
        assert all(t.dtype == torch.uint8 and t.dim() == 1 and t.device.type == "cpu" for t in source)
        calls.append((len(source), mode, str(device)))
        return [torch.zeros(3, 4, 5, dtype=torch.uint8) for _ in source]

    module = types.ModuleType("torchcodec")
    module.__spec__ = importlib_spec("torchcodec")
    decoders = types.ModuleType("torchcodec.decoders")
    decoders.decode_jpeg = decode_jpeg
    module.decoders = decoders
    monkeypatch.setitem(sys.modules, "torchcodec", module)
    monkeypatch.setitem(sys.modules, "torchcodec.decoders", decoders)
    monkeypatch.setattr(render, "device_decoder_library", lambda: "torchcodec")
    assert list(inspect.signature(decode_jpeg).parameters)[0] == "source"
    out = render.decode_on_device([b"\xff\xd8\xffa", b"\xff\xd8\xffb"], torch.device("cpu"))
    assert calls == [(2, "RGB", "cpu")] and isinstance(out, list) and len(out) == 2
    assert decoder_backend(NVJPEG, torch.device("cpu"))["library"].startswith("torchcodec")
    assert decoder_backend(TORCH, torch.device("cpu"))["library"].startswith("pillow")


def importlib_spec(name: str):
    import importlib.machinery

    return importlib.machinery.ModuleSpec(name, None)


@pytest.mark.unit
def test_the_device_decode_path_has_no_host_sync_and_builds_its_tables_once(photos, monkeypatch):
    """The nvJPEG path (JPEG bytes decoded on the device, cut and resized there) on the meta device,
    the decode replaced by its output: no sync-prone operation, and after the first batch of a
    shape no copy from the host at all (its resize tables are built once per shape and kept: they
    were uploaded with a blocking copy in every pass, about 4 syncs a crop); crops of one size are
    resized together, so a batch of 16 such crops launches what a batch of 2 does."""
    import shards.device_decode as render

    policy = AugmentPolicy(input_size=48, renderer="torch", scale=(1.0, 1.0), ratio=(1.0, 1.0))
    jpeg = _jpeg(photos[0].crop((0, 0, 120, 120)))  # square: every crop the whole image, one size
    decoded = decode_on_device([jpeg], torch.device("cpu"))[0].to("meta")  # what the device's decoder gives
    monkeypatch.setattr(render, "decode_on_device", lambda datas, device: [decoded for _ in datas])

    runs = {}
    for n in (2, 16):
        items = [draw_for_device_decode(jpeg, f"k{i}", i, policy) for i in range(n)]
        items = [(data, p.__class__(**{**p.__dict__, "flip": False})) for data, p in items]  # the same work per crop
        render.crops_on_device(items, policy, "meta")  # a first batch of this shape builds the tables
        with DispatchRecord() as record:
            out = render.crops_on_device(items, policy, "meta")
        assert out.shape == (n, 3, 48, 48) and out.device.type == "meta"
        assert not SYNCING & set(record.ops), SYNCING & set(record.ops)
        assert record.uploads == 0, record.uploads
        runs[n] = [op for op in record.ops if op not in ("stack", "select", "slice", "alias", "detach")]
    assert runs[2] == runs[16]


@pytest.mark.unit
@pytest.mark.parametrize("n", [1, 2, 3])
def test_a_small_batch_with_empty_op_groups_renders_each_crop_as_alone(photos, n):
    """A batch too small to draw every family (what a small CUDA batch takes): rendered the device's
    way (`fixed`: every family launched, on no rows where none drew it) each crop is the crop
    rendered alone, so empty groups are compared too."""
    prepared = [cut_crop(photos[i % 2], f"small{i}", 40 + i, TORCH) for i in range(n)]
    crops, params = torch.stack([c for c, _ in prepared]), [p for _, p in prepared]
    kinds = {name for p in params for name, _ in p.ops}
    assert len(kinds) < len(INCREASING_OPS)  # some family of some layer is empty
    together = render_batch(crops, params, TORCH, "cpu", every_family=True)
    for i in range(n):
        assert torch.equal(
            together[i], render_batch(crops[i : i + 1], params[i : i + 1], TORCH, "cpu", every_family=False)[0]
        )
