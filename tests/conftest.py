"""What both suites share.

The test process is made hermetic: boto3 clients the tests create (for moto, the dev
model server, a stack's tables) never pick up a developer's AWS_PROFILE, ~/.aws config
or AWS_ENDPOINT_URL overrides. Stacks the tests start get the environment as it was
(`caller_env`): BEDROCK=aws needs the real AWS setup, and the stack decides itself what
of it its processes see.
"""

from __future__ import annotations

import os

import pytest

from infra.aws_env import make_environ_local

_CALLER_ENV = dict(os.environ)
if (os.environ.get("BEDROCK") or "").lower() != "aws":
    make_environ_local()


@pytest.fixture(scope="session")
def caller_env() -> dict[str, str]:
    """The environment pytest was started with, before the AWS_* variables were replaced."""
    return dict(_CALLER_ENV)
