#!/usr/bin/env bash
# Sets up the test environment and runs the whole suite on 8 simulated CPU devices.
# torch is the CPU build: transformers' MiniMaxM2ForCausalLM is the oracle, no GPU involved.
set -euo pipefail
cd "$(dirname "$0")/.."
python -m pip install -q torch==2.13.0
python -m pip install -q -e '.[test]'
# two worker processes, one a core of the CI machine: on two cores the suite took 975 s in one
# process and 763-884 s in two
python -m pytest -q -n 2 "$@"
