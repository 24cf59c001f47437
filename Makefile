# The README's two commands: `make dev` (the demo) and `make test` (the whole suite).
# uv may have just been installed by setup without a PATH entry: `python3 -m uv` then.
UV ?= $(shell command -v uv >/dev/null 2>&1 && echo uv || echo python3 -m uv)
.PHONY: setup test dev lint

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
