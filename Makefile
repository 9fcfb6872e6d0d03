# Convenience targets; every one is a plain command you can also run by hand.
PY ?= python3

.PHONY: install build test lint bench bench-save bench-compare demo fuzz chaos cometbft clean

install:          ## editable install with the test extras (builds the Cython kernels)
	$(PY) -m pip install -e ".[test]"

build:            ## rebuild the Cython kernels in place
	$(PY) setup.py build_ext --inplace

test:             ## the README's test command
	$(PY) -m pytest

lint:
	ruff check . && ruff format --check nebula

bench:            ## time every benchmark
	$(PY) -m pytest benches --benchmark-enable

bench-save:
	$(PY) -m pytest benches --benchmark-enable --benchmark-autosave

bench-compare:
	$(PY) -m pytest benches --benchmark-enable --benchmark-compare --benchmark-compare-fail=median:20%

demo:             ## a local chain signed by a local 3-node Nebula cluster
	nebula demo

fuzz:             ## long hypothesis run (atheris: see fuzz/atheris/README.md)
	HYPOTHESIS_PROFILE=long $(PY) -m pytest tests/fuzz

chaos:            ## 30 minutes of seeded faults against a real chain
	$(PY) -m tests.support.chaos --seed $${SEED:-1} --minutes 30

cometbft:         ## build the pinned CometBFT releases into ~/.cache/nebula-test
	$(PY) -m nebula.devnet.cometbft

clean:
	rm -rf build nebula/_fast/*.so nebula/_fast/*.c .pytest_cache .benchmarks
