"""`kolors-api generate` as a user runs it: a subprocess against a live server (a torch-free engine)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import LiveServer, free_port
from tests.pixel_engines import pixel_server

SMALL = ["--steps", "2", "--width", "512", "--height", "512"]


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    """The module's live server on the torch-free engine: here the CLI is the point, not the pixels."""
    yield from pixel_server(tmp_path_factory)


def is_webp(data: bytes) -> bool:
    return data[:4] == b"RIFF" and data[8:12] == b"WEBP"


def generate(server: LiveServer | None, *args: str, cwd: Path, key: str | None = None,
             env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("KOLORS_API_")}
    if server is not None:
        full_env |= {"KOLORS_API_BASE_URL": server.url, "KOLORS_API_KEY": key or server.key}
    full_env |= env or {}
    return subprocess.run([sys.executable, "-m", "kolors_api.cli", "generate", *args], cwd=cwd, env=full_env,
                          capture_output=True, text=True, timeout=240)


def test_generate_writes_the_image_and_prints_path_and_seed(server: LiveServer, tmp_path: Path) -> None:
    out = tmp_path / "fox.webp"

    proc = generate(server, "a red fox in the snow", "-o", str(out), "--seed", "42", *SMALL, "--no-progress",
                    cwd=tmp_path)

    assert proc.returncode == 0, proc.stderr
    assert is_webp(out.read_bytes())
    assert proc.stdout.splitlines() == [f"{out}  seed=42"]


def test_generate_with_the_progress_bar(server: LiveServer, tmp_path: Path) -> None:
    proc = generate(server, "a lighthouse", "-o", "light.webp", "--steps", "4", "--width", "512",
                    "--height", "512", cwd=tmp_path, env={"FORCE_COLOR": "1", "COLUMNS": "100"})

    assert proc.returncode == 0, proc.stderr
    assert is_webp((tmp_path / "light.webp").read_bytes())
    assert "Traceback" not in proc.stderr
    assert re.fullmatch(r"light\.webp  seed=\d+\n", proc.stdout)


def test_generate_names_the_file_after_the_seed_by_default(server: LiveServer, tmp_path: Path) -> None:
    proc = generate(server, "a koi", "--seed", "77", *SMALL, "--no-progress", cwd=tmp_path)

    assert proc.returncode == 0, proc.stderr
    assert is_webp((tmp_path / "kolors-77.webp").read_bytes())
    assert "seed=77" in proc.stdout


def test_generate_several_images_numbers_the_files(server: LiveServer, tmp_path: Path) -> None:
    proc = generate(server, "two boats", "-o", "boat.webp", "-n", "2", "--seed", "5", *SMALL, "--no-progress",
                    cwd=tmp_path)

    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines() == ["boat-0.webp  seed=5", "boat-1.webp  seed=6"]
    first, second = (tmp_path / "boat-0.webp").read_bytes(), (tmp_path / "boat-1.webp").read_bytes()
    assert is_webp(first) and is_webp(second) and first != second


def test_generate_takes_the_format_from_the_output_suffix(server: LiveServer, tmp_path: Path) -> None:
    proc = generate(server, "a map", "-o", "map.png", *SMALL, "--no-progress", cwd=tmp_path)

    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "map.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_generate_with_a_bad_key_exits_1_with_the_server_message(server: LiveServer, tmp_path: Path) -> None:
    proc = generate(server, "a fox", *SMALL, cwd=tmp_path, key="kol_not_a_key")

    assert proc.returncode == 1
    assert proc.stderr.strip() == "error: invalid API key (HTTP 401)"
    assert "Traceback" not in proc.stderr
    assert proc.stdout == ""
    assert list(tmp_path.iterdir()) == []


def test_generate_with_a_bad_parameter_exits_1_with_the_server_message(server: LiveServer,
                                                                        tmp_path: Path) -> None:
    proc = generate(server, "a fox", "--steps", "0", "--no-progress", cwd=tmp_path)

    assert proc.returncode == 1
    assert "steps: must be between 1 and 50, got 0" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_generate_without_a_server_exits_1(tmp_path: Path) -> None:
    url = f"http://127.0.0.1:{free_port()}"

    proc = generate(None, "a fox", "--no-progress", "--base-url", url, "--api-key", "k", cwd=tmp_path)

    assert proc.returncode == 1
    assert proc.stderr.startswith(f"error: cannot reach {url}")
    assert "Traceback" not in proc.stderr


