# raysv: `make demo` runs the main job on the toy corpus; `make test` runs the tests.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
export RAY_ENABLE_UV_RUN_RUNTIME_ENV := 0

.PHONY: demo test venv clean

venv: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "torch>=2.9" "torchaudio>=2.9"
	$(BIN)/python -m pip install -q -e ".[dev]"
	touch $(STAMP)

test: $(STAMP)
	$(BIN)/python -m pytest -q tests

DEMO := runs/demo-data
demo: $(STAMP)
	test -f $(DEMO)/train/meta.csv || $(BIN)/raysv synth --out $(DEMO)/train --speakers 40 --sessions 4 --utterances 8 --trials 0 --seed 1 --jobs 2
	test -f $(DEMO)/test/trials.txt || $(BIN)/raysv synth --out $(DEMO)/test --speakers 24 --sessions 3 --utterances 8 --speaker-offset 1000 --trials 4000 --seed 1 --jobs 2
	test -f $(DEMO)/dev/trials.txt || $(BIN)/raysv synth --out $(DEMO)/dev --speakers 10 --sessions 3 --utterances 4 --speaker-offset 2000 --trials 1000 --seed 1 --jobs 2
	$(BIN)/raysv prepare --audio-root $(DEMO)/train/wav --out $(DEMO)/train_shards
	$(BIN)/raysv evaluate --embedder fbank-mean --trials $(DEMO)/test/trials.txt --audio-root $(DEMO)/test/wav --json $(DEMO)/baseline.json
	$(BIN)/raysv run --config configs/demo.yaml

clean:
	rm -rf runs
