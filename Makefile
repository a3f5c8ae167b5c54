# The two set-up commands of the README: `make demo` and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# CPU torch by default. GPU users install a CUDA torch into $(VENV) first, then: make install TORCH=
TORCH ?= torch==2.13.0
PROMPT ?= a red circle moves left
DEMO_OUT ?= demo.mp4
KERNEL_SOURCES := $(shell find csrc bindings -type f) CMakeLists.txt setup.py pyproject.toml

.PHONY: install demo test bench showcase clean

# Builds run without isolation (an isolated one would fetch a CUDA torch), so their tools come
# first: numpy for torch's extension build, Cython for pdqhash (an sdist, no wheels).
$(VENV)/.installed: $(KERNEL_SOURCES)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(if $(TORCH),$(PY) -m pip install -q "$(TORCH)")
	$(PY) -m pip install -q setuptools wheel pybind11 ninja cmake numpy cython
	$(PY) -m pip install -q --no-build-isolation -e ".[test]"
	touch $@

install: $(VENV)/.installed

demo: install
	$(VENV)/bin/skyloom generate "$(PROMPT)" -o $(DEMO_OUT) --frames 17 --size 64x64 --upscale 4 --seed 0

test: install
	$(PY) -m pytest -q -p no:cacheprovider

bench: install
	$(PY) benchmarks/bench_ops.py
	$(PY) -m benchmarks.bench_training
	$(PY) -m benchmarks.bench_data

# The README's picture: frame strips of several prompts from the embedded model.
showcase: install
	$(PY) benchmarks/showcase.py --out docs/showcase.png

clean:
	rm -rf build *.egg-info core/_C*.so $(VENV)
