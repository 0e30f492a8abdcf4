"""`labels import` / `export` against hostile and careless files (reliability cases of label files):
nothing a file says is written unchecked, a file that fails writes nothing, and every failure is
one `ERROR ...` line with exit code 2. In process, on both stores."""

from __future__ import annotations

import io
import json
import os
import zipfile
from pathlib import Path

import numpy as np
import pytest

from labels.files import check_file, export_namespace, import_namespace
from labels.namespace import Namespace, RecordFormat
from labels.store import open_existing, open_store
from teacher_service.__main__ import APP

NS = Namespace("regnety_002@w:0123456789abcdef", "policy0123456789", RecordFormat(), 10, "classes")
KEYS = [f"digits/{c}/{i:05d}" for c in range(3) for i in range(4)]  # 12 images, sorted


@pytest.fixture
def good(tmp_path):
    """A store holding 12 images x 3 seeds and its export: the file every case below spoils."""
    src = str(tmp_path / "src.db")
    with open_store(src, NS, seed_limit=2048) as st:
        keys, seeds = [k for k in KEYS for _ in range(3)], [s for _ in KEYS for s in range(3)]
        st.put(keys, seeds, [(i * 7) % 10 for i in range(36)])
        st.record_coverage({"seeds": 3, "node_rank": 0, "num_nodes": 1})
    path = tmp_path / "good.npz"
    export_namespace(src, path, progress=False)
    return path


def arrays(path) -> dict:
    with np.load(path, allow_pickle=False) as f:
        return {n: f[n] for n in f.files}


def spoil(path, out, header=None, **members) -> str:
    """`path`'s members, some replaced (None: dropped), the header's fields updated, written to `out`."""
    a = arrays(path)
    h = json.loads(str(a["header"]))
    h.update(header or {})
    a["header"] = np.array(json.dumps(h))
    for name, value in members.items():
        if value is None:
            a.pop(name)
        else:
            a[name] = value
    np.savez_compressed(out, **a)
    return str(out)


def imported(url) -> int:
    """Labels of NS at `url` (0 when the namespace is not there at all)."""
    from labels.files import _holds

    if not _holds(url, NS):
        return 0
    with open_existing(url, NS.id) as st:
        return int(sum(st.codec.present_mask(r).sum() for rows in st.iter_rows() for _, r in rows if r))


def cli(*argv, capsys) -> tuple[int, str]:
    code = APP.main(["labels", *map(str, argv), "--no-progress"])
    return code, capsys.readouterr().err


def test_the_good_file_round_trips(good, store_url):
    s = import_namespace(good, store_url, progress=False)
    assert s["labels"] == 36 and imported(store_url) == 36
    assert s["coverage"] == [{"seeds": 3, "node_rank": 0, "num_nodes": 1}]
    assert import_namespace(good, store_url, progress=False)["labels"] == 36  # again: the same bytes, no conflict


@pytest.mark.parametrize(
    "case,why",
    [
        ({"header": {"seed_limit": 1e30}}, "seed_limit' must be an integer"),
        ({"header": {"seed_limit": 2048.5}}, "seed_limit' must be an integer"),
        ({"header": {"seed_limit": True}}, "seed_limit' must be an integer"),
        ({"header": {"namespace": {"teacher_id": "x"}}}, "namespace is malformed"),
        ({"header": {"format_version": "1"}}, "version '1' unsupported"),
        ({"header": {"coverage": [{"seeds": "all of them"}]}}, "non-negative integers"),
        ({"header": {"coverage": ["junk"]}}, "must be an object"),
        ({"header": {"coverage": [{"repeat_mode": "deit", "repeats": 3}]}}, "not a coverage record"),
        ({"key_index": np.array([-1] + [0] * 35, dtype=np.int32)}, "key_index -1 is out of"),
        ({"seed": np.array([1.7] * 36)}, "seed must hold integers"),
        ({"classes": np.full((36, 1), 8.9)}, "classes must hold integers"),
        ({"classes": np.array([[1]] * 35 + [[10]], dtype=np.int32)}, "class id out of 0..9"),
        ({"keys": np.array([k.encode() for k in KEYS])}, "keys must be strings"),
        ({"keys": np.arange(12)}, "keys must be strings"),
        ({"keys": np.array(KEYS[:-1] + ["z" * 10_000])}, "keys of up to 10000 characters"),
        ({"keys": np.array(sorted(KEYS[:-1] + [""]))}, "an empty key"),
        ({"seed": np.array([0, 0, 1] + list(range(3)) * 11, dtype=np.int32)}, "each once"),
        ({"classes": None}, "no 'classes' array"),
        ({"header": {"labels": 10**12}}, "'labels' must be an integer"),
        ({"header": {"labels": 40}}, "shape (36,), the header's labels need (40,)"),
    ],
)
def test_a_bad_file_writes_nothing_and_says_why(good, tmp_path, store_url, case, why, capsys):
    """Each of these exited 0 and wrote wrong labels, or broke the namespace for good (a seed range
    of '1e30' made every later command fail), or wrote 200,000 labels before failing."""
    bad = spoil(good, tmp_path / "bad.npz", case.get("header"), **{k: v for k, v in case.items() if k != "header"})
    with pytest.raises(ValueError, match=why.replace("(", r"\(").replace(")", r"\)")):
        import_namespace(bad, store_url, progress=False)
    assert imported(store_url) == 0  # nothing, not even the namespace
    code, err = cli("import", bad, store_url, capsys=capsys)
    assert code == 2 and err.startswith("ERROR ") and "Traceback" not in err


