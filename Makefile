# The set-up commands of README.md: `make demo` runs the built-in CPU job, `make test` the test suite.
# Both first install what they need, into
#   - the active virtual environment (or conda environment) when there is one, else
#   - the project's own .venv, made with `python3 -m venv --system-site-packages` (a PEP 668 system Python
#     refuses pip installs; the system's packages stay visible, so a torch installed there is used as is).
# torch is installed (2.13.0, the CPU build) only where no torch >= 2.5 can be imported: an existing CPU or
# CUDA build is never replaced. `make PY=/path/to/python ...` picks the interpreter yourself.
ifneq ($(VIRTUAL_ENV)$(CONDA_PREFIX),)
PY ?= python
WHERE := the active environment $(VIRTUAL_ENV)$(if $(VIRTUAL_ENV),,$(CONDA_PREFIX))
else
PY ?= .venv/bin/python
WHERE := the project's virtual environment .venv
endif
NEW_VENV := $(filter .venv/bin/python,$(PY))
SYSTEM_PY ?= python3
# one install stamp per interpreter, so switching environments installs again
STAMP = .make/installed-$(shell $(PY) -c 'import sys, zlib; print(zlib.crc32(sys.prefix.encode()))' 2>/dev/null)
# "1" when torch sees a GPU: then the kernels are compiled for it instead of interpreted
HAS_GPU = $(shell $(PY) -c 'import torch; print(int(torch.cuda.is_available()))' 2>/dev/null)

.venv/bin/python:
	$(SYSTEM_PY) -m venv --system-site-packages .venv || { echo "make: could not create .venv with $(SYSTEM_PY) -m venv (on Debian/Ubuntu: apt install python3-venv)"; exit 2; }

install: $(NEW_VENV)
	@echo "make: using $(WHERE) ($$($(PY) -c 'import sys; print(sys.executable, sys.version.split()[0])'))"
	@$(MAKE) --no-print-directory -s $(STAMP)

.make/installed-%: pyproject.toml
	@if $(PY) -c 'import sys, torch; sys.exit(tuple(map(int, torch.__version__.split(".")[:2])) < (2, 5))' 2>/dev/null; \
	then echo "make: keeping the installed torch $$($(PY) -c 'import torch; print(torch.__version__)')"; \
	else echo "make: no torch >= 2.5 here: installing torch==2.13.0 (CPU build)"; $(PY) -m pip install -q torch==2.13.0; fi
	@echo "make: pip install -e .[test] (nanoufo and what it needs)"
	$(PY) -m pip install -q -e ".[test]"
	@mkdir -p .make && touch $@

# One thread: the tiny model's ops are too small to share, and the README's figures were measured so.
demo: install
	OMP_NUM_THREADS=1 $(PY) train.py

# Triton kernels run on the CPU under the interpreter, so CI checks them against their references.
test: install
	TRITON_INTERPRET=1 $(PY) -m pytest -q tests

# The kernel tests compiled on the GPU (needs torch with CUDA and a GPU).
test-gpu: install
	@[ "$(HAS_GPU)" = 1 ] || { echo "make test-gpu: torch sees no GPU here ($(PY)); make test runs the kernels on the CPU"; exit 2; }
	NANOUFO_TEST_DEVICE=cuda $(PY) -m pytest -q tests/test_kernels_*.py

# Kernel microbenchmarks: compiled and at real shapes on a GPU, interpreted at tiny shapes on the CPU.
bench: install
	$(if $(filter 1,$(HAS_GPU)),,TRITON_INTERPRET=1 )$(PY) -m pytest -q bench --benchmark-only

.PHONY: install demo test test-gpu bench
