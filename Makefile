# The entry points. README gives the two that matter on a fresh machine: `make quickstart`, `make test`.
PYTHON ?= python3
PYTEST_ARGS ?=

.PHONY: setup images quickstart down test unit lint doctor

setup:
	@bash scripts/setup-host.sh

images: setup
	$(PYTHON) images/build.py

quickstart: images
	$(PYTHON) scripts/quickstart.py up

down:
	$(PYTHON) scripts/quickstart.py down

doctor:
	docker exec airlock-quickstart airlock doctor

lint: setup
	$(PYTHON) -m ruff check .

unit: setup
	$(PYTHON) -m pytest -q tests/unit tests/contract $(PYTEST_ARGS)

# Everything: lint, unit, then the real-Docker layers (images are built first, cached by content hash).
test: images
	$(PYTHON) -m ruff check .
	$(PYTHON) -m pytest tests $(PYTEST_ARGS)