def test_a_conflict_with_stored_labels_is_refused(good, tmp_path, store_url):
    import_namespace(good, store_url, progress=False)
    a = arrays(good)
    other = spoil(good, tmp_path / "other.npz", classes=(a["classes"] + 1) % 10)
    with pytest.raises(ValueError, match="36 labels differ from the ones stored"):
        import_namespace(other, store_url, progress=False)
    with open_existing(store_url, NS.id) as st:  # the stored labels are untouched
        assert st.get([KEYS[0]] * 3, [0, 1, 2]).top1.tolist() == a["classes"][:3, 0].tolist()


def test_a_coverage_record_the_labels_do_not_bear_out_is_not_imported(good, tmp_path, store_url):
    """A file claiming seeds 0:1024 of every image with 3 of them: the labels are imported, the
    record is not (it passed the trainer's start-up check, which then trained without 99% of them)."""
    lying = spoil(good, tmp_path / "lying.npz", {"coverage": [{"seeds": 1024}, {"seeds": 3}]})
    s = import_namespace(lying, store_url, progress=False)
    assert s["coverage"] == [{"seeds": 3}]
    with open_existing(store_url, NS.id) as st:
        assert st.coverage() == [{"seeds": 3}]


def test_a_schedule_record_must_hold_its_counts_to_be_imported(good, tmp_path, store_url):
    """A schedule record claiming 300 epochs of a file holding 3 seeds of 12 images is not imported
    (it was: a trainer then skipped its start-up refusal and died with MissingLabels at seed 3), nor
    one claiming more images than the file holds, nor one without counts; true ones are, among them
    one epoch under 3 repeats, which draws a third of its shards' 36 images, 3 times each (it was
    refused, for holding fewer images than its shards: an export of the demo's precompute lost it)."""
    sched = {"repeat_mode": "deit", "repeats": 1, "schedule": 2}
    true = {**sched, "epochs": 3, "images": 12, "labels": 36, "node_rank": 0, "num_nodes": 1}
    repeated = {**true, "repeats": 3, "epochs": 1, "images": 36}
    records = [
        {**true, "epochs": 300, "labels": 3600},  # 300 epochs: 3,600 labels, the file has 36
        {**true, "epochs": 2, "images": 13},  # more images than the file holds
        {**repeated, "epochs": 2, "images": 39},  # a third of 39 is 13 images, more than the file holds
        {**sched, "epochs": 1},  # no counts
        true,
        repeated,
    ]
    s = import_namespace(spoil(good, tmp_path / "lying.npz", {"coverage": records}), store_url, progress=False)
    assert s["coverage"] == [true, repeated]
    with open_existing(store_url, NS.id) as st:
        by_text = lambda r: json.dumps(r, sort_keys=True)  # noqa: E731
        assert sorted(st.coverage(), key=by_text) == sorted([true, repeated], key=by_text)


def bomb(path: Path, keys: np.ndarray) -> Path:
    """A label file of `keys`, one label each: what the keys member costs, nothing else."""
    n = len(keys)
    header = {"format_version": 1, "namespace": NS.meta(), "seed_limit": 2048, "coverage": [], "fingerprint": None,
              "images": n, "labels": n}  # fmt: skip
    np.savez_compressed(path, header=np.array(json.dumps(header)), keys=keys, key_index=np.arange(n, dtype=np.int32),
                        seed=np.zeros(n, np.int32), classes=np.zeros((n, 1), np.int32))  # fmt: skip
    return path


