"""The benchmarks, bounded: they run, and what they measure holds together."""

from __future__ import annotations

import json

import pytest
from conftest import PY, ROOT, last_json, run_step

BENCH = ROOT / "bench"


@pytest.mark.slow
def test_bench_scale_measures_two_sizes_and_plans_from_them(redis_server, tmp_path):
    """bench/scale.py at two small sizes: the index opens in milliseconds, serve becomes ready,
    every measured part reports, and the plan follows."""
    argv = [
        PY, BENCH / "scale.py", "--sizes", "300,600", "--shard-size", "100", "--precompute-images", "100",
        "--loader-batches", "3", "--seconds", "0.3", "--workdir", tmp_path, "--redis-url", redis_server.url,
    ]  # fmt: skip
    s = last_json(run_step(argv, "bench/scale.py at 300 and 600 images", 82, cwd=BENCH).stdout)
    small, large = s["sizes"]
    assert (small["images"], large["images"]) == (300, 600)
    for row in s["sizes"]:
        assert 0 < row["index"]["open_s"] < 0.1
        assert 40 < row["index"]["bytes_per_image"] < 120
        assert row["serve"]["ready_s"] > 0 and len(row["serve"]["http_workers"]) == 2
        assert row["loader"]["images_per_s_per_core"] > 0 and row["store_900"]["bytes_per_label"] > 2
    assert large["index"]["bytes_per_image"] == pytest.approx(small["index"]["bytes_per_image"], rel=0.2)
    assert s["precompute"]["labels"] == 100 and s["cost_split"]["teacher_ms"] > 0
    plan = s["plan"]
    assert plan["labels_deit_schedule"] == 300 * 1_281_168 and plan["labels_all_schedule"] == 900 * 1_281_167
    assert plan["serve_ready_s_with_index"] > 0 and plan["index_mb"] > 0


def test_bench_store_slot_read_reads_the_same_labels_three_ways(redis_server):
    """bench/store.py --backends slot_read: MGET, the Lua slot read and GETRANGE agree (the bench
    asserts every label it reads) and the wire cost per label is what each way sends."""
    argv = [PY, BENCH / "store.py", "--backends", "slot_read", "--images", "300", "--seconds", "0.2"]
    argv += ["--redis-url", redis_server.url]
    out = run_step(argv, "bench/store.py slot_read", 6, cwd=BENCH).stdout.strip().splitlines()
    rows = [last_json(line) for line in out]
    assert [r["seeds"] for r in rows] == [300, 900]
    for r in rows:
        assert r["mget"]["wire_bytes_per_label"] == 2 * r["seeds"] and r["lua"]["wire_bytes_per_label"] == 2
        assert min(r[k]["labels_per_s"] for k in ("mget", "lua", "getrange")) > 0


def test_bench_render_ops_compares_every_part_of_the_render():
    """bench/render_ops.py (bench/gpu.py's CPU-vs-CUDA part) run against the CPU itself: every
    part reports, and all differences are 0 (on a GPU the same rows compare CUDA with the CPU)."""
    from shards.policy import INCREASING_OPS

    argv = [PY, BENCH / "render_ops.py", "--device", "cpu", "--crops", "8", "--size", "64", "--boxes", "4"]
    s = last_json(run_step(argv, "bench/render_ops.py on the CPU", 8, cwd=BENCH).stdout)
    rows = ["resize_gather", "resize_matmul", *INCREASING_OPS, "normalize_and_erase", "render_batch"]
    assert all(s[r] == {"max": 0.0, "differ": 0.0} for r in rows), s
    assert s["all_zero"] is True and s["crops"] == 8


_LEAVE_A_CHILD = """
import json, subprocess, sys, time
quiet = {"stdout": subprocess.DEVNULL, "stderr": subprocess.DEVNULL}
child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(300)"], **quiet)
open(sys.argv[1], "w").write(str(child.pid))
print(json.dumps({"left": child.pid}), flush=True)
if sys.argv[2] == "hang":
    time.sleep(300)
"""


def test_a_gpu_bench_part_leaves_no_process_behind_when_it_ends_or_times_out(tmp_path):
    """bench/gpu.py runs each part in its own session: a part's children (a bench's `serve`, its
    engine and workers) go with it, whether the part exits or is stopped at its time limit (only
    the part's own process was killed once, and five `serve`s stayed up for hours)."""
    import sys

    import psutil

    sys.path.insert(0, str(BENCH))
    from gpu import Run

    def alive(pid: int) -> bool:  # a few seconds for the kill to land on a busy machine
        try:
            proc = psutil.Process(pid)
            psutil.wait_procs([proc], timeout=5)
            return proc.status() != psutil.STATUS_ZOMBIE
        except psutil.NoSuchProcess:
            return False

    script = tmp_path / "part.py"
    script.write_text(_LEAVE_A_CHILD)
    run = Run(budget_s=60)
    for how in ("exit", "hang"):
        pid_file = tmp_path / f"{how}.pid"
        run.part(how, [PY, str(script), str(pid_file), how], limit=10)
        pid = int(pid_file.read_text())
        assert not alive(pid), f"the {how} part's child {pid} outlived it"
        if how == "exit":
            assert run.out["exit"]["left"] == pid and "exit" not in run.failures
    assert run.failures["hang"] == "timed out after 10 s" and "hang" not in run.out


