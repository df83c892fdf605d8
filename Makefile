# The two commands a new user needs; both install everything first.
.PHONY: install demo test test-fast bench

install:
	bash scripts/install.sh

demo: install
	bash scripts/demo.sh

test: install
	.venv/bin/python -m pytest -q

test-fast: install
	.venv/bin/python -m pytest -q -m "not slow"

bench: install
	.venv/bin/python benchmarks/bench_pipeline.py
	.venv/bin/python benchmarks/bench_pacs.py
