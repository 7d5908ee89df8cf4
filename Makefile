# The set-up commands of README.md: `make demo` runs the built-in CPU job, `make test` the test suite.
# Both first install what they need, into
#   - the active virtual environment (or conda environment) when there is one, else
#   - the project's own .venv, made with `python3 -m venv --system-site-packages` (a PEP 668 system Python
#     refuses pip installs; the system's packages stay visible, so a torch installed there is used as is).
# Versions: requirements-lock.txt, the exact releases the suite passed on (what CI tests), for everything but
# torch. torch is installed (2.13.0, the CPU build) only where no torch >= 2.9 can be imported: an existing
# CPU or CUDA build is never replaced, and then the triton it came with is kept too.
# `make test-latest` tests the newest releases instead, in .venv-latest; `make lock` rewrites the lock.
# `make PY=/path/to/python ...` picks the interpreter yourself.
LOCK ?= requirements-lock.txt
TORCH_DEFAULT := 2.13.0
TORCH_FLOOR := 2.9
VENV_FLAGS ?= --system-site-packages
ifneq ($(VIRTUAL_ENV)$(CONDA_PREFIX),)
PY ?= python
WHERE := the active environment $(VIRTUAL_ENV)$(if $(VIRTUAL_ENV),,$(CONDA_PREFIX))
else
PY ?= .venv/bin/python
WHERE := the project's virtual environment $(patsubst %/bin/python,%,$(PY))
endif
NEW_VENV := $(filter .venv%/bin/python,$(PY))
SYSTEM_PY ?= python3
PIP = $(PY) -m pip install -q
# one install stamp per interpreter and lock, so switching either installs again
STAMP = .make/installed-$(shell $(PY) -c 'import sys, zlib; print(zlib.crc32(sys.prefix.encode()))' 2>/dev/null)
# "1" when torch sees a GPU: then the kernels are compiled for it instead of interpreted
HAS_GPU = $(shell $(PY) -c 'import torch; print(int(torch.cuda.is_available()))' 2>/dev/null)
# exit status 0 when a torch >= TORCH_FLOOR can be imported; and when that torch names its own triton release
HAS_TORCH = $(PY) -c 'import sys, torch; sys.exit(tuple(map(int, torch.__version__.split(".")[:2])) < ($(subst .,$(comma),$(TORCH_FLOOR))))'
TORCH_OWNS_TRITON = $(PY) -c 'import sys, importlib.metadata as m; sys.exit(not any(r.startswith("triton") for r in m.requires("torch") or []))'
comma := ,

.venv/bin/python .venv-latest/bin/python:
	$(SYSTEM_PY) -m venv $(VENV_FLAGS) $(@D:/bin=) || { echo "make: could not create $(@D:/bin=) with $(SYSTEM_PY) -m venv (on Debian/Ubuntu: apt install python3-venv)"; exit 2; }

install: $(NEW_VENV)
	@echo "make: using $(WHERE) ($$($(PY) -c 'import sys; print(sys.executable, sys.version.split()[0])'))"
	@$(MAKE) --no-print-directory -s $(STAMP)-locked

# The lock pins everything but torch; a torch that was already here keeps its own triton.
.make/installed-%-locked: pyproject.toml $(LOCK)
	@mkdir -p .make
	@cp $(LOCK) .make/constraints.txt
	@if $(HAS_TORCH) 2>/dev/null; \
	then echo "make: keeping the installed torch $$($(PY) -c 'import torch; print(torch.__version__)')"; \
	     if $(TORCH_OWNS_TRITON); then grep -v '^triton==' $(LOCK) > .make/constraints.txt; fi; \
	else echo "make: no torch >= $(TORCH_FLOOR) here: installing torch==$(TORCH_DEFAULT) (CPU build)"; \
	     $(PIP) -c $(LOCK) torch==$(TORCH_DEFAULT); fi
	@echo "make: pip install -e .[test] with the versions of $(LOCK)"
	$(PIP) -c .make/constraints.txt -e ".[test]"
	@touch $@

