"""Mint a bearer token for the local stack (CHAINRUN_AUTH=local-jwt).

HS256 JWT with claims `sub`, `groups`, `iss: "chainrun-local"`, `aud: "chainrun"`,
`iat`, `exp` (default +12 h), signed with the stack's CHAINRUN_LOCAL_JWT_SECRET.

CLI:
    python -m infra.local_token --user alice --groups eng,ops [--secret S] [--env-file .local/stack.env]
prints just the token (the secret defaults to CHAINRUN_LOCAL_JWT_SECRET from the
env file, then from the environment).

Library: mint(secret, user, groups=(), ttl_s=43200) -> str; decode(secret, token) -> dict.
"""

import argparse
import os
import sys
import time

from . import ROOT
from .envfile import read_env_file

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
    now = int(time.time())
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


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description="Print a local bearer token for the chainrun stack.")
    ap.add_argument("--user", "-u", required=True)
    ap.add_argument("--groups", "-g", default="", help="comma-separated, e.g. eng,ops")
    ap.add_argument("--secret", help="HS256 secret (default: CHAINRUN_LOCAL_JWT_SECRET of the env file)")
    ap.add_argument("--env-file", default=str(ROOT / ".local" / "stack.env"))
    ap.add_argument("--ttl", type=int, default=DEFAULT_TTL_S, help="lifetime in seconds")
    args = ap.parse_args(argv)

    secret = args.secret
    if not secret:
        secret = read_env_file(args.env_file).get("CHAINRUN_LOCAL_JWT_SECRET")
    if not secret:
        secret = os.environ.get("CHAINRUN_LOCAL_JWT_SECRET")
    if not secret:
        print(f"token: no secret: pass --secret, or start the stack (make up) so that "
              f"{args.env_file} exists", file=sys.stderr)
        return 2
    groups = [g.strip() for g in args.groups.split(",") if g.strip()]
    print(mint(secret, args.user, groups, ttl_s=args.ttl))
    return 0


if __name__ == "__main__":
    sys.exit(main())