def test_keys_are_read_in_chunks_whatever_a_file_declares(tmp_path):
    """A 2.4 MB file declaring a million empty keys of 256 characters is refused at its first chunk
    (it peaked at 2.55 GB, reading the whole member first); a 6.8 MB file of a million valid keys
    of 256 characters is checked within 200 MB (85 MB measured): keys are read 16,384 at a time and
    never all held."""
    import tracemalloc

    for keys, refused in ((np.zeros(10**6, dtype="U256"), "an empty key"),
                          (np.array([f"{i:0256d}" for i in range(10**6)]), None)):  # fmt: skip
        path = bomb(tmp_path / "bomb.npz", keys)
        del keys
        assert path.stat().st_size < 10_000_000
        tracemalloc.start()
        try:
            if refused:
                with pytest.raises(ValueError, match=refused):
                    check_file(path)
            else:
                assert check_file(path)["images"] == 10**6
        finally:
            peak = tracemalloc.get_traced_memory()[1]
            tracemalloc.stop()
        assert peak < 200_000_000, peak


@pytest.mark.unit
def test_keys_read_in_chunks_and_windows_import_every_label(tmp_path, monkeypatch):
    """Chunks of 7 keys and windows of 5: every label is written under its own key, and keys out of
    order across a chunk boundary are refused."""
    import labels.files as files

    monkeypatch.setattr(files, "KEY_CHUNK", 7)
    monkeypatch.setattr(files, "KEY_WINDOW", 5)
    keys = np.array([f"k{i:03d}" for i in range(50)])
    n = len(keys)
    header = {"format_version": 1, "namespace": NS.meta(), "seed_limit": 2048, "coverage": [], "fingerprint": None,
              "images": n, "labels": 2 * n}  # fmt: skip
    ki = np.repeat(np.arange(n, dtype=np.int32), 2)
    classes = (ki % 10).reshape(-1, 1).astype(np.int32)
    seed = np.tile([0, 1], n).astype(np.int32)
    arrays = dict(header=np.array(json.dumps(header)), keys=keys, key_index=ki, seed=seed, classes=classes)
    np.savez_compressed(tmp_path / "ok.npz", **arrays)
    import_namespace(tmp_path / "ok.npz", str(tmp_path / "ok.db"), progress=False)
    with open_existing(str(tmp_path / "ok.db"), NS.id) as st:
        got = st.get([str(k) for k in keys for _ in (0, 1)], [s for _ in keys for s in (0, 1)])
    assert got.present.all() and got.top1.tolist() == classes[:, 0].tolist()
    arrays["keys"] = keys.copy()
    arrays["keys"][[6, 7]] = arrays["keys"][[7, 6]]  # out of order across the first chunk boundary
    np.savez_compressed(tmp_path / "bad.npz", **arrays)
    with pytest.raises(ValueError, match="keys must be sorted and unique"):
        check_file(tmp_path / "bad.npz")


def test_import_reads_only_its_members_and_checks_sizes_before_reading(good, tmp_path, store_url):
    import tracemalloc

    a = arrays(good)
    a["extra"] = np.zeros(200_000_000, dtype=np.uint8)  # a 200 MB member, compressed to 200 KB
    big = tmp_path / "extra.npz"
    np.savez_compressed(big, **a)
    assert big.stat().st_size < 2_000_000
    tracemalloc.start()
    import_namespace(big, store_url, progress=False)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < 20_000_000, peak  # the unknown member was never read (it peaked at 1.97 GB)
    a = arrays(good)
    a["header"] = np.array("x" * 5_000_000)  # a 20 MB header (a few KB is normal): refused unread
    np.savez_compressed(tmp_path / "huge.npz", **a)
    with pytest.raises(ValueError, match="header declares 20,000,000 bytes"):
        check_file(tmp_path / "huge.npz")
    # a member whose header claims 10^12 labels, with nothing behind it: refused, no allocation
    claim = tmp_path / "claim.npz"
    with zipfile.ZipFile(good) as src, zipfile.ZipFile(claim, "w") as dst:
        for item in src.namelist():
            if item != "seed.npy":
                dst.writestr(item, src.read(item))
        buf = io.BytesIO()
        np.lib.format.write_array_header_1_0(buf, {"descr": "<i4", "fortran_order": False, "shape": (10**12,)})
        dst.writestr("seed.npy", buf.getvalue())  # magic, header, and no data
    with pytest.raises(ValueError, match=r"seed has shape \(1000000000000,\)"):
        check_file(claim)


