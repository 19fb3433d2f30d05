"""`kolors-api keys` and the settings at the command line: the admin API's rules, one clear line."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest


def cli(*args: str, data_dir: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "kolors_api.cli", *args, "--data-dir", str(data_dir)],
                          capture_output=True, text=True, timeout=60)


def listed(data_dir: Path) -> list[dict[str, object]]:
    out = cli("keys", "list", data_dir=data_dir)
    assert out.returncode == 0, out.stderr
    return [json.loads(line) for line in out.stdout.splitlines()]


@pytest.mark.parametrize(("flags", "words"), [
    (["--credits", "nan"], "--credits: must be a finite number between 0 and 1e+09 or null, got nan"),
    (["--credits", "-1"], "--credits: must be a number between 0"),
    (["--credits", "inf"], "--credits: must be a finite number"),
    (["--max-concurrency", "-3"], "--max-concurrency: must be an integer between 1"),
    (["--max-concurrency", "0"], "--max-concurrency: must be an integer between 1"),
    (["--rate-limit", "ten/min"], "--rate-limit: must look like \"10/min\""),
    (["--rate-limit", "0/min"], "--rate-limit: must look like \"10/min\""),
    (["--name", "   "], "--name: must be a non-empty string"),
    (["--name", "\udcff"], "--name: must be valid Unicode text"),  # the byte 0xff in argv
    (["--rate-limit", "99999999999999999999/s"], "--rate-limit: must look like \"10/min\""),
])
def test_keys_create_refuses_what_the_admin_api_refuses_and_stores_nothing(tmp_path: Path, flags: list[str],
                                                                           words: str) -> None:
    args = ["keys", "create", "--name", "alice", *flags] if "--name" not in flags else ["keys", "create", *flags]
    out = cli(*args, data_dir=tmp_path)
    assert out.returncode == 2 and words in out.stderr, out.stderr
    assert "Traceback" not in out.stderr and out.stdout == ""
    assert listed(tmp_path) == []


def test_keys_create_then_list_then_revoke(tmp_path: Path) -> None:
    out = cli("keys", "create", "--name", " alice ", "--credits", "2.5", "--rate-limit", "10/min",
              "--max-concurrency", "2", data_dir=tmp_path)
    assert out.returncode == 0, out.stderr
    key = out.stdout.strip()
    assert key.startswith("kol_")
    (record,) = listed(tmp_path)
    assert (record["name"], record["credits"], record["rate_limit"], record["max_concurrency"], record["enabled"]) \
        == ("alice", 2.5, "10/min", 2, True)
    assert key not in json.dumps(record) and record["prefix"] == key[:10]
    assert cli("keys", "revoke", str(record["id"]), data_dir=tmp_path).returncode == 0
    assert listed(tmp_path)[0]["enabled"] is False


@pytest.mark.parametrize(("args", "words"), [
    (["keys", "list", "--store", "postgres://db/x"], "store (flag --store, env KOLORS_API_STORE): expected sqlite"),
    (["keys", "list", "--store", "sqlite:///"], "expected sqlite, sqlite:///PATH"),
    (["serve", "--port", "70000"], "port (flag --port, env KOLORS_API_PORT)"),
])
def test_a_setting_the_settings_refuse_is_one_line_and_exit_2(tmp_path: Path, args: list[str], words: str) -> None:
    out = cli(*args, data_dir=tmp_path)
    assert out.returncode == 2 and words in out.stderr, out.stderr
    assert "Traceback" not in out.stderr and len(out.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "kolors-api.sqlite3").exists(), "nothing was opened"
