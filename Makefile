# seqtrain: `make demo` trains, evaluates and predicts on real data; `make test` runs the tests.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install data demo test test-fast lint bench bench-scale clean bench-serve browser-deps wrk

install: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev,export,tensorboard,serve,tune,vectors,baselines]'
	touch $(STAMP)

data: $(STAMP)
	$(BIN)/python data/fetch.py

demo: install data
	rm -rf runs/quickstart
	$(BIN)/seqtrain train configs/quickstart.yaml
	$(BIN)/seqtrain eval runs/quickstart
	$(BIN)/seqtrain predict runs/quickstart \
		"a gripping, beautifully acted film that stays with you" \
		"tedious, overlong and not even funny" \
		"the plot is thin but the performances are wonderful"

# The tests on every core (pytest-xdist; tests/conftest.py groups those that must share a worker), one
# torch thread per worker, the 25 slowest listed at the end (to keep the whole under 5 minutes). TEST_WORKERS=1
# runs them in one process.
TEST_WORKERS ?= auto
PYTEST := OMP_NUM_THREADS=1 $(BIN)/python -m pytest -n $(TEST_WORKERS) --dist loadgroup --durations=25

test: install
	$(PYTEST)

# Without the slow, subprocess, distributed and browser tests (pyproject.toml lists the markers).
test-fast: install
	$(PYTEST) -m "not slow and not subprocess and not distributed and not browser"

lint: install
	$(BIN)/ruff check seqtrain tests bench data docs
	$(BIN)/ruff format --check seqtrain tests bench docs   # data/fetch.py is not formatted yet: left out
	$(BIN)/mypy
	$(BIN)/python docs/gen_config.py --check || { echo "docs/config.md is out of date: run $(BIN)/python docs/gen_config.py" >&2; exit 1; }
	$(BIN)/python -m seqtrain.config --check || { echo "seqtrain/config_help.json is out of date: run $(BIN)/python -m seqtrain.config" >&2; exit 1; }

bench: install data
	$(BIN)/python -m bench.bench
	$(BIN)/python -m bench.pretrain

bench-scale: install data
	$(BIN)/python -m bench.scale

# seqtrain tune with and without pruning: same TPE seeds, same trials (bench/tune.py). Two studies at a time,
# 1 thread each: about 8 minutes a seed on 2 free cores; finished studies are read, not run again.
.PHONY: bench-tune
bench-tune: install data
	OMP_NUM_THREADS=1 $(BIN)/python -m bench.tune --seeds $$(seq 0 36) \
		--trials 24 --parallel 2 --equal-steps --replay --replay-grid

# headless Chromium for the page test in tests/test_serve.py (Debian's packages; .ci/run calls this)
browser-deps:
	command -v chromium >/dev/null && command -v chromedriver >/dev/null || \
		{ apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver; }

# wrk, the C load generator of bench-serve (Debian's package); skipped when it is installed
wrk:
	command -v wrk >/dev/null || \
		{ apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq wrk; }

# seqtrain serve under 1, 8 and 64 concurrent clients (wrk), beside two ceilings: the sorted forward
# pass alone and what its worker processes can reach on arrival-order batches (bench/serve.py); each run's
# ONNX export at 64 clients; /predict's p99 at 8 clients idle and with /explain running; the soak.
# The quickstart model on SST-2 sentences, and a short-trained IMDB LSTM on reviews (speed does not
# depend on training).
bench-serve: install data wrk
	test -d runs/quickstart || $(BIN)/seqtrain train configs/quickstart.yaml
	test -d runs/serve-imdb || $(BIN)/seqtrain train configs/imdb-lstm.yaml train.max_steps=30 \
		data.max_train_examples=3000 data.max_eval_examples=200 train.eval_every=0 name=serve-imdb
	$(BIN)/python -m bench.serve runs/quickstart runs/serve-imdb

clean:
	rm -rf runs .pytest_cache .mypy_cache .ruff_cache
