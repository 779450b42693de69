"""chainrun's local stack and its tools, as one package.

Run the tools from the repository root (the Makefile does):

    python -m infra.stack up|down|env|run   the local stack (see infra/stack.py)
    python -m infra.devmodel                the dev Bedrock server
    python -m infra.invoke_proxy            the async-invoke proxy
    python -m infra.local_token             a bearer token for a running stack
    python -m infra.demo                    the sample workflow, followed live

What they share lives once, in modules named after what they do: `envfile` (the
KEY=VALUE files a stack writes), `net` (free ports, one HTTP call, waiting for
something to come up), `serve` (what the two HTTP servers share), `processes` (children
in their own sessions, told apart from recycled pids by lock bytes) and `tables`
(DynamoDB tables from tables.json).

Importing any of them needs only the standard library (boto3 and PyJWT are imported
where they are used), so `make down` works without the project venv and the dev model
server runs from any Python 3.11.
"""

from pathlib import Path

INFRA = Path(__file__).resolve().parent
ROOT = INFRA.parent
