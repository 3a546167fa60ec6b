# The two commands README.md gives a new user; both set up .venv first (fast when already done).
.PHONY: setup demo test

setup:
	@bash scripts/setup.sh

demo: setup
	.venv/bin/cllm demo

test: setup
	.venv/bin/python -m pytest -q
