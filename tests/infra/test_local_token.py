"""Tests of infra/local_token.py: the bearer tokens the API accepts in local mode."""

from __future__ import annotations

import subprocess
import sys
import time

import jwt
import pytest

from infra import ROOT, local_token

SECRET = "0123456789abcdef" * 4


def test_token_carries_the_claims():
    tok = local_token.mint(SECRET, "alice", ["eng", "ops"])
    claims = jwt.decode(tok, SECRET, algorithms=["HS256"], audience="chainrun", issuer="chainrun-local")
    assert claims["sub"] == "alice"
    assert claims["groups"] == ["eng", "ops"]
    assert claims["iss"] == "chainrun-local" and claims["aud"] == "chainrun"
    assert claims["exp"] - claims["iat"] == 12 * 3600
    assert abs(claims["iat"] - time.time()) < 60
    assert jwt.get_unverified_header(tok)["alg"] == "HS256"
    assert local_token.decode(SECRET, tok)["sub"] == "alice"


def test_token_rejects_wrong_secret_and_expiry():
    tok = local_token.mint(SECRET, "bob")
    with pytest.raises(jwt.InvalidSignatureError):
        jwt.decode(tok, "f" * 64, algorithms=["HS256"], audience="chainrun")
    expired = local_token.mint(SECRET, "bob", ttl_s=-10)
    with pytest.raises(jwt.ExpiredSignatureError):
        local_token.decode(SECRET, expired)
    assert local_token.decode(SECRET, tok)["groups"] == []


def test_token_cli(tmp_path):
    run = lambda *a: subprocess.run([sys.executable, "-m", "infra.local_token", *a],  # noqa: E731
                                    cwd=ROOT, capture_output=True, text=True, timeout=60)
    r = run("--user", "alice", "--groups", "eng, ops", "--secret", SECRET)
    assert r.returncode == 0, r.stderr
    tok = r.stdout.strip()
    assert r.stdout == tok + "\n" and tok.count(".") == 2
    assert local_token.decode(SECRET, tok)["groups"] == ["eng", "ops"]

    env_file = tmp_path / "stack.env"
    env_file.write_text(f"API_URL=http://x\nCHAINRUN_LOCAL_JWT_SECRET={SECRET}\n")
    r = run("--user", "carol", "--env-file", str(env_file))
    assert r.returncode == 0, r.stderr
    assert local_token.decode(SECRET, r.stdout.strip())["sub"] == "carol"

    r = run("--user", "dave", "--env-file", str(tmp_path / "missing.env"))
    assert r.returncode == 2 and r.stdout == "" and "no secret" in r.stderr