# The newest releases of everything but torch (kept, or 2.13.0 where there is none), checked at every call.
install-latest: PY = .venv-latest/bin/python
install-latest: .venv-latest/bin/python
	@echo "make: using .venv-latest, the newest releases"
	@mkdir -p .make
	@$(HAS_TORCH) 2>/dev/null || $(PIP) torch==$(TORCH_DEFAULT)
	@$(PY) -c 'import torch; print(f"torch=={torch.__version__}")' > .make/latest-keep.txt
	@! $(TORCH_OWNS_TRITON) || $(PY) -c 'import triton; print(f"triton=={triton.__version__}")' >> .make/latest-keep.txt
	$(PIP) -U --upgrade-strategy eager -c .make/latest-keep.txt -e ".[test]"

# Two threads, as the README's figures were measured (a 2-core machine; 1.4 s an RL step against 2.1 s with one).
# The thread count changes how float sums are split, so another count gives another, equally valid, run.
demo: install
	OMP_NUM_THREADS=2 $(PY) train.py

# Triton kernels run on the CPU under the interpreter, so CI checks them against their references.
# The tests run in parallel, one pytest-xdist worker per core (TEST_WORKERS=0: in this process, one after another);
# a test file goes whole to one worker (--dist loadscope), so a module fixture (a train.py run, the soak) is built
# once, and each worker gets its share of the cores' threads (tests/conftest.py). (--dist loadgroup would not do:
# with pytest 9.2 it silently stops grouping, pytest-xdist issue #1386.)
TEST_WORKERS ?= auto
PYTEST_PARALLEL = -n $(TEST_WORKERS) --dist loadscope
test: install
	TRITON_INTERPRET=1 $(PY) -m pytest -q $(PYTEST_PARALLEL) tests

# README's real-checkpoint commands on a tiny random Qwen2.5-architecture checkpoint, outputs checked (CPU, minutes).
# The kernels run their PyTorch references here, as on any CPU; make test checks them against the Triton kernels.
rehearsal: install
	OMP_NUM_THREADS=2 $(PY) tests/rehearsal.py
	OUT=$$(mktemp -d) PY=$(PY) bash bench/gpu_session.sh --dry-run

# The wheels bench/gpu_session.sh installs on a GPU machine that cannot reach PyPI (carry .whl/ with the run).
gpu-wheels:
	$(PY) -m pip download --no-deps -q -d .whl -c $(LOCK) math-verify latex2sympy2_extended antlr4-python3-runtime

test-latest: install-latest
	TRITON_INTERPRET=1 .venv-latest/bin/python -m pytest -q $(PYTEST_PARALLEL) tests

# The kernel tests compiled on the GPU (needs torch with CUDA and a GPU).
test-gpu: install
	@[ "$(HAS_GPU)" = 1 ] || { echo "make test-gpu: torch sees no GPU here ($(PY)); make test runs the kernels on the CPU"; exit 2; }
	NANOUFO_TEST_DEVICE=cuda $(PY) -m pytest -q tests/test_kernels_*.py

# Kernel microbenchmarks: compiled and at real shapes on a GPU, interpreted at tiny shapes on the CPU.
bench: install
	$(if $(filter 1,$(HAS_GPU)),,TRITON_INTERPRET=1 )$(PY) -m pytest -q bench --benchmark-only

# Rewrite the lock from PyPI (needs uv: pip install uv), for every Python from 3.10, with torch 2.13.0's
# triton; torch and its CUDA libraries are left out. Run `make test` on the new lock before committing it.
lock:
	@mkdir -p .make && echo "torch==$(TORCH_DEFAULT)" > .make/lock-torch.txt
	uv pip compile pyproject.toml --extra test --universal --python-version 3.10 -c .make/lock-torch.txt \
	    --no-header --no-annotate --no-emit-package torch -o .make/lock.txt
	grep -vE '^(nvidia|cuda)-' .make/lock.txt > $(LOCK)

.PHONY: install install-latest demo test rehearsal gpu-wheels test-latest test-gpu bench lock
