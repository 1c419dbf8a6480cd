# tollgate — the two commands of the quick start, and a few more.
.PHONY: run test setup build lint bench

CARGO ?= cargo

setup:
	@scripts/setup.sh

build: setup
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
