#!/bin/sh
# Create a virtualenv at $1 and install exactly the hash-locked wheels staged in the build context:
# no index, no network, every file checked against requirements.lock.
set -eu
venv=${1:?usage: install-venv.sh VENV_DIR}
python3 -m venv "$venv"
"$venv/bin/pip" install --no-cache-dir --no-index --find-links /tmp/wheels --require-hashes -r /tmp/requirements.lock
find "$venv" -name '__pycache__' -prune -exec rm -rf {} +