@pytest.mark.unit
def test_export_never_leaves_a_partial_file(good, tmp_path, monkeypatch, capsys):
    src = str(tmp_path / "src.db")
    target = tmp_path / "out.npz"

    def full_disk(f, **arrays):
        f.write(b"PK\x03\x04 a partial zip")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(np, "savez_compressed", full_disk)
    code, err = cli("export", src, target, capsys=capsys)
    assert code == 2 and "No space left on device" in err and "Traceback" not in err
    assert set(os.listdir(tmp_path)) <= {"good.npz", "src.db", "src.db-wal", "src.db-shm"}  # no temp, no out.npz
    monkeypatch.undo()
    code, err = cli("export", src, tmp_path, capsys=capsys)  # a directory
    assert code == 2 and "is a directory" in err
    partial = tmp_path / "partial.npz"
    partial.write_bytes(good.read_bytes()[:-100])  # cut short: never imports as a complete file
    code, err = cli("import", partial, str(tmp_path / "x.db"), capsys=capsys)
    assert code == 2 and "not a complete .npz" in err


@pytest.mark.unit
def test_export_replaces_no_device_fifo_or_link(good, tmp_path, capsys):
    """An export goes to a new path or over a regular file. A device node, a FIFO or a symbolic link
    at the target is refused with one line and left as it was (as root, renaming over /dev/null
    replaced the device with a 0600 file; over a link it replaced the link)."""
    import stat

    src = str(tmp_path / "src.db")
    fifo = tmp_path / "fifo.npz"
    os.mkfifo(fifo)
    regular = tmp_path / "regular.npz"
    regular.write_bytes(b"keep me")
    link = tmp_path / "link.npz"
    link.symlink_to(regular)
    dangling = tmp_path / "dangling.npz"
    dangling.symlink_to(tmp_path / "nowhere.npz")
    targets = [(fifo, "a FIFO"), (link, "a symbolic link"), (dangling, "a symbolic link")]
    device = tmp_path / "null"  # a /dev/null of the test's own: a regression must not replace the real one
    try:
        os.mknod(device, stat.S_IFCHR | 0o666, os.makedev(1, 3))
        targets.append((device, "a character device"))
    except PermissionError:  # not root: the FIFO stands for the other non-regular files
        device = None
    for target, kind in targets:
        code, err = cli("export", src, target, capsys=capsys)
        assert code == 2 and f"is {kind}" in err and "Traceback" not in err, (target, err)
    assert device is None or stat.S_ISCHR(os.lstat(device).st_mode)
    assert stat.S_ISFIFO(os.lstat(fifo).st_mode) and link.is_symlink() and dangling.is_symlink()
    assert regular.read_bytes() == b"keep me" and not (tmp_path / "nowhere.npz").exists()
    code, _ = cli("export", src, regular, capsys=capsys)  # over a regular file: written
    assert code == 0 and regular.read_bytes()[:2] == b"PK"
    assert not [p for p in os.listdir(tmp_path) if p.endswith(".tmp")]


@pytest.mark.unit
def test_a_deeply_nested_header_is_one_error_line(good, tmp_path, capsys):
    """A header nested 200,000 levels deep: one ERROR line (it was a RecursionError traceback)."""
    a = arrays(good)
    a["header"] = np.array("[" * 200_000 + "]" * 200_000)
    np.savez_compressed(tmp_path / "deep.npz", **a)
    code, err = cli("import", tmp_path / "deep.npz", str(tmp_path / "x.db"), capsys=capsys)
    assert code == 2 and "nests too deeply" in err and "Traceback" not in err, err


@pytest.mark.unit
def test_a_namespace_mismatch_is_an_error_line(good, tmp_path, capsys):
    """The same namespace id with other metadata in the destination: one ERROR line, exit 2."""
    dst = str(tmp_path / "dst.db")
    other = Namespace(NS.teacher_id, NS.policy_id, NS.format, NS.num_classes, "another-digest")
    assert other.id == NS.id
    open_store(dst, other).close()
    code, err = cli("import", good, dst, capsys=capsys)
    assert code == 2 and err.startswith("ERROR ") and "different metadata" in err


def test_keys_that_are_not_strings_are_refused_by_every_store(store_url):
    with open_store(store_url, NS) as st:
        for key in (b"digits/0/00000", 0, "k" * 513, ""):
            with pytest.raises(ValueError, match="a key must be a string of 1..512 characters"):
                st.put([key], [0], [1])
        with pytest.raises(ValueError, match="seeds must be integers"):
            st.put(["a"], [1.7], [1])
