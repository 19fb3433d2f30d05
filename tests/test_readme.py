"""README.md runs as written: its shell and Python blocks, in order, against a live server on loopback.

The test starts what the quick start's first command starts (`kolors-api serve --model tiny`, the
embedded default, data in `./.kolors-api`) in a fresh folder that holds the `.venv` of this checkout,
then runs every block in one bash session there (Python blocks through `python3 -`), so what one
block exports the next one reads. The folder is the checkout a user follows the README in, so the
run must leave nothing in it but the server's data: the examples write under `$OUT` (a `mktemp -d`).
It rewrites only what must differ in a test: the port (in the blocks, and `KOLORS_API_BASE_URL` for
the CLI's default). A block that cannot run here is marked in README.md, on the line above its fence, with
`<!-- readme-test: skip (why) -->`; there are few, and each says why.
"""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
import sys
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import httpx

from tests.conftest import ADMIN_KEY, free_port, start_server

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
#: PyTorch's CPU wheel index: what the quick start installs torch from (a CPU-only machine, and the tests).
CPU_INDEX = "--index-url https://download.pytorch.org/whl/cpu"
SKIP = re.compile(r"<!-- readme-test: skip \((.+)\) -->")
FENCE = re.compile(r"^```(bash|python)\n(.*?)^```\n", re.M | re.S)


@dataclass
class Block:
    lang: str
    code: str
    line: int
    skip: str | None


def blocks(text: str) -> list[Block]:
    out = []
    for match in FENCE.finditer(text):
        line = text.count("\n", 0, match.start()) + 1
        above = text[:match.start()].rstrip("\n").rsplit("\n", 1)[-1]
        skip = SKIP.fullmatch(above.strip())
        out.append(Block(match[1], match[2], line, skip[1] if skip else None))
    return out


def script(text: str, port: int) -> str:
    """One bash script: every block not marked skip, in README order, with the port rewritten."""
    parts = ["set -euo pipefail"]
    for i, block in enumerate(blocks(text)):
        if block.skip is not None:
            continue
        code = block.code.replace(":8000", f":{port}")
        parts.append(f"echo {shlex.quote(f'### README.md block at line {block.line}')} >&2")
        if block.lang == "python":
            parts.append(f"python3 - <<'README_PY_{i}'\n{code}README_PY_{i}")
        else:
            parts.append(code)
    return "\n".join(parts) + "\n"


def test_few_blocks_are_skipped_and_each_says_why() -> None:
    found = blocks(README.read_text())
    skipped = [b for b in found if b.skip is not None]
    assert len(found) >= 10 and len(skipped) <= 4, [(b.line, b.skip) for b in skipped]
    # Nothing the test cannot run hides in a block it runs: no placeholders, no install.
    for b in found:
        if b.skip is None:
            assert not re.search(r"<[a-z_]+>|pip install|kol_\.\.\.", b.code), (b.line, b.code)


def test_the_quick_start_commands_are_the_ones_ci_and_the_test_run() -> None:
    text = README.read_text()
    first, tests = (b.code.strip() for b in blocks(text)[:2])
    assert first.endswith("&& .venv/bin/kolors-api serve --model tiny")
    # torch from the CPU index in both (PyPI's Linux torch is the 2.7 GB CUDA build), the GPU path in words.
    for command in (first, tests):
        assert f".venv/bin/pip install torch==2.13.0 {CPU_INDEX} && " in command, command
    quick_start = text.split("## Quick start", 1)[1].split("\n## ", 1)[0]
    assert "On a machine with an NVIDIA GPU" in quick_start and "CUDA 13" in quick_start
    assert "never pulls" not in text
    ci = (ROOT / ".ci" / "run").read_text()
    for step in tests.split(" && "):
        # .ci/run runs each step of the README's test command (pip quietly, after upgrading pip).
        assert step in ci or step.replace("pip install ", "pip install -q ") in ci, step


#: Top-level modules the README's Python blocks may import without saying how to install them: the
#: standard library and this project (the base install).
OURS = {"kolors_api"}


