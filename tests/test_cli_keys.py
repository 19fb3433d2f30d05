"""`kolors-api keys` and the settings at the command line: the admin API's rules, one clear line."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from collections.abc import Iterator
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
    args = ["keys", "create", "--init", *([] if "--name" in flags else ["--name", "alice"]), *flags]
    out = cli(*args, data_dir=tmp_path)
    assert out.returncode == 2 and words in out.stderr, out.stderr
    assert "Traceback" not in out.stderr and out.stdout == ""
    assert not (tmp_path / "kolors-api.sqlite3").exists(), "refused before the store was made"


def test_keys_create_then_list_disable_enable_delete(tmp_path: Path) -> None:
    out = cli("keys", "create", "--init", "--name", " alice ", "--credits", "2.5", "--rate-limit", "10/min",
              "--max-concurrency", "2", data_dir=tmp_path)
    assert out.returncode == 0, out.stderr
    key = out.stdout.strip()
    assert key.startswith("kol_")
    (record,) = listed(tmp_path)
    assert (record["name"], record["credits"], record["rate_limit"], record["max_concurrency"], record["enabled"]) \
        == ("alice", 2.5, "10/min", 2, True)
    assert key not in json.dumps(record) and record["prefix"] == key[:10]
    key_id = str(record["id"])
    disabled = cli("keys", "disable", key_id, data_dir=tmp_path)
    assert (disabled.returncode, disabled.stdout.strip()) == (0, f"disabled {key_id}")
    assert listed(tmp_path)[0]["enabled"] is False
    assert cli("keys", "enable", key_id, data_dir=tmp_path).returncode == 0
    assert listed(tmp_path)[0]["enabled"] is True
    # `revoke`, the old name of `disable`, still works (scripts may use it) but is not listed in the help.
    assert cli("keys", "revoke", key_id, data_dir=tmp_path).returncode == 0
    assert listed(tmp_path)[0]["enabled"] is False
    assert "revoke" not in cli("keys", "--help", data_dir=tmp_path).stdout
    secrets = [cli("keys", "rotate-webhook-secret", key_id, data_dir=tmp_path) for _ in range(2)]
    assert all(out.returncode == 0 and out.stdout.startswith("whsec_") for out in secrets)
    assert secrets[0].stdout != secrets[1].stdout
    deleted = cli("keys", "delete", key_id, data_dir=tmp_path)
    assert (deleted.returncode, deleted.stdout.strip()) == (0, f"deleted {key_id}")
    assert listed(tmp_path) == []
    for verb in ("disable", "enable", "delete", "rotate-webhook-secret"):
        unknown = cli("keys", verb, key_id, data_dir=tmp_path)
        assert (unknown.returncode, unknown.stderr.strip()) == (1, f"unknown key: {key_id}")


@pytest.mark.parametrize("args", [["keys", "list"], ["keys", "create", "--name", "bob"], ["keys", "disable", "x"],
                                  ["keys", "delete", "x"]])
def test_keys_commands_never_create_a_store_and_name_the_path(tmp_path: Path, args: list[str]) -> None:
    data_dir = tmp_path / "elsewhere"
    out = cli(*args, data_dir=data_dir)
    assert out.returncode == 2 and out.stdout == "", out.stderr
    line = out.stderr.strip()
    assert len(line.splitlines()) == 1 and "Traceback" not in line
    assert f"no store at {data_dir.resolve() / 'kolors-api.sqlite3'}" in line
    assert "--data-dir" in line and "--store" in line and "--init" in line
    assert not data_dir.exists(), "nothing was created"


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


def _flags(parser: argparse.ArgumentParser, path: str = "kolors-api") -> Iterator[tuple[str, argparse.Action]]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                if name != "revoke":  # the hidden old name of `keys disable`
                    yield from _flags(sub, f"{path} {name}")
        elif not isinstance(action, (argparse._HelpAction, argparse._VersionAction)):
            yield path, action


def test_every_flag_says_what_it_does_and_a_setting_names_its_default_and_env_var() -> None:
    from kolors_api.cli import parser
    from kolors_api.settings import Settings

    seen = 0
    for where, action in _flags(parser()):
        assert action.help, f"{where} {action.option_strings or action.dest}: no help"
        if action.dest in Settings.model_fields:
            seen += 1
            assert f"env KOLORS_API_{action.dest.upper()}" in action.help, (where, action.dest)
            assert "default" in action.help, (where, action.dest)
            default = Settings.model_fields[action.dest].default
            if isinstance(default, (str, int)) and not isinstance(default, bool):
                assert str(default) in action.help, (where, action.dest, default)
    assert seen >= 10


def test_bare_kolors_api_prints_the_help() -> None:
    out = subprocess.run([sys.executable, "-m", "kolors_api.cli"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and out.stderr == ""
    assert out.stdout.startswith("usage: kolors-api") and "serve" in out.stdout and "keys" in out.stdout
