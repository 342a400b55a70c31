VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
STAMP := $(VENV)/.installed
DEMO_HOME ?= data/.library
DEMO_MODEL ?= data/.demo-model

.PHONY: install run test test-fast ui bench lint clean

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

# Demo without internet: train the tiny shapes model (seconds), index data/samples, run a query.
# With internet, `imgsearch index PATH` uses the real default model (ViT-B-32, laion2b_s34b_b79k).
run: $(STAMP)
	test -f $(DEMO_MODEL)/open_clip_model.safetensors || $(PY) data/make_demo_model.py $(DEMO_MODEL)
	$(VENV)/bin/imgsearch --home $(DEMO_HOME) --model local-dir:$(DEMO_MODEL) index data/samples
	$(VENV)/bin/imgsearch --home $(DEMO_HOME) --model local-dir:$(DEMO_MODEL) query "a red circle" -k 5

test: $(STAMP)
	$(PY) -m pytest -q

test-fast: $(STAMP)
	$(PY) -m pytest -q -m "not slow and not browser"

ui: $(STAMP)
	test -f $(DEMO_MODEL)/open_clip_model.safetensors || $(PY) data/make_demo_model.py $(DEMO_MODEL)
	$(VENV)/bin/imgsearch --home $(DEMO_HOME) --model local-dir:$(DEMO_MODEL) ui

bench: $(STAMP)
	$(PY) bench/index_throughput.py
	$(PY) bench/query_latency.py

lint: $(STAMP)
	$(PY) -m pyflakes imgsearch tests ui bench

clean:
	rm -rf $(DEMO_HOME) $(DEMO_MODEL) .pytest_cache
