"""Scale-out with the real engines, on one machine: a 3-master Redis Cluster of real redis-server
processes, training as two torchrun nodes (c10d rendezvous on loopback), and precompute split
over two nodes writing into one Redis at once."""

import shutil
import subprocess
import sys

import numpy as np
import pytest
from conftest import (
    PY,
    ROOT,
    communicate,
    free_port,
    last_json,
    learned,
    precompute_argv,
    require_redis_server,
    run_precompute,
    run_step,
    student_argv,
)

from labels.store import StoreUnavailable, open_existing
from shards import Manifest, SkipCounter, iter_shard

sys.path.insert(0, str(ROOT / "bench"))
from common import LocalRedisCluster  # noqa: E402 (the benchmarks' helper: one implementation)


@pytest.fixture
def redis_cluster(tmp_path):
    require_redis_server()
    if shutil.which("redis-cli") is None:
        pytest.fail("redis-cli is required with redis-server (Debian's redis-tools)")
    cluster = LocalRedisCluster(tmp_path).start()
    yield cluster
    cluster.kill()


def run_together(argvs: list[list[str]], step: str, measured_s: float) -> list[str]:
    """Start every command at once (the machines of one job), wait for all: their stdouts."""
    procs = [subprocess.Popen(a, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for a in argvs]
    outs = []
    for i, p in enumerate(procs):
        out, err = communicate(p, f"{step} (node {i})", measured_s)
        assert p.returncode == 0, err[-3000:]
        outs.append(out)
    return outs


def train_keys(shards) -> list[str]:
    m = Manifest.load(shards)
    return [r.key for s in m.shards("train") for r in iter_shard(shards / s.name, SkipCounter())]


def test_precompute_into_a_redis_cluster_and_read_back(redis_cluster, demo_shards, tiny_teacher, tmp_path):
    s = last_json(run_precompute(demo_shards, "0:2", redis_cluster.url, tiny_teacher).stdout)
    assert s["ok"] and s["labels_computed"] == 1437 * 2
    reference = tmp_path / "one.db"  # the same labels into the embedded file store
    run_precompute(demo_shards, "0:2", reference, tiny_teacher)
    keys = train_keys(demo_shards)
    pairs_k, pairs_s = [k for k in keys for _ in range(2)], [s for _ in keys for s in range(2)]
    from student_trainer.data import StoreSource  # the trainer's path: one bulk get per batch

    source = StoreSource(redis_cluster.url, retry_for=1)
    assert source.meta()["seed_limit"] >= 2
    got = source.fetch(pairs_k, pairs_s)
    with open_existing(str(reference)) as ref:
        want = ref.get(pairs_k, pairs_s)
    assert got.present.all() and np.array_equal(got.top1, want.top1)
    # rows spread over every master (no hash tag on rows)
    import redis

    sizes = [redis.Redis(port=p).dbsize() for p, _ in redis_cluster.nodes]
    assert all(n > 100 for n in sizes), sizes
    # a master gone: a clear error, never labels that look present
    redis_cluster.kill(redis_cluster.nodes[1][0])
    with pytest.raises(StoreUnavailable, match="unavailable"):
        StoreSource(redis_cluster.url, retry_for=1).fetch(pairs_k[:512], pairs_s[:512])


@pytest.mark.slow
def test_precompute_split_over_two_nodes_at_once(redis_server, demo_shards, tiny_teacher, tmp_path):
    """Two precompute processes (--node-rank 0/1 of 2) into one Redis at the same time: the union is
    complete, nothing is computed twice, the labels are those of a one-node run."""
    argv = [
        precompute_argv(
            demo_shards, "0:2", redis_server.url, tiny_teacher, "--node-rank", rank, "--num-nodes", 2, "--workers", 1
        )  # fmt: skip
        for rank in range(2)
    ]
    summaries = [last_json(out) for out in run_together(argv, "precompute on two nodes at once", 12)]
    assert sum(s["labels_computed"] for s in summaries) == 1437 * 2  # no overlap, nothing missed
    assert all(s["labels_present"] == 0 for s in summaries)
    one = tmp_path / "one.db"
    run_precompute(demo_shards, "0:2", one, tiny_teacher)
    keys = train_keys(demo_shards)
    pairs_k, pairs_s = [k for k in keys for _ in range(2)], [s for _ in keys for s in range(2)]
    with open_existing(redis_server.url) as split, open_existing(str(one)) as ref:
        a, b = split.get(pairs_k, pairs_s), ref.get(pairs_k, pairs_s)
    assert a.present.all() and np.array_equal(a.top1, b.top1)


@pytest.mark.slow
@pytest.mark.learning
def test_training_as_two_nodes_matches_one_node(redis_server, demo_shards, tiny_teacher, tmp_path):
    """torchrun --nnodes 2 (c10d rendezvous on loopback), one process per node, labels from one
    Redis: the same steps per rank and the same accuracy as one node with two processes."""
    run_precompute(demo_shards, "0:3", redis_server.url, tiny_teacher)
    run = dict(labels="store", store=redis_server.url, epochs=3, mixup=0.0, cutmix=0.0, eval_every=3, export=False)
    common = ["-m", "student_trainer", "train", *student_argv(demo_shards, **run)]
    single = [PY, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", *common]
    one = run_step([*single, "--out", tmp_path / "one"], "torchrun: one node, 2 processes, 3 epochs", 12)
    endpoint = f"127.0.0.1:{free_port()}"
    rdzv = ["--nnodes", "2", "--nproc_per_node", "1", "--rdzv-backend", "c10d", "--rdzv-endpoint", endpoint,
            "--rdzv-id", "two-nodes"]  # fmt: skip
    argv = [
        [PY, "-m", "torch.distributed.run", *rdzv, "--node-rank", str(rank), *common, "--out", str(tmp_path / "two")]
        for rank in range(2)
    ]
    outs = run_together(argv, "torchrun: two nodes, 1 process each, 3 epochs", 15)
    a, b = last_json(one.stdout), last_json("\n".join(outs))
    assert b["world_size"] == 2 and b["steps"] == a["steps"] == 3 * 12
    assert b["labels_cached"] == a["labels_cached"] == 3 * 1437 and b["labels_missing"] == 0
    learned("|two nodes - one node| val top-1, 3 epochs", abs(b["val_top1"] - a["val_top1"]), below=3.0)