@pytest.mark.slow
def test_bench_gpu_runs_every_part_on_a_cpu():
    """bench/gpu.py's orchestration (`--device cpu --smoke`: tiny sizes, figures meaningless), so a
    lent GPU's minutes are not lost to a broken script: every part runs and prints its line as it
    ends, and the summary states every target, met or not."""
    argv = [PY, BENCH / "gpu.py", "--device", "cpu", "--smoke"]
    out = run_step(argv, "bench/gpu.py --smoke on a CPU", 210, cwd=BENCH).stdout
    lines = [json.loads(line) for line in out.splitlines()]
    parts = [line["part"] for line in lines]
    assert parts == ["start", "data", "render_ops", "render", "models", "teacher_torch", "teacher_pil",
                     "train_torch_w12", "train_torch_w4", "train_pil_w12", "summary"]  # fmt: skip
    summary = lines[-1]
    assert summary["failures"] == {}
    assert all(t["value"] is not None and t["met"] in (True, False) for t in summary["targets"].values())
    targets = summary["targets"]
    assert targets["render_ops_all_zero"]["met"] and targets["device_renders_the_cpus_crops"]["met"]


@pytest.mark.slow
def test_bench_service_cpu_splits_a_labels_cpu_by_process():
    """bench/service_cpu.py, bounded: every process of precompute and of the service's miss path
    is found and spent CPU on the labels, and the totals are the sums of their parts."""
    argv = [PY, BENCH / "service_cpu.py", "--input-size", "32", "--items-per-request", "8", "--clients", "2",
            "--requests", "20", "--seeds-large", "2"]  # fmt: skip
    s = last_json(run_step(argv, "bench/service_cpu.py, 20 requests", 150, cwd=BENCH).stdout)
    pre, svc = s["cpu_s_per_1k_labels"]["precompute"], s["cpu_s_per_1k_labels"]["service"]
    assert pre["process"] > 0 and pre["workers"] > 0 and pre["total"] == pytest.approx(pre["process"] + pre["workers"])
    parts = [svc[k] for k in ("http_worker", "engine", "workers", "clients")]
    assert all(p > 0 for p in parts) and svc["total"] == pytest.approx(sum(parts), abs=1e-3)
    assert svc["labels_per_s"] > 0 and 0 <= svc["idle_share"] <= 1


@pytest.mark.slow
def test_bench_worker_task_times_a_task_and_its_parts():
    """bench/worker_task.py, one pass each: every figure is measured, and a task of four seeds an
    image costs less a label than one of one seed (the image is read and decoded once for four)."""
    argv = [PY, BENCH / "worker_task.py", "--repeats", "1"]
    s = last_json(run_step(argv, "bench/worker_task.py, one pass", 120, cwd=BENCH).stdout)
    times = ["task_1_seed_us_per_label", "image_by_image_1_seed_us_per_label", "task_4_seeds_us_per_label",
             "read_us_per_image", "decode_us_per_image", "crop_us_per_label"]  # fmt: skip
    assert all(s[k] > 0 for k in times), s
    assert s["task_4_seeds_us_per_label"] < s["task_1_seed_us_per_label"]
    assert s["task_vs_image_by_image"] == pytest.approx(
        s["image_by_image_1_seed_us_per_label"] / s["task_1_seed_us_per_label"], abs=1e-3
    )


def test_deit_compare_keeps_one_teacher_files_runs_in_an_out(tmp_path):
    """bench/deit_compare.py counts a run for the recipe it ran, the teacher file included: an OUT
    whose labels and converted teacher came from one file refuses another (its runs would be
    labelled by the first and pooled with them), and the same file's bytes name it wherever it is."""
    import sys

    sys.path.insert(0, str(BENCH))
    from deit_compare import claim_teacher, teacher_id

    first, copy, other = tmp_path / "a.safetensors", tmp_path / "b.safetensors", tmp_path / "c.safetensors"
    first.write_bytes(b"weights" * 1000)
    copy.write_bytes(first.read_bytes())
    other.write_bytes(b"weights" * 999 + b"WEIGHTS")
    assert teacher_id(first) == teacher_id(copy) != teacher_id(other)
    out = tmp_path / "out"
    out.mkdir()
    claim_teacher(out, first, teacher_id(first))
    claim_teacher(out, copy, teacher_id(copy))  # the same bytes under another name: the same teacher
    with pytest.raises(SystemExit, match="give another --out"):
        claim_teacher(out, other, teacher_id(other))
    assert (out / "teacher.id").read_text().strip() == teacher_id(first)
