# The entry points. README gives the two that matter on a fresh machine: `make quickstart`, `make test`.
PYTHON ?= python3
PYTEST_ARGS ?=

.PHONY: setup images quickstart down test unit lint doctor lock fastpath

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

# The relay's compiled data path on the host (the images build their own): host-level tests and benches run it.
fastpath:
	cd fastpath && cargo build --release --locked

unit: setup fastpath
	cd fastpath && cargo test --release --locked
	$(PYTHON) -m pytest -q tests/unit tests/contract $(PYTEST_ARGS)

# Everything: lint, unit, then the real-Docker layers (images are built first, cached by content hash).
test: images fastpath
	$(PYTHON) -m ruff check .
	cd fastpath && cargo clippy --release --locked -- -D warnings && cargo test --release --locked
	$(PYTHON) -m pytest tests/unit tests/contract tests/integration tests/escape tests/e2e $(PYTEST_ARGS)

# Re-pin requirements/*.lock (hashes for every platform file) after editing requirements/*.in.
lock:
	$(PYTHON) -m pip install -q uv
	cd requirements && for f in appliance usercode controlplane dev; do \
	  uv pip compile -q --generate-hashes --python-version 3.11 --python-platform x86_64-unknown-linux-gnu \
	    --no-header --annotation-style line $$f.in -o $$f.lock; done
