# The two commands README.md gives a new user; both set up .venv first (fast when already done).
# test-fast is the quick loop: the logic without the real model and the heavy tests.
.PHONY: setup demo test test-fast

setup:
	@bash scripts/setup.sh

demo: setup
	.venv/bin/cllm demo

# Two workers (pytest-xdist), a test file each at a time: most tests are bound by Python overhead
# on tiny models, so two run side by side on two cores at nearly the speed of one. Files go out in
# the order tests/conftest.py gives them (longest first); xdist's own reorder (most tests first)
# left the one-test wheel file, the longest, to the end.
PYTEST = .venv/bin/python -m pytest -q -n 2 --dist loadfile --no-loadscope-reorder

test: setup
	$(PYTEST)

test-fast: setup
	$(PYTEST) -m "not slow and not heavy"
