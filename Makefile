# sudo make demo   - set up everything and run the namespace lab demo
# sudo make test   - set up everything and run lint, types and the whole test suite
VENV ?= .venv
export VENV

.PHONY: setup demo test lint unit netns clean

setup:
	./scripts/setup.sh

demo: setup
	$(VENV)/bin/hostwall demo

lint: setup
	$(VENV)/bin/ruff check hostwall tests
	$(VENV)/bin/mypy

unit: setup
	$(VENV)/bin/python -m pytest tests/unit

netns: setup
	$(VENV)/bin/python -m pytest tests/netns

test: lint
	$(VENV)/bin/python -m pytest

clean:
	rm -rf $(VENV) .mypy_cache .pytest_cache .ruff_cache
