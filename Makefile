# `make demo`: set up and run the main job on the embedded default model.
# `make test`: set up and run the whole test suite.
.PHONY: setup setup-test demo test lint bench

setup:
	./scripts/setup.sh

setup-test:
	./scripts/setup.sh test

demo: setup
	.venv/bin/falconet generate "The" --max-tokens 48

test: setup-test
	.venv/bin/python -m pytest -q

lint:
	.venv/bin/ruff check falconet tests benchmarks && .venv/bin/ruff format --check falconet tests benchmarks

bench:
	.venv/bin/python benchmarks/bench_generate.py
