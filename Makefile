# tollgate — the two commands of the quick start, and a few more.
.PHONY: run test setup setup-run build lint bench

CARGO ?= cargo

# What running needs (a C compiler, cmake); nothing the tests alone use.
setup-run:
	@scripts/setup.sh run

# What the tests need on top: redis-server, promtool, curl, h2load, and the
# test-only Python packages in a virtual environment (.venv).
setup:
	@scripts/setup.sh test

build: setup-run
	$(CARGO) build --release

# Starts the demo upstream and the proxy on conf/tollgate.yaml (no Redis needed).
run: build
	@scripts/run-demo.sh

# The whole suite: formatting, lints, unit and integration tests.
test: setup
	$(CARGO) fmt --check
	$(CARGO) clippy --all-targets -- -D warnings
	@if $(CARGO) nextest --version >/dev/null 2>&1; then \
		$(CARGO) nextest run --no-fail-fast; \
	else \
		$(CARGO) test --no-fail-fast; \
	fi

bench: setup
	bench/run.sh
