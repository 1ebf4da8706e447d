#!/usr/bin/env bash
# The tests: installs what they need, lints, then runs them (extra arguments go to pytest).
source "$(dirname "$0")/setup.sh"
python3 -m ruff check --quiet .
python3 -m ruff format --check --quiet .
exec python3 -m pytest -q "$@"
