.PHONY: help run test lint bench
help:  ## list targets
	@grep -E '^[a-z]+:.*##' Makefile | sed 's/:.*## /\t/'
run:  ## install and run the relay on SQLite under ./data
	bash scripts/run.sh
test:  ## install and run the whole test suite
	bash scripts/test.sh
lint:  ## ruff and mypy
	bash scripts/dev-env.sh && .venv/bin/ruff check . && .venv/bin/ruff format --check . && .venv/bin/mypy
bench:  ## print the hot-path benchmarks
	bash scripts/dev-env.sh && for b in scripts/bench_*.py; do .venv/bin/python $$b; done
