"""chainrun's chaos suite: fault injection against the real binaries on local stacks.

    python -m tests.chaos [--trials N] [--seed S] [--scenarios kill,duplicates,…] [--short] [--keep]

`make chaos` runs the full suite; `make test` runs a short seeded version as pytest tests
(tests/chaos/test_chaos.py). Scenarios: tests/chaos/scenarios.py; checks:
tests/chaos/checks.py; the stack-facing driver: tests/chaos/driver.py.
"""
