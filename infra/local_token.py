#!/usr/bin/env python3
"""Mint a bearer token for the local stack (CHAINRUN_AUTH=local-jwt).

HS256 JWT with claims `sub`, `groups`, `iss: "chainrun-local"`, `aud: "chainrun"`,
`iat`, `exp` (default +12 h), signed with the stack's CHAINRUN_LOCAL_JWT_SECRET.

CLI:
    python infra/local_token.py --user alice --groups eng,ops [--secret S] [--env-file .local/stack.env]
prints just the token (the secret defaults to CHAINRUN_LOCAL_JWT_SECRET from the
env file, then from the environment).

Library: mint(secret, user, groups=(), ttl_s=43200) -> str; decode(secret, token) -> dict.
"""

import argparse as _argparse
import os as _os
import sys as _sys
import time as _time

ISSUER = "chainrun-local"
AUDIENCE = "chainrun"
DEFAULT_TTL_S = 12 * 3600


def mint(secret: str, user: str, groups=(), ttl_s: int = DEFAULT_TTL_S, **extra_claims) -> str:
    """Return an HS256 JWT for `user` in `groups`, valid for ttl_s seconds."""
    import jwt  # PyJWT

    if not secret:
        raise ValueError("empty JWT secret")
    if not user:
        raise ValueError("empty user")
    now = int(_time.time())
    claims = {
        "sub": user,
        "groups": [str(g) for g in groups],
        "iss": ISSUER,
        "aud": AUDIENCE,
        "iat": now,
        "exp": now + int(ttl_s),
    }
    claims.update(extra_claims)
    tok = jwt.encode(claims, secret, algorithm="HS256")
    return tok.decode() if isinstance(tok, bytes) else tok


def decode(secret: str, tok: str) -> dict:
    """Verify and decode a token minted by mint() (signature, iss, aud, exp)."""
    import jwt

    return jwt.decode(tok, secret, algorithms=["HS256"], audience=AUDIENCE, issuer=ISSUER)


def read_env_file(path: str) -> dict:
    """Parse a KEY=VALUE file (as written by infra/stack.py); missing file -> {}."""
    out = {}
    try:
        with open(path, encoding="utf-8") as f:
            for line in f:
                line = line.strip()
                if not line or line.startswith("#") or "=" not in line:
                    continue
                k, v = line.split("=", 1)
                v = v.strip()
                if len(v) >= 2 and v[0] == v[-1] and v[0] in "'\"":
                    v = v[1:-1]
                out[k.strip()] = v
    except FileNotFoundError:
        pass
    return out


def _default_env_file() -> str:
    root = _os.path.dirname(_os.path.dirname(_os.path.abspath(__file__)))
    return _os.path.join(root, ".local", "stack.env")


def main(argv=None) -> int:
    ap = _argparse.ArgumentParser(description="Print a local bearer token for the chainrun stack.")
    ap.add_argument("--user", "-u", required=True)
    ap.add_argument("--groups", "-g", default="", help="comma-separated, e.g. eng,ops")
    ap.add_argument("--secret", help="HS256 secret (default: CHAINRUN_LOCAL_JWT_SECRET of the env file)")
    ap.add_argument("--env-file", default=_default_env_file())
    ap.add_argument("--ttl", type=int, default=DEFAULT_TTL_S, help="lifetime in seconds")
    args = ap.parse_args(argv)

    secret = args.secret
    if not secret:
        secret = read_env_file(args.env_file).get("CHAINRUN_LOCAL_JWT_SECRET")
    if not secret:
        secret = _os.environ.get("CHAINRUN_LOCAL_JWT_SECRET")
    if not secret:
        print(f"token: no secret: pass --secret, or start the stack (make up) so that "
              f"{args.env_file} exists", file=_sys.stderr)
        return 2
    groups = [g.strip() for g in args.groups.split(",") if g.strip()]
    print(mint(secret, args.user, groups, ttl_s=args.ttl))
    return 0


if __name__ == "__main__":
    _sys.exit(main())
