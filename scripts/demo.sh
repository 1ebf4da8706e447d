#!/usr/bin/env bash
# The main job: installs what it lacks, then a short GRPO run of the demo model on the built-in
# arithmetic taskset through the Tinker API (examples/grpo_demo.yaml). Extra arguments are
# config overrides, e.g. `bash scripts/demo.sh model.tinker.enable=false`.
source "$(dirname "$0")/setup.sh"
exec trinity run --config examples/grpo_demo.yaml "$@"
