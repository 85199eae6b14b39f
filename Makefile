# The README's two commands.  Both create or refresh .venv from pyproject.toml first (and build the
# optional C parts, src/midiforge/music/_*.c, in place).
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
DEMO_OUT ?= demo-out

.PHONY: demo test test-cluster venv clean bench

venv: $(STAMP)

$(STAMP): pyproject.toml setup.py src/midiforge/music/_events.c src/midiforge/music/_midi.c
	$(PYTHON) -c 'import sys; assert sys.version_info[:2] in ((3, 11), (3, 12)), "midiforge needs Python 3.11 or 3.12"'
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/midiforge demo --out $(DEMO_OUT)

# everything but the tests on the real clusters (marker "cluster"): those need root, Slurm and network namespaces
# and take ~9 minutes on 2 cores; `make test-cluster` runs them (CI runs both)
test: $(STAMP)
	$(BIN)/python -m pytest -ra -m "not cluster"

test-cluster: $(STAMP)
	$(BIN)/python -m pytest -ra -m cluster

# the benchmarks (each prints one JSON object); the preprocess and train ones read the shared corpora
SHARED ?= ../shared/corpora
bench: $(STAMP)
	$(BIN)/python benchmarks/preprocess.py $(SHARED)/nottingham
	$(BIN)/python benchmarks/preprocess.py $(SHARED)/ff
	$(BIN)/python benchmarks/train.py --corpus $(SHARED)/ff
	$(BIN)/python benchmarks/generate.py

clean:
	rm -rf $(VENV) $(DEMO_OUT) build src/midiforge/music/_*.so
