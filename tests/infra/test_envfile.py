"""Tests of infra/envfile.py: what the stack writes, it and a shell read back unchanged."""

from __future__ import annotations

import stat
import subprocess

import pytest

from infra.envfile import quote_for_cargo_lambda, read_env_file, write_env_file

AWKWARD = {"PLAIN": "http://127.0.0.1:9000", "SPACES": "/tmp/a dir/x", "QUOTES": "it's \"quoted\"",
           "RUST_LOG": "info,chainrun=debug", "EMPTY": ""}


def test_what_is_written_is_read_back_and_is_private(tmp_path):
    path = tmp_path / "stack.env"
    write_env_file(path, AWKWARD)
    assert read_env_file(path) == AWKWARD
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


def test_a_shell_sources_the_same_values(tmp_path):
    path = tmp_path / "stack.env"
    write_env_file(path, AWKWARD)
    out = subprocess.run(["bash", "-c", f'set -a; . "{path}"; printf "%s\\0" "$SPACES" "$QUOTES" "$RUST_LOG"'],
                         capture_output=True, text=True, check=True).stdout
    assert out.split("\0")[:3] == [AWKWARD["SPACES"], AWKWARD["QUOTES"], AWKWARD["RUST_LOG"]]


def test_a_missing_file_reads_as_empty_unless_it_must_exist(tmp_path):
    assert read_env_file(tmp_path / "missing.env") == {}
    with pytest.raises(FileNotFoundError):
        read_env_file(tmp_path / "missing.env", missing_ok=False)


def test_function_env_file_quoting_survives_equals_and_commas():
    # cargo lambda watch's --env-file parser rejects an unquoted RUST_LOG=info,chainrun=debug
    assert quote_for_cargo_lambda("info,chainrun=debug") == '"info,chainrun=debug"'
    assert quote_for_cargo_lambda('a"b\\c$d') == '"a\\"b\\\\c\\$d"'
