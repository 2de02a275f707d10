# Two-command quick start: `make demo` runs the main job, `make test` runs the suite.
# Both create .venv on first use and install what they need into it: `make demo` the package with its `vision` extra
# and the torch/torchvision pair (stamp .demo-*); `make test` everything (stamp .installed-*, which the demo accepts
# too), so `make demo` then `make test` installs the rest and `make test` then `make demo` installs nothing.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
KEY := $(shell cat pyproject.toml Makefile | cksum | cut -d' ' -f1)
STAMP := $(VENV)/.installed-$(KEY)
DEMO_STAMP := $(VENV)/.demo-$(KEY)
DEMO_READY := $(if $(wildcard $(STAMP)),$(STAMP),$(DEMO_STAMP))
# a torch/torchvision pair that imports together on this platform (see DEVELOPERS.md)
TORCH := torch==2.14.1 torchvision==0.29.1

.PHONY: setup test demo lint bench clean l2l

setup: $(STAMP)

$(STAMP):
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q $(TORCH)
	$(BIN)/pip install -q -e ".[dev]"
	$(MAKE) --no-print-directory VENV=$(VENV) l2l
	rm -f $(VENV)/.installed-* $(VENV)/.demo-*
	touch $@

# what the demo needs, only: no learn2learn, no test tools
$(DEMO_STAMP):
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q $(TORCH)
	$(BIN)/pip install -q -e ".[vision]"
	rm -f $(VENV)/.demo-*
	touch $@

# learn2learn 0.2.0 is a peer we test against; its sdist does not build on Python 3.11 with build isolation,
# so it is built with the recipe from DEVELOPERS.md. A failure here is reported, not fatal: tests that need it skip
# (except under CI=true, where they fail). qpth (one of its imports) pins numpy<2 in its metadata only: installed
# without its dependencies, so numpy stays 2.x, which pyarrow (under `datasets`) needs and learn2learn runs on.
# learn2learn's own requirements go in first and learn2learn and qpth last, without dependencies: pip checks
# requirements only when it resolves them, so no resolver `ERROR:` lines (learn2learn's gsutil, qpth's numpy<2) appear.
l2l:
	@$(BIN)/python -c "import learn2learn" 2>/dev/null || ( \
	  $(BIN)/pip install -q cython setuptools gym scipy && \
	  $(BIN)/pip install -q --no-deps --no-build-isolation -C--global-option=build_ext learn2learn==0.2.0 && \
	  $(BIN)/pip install -q --no-deps qpth ) || echo "warning: learn2learn could not be installed; comparison tests will skip"

test: setup
	$(BIN)/ruff check lightning_meta tests examples benchmarks
	$(BIN)/mypy
	$(BIN)/python -m pytest -q -n auto --dist worksteal --durations=25

demo: $(DEMO_READY)
	$(BIN)/python examples/demo.py

lint: setup
	$(BIN)/ruff check lightning_meta tests examples benchmarks
	$(BIN)/mypy

bench: setup
	$(BIN)/python benchmarks/bench_sampling.py
	$(BIN)/python benchmarks/bench_protonet.py
	$(BIN)/python benchmarks/bench_maml.py

clean:
	rm -rf $(VENV) lightning_logs runs .pytest_cache
