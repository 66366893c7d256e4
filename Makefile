# The two commands of the README, and the slower suites beside them.
.PHONY: demo test test-nspawn test-kernel test-slow bench

demo:
	@scripts/setup.sh
	.venv/bin/liveupdatectl demo

test:
	@scripts/setup.sh
	.venv/bin/ruff check liveupdated tests bench
	.venv/bin/mypy
	.venv/bin/python -m pytest -q

test-nspawn:
	@scripts/setup.sh
	@scripts/nspawn-deps.sh
	.venv/bin/python -m pytest -q -m nspawn tests/nspawn

test-kernel:
	@scripts/setup.sh
	@scripts/kernel/deps.sh
	.venv/bin/python -m pytest -q -m kernel tests/kernel

test-slow:
	@scripts/setup.sh
	.venv/bin/python -m pytest -q -m slow

bench:
	@scripts/setup.sh
	.venv/bin/python bench/run.py
