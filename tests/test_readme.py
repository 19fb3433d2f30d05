"""README.md runs as written: its shell and Python blocks, in order, against a live server on loopback.

The test starts what the quick start's first command starts (`kolors-api serve --model tiny`, the
embedded default, data in `./.kolors-api`) in a fresh folder that holds the `.venv` of this checkout,
then runs every block in one bash session there (Python blocks through `python3 -`), so what one
block exports the next one reads. It rewrites only what must differ in a test: the port (in the
blocks, and `KOLORS_API_BASE_URL` for the CLI's default). A block
that cannot run here is marked in README.md, on the line above its fence, with
`<!-- readme-test: skip (why) -->`; there are few, and each says why.
"""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from tests.conftest import ADMIN_KEY, free_port, start_server

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
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
    first, tests = (b.code.strip() for b in blocks(README.read_text())[:2])
    assert first.endswith("&& .venv/bin/kolors-api serve --model tiny")
    ci = (ROOT / ".ci" / "run").read_text()
    for step in tests.split(" && "):
        # .ci/run runs each step of the README's test command (pip quietly, after upgrading pip).
        assert step in ci or step.replace("pip install ", "pip install -q ") in ci, step


def test_readme_blocks_run_as_written_against_a_live_server(tiny_model: Path, tmp_path: Path) -> None:
    home = tmp_path / "checkout"
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
                                  "PYTHONPATH": str(ROOT / "src"),
                                  # the port again, for what uses the default base URL (kolors-api generate)
                                  "KOLORS_API_BASE_URL": f"http://127.0.0.1:{port}"})
        assert out.returncode == 0, f"{out.stderr[-4000:]}\n{out.stdout[-2000:]}"
        # Every answer was a success: no error body anywhere in what the blocks printed.
        assert not re.search(r'\{"error": ?["{]', out.stdout), out.stdout[-4000:]
        assert "HTTP/1.1 200" in out.stdout and '"cancel_requested":true' in out.stdout
        assert (home / "fox.webp").read_bytes()[8:12] == b"WEBP"
        assert (home / "lighthouse.webp").read_bytes()[8:12] == b"WEBP"
        assert "image(s)" in out.stdout and "/outputs/0.webp?exp=" in out.stdout
    finally:
        server.stop()
