import os
import signal
import subprocess
import textwrap
import time

import numpy as np
import pytest
from conftest import PY, RedisServer, communicate, last_json, require_redis_server, run_cli, wait_exit

from labels.namespace import Namespace, NamespaceMismatch, RecordFormat
from labels.store import StoreUnavailable, open_existing, open_store
from teacher_service.precompute import parse_seeds

NS = Namespace("regnety_002@abc123", "policy01", RecordFormat(), num_classes=10)
NS5 = Namespace("regnety_002@abc123", "policy01", RecordFormat(topk=5, probs=True), num_classes=10)


def expected(key: str, seed: int, n=10) -> int:
    return (sum(key.encode()) * 31 + seed * 7) % n


def test_missing_vs_present_and_roundtrip(store_url):
    with open_store(store_url, NS) as st:
        keys = ["a/1", "a/1", "b/2", "c/3"]
        st.put(keys[:3], [0, 5, 2], [3, 0, 9])  # class 0 must stay distinguishable from missing
        got = st.get(keys + ["a/1", "a/1"], [0, 5, 2, 0, 1, 1_000_000])
        assert got.present.tolist() == [True, True, True, False, False, False]
        assert got.top1[:3].tolist() == [3, 0, 9]
        assert (got.top1[~got.present] == -1).all()
        assert st.num_keys() == 2


def test_a_store_of_several_policies_opens_the_runs_own_without_a_namespace(store_url):
    """A trainer names no namespace: the only one, else the only one of its policy; two of the
    same policy, or none of it, are refused with every namespace and its policy listed."""
    other = Namespace("regnety_002@abc123", "policy02", RecordFormat(), num_classes=10)
    with open_store(store_url, NS):
        pass
    with open_existing(store_url) as st:  # the only one
        assert st.namespace == NS
    with open_store(store_url, other):
        pass
    with open_existing(store_url, policy_id="policy02") as st:
        assert st.namespace == other
    with open_existing(store_url, NS.id[:8], policy_id="policy02") as st:  # a named one wins
        assert st.namespace == NS
    with pytest.raises(Exception, match=r"matching \* \(have: .*\); pass --namespace") as refused:
        open_existing(store_url)
    assert f"{NS.id} (policy policy01)" in str(refused.value) and f"{other.id} (policy policy02)" in str(refused.value)
    with pytest.raises(Exception, match="need exactly one namespace matching policy policy02"):
        with open_store(store_url, Namespace("regnety_002@fff", "policy02", RecordFormat(), num_classes=10)):
            pass
        open_existing(store_url, policy_id="policy02")


def test_idempotent_rewrites_and_bulk(store_url):
    rng = np.random.default_rng(1)
    keys = [f"k/{i}" for i in range(50) for _ in range(40)]
    seeds = [s for _ in range(50) for s in range(40)]
    labels = np.array([expected(k, s) for k, s in zip(keys, seeds)])
    with open_store(store_url, NS) as st:
        st.put(keys, seeds, labels)
        st.put(keys, seeds, labels)
        idx = rng.permutation(len(keys))[:256]
        got = st.get([keys[i] for i in idx], [seeds[i] for i in idx])
        assert got.present.all() and (got.top1 == labels[idx]).all()
        assert st.num_keys() == 50


def test_topk_records_with_probabilities(store_url):
    classes = np.array([[3, 1, 4, 0, 2], [9, 8, 7, 6, 5]])
    probs = np.array([[0.5, 0.2, 0.1, 0.1, 0.05], [0.9, 0.05, 0.02, 0.01, 0.01]])
    with open_store(store_url, NS5) as st:
        st.put(["x", "y"], [7, 0], classes, probs)
        got = st.get(["x", "y", "x"], [7, 0, 6])
        assert got.present.tolist() == [True, True, False]
        assert (got.classes[:2] == classes).all()
        np.testing.assert_allclose(got.probs[:2], probs, atol=1e-3)
        with pytest.raises(ValueError):
            st.put(["x"], [1], classes[:1])  # probabilities required by the format


def test_namespace_mismatch_is_an_error(store_url):
    open_store(store_url, NS).close()
    other_classes = Namespace(NS.teacher_id, NS.policy_id, NS.format, num_classes=12)
    assert other_classes.id == NS.id
    with pytest.raises(NamespaceMismatch):
        open_store(store_url, other_classes)
    # a different teacher is a different namespace: its labels are never the first one's
    other = Namespace("regnety_002@fff", NS.policy_id, NS.format, num_classes=10)
    with open_store(store_url, NS) as a, open_store(store_url, other) as b:
        a.put(["k"], [0], [4])
        assert not b.get(["k"], [0]).present[0]
        assert a.get(["k"], [0]).top1[0] == 4


