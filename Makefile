# raysv: `make demo` runs the main job on the toy corpus; `make test` runs the tests.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
export RAY_ENABLE_UV_RUN_RUNTIME_ENV := 0

.PHONY: demo demo-tube demo-formant80 test venv clean

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

# The same method on the second kind of toy voice, 80 training speakers (a check, not the contract).
TUBE := runs/tube-data
demo-tube: $(STAMP)
	test -f $(TUBE)/train/meta.csv || $(BIN)/raysv synth --style tube --out $(TUBE)/train --speakers 80 --sessions 3 --utterances 5 --min-seconds 3 --max-seconds 10 --trials 0 --seed 7 --jobs 2
	test -f $(TUBE)/test/trials.txt || $(BIN)/raysv synth --style tube --out $(TUBE)/test --speakers 48 --sessions 3 --utterances 4 --min-seconds 3 --max-seconds 10 --speaker-offset 1000 --trials 6000 --seed 7 --jobs 2
	test -f $(TUBE)/dev/trials.txt || $(BIN)/raysv synth --style tube --out $(TUBE)/dev --speakers 10 --sessions 3 --utterances 4 --min-seconds 3 --max-seconds 10 --speaker-offset 2000 --trials 1000 --seed 7 --jobs 2
	$(BIN)/raysv prepare --audio-root $(TUBE)/train/wav --out $(TUBE)/train_shards
	$(BIN)/raysv evaluate --embedder fbank-mean --trials $(TUBE)/test/trials.txt --audio-root $(TUBE)/test/wav --json $(TUBE)/baseline.json
	$(BIN)/raysv run --config configs/demo.yaml --merge configs/demo_tube.yaml

# The formant voices with twice the speakers and half the utterances each (80 x 15; a check, not the contract).
F80 := runs/formant80-data
demo-formant80: $(STAMP)
	test -f $(F80)/train/meta.csv || $(BIN)/raysv synth --out $(F80)/train --speakers 80 --sessions 3 --utterances 5 --trials 0 --seed 11 --jobs 2
	test -f $(F80)/test/trials.txt || $(BIN)/raysv synth --out $(F80)/test --speakers 24 --sessions 3 --utterances 8 --speaker-offset 3000 --trials 4000 --seed 11 --jobs 2
	test -f $(F80)/dev/trials.txt || $(BIN)/raysv synth --out $(F80)/dev --speakers 10 --sessions 3 --utterances 4 --speaker-offset 4000 --trials 1000 --seed 11 --jobs 2
	$(BIN)/raysv prepare --audio-root $(F80)/train/wav --out $(F80)/train_shards
	$(BIN)/raysv evaluate --embedder fbank-mean --trials $(F80)/test/trials.txt --audio-root $(F80)/test/wav --json $(F80)/baseline.json
	$(BIN)/raysv run --config configs/demo.yaml --merge configs/demo_formant80.yaml

clean:
	rm -rf runs
