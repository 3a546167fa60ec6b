# The two commands README.md gives a new user; both set up .venv first (fast when already done).
# test-fast is the quick loop: the logic without the real model and the heavy tests.
.PHONY: setup demo test test-fast

setup:
	@bash scripts/setup.sh

demo: setup
	.venv/bin/cllm demo

# Two workers (pytest-xdist), a test file each at a time: most tests are bound by Python overhead
# on tiny models, so two run side by side on two cores at nearly the speed of one.
test: setup
	.venv/bin/python -m pytest -q -n 2 --dist loadfile

test-fast: setup
	.venv/bin/python -m pytest -q -n 2 --dist loadfile -m "not slow and not heavy"
