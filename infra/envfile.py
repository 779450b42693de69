"""KEY=VALUE files: a stack's state (`stack.env`, `pids`) and the functions' env file.

`stack.env` is shell-sourceable (`set -a; . .local/stack.env`), so values are
shell-quoted where they need it and reading undoes that quoting. cargo lambda's
`--env-file` parser is stricter (it rejects an unquoted value containing `=`, such as
RUST_LOG=info,chainrun=debug) and gets a quoting of its own. Files are written
atomically (a reader never sees half a file) and readable by their owner only: they
hold the stack's JWT secret.
"""

from __future__ import annotations

import os
import shlex
from pathlib import Path


def read_env_file(path: Path | str, *, missing_ok: bool = True) -> dict[str, str]:
    """The KEY=VALUE lines of a file (comments and blank lines skipped, quotes undone);
    {} for a missing file unless missing_ok is false."""
    out: dict[str, str] = {}
    try:
        with open(path, encoding="utf-8") as f:
            for line in f:
                line = line.strip()
                if not line or line.startswith("#") or "=" not in line:
                    continue
                k, v = line.split("=", 1)
                out[k.strip()] = _unquote(v.strip())
    except FileNotFoundError:
        if not missing_ok:
            raise
    return out


def write_env_file(path: Path | str, values: dict[str, str], quote=shlex.quote) -> None:
    """Write values as KEY=VALUE lines, each value through `quote` (shell quoting by
    default; quote_for_cargo_lambda for watch's --env-file)."""
    write_private(Path(path), "".join(f"{k}={quote(str(v))}\n" for k, v in values.items()))


def quote_for_cargo_lambda(v: str) -> str:
    # Double quotes with \\ \" \$ escapes are what cargo lambda's parser accepts.
    return '"' + v.replace("\\", "\\\\").replace('"', '\\"').replace("$", "\\$") + '"'


def write_private(path: Path, text: str) -> None:
    """Replace path with text atomically, readable by its owner only."""
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(text)
    os.chmod(tmp, 0o600)  # an older tmp file may have had other bits
    os.replace(tmp, path)


def _unquote(v: str) -> str:
    if len(v) >= 2 and v[0] == v[-1] and v[0] in "'\"":
        try:
            return shlex.split(v)[0]
        except ValueError:
            return v[1:-1]
    return v
