# The two set-up commands of README.md. `make demo` runs the built-in CPU job, `make test` the test suite;
# both install what they need first (torch pinned to the CPU build for machines without a GPU).
PY ?= python
STAMP := .venv-installed

$(STAMP): pyproject.toml
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ".[test]"
	touch $(STAMP)

install: $(STAMP)

# One thread: the tiny model's ops are too small to share, and the README's figures were measured so.
demo: $(STAMP)
	OMP_NUM_THREADS=1 $(PY) train.py

# Triton kernels run on the CPU under the interpreter, so CI checks them against their references.
test: $(STAMP)
	TRITON_INTERPRET=1 $(PY) -m pytest -q tests

bench: $(STAMP)
	TRITON_INTERPRET=1 $(PY) -m pytest -q bench --benchmark-only

.PHONY: install demo test bench
