# The single interface: every target does its own set-up on a fresh machine.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
PACKAGES := detfleet shared producer consumer

.PHONY: help install services tools setup test unit integration lint format demo bench bench-scale soak drill train up down clean dashboard

help:
	@echo "make demo   run the main job end to end"
	@echo "make test   lint, then unit and integration tests against the real RabbitMQ and Postgres"
	@echo "make lint   ruff and mypy (strict) on the packages and tests"
	@echo "make drill  the disaster-recovery drill: a private 3-node cluster and a database failover (< 5 min)"
	@echo "make bench | bench-scale | soak | train | up | down | clean"

$(STAMP): pyproject.toml
	test -d $(VENV) || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[dev,bench]'  # bench too: lint type-checks bench/ against its peers
	touch $(STAMP)

install: $(STAMP)

services:
	scripts/services.sh

# promtool checks the Prometheus rules in deploy/ (Debian's prometheus package ships it).
tools:
	scripts/tools.sh

# Topology on the default vhost and the database with its migrations: what demo and the fleet need.
setup: install services
	$(BIN)/detfleet topology apply
	$(BIN)/detfleet db migrate

lint: install
	$(BIN)/ruff check $(PACKAGES) tests bench deploy/grafana
	$(BIN)/ruff format --check $(PACKAGES) tests bench deploy/grafana
	$(BIN)/mypy

format: install
	$(BIN)/ruff format $(PACKAGES) tests bench deploy/grafana
	$(BIN)/ruff check --fix $(PACKAGES) tests bench deploy/grafana

unit: install
	$(BIN)/pytest tests/unit -q

integration: setup
	$(BIN)/pytest tests/integration -q

test: lint setup tools
	$(BIN)/pytest tests -q -p no:cacheprovider

demo: setup
	$(BIN)/python -m detfleet.demo

# Every peer side by side on the same frames and machine: ceilings, Celery, a pika seed-style consumer and
# detfleet, with the shipped and a compute-bound model, then the scale part; writes bench/results/ and docs/performance.md.
bench: setup
	$(BIN)/python -m bench.run

# Only the scale part (backlog depth to 200,000 frames, 1 and 1,000 cameras, 1-8 replicas, lane isolation),
# about 20 minutes on 2 cores; DEEPEST=20000 for a shorter run. Adds its tables to docs/performance.md.
bench-scale: setup
	$(BIN)/python -m bench.run --scale $(if $(DEEPEST),--deepest $(DEEPEST))

# The long reliability runs (make test runs short versions of each): a 10-minute chaos soak on a private
# RabbitMQ node and Postgres, 10,000 fuzzed inputs through the broker, two minutes of overload, and five
# minutes of the cluster soak (a 3-node cluster and a database pair; make drill is its short version).
soak: setup
	$(BIN)/python -m tests.chaos.soak --duration 600 --tasks 11500 --log-dir out/soak
	FUZZ_INPUTS=10000 $(BIN)/pytest tests/integration/test_fuzz.py -q -p no:cacheprovider
	$(BIN)/python -m tests.chaos.overload --duration 120
	$(BIN)/python -m tests.chaos.cluster --duration 300 --tasks 3000 --log-dir out/soak-cluster

# The disaster-recovery drill (docs/disaster-recovery.md): a private 3-node RabbitMQ cluster with quorum queues
# and a Postgres primary with a synchronous standby; kills the lanes' leader node, then fails the primary over,
# and prints each event's recovery time with lost and duplicate counts. Under five minutes on 2 cores.
drill: install
	$(BIN)/python -m tests.chaos.cluster --drill --log-dir out/drill --json out/drill/summary.json

# Retrains the shipped detector from generated frames (CPU, under 20 minutes on 2 cores) and rewrites
# models/ with the model card; torch 2.13.0 CPU comes with the train extra.
train: install
	$(BIN)/pip install -q -e '.[dev,train]'
	$(BIN)/python -m detfleet.train

# The compose stack (docs/deployment.md); each says in one line what is missing instead of failing later.
COMPOSE := docker compose -f deploy/docker-compose.yml
NEED_DOCKER = command -v docker >/dev/null || { echo "make $@: Docker is not installed here" >&2; exit 1; }; \
	docker compose version >/dev/null 2>&1 || { echo "make $@: the Docker Compose plugin is missing" >&2; exit 1; }; \
	docker info >/dev/null 2>&1 || { echo "make $@: no Docker engine answers (is the daemon running?)" >&2; exit 1; }

up:
	@$(NEED_DOCKER)
	@test -f deploy/.env || { echo "make up: copy deploy/.env.example to deploy/.env and set its passwords" >&2; exit 1; }
	$(COMPOSE) up -d --build

down:
	@$(NEED_DOCKER)
	$(COMPOSE) down

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache out

# Regenerates deploy/grafana/dashboards/detfleet.json from deploy/grafana/dashboard.py.
dashboard: install
	$(BIN)/python deploy/grafana/dashboard.py
