# Two commands do all setup on a fresh machine:
#   make demo   install into .venv, run the valued training on the built-in corpus, write a report
#   make test   install with test extras, then run the whole test suite
PY ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
# torch is pinned to the CPU wheel: an unpinned torch pulls a multi-GB CUDA build.
TORCH := torch==2.13.0

.PHONY: demo test install install-test system-deps lint clean

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

install: $(BIN)/python
	$(BIN)/pip install -q $(TORCH)
	$(BIN)/pip install -q -e .

install-test: install system-deps
	$(BIN)/pip install -q -e '.[test]'

# Debian packages: chromium for the browser test of HTML reports, mythes-en-us for the offline
# paraphraser's thesaurus. Installed only when missing (needs root, as on CI).
system-deps:
	@if ! command -v chromium >/dev/null || [ ! -f /usr/share/mythes/th_en_US_v2.dat ]; then \
		apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium mythes-en-us; \
	fi

demo: install system-deps
	$(BIN)/attribution demo --out runs/demo --report reports/demo

test: install-test lint
	$(BIN)/python -m pytest -q

# CI runs it first (make test): the linter and the formatter both clean.
lint:
	$(BIN)/ruff check attribution tests benchmarks
	$(BIN)/ruff format --check attribution tests benchmarks

clean:
	rm -rf $(VENV) .cache runs
