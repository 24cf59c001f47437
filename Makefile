# The README's two commands: `make dev` (the demo) and `make test` (the whole suite).
# uv may have just been installed by setup without a PATH entry: `python3 -m uv` then.
UV ?= $(shell command -v uv >/dev/null 2>&1 && echo uv || echo python3 -m uv)
.PHONY: setup test dev lint soak bench

setup:
	./scripts/setup.sh

test: setup
	$(UV) run pytest

lint:
	$(UV) run ruff check worker tests bench
	$(UV) run ruff format --check worker tests bench
	$(UV) run mypy

dev: setup
	$(UV) run worker dev

# The chaos soak: 200 jobs through 3 worker processes while workers are killed, stopped
# and redeployed and Redis restarts; every job must end exactly once (tests/chaos_soak.py).
soak: setup
	$(UV) run python -m tests.chaos_soak --jobs 200

# The benchmarks (bench/README.md): runs them and writes bench/RESULTS.md with PNG plots
# under bench/plots/ (about 12 minutes on 2 cores; `bench/report.py --quick`: a smoke run).
bench: setup
	$(UV) run --group bench python bench/report.py
