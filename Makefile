# The two commands a new user needs; both install everything first.
.PHONY: install demo test test-fast lint bench

install:
	bash scripts/install.sh

demo: install
	bash scripts/demo.sh

test: install
	.venv/bin/python -m pytest -q

test-fast: install
	.venv/bin/python -m pytest -q -m "not slow"

# The checks tests/test_architecture.py runs: lint and the layout's import contracts.
lint: install
	.venv/bin/ruff check .
	.venv/bin/lint-imports

bench: install
	.venv/bin/python benchmarks/bench_pipeline.py
	.venv/bin/python benchmarks/bench_pacs.py
