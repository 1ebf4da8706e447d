#!/usr/bin/env bash
# The tests: installs what they need, then runs them (extra arguments go to pytest).
source "$(dirname "$0")/setup.sh"
exec python3 -m pytest -q "$@"