def test_drop_deletes_one_namespace_only(store_url):
    other = Namespace("regnety_002@fff", NS.policy_id, NS.format, num_classes=10)
    with open_store(store_url, NS) as a, open_store(store_url, other) as b:
        a.put(["k/1", "k/2", "k/3"], [0, 1, 2], [1, 2, 3])
        b.put(["k/1"], [0], [5])
        assert a.drop() == 3
        assert b.get(["k/1"], [0]).top1[0] == 5  # the other namespace keeps its labels
    from labels.store import list_namespaces

    assert [m["id"] for m in list_namespaces(store_url)] == [other.id]
    with pytest.raises(Exception, match="not found"):
        open_store(store_url, NS, create=False)


def test_coverage_records_persist_per_namespace_and_go_with_it(store_url):
    """What precompute finished (a schedule, a seed range) is recorded with the namespace, read
    back by another opener, kept once however often it is recorded, and dropped with it."""
    deit = {"repeat_mode": "deit", "repeats": 3, "epochs": 300, "node_rank": 0, "num_nodes": 1}
    with open_store(store_url, NS) as st:
        assert st.coverage() == []
        st.record_coverage(deit)
        st.record_coverage({"seeds": 40, "node_rank": 1, "num_nodes": 2})
        st.record_coverage(deit)
    with open_existing(store_url, NS.id) as st:
        assert sorted(st.coverage(), key=len) == [{"seeds": 40, "node_rank": 1, "num_nodes": 2}, deit]
        assert st.namespace == NS  # the records do not change the namespace's identity
        st.drop()
    with open_store(store_url, NS) as st:
        assert st.coverage() == []
        st.drop()


@pytest.mark.unit
def test_a_full_file_store_says_so_and_keeps_what_it_had(tmp_path):
    """Reliability case 8: on a full disk SQLite rolls back by itself; the store must report the
    full disk (not the ROLLBACK that follows) and keep every earlier commit. The disk is made
    "full" with SQLite's own page limit, which raises the same SQLITE_FULL."""
    from labels.store import StoreError

    with open_store(str(tmp_path / "full.db"), NS, seed_limit=5000) as st:
        st.put(["keep/0"], [0], [7])
        db = st.conn.get()
        pages = db.execute("PRAGMA page_count").fetchone()[0]
        db.execute(f"PRAGMA max_page_count = {pages + 2}")
        rng = np.random.default_rng(0)
        with pytest.raises(StoreError, match="full") as info:
            for i in range(200):  # rows of incompressible labels until the limit
                st.put([f"big/{i}"] * 4000, list(range(4000)), rng.integers(0, 10, 4000))
        assert "rollback" not in str(info.value).lower()
        assert st.get(["keep/0"], [0]).top1.tolist() == [7]
        db.execute("PRAGMA max_page_count = 1073741823")
        st.put(["after/0"], [0], [3])  # and it writes again once there is room
        assert st.get(["after/0"], [0]).top1.tolist() == [3]


def test_bad_inputs_rejected(store_url):
    with open_store(store_url, NS) as st:
        with pytest.raises(ValueError):
            st.put(["k"], [-1], [1])
        with pytest.raises(ValueError):
            st.put(["k"], [0], [10])  # >= num_classes
        with pytest.raises(ValueError):
            st.get(["k", "j"], [0])
    with pytest.raises(ValueError):
        parse_seeds("5:2")
    assert parse_seeds("0:300") == range(0, 300)


WRITER = textwrap.dedent("""
    import glob, sys, time
    from labels.namespace import Namespace, RecordFormat
    from labels.store import open_store
    sys.path.insert(0, {tests!r})
    from test_store import expected
    ns = Namespace("regnety_002@abc123", "policy01", RecordFormat(), num_classes=10)
    st = open_store({url!r}, ns)
    while len(glob.glob({ready!r} + "*")) < {readers}:  # every reader reading before the first write
        time.sleep(0.01)
    for b in range({batches}):
        keys = [f"b{{b}}/{{i}}" for i in range(20) for s in range(100)]
        seeds = [s for i in range(20) for s in range(100)]
        st.put(keys, seeds, [expected(k, s) for k, s in zip(keys, seeds)])
        print(b, flush=True)
        time.sleep({pause})
    st.put(["done"], [0], [1])
""")

READER = textwrap.dedent("""
    import sys, random
    from labels.namespace import Namespace, RecordFormat
    from labels.store import open_store
    sys.path.insert(0, {tests!r})
    from test_store import expected
    ns = Namespace("regnety_002@abc123", "policy01", RecordFormat(), num_classes=10)
    st = open_store({url!r}, ns)
    rng = random.Random({seed})
    open({ready!r} + str({seed}), "w").close()
    seen = 0
    while not st.get(["done"], [0]).present[0]:  # until the writer has finished
        keys = [f"b{{rng.randrange({batches})}}/{{rng.randrange(20)}}" for _ in range(64)]
        seeds = [rng.randrange(100) for _ in keys]
        got = st.get(keys, seeds)
        for k, s, p, c in zip(keys, seeds, got.present, got.top1):
            if p:
                assert c == expected(k, s), (k, s, c)
                seen += 1
    print(seen)
""")