def test_each_python_block_says_how_to_install_the_packages_it_imports() -> None:
    text = README.read_text()
    previous_end = 0
    for match in FENCE.finditer(text):
        prose = text[previous_end:match.start()]  # between the previous block and this one
        previous_end = match.end()
        if match[1] != "python":
            continue
        imported = set(re.findall(r"^(?:from|import) (\w+)", match[2], re.M))
        for module in imported - set(sys.stdlib_module_names) - OURS:
            assert f"pip install {module}" in prose, f"README: say `pip install {module}` above the block " \
                                                     f"at line {text.count(chr(10), 0, match.start()) + 1}"


def test_every_example_reads_the_key_from_kolors_api_key() -> None:
    for doc in (README, *sorted((ROOT / "docs").glob("*.md")), ROOT / "deploy" / "README.md"):
        text = doc.read_text()
        # Python reads KOLORS_API_* variables only; a shell sends $KOLORS_API_KEY (or the admin key, $ADMIN).
        assert set(re.findall(r"os\.environ(?:\.get\(|\[)[\"']([A-Z_]+)", text)) <= {"KOLORS_API_KEY",
                                                                                   "KOLORS_API_BASE_URL"}, doc
        sent = set(re.findall(r"(?:x-api-key: |Bearer )\$\{?([A-Za-z_]+)", text))
        assert sent <= {"KOLORS_API_KEY", "ADMIN"}, (doc, sent)


def test_readme_blocks_run_as_written_against_a_live_server(tiny_model: Path, tmp_path: Path) -> None:
    home = tmp_path / "checkout"
    scratch = tmp_path / "scratch"  # TMPDIR: where `mktemp -d` makes the examples' $OUT
    scratch.mkdir()
    # The fresh folder a user works in: the checkout's .venv (its bin holds kolors-api and python3).
    home.mkdir()
    (home / ".venv").symlink_to(Path(sys.prefix))
    # `--model tiny` builds the tiny model under the data dir on first use; the session built it already.
    shutil.copytree(tiny_model, home / ".kolors-api" / "models" / "tiny")
    port = free_port()
    server = start_server("tiny", home / ".kolors-api", port=port, env={"KOLORS_API_BOOTSTRAP_KEY": ADMIN_KEY})
    try:
        text = script(README.read_text(), port)
        out = subprocess.run(["bash", "-c", text], cwd=home, capture_output=True, text=True, timeout=600,
                             env={"PATH": "/usr/bin:/bin", "HOME": str(home), "LANG": "C.UTF-8",
                                  "TMPDIR": str(scratch),
                                  "PYTHONPATH": str(ROOT / "src"),
                                  # the port again, for what uses the default base URL (kolors-api generate)
                                  "KOLORS_API_BASE_URL": f"http://127.0.0.1:{port}"})
        assert out.returncode == 0, f"{out.stderr[-4000:]}\n{out.stdout[-2000:]}"
        # Every answer was a success: no error body anywhere in what the blocks printed.
        assert not re.search(r'\{"error": ?["{]', out.stdout), out.stdout[-4000:]
        assert "HTTP/1.1 200" in out.stdout and '"cancel_requested":true' in out.stdout
        for name in ("fox.webp", "lighthouse.webp"):
            assert [p.read_bytes()[8:12] for p in scratch.glob(f"*/{name}")] == [b"WEBP"], name
        assert "image(s)" in out.stdout and "/outputs/0.webp?exp=" in out.stdout
        # The checkout holds what it held and the server's data: the examples wrote under $OUT.
        assert sorted(p.name for p in home.iterdir()) == [".kolors-api", ".venv"]
        # Each key has a name of its own, and none is `admin`: the name of the key a first `serve`
        # makes when no KOLORS_API_BOOTSTRAP_KEY is set (the README's reader has that one; the test
        # set the variable, so its first key is `bootstrap`).
        keys = httpx.get(f"http://127.0.0.1:{port}/v1/admin/keys", headers={"x-api-key": ADMIN_KEY}).json()
        names = Counter(k["name"] for k in keys["data"])
        assert names["bootstrap"] == 1 and "admin" not in names and names.most_common(1)[0][1] == 1, names
    finally:
        server.stop()