def test_generate_without_a_key_says_which_variable_or_flag_before_any_request(tmp_path: Path) -> None:
    url = f"http://127.0.0.1:{free_port()}"  # nothing listens: a request would say "cannot reach"

    proc = generate(None, "a fox", "--no-progress", "--base-url", url, cwd=tmp_path)

    assert proc.returncode == 2
    assert proc.stderr == "error: no API key: set KOLORS_API_KEY or pass --api-key\n"
    assert proc.stdout == "" and list(tmp_path.iterdir()) == []


#: `kolors-api` as the base install (`pip install -e .`, httpx only) runs it: the server's and worker's
#: packages cannot be imported (a finder refuses them, as a missing package would be refused).
BASE_INSTALL = """
import importlib.abc, sys
SERVER_SIDE = {"pydantic", "pydantic_settings", "fastapi", "starlette", "uvicorn", "rich", "limits",
               "prometheus_client", "standardwebhooks", "redis", "torch", "diffusers", "transformers", "PIL",
               "numpy"}
class NotInstalled(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in SERVER_SIDE:
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return None
sys.meta_path.insert(0, NotInstalled())
from kolors_api.cli import main
sys.argv[0] = "kolors-api"
sys.exit(main())
"""


def base_install(*args: str, cwd: Path, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("KOLORS_API_")} | env
    return subprocess.run([sys.executable, "-c", BASE_INSTALL, *args], cwd=cwd, env=full_env,
                          capture_output=True, text=True, timeout=240)


def test_the_client_side_of_the_cli_runs_on_the_base_install(server: LiveServer, tmp_path: Path) -> None:
    env = {"KOLORS_API_BASE_URL": server.url, "KOLORS_API_KEY": server.key}
    help_ = base_install("generate", "--help", cwd=tmp_path, env=env)
    assert help_.returncode == 0, help_.stderr
    assert "--api-key" in help_.stdout and "server default 25" in help_.stdout
    version = base_install("--version", cwd=tmp_path, env=env)
    assert version.returncode == 0 and version.stdout.strip(), version.stderr

    # A real generation, no progress bar (rich is the server's): the image is written.
    proc = base_install("generate", "a fox on the base install", "-o", "fox.webp", "--seed", "3", *SMALL,
                        cwd=tmp_path, env=env)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == "fox.webp  seed=3\n" and "Traceback" not in proc.stderr
    assert is_webp((tmp_path / "fox.webp").read_bytes())

    # The server's commands say which extra they need, in one line.
    keys = base_install("keys", "list", "--data-dir", str(server.data_dir), cwd=tmp_path, env=env)
    assert keys.returncode == 2 and "Traceback" not in keys.stderr
    assert "needs the `server` extra" in keys.stderr


def test_generate_refuses_an_output_suffix_that_contradicts_format(tmp_path: Path) -> None:
    proc = generate(None, "a fox", "-o", "x.png", "--format", "webp", cwd=tmp_path)

    assert proc.returncode == 2
    assert "does not match --format webp" in proc.stderr


def test_generate_open_hands_the_written_file_to_the_desktop_viewer(server: LiveServer, tmp_path: Path) -> None:
    # webbrowser runs $BROWSER with the file's URL: a real program that writes down what it was given.
    seen = tmp_path / "opened.txt"
    viewer = tmp_path / "viewer.sh"
    viewer.write_text(f'#!/bin/sh\necho "$1" >> {seen}\n')
    viewer.chmod(0o755)

    proc = generate(server, "a red fox", "-o", "fox.webp", "--open", *SMALL, "--no-progress", cwd=tmp_path,
                    env={"BROWSER": f"{viewer} %s"})

    assert proc.returncode == 0, proc.stderr
    assert seen.read_text().split() == [(tmp_path / "fox.webp").resolve().as_uri()]
