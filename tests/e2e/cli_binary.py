"""The `chainrun` CLI binary, for the tests that drive it (test_cli.py).

build() compiles it once per test session with cargo, which rebuilds only what changed
(a fresh clone builds it; an up-to-date one costs a second), into the repository's
target/ where `make` puts it too. Cli runs it as a user would, with an environment of
its own: the stack's API_URL and a token given explicitly, nothing inherited that could
point it elsewhere (a developer's CHAINRUN_TOKEN, or a `.local/stack.env` found from the
working directory, which is a temp dir).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
from pathlib import Path

from infra import ROOT

BINARY = ROOT / "target" / "debug" / "chainrun"
ANSI = re.compile(r"\x1b\[")


def build() -> Path:
    env = dict(os.environ, CARGO_TARGET_DIR=str(ROOT / "target"))
    done = subprocess.run(["cargo", "build", "--quiet", "--manifest-path", str(ROOT / "cli" / "Cargo.toml")],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=1800)
    if done.returncode != 0:
        raise RuntimeError(f"cargo build of the CLI failed:\n{done.stderr[-4000:]}")
    return BINARY


class Result:
    def __init__(self, done: subprocess.CompletedProcess):
        self.code, self.out, self.err = done.returncode, done.stdout, done.stderr

    def json(self):
        return json.loads(self.out)

    def __repr__(self) -> str:
        return f"exit {self.code}\n--- stdout\n{self.out}\n--- stderr\n{self.err}"


class Cli:
    def __init__(self, binary: Path, api_url: str, cwd: Path):
        self.binary, self.api_url, self.cwd = binary, api_url, cwd

    def env(self, token: str | None, **extra: str) -> dict[str, str]:
        env = {"PATH": os.environ.get("PATH", ""), "HOME": str(self.cwd), "API_URL": self.api_url}
        if token:
            env["CHAINRUN_TOKEN"] = token
        env.update(extra)
        return env

    def __call__(self, *args: str, token: str | None = None, env: dict | None = None, timeout: float = 120,
                 stdin: str | None = None) -> Result:
        done = subprocess.run([str(self.binary), *args], cwd=self.cwd, env=env or self.env(token), input=stdin,
                              capture_output=True, text=True, timeout=timeout)
        return Result(done)
