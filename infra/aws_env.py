"""The AWS setup everything local runs with: dummy credentials, a fixed region, and none
of the developer's own (AWS_PROFILE, ~/.aws config and credentials, AWS_ENDPOINT_URL_*
overrides, instance metadata). The functions of the stack get it in their environment,
the stack's own boto3 calls and the test process get it in theirs, so nothing local can
reach, or be billed to, a real account by accident.
"""

from __future__ import annotations

import contextlib
import os

DEFAULT_REGION = "us-east-1"


def local_aws_env(region: str = DEFAULT_REGION) -> dict[str, str]:
    return {
        "AWS_ACCESS_KEY_ID": "test",
        "AWS_SECRET_ACCESS_KEY": "test",
        "AWS_REGION": region,
        "AWS_DEFAULT_REGION": region,  # boto3 and the aws CLI read this one
        "AWS_EC2_METADATA_DISABLED": "true",
        "AWS_CONFIG_FILE": os.devnull,
        "AWS_SHARED_CREDENTIALS_FILE": os.devnull,
    }


def make_environ_local(region: str = DEFAULT_REGION) -> dict[str, str]:
    """Replace every AWS_* variable of this process by local_aws_env(region); return
    what was replaced."""
    saved = {k: v for k, v in os.environ.items() if k.upper().startswith("AWS_")}
    for k in saved:
        del os.environ[k]
    os.environ.update(local_aws_env(region))
    return saved


@contextlib.contextmanager
def local_aws(region: str = DEFAULT_REGION):
    """make_environ_local for the duration of a with block."""
    saved = make_environ_local(region)
    try:
        yield
    finally:
        for k in [k for k in os.environ if k.upper().startswith("AWS_")]:
            del os.environ[k]
        os.environ.update(saved)
