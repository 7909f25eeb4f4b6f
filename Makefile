# Two commands for a fresh machine: `make demo` and `make test` (`make lint`: ruff, configured in pyproject.toml).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: install demo test test-slow lint bench clean-demo

install: $(STAMP)

$(STAMP): setup.cfg pyproject.toml constraints.txt
	test -d $(VENV) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade --quiet pip
	$(PY) -m pip install -c constraints.txt -e '.[test]'
	touch $(STAMP)

demo: install
	$(VENV)/bin/pipeline demo

test: install
	$(PY) -m pytest -q -m "not slow"

test-slow: install
	$(PY) -m pytest -q -m slow

lint: install
	$(PY) -m ruff check .

clean-demo:
	rm -rf datasets/demo cache/demo cache/demo-weights runs/demo
