# The two commands README.md gives a new user; both set up .venv first (fast when already done).
# test-fast is the quick loop: the logic without the real model and the heavy tests.
.PHONY: setup demo test test-fast

setup:
	@bash scripts/setup.sh

demo: setup
	.venv/bin/cllm demo

test: setup
	.venv/bin/python -m pytest -q

test-fast: setup
	.venv/bin/python -m pytest -q -m "not slow and not heavy"
