"""The README's examples run as pasted. Every block marked `<!-- runnable: NAME -->` runs in order,
in a directory that holds what the quick start leaves in runs/demo: the demo's shards, a teacher
trained on them, and labels for their first seeds. The outputs a block shows in `# {...}`
comments are the outputs it gives: the same fields, and the same values where they do not depend
on the teacher's weights. The one change made to a block is the service's port, to a free one."""

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
from conftest import PY, ROOT, free_port, run_precompute, run_step

README = ROOT / "README.md"
RUNNABLE = re.compile(r"<!-- runnable: ([\w-]+) -->\n```(\w+)\n(.*?)```", re.S)
# fields of the shown outputs that do not depend on the teacher's weights: compared by value
SAME_EVERYWHERE = {"status", "engines", "cached", "computed", "unstored", "errors"}
# seconds each block took on the 2-core development machine (the budgets' base)
BLOCK_SECONDS = {"one-machine": 75, "own-loop": 20, "rest": 15}


def blocks() -> list[tuple[str, str, str]]:
    return RUNNABLE.findall(README.read_text())


@pytest.mark.unit
def test_the_readme_keeps_its_shape():
    """About 3,000 words at most, the quick start's two commands, the runnable blocks this test
    runs, and no literal `...` in a command of any code block."""
    text = README.read_text()
    assert len(text.split()) <= 3100
    assert [name for name, _, _ in blocks()] == list(BLOCK_SECONDS)
    for lang, code in re.findall(r"```(\w*)\n(.*?)```", text, re.S):
        for line in code.splitlines():
            command = line.split("#", 1)[0]
            assert "..." not in command, f"a placeholder in a {lang} block: {line}"
    for page in re.findall(r"\]\((docs/[^)#]+)", text):
        assert (ROOT / page).exists(), page


@pytest.fixture(scope="module")
def workdir(demo_shards, tiny_teacher, tmp_path_factory) -> Path:
    """What the quick start leaves in runs/demo, made in seconds: its shards, a small teacher
    trained on them, and their labels for seeds 0 and 1 (the demo precomputes 0 to 39)."""
    work = tmp_path_factory.mktemp("readme")
    demo = work / "runs" / "demo"
    shutil.copytree(demo_shards, demo / "shards")
    (demo / "teacher").mkdir()
    shutil.copy(tiny_teacher, demo / "teacher" / "model.safetensors")
    run_precompute(demo / "shards", "0:2", demo / "labels.db", demo / "teacher" / "model.safetensors")
    return work


def run_block(name: str, lang: str, code: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {"PATH": f"{Path(PY).parent}{os.pathsep}{os.environ['PATH']}"}  # `python` is this venv's
    if lang == "python":
        (cwd / f"{name}.py").write_text(code)
        return run_step([PY, f"{name}.py"], f"README block {name}", BLOCK_SECONDS[name], env=env, cwd=cwd)
    port = str(free_port())
    code = code.replace("localhost:8000", f"localhost:{port}").replace("--port 8000", f"--port {port}")
    argv = ["bash", "-euo", "pipefail", "-c", code]
    return run_step(argv, f"README block {name}", BLOCK_SECONDS[name], env=env, cwd=cwd)


def json_objects(text: str) -> list:
    """The JSON values in `text`, also when they follow one another on one line (curl -s)."""
    decoder, out, at = json.JSONDecoder(), [], 0
    while (start := text.find("{", at)) != -1:
        try:
            value, at = decoder.raw_decode(text, start)
        except json.JSONDecodeError:
            at = start + 1
            continue
        out.append(value)
    return out


@pytest.mark.slow
def test_the_readme_examples_run_as_pasted(workdir):
    for name, lang, code in blocks():
        r = run_block(name, lang, code, workdir)
        shown = [json.loads(line[1:].strip()) for line in code.splitlines() if line.startswith("# {")]
        if shown:
            got = json_objects(r.stdout)
            assert len(got) == len(shown), (name, r.stdout)
            for want, have in zip(shown, got):
                assert set(want) == set(have), (name, want, have)
                assert {k: want[k] for k in SAME_EVERYWHERE & set(want)} == {
                    k: have[k] for k in SAME_EVERYWHERE & set(have)
                }, (name, want, have)
        if name == "one-machine":
            summaries = json_objects(r.stdout)
            stats = summaries[-1]["namespaces"][0]
            assert stats["label_quality"]["labels"] > 0 and stats["images"] > 0
            evaluation = summaries[-2]
            assert evaluation["eval"] == "runs/mine/student/last.pt" and evaluation["val_images"] == 40
            assert summaries[1]["val_from"]["from"] == "folder"
        if name == "own-loop":
            assert "epoch 9: loss" in r.stdout