@pytest.mark.parametrize("backend", ["file", "redis"])
def test_concurrent_writer_and_readers(backend, tmp_path):
    """Two reader processes read while a writer writes: they see labels appear (every one right)."""
    store_url, srv = str(tmp_path / "labels.db"), None
    if backend == "redis":
        require_redis_server()
        srv = RedisServer(tmp_path).start()
        store_url = srv.url
    tests, ready = os.path.dirname(__file__), str(tmp_path / "ready")
    open_store(store_url, NS).close()
    kw = dict(tests=tests, url=store_url, batches=40, ready=ready)
    writer = subprocess.Popen([PY, "-c", WRITER.format(**kw, pause=0.01, readers=2)], stdout=subprocess.PIPE, text=True)
    readers = [
        subprocess.Popen(
            [PY, "-c", READER.format(**kw, seed=i)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        for i in range(2)
    ]
    try:
        for r in readers:
            out, err = communicate(r, "store reader: reads until the writer is done", 6)
            assert r.returncode == 0, err[-2000:]
            assert int(out) > 0  # labels appeared while it read
        assert wait_exit(writer, "store writer: 40 batches", 4) == 0
        with open_store(store_url, NS) as st:
            assert st.num_keys() == 40 * 20 + 1  # and "done"
    finally:
        if srv is not None:
            srv.kill()


def test_file_store_survives_sigkill_of_writer(tmp_path):
    url = str(tmp_path / "labels.db")
    tests = os.path.dirname(__file__)
    writer = subprocess.Popen(
        [PY, "-c", WRITER.format(tests=tests, url=url, batches=10_000, pause=0, ready=str(tmp_path / "r"), readers=0)],
        stdout=subprocess.PIPE,
        text=True,
    )
    done = 0
    while done < 15:
        line = writer.stdout.readline()
        assert line, "writer died"
        done = int(line) + 1
    writer.send_signal(signal.SIGKILL)
    writer.wait()
    with open_store(url, NS) as st:
        batches = st.num_keys() // 20
        assert batches >= done
        for b in range(batches + 1):  # every batch all-or-nothing, every label right
            keys = [f"b{b}/{i}" for i in range(20) for s in range(100)]
            seeds = [s for i in range(20) for s in range(100)]
            got = st.get(keys, seeds)
            assert got.present.all() or not got.present.any()
            if got.present.any():
                assert got.top1.tolist() == [expected(k, s) for k, s in zip(keys, seeds)]


def test_redis_killed_gives_clear_error_then_recovers(persistent_redis):
    url = persistent_redis.url
    st = open_store(url, NS)
    st.put(["a", "b"], [0, 1], [1, 2])
    persistent_redis.kill()
    t0 = time.time()
    with pytest.raises(StoreUnavailable, match="unavailable"):
        st.get(["a"], [0])
    with pytest.raises(StoreUnavailable):
        st.put(["c"], [0], [3])
    assert time.time() - t0 < 30  # bounded retries
    persistent_redis.start()
    got = st.get(["a", "b", "c"], [0, 1, 0])
    assert got.present.tolist() == [True, True, False]  # nothing lost; the failed put is not there
    assert got.top1[:2].tolist() == [1, 2]
    st.put(["c"], [0], [3])
    assert st.get(["c"], [0]).top1[0] == 3


def test_unreachable_redis_at_open():
    with pytest.raises(StoreUnavailable):
        open_store("redis://127.0.0.1:1/0", NS)


def test_stats_and_copy_cli(tmp_path, redis_server):
    src = str(tmp_path / "src.db")
    with open_store(src, NS) as st:
        keys = [f"k/{i}" for i in range(30) for s in range(10)]
        seeds = [s for i in range(30) for s in range(10)]
        st.put(keys, seeds, [expected(k, s) for k, s in zip(keys, seeds)])
        st.put(["k/0"], [12], [1])
    s = last_json(run_cli("teacher_service", "labels", "stats", src).stdout)
    ns = s["namespaces"][0]
    assert ns["images"] == 30 and ns["labels"] == 301
    assert ns["coverage"] == [[0, 10, 30], [12, 13, 1]]
    c = last_json(run_cli("teacher_service", "labels", "copy", src, redis_server.url).stdout)
    assert c["labels"] == 301 and c["images"] == 30
    with open_existing(redis_server.url) as dst:
        got = dst.get(keys + ["k/0"], seeds + [12])
        assert got.present.all()
        assert got.top1[:-1].tolist() == [expected(k, s) for k, s in zip(keys, seeds)]
    r = last_json(run_cli("teacher_service", "labels", "stats", redis_server.url).stdout)
    assert r["namespaces"][0]["labels"] == 301
    bad = run_cli("teacher_service", "labels", "stats", "ftp://x", check=False)
    assert bad.returncode == 2 and "unsupported store URL" in bad.stderr


def test_seeds_are_bounded_by_the_namespace(store_url):
    from labels.store import DEFAULT_SEED_LIMIT, SeedOutOfRange

    with open_store(store_url, NS) as st:
        assert st.seed_limit == DEFAULT_SEED_LIMIT
        st.put(["k"], [DEFAULT_SEED_LIMIT - 1], [3])
        with pytest.raises(SeedOutOfRange, match="precompute with --seeds 0:5001"):
            st.put(["k"], [5000], [3])  # would grow the row past what the namespace serves
        got = st.get(["k", "k"], [DEFAULT_SEED_LIMIT - 1, 5000])
        assert got.present.tolist() == [True, False]  # beyond the range: missing, never fetched
    with open_store(store_url, NS, seed_limit=6000) as wider, open_store(store_url, NS, seed_limit=10) as st:
        assert wider.seed_limit == st.seed_limit == 6000  # extended by the first, never lowered by the second
        st.put(["k"], [5000], [4])
        assert wider.get(["k"], [5000]).top1[0] == 4


def test_a_long_row_does_not_inflate_a_batch(store_url):
    """One image with a label at the last seed (a 2 MB row) beside 255 short rows: a get of the
    batch allocates about the rows it fetched, not 256 rows padded to the longest."""
    import tracemalloc

    from labels.namespace import MAX_SEED

    with open_store(store_url, NS, seed_limit=MAX_SEED + 1) as st:
        keys = [f"k/{i}" for i in range(256)]
        st.put(keys, [0] * 256, [1] * 256)
        st.put(["k/0"], [MAX_SEED], [2])
        tracemalloc.start()
        got = st.get(keys, [MAX_SEED] + [0] * 255)
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        assert got.present.all() and got.top1[0] == 2
        assert peak < 16 * 2**20, peak  # padded, it was 256 x 2 MB = 512 MB


def test_an_evicted_namespace_record_is_restored_never_smaller(redis_server, caplog):
    """Reliability case 2: Redis evicted the namespace's records (allkeys-lru). The store warns that
    a label store needs noeviction; a small precompute that recreates the namespace does not
    shrink its seed range below a service's 1024; every write restores at least the writer's range."""
    import logging

    import redis as redis_py

    r = redis_py.Redis(port=redis_server.port)
    r.config_set("maxmemory-policy", "allkeys-lru")
    with caplog.at_level(logging.WARNING), open_store(redis_server.url, NS) as service:
        assert service.seed_limit == 1024
        service.put(["a"], [1023], [1])
    assert "needs noeviction" in caplog.text
    r.delete(f"dl:{{{NS.id}}}:meta", f"dl:{{{NS.id}}}:seeds")  # what eviction did
    from labels.admin import stats

    lost = stats(redis_server.url, progress=False)
    assert lost["namespaces"] == [] and lost["orphaned_rows"] == {NS.id: 1}  # found, with how to restore it
    with open_store(redis_server.url, NS, seed_limit=4) as precompute:  # precompute --seeds 0:4
        assert precompute.seed_limit == 1024
    r.delete(f"dl:{{{NS.id}}}:seeds")
    with open_store(redis_server.url, NS, seed_limit=2000) as wide:
        r.set(f"dl:{{{NS.id}}}:seeds", 10)  # evicted and recreated small by someone else meanwhile
        wide.put(["b"], [5], [2])  # the write restores the writer's range
    with open_store(redis_server.url, NS, create=False) as again:
        assert again.seed_limit == 2000 and again.get(["a"], [1023]).top1[0] == 1


def test_redis_that_lost_its_data_gets_the_namespace_back(redis_server):
    """A Redis restarted without persistence keeps no metadata; the next write restores it, so the
    rows written after are never rows that no namespace describes."""
    import redis as redis_py

    from labels.store import list_namespaces

    with open_store(redis_server.url, NS, seed_limit=2000) as st:
        st.put(["a"], [0], [1])
        redis_py.Redis(port=redis_server.port).flushall()
        assert list_namespaces(redis_server.url) == []
        st.put(["b"], [1], [2])
        assert [m["id"] for m in list_namespaces(redis_server.url)] == [NS.id]
    with open_store(redis_server.url, NS, create=False) as again:
        assert again.seed_limit == 2000 and again.get(["b"], [1]).top1[0] == 2
