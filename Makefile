# chainrun — local development front door. Needs only Rust (cargo) and Python 3.
#
#   make demo    bring a local stack up on free ports, run a sample workflow end to end
#                through the `chainrun` CLI with live progress, stop everything again
#   make test    cargo test --workspace, then the local stack's tests, the end-to-end
#                tests and a short seeded chaos suite (each suite starts its own stacks)
#   make chaos   the full chaos suite: runners killed, duplicate deliveries, throttling,
#                DynamoDB faults, lost dispatches, long runs over short invocations
#   make up / make down / make token USER=alice GROUPS=eng,ops
#
# The stack (DynamoDB via moto, dev Bedrock server, async-invoke proxy, cargo lambda
# watch) is driven by `python -m infra.stack` (infra/stack.py); see its docstring.

SHELL   := /bin/bash
PYTHON  ?= python3
VENV    := .venv
PY      := $(VENV)/bin/python
STAMP   := $(VENV)/.requirements.stamp
LOCAL   := .local
DEMO_DIR := $(LOCAL)/demo
# `make down` must work even without a venv (infra.stack down uses only the stdlib).
DOWN_PY  = $(if $(wildcard $(PY)),$(PY),$(PYTHON))

USER    ?= dev
GROUPS  ?=

.DEFAULT_GOAL := help
.PHONY: help venv build up down token demo test chaos bench cost-check

help:
	@echo "make demo                          local stack + sample workflow with live progress"
	@echo "make test                          cargo unit tests + end-to-end tests + a short seeded chaos suite"
	@echo "make chaos [TRIALS=20 SEED=1 SCENARIOS=kill,…]  fault injection on local stacks (kills, duplicates, storms, …)"
	@echo "make up | down                     start/stop a background stack (.local/stack.env)"
	@echo "make token USER=alice GROUPS=a,b   bearer token for the running stack"
	@echo "make bench                         scheduler benchmark (dataflow vs waves, engine overhead), cost levers' savings, store requests per step"
	@echo "make cost-check                    1,000 random budgeted runs: no overrun, estimate brackets each"
	@echo "make venv | build                  .venv from infra/requirements.txt | cargo build --bins and the chainrun CLI"

# Re-install only when requirements.txt is newer than the stamp.
venv: $(STAMP)

$(STAMP): infra/requirements.txt
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --disable-pip-version-check -q -r infra/requirements.txt
	@touch $@

# The CLI (cli/) is a workspace of its own, so `cargo lambda watch` does not serve it; it
# builds into the same target/ (target/debug/chainrun).
CLI_CARGO := CARGO_TARGET_DIR=$(CURDIR)/target cargo
CLI_MANIFEST := --manifest-path cli/Cargo.toml

build:
	cargo build --bins
	$(CLI_CARGO) build $(CLI_MANIFEST)

up: venv build
	$(PY) -m infra.stack up --dir $(LOCAL) --no-build

down:
	$(DOWN_PY) -m infra.stack down --dir $(LOCAL)
	@$(DOWN_PY) -m infra.stack down --dir $(DEMO_DIR) --if-orphaned >/dev/null 2>&1 || true

token: venv
	@$(PY) -m infra.local_token --user "$(USER)" --groups "$(GROUPS)" --env-file $(LOCAL)/stack.env

# Own stack in .local/demo on its own free ports; `infra.stack run` stops it on exit, failure
# or Ctrl-C and returns the demo's exit code: `chainrun run`'s (0 completed, 1 failed, 2 not
# started, 3 waiting for input).
demo: venv build
	$(PY) -m infra.stack run --dir $(DEMO_DIR) --no-build -- $(PY) -m infra.demo --cli target/debug/chainrun

test: venv
	@rc=0; \
	cargo check -q -p chainrun-core --no-default-features || rc=1; \
	CHAINRUN_MOTO=1 cargo test --workspace || rc=1; \
	$(CLI_CARGO) test $(CLI_MANIFEST) || rc=1; \
	$(PY) -m pytest tests/infra tests/e2e -q || rc=1; \
	$(PY) -m pytest tests/chaos -q || rc=1; \
	exit $$rc

# The full chaos suite (tests/chaos): every scenario on its own local stack, real binaries,
# no person acting. Its last line: chaos: trials=N completed=N stuck=0 duplicated_events=0
# double_paid_calls=0 overruns=0 max_recovery_s=X; non-zero exit if any count is not 0.
TRIALS    ?= 20
SEED      ?= 1
SCENARIOS ?= kill,duplicates,storm,dynamodb,lost,steer,review,chain
# Progress and problems go to stderr and the scenario lines to stdout, the summary last
# (make's own "Error 1" note on a failure goes to stderr after it).
chaos: venv
	@$(PY) -m tests.chaos --trials $(TRIALS) --seed $(SEED) --scenarios $(SCENARIOS)

# 1. Scheduler: a release build of the pure core only (no AWS crates), the engine with the
#    in-memory adapters.
# 2. Store traffic: the engine and the DynamoDB adapters run the sample workflow against a
#    moto server that the example starts on a free loopback port and stops itself (on
#    failure too); it counts DynamoDB requests per step. A debug build: it counts, not times.
bench: venv
	cargo run -q --release -p chainrun-core --no-default-features --example scheduler_bench
	cargo run -q --release -p chainrun-core --no-default-features --example levers_bench
	CHAINRUN_MOTO_SERVER="$(abspath $(VENV))/bin/moto_server" cargo run -q -p chainrun-core --example store_bench

# Release build of the pure core only: random budgeted runs against the in-memory adapters,
# checking no run exceeds its budget and the estimate brackets every run's cost.
cost-check:
	cargo run -q --release -p chainrun-core --no-default-features --example cost_check
