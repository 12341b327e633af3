#!/usr/bin/env bash
# Sets up (if needed) and runs the default test tiers: unit tests, in-process role tests and the Ray
# integration tests on the tiny model with real vLLM. `-m slow` selects the end-to-end run on SmolLM2.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python -m pytest -p no:cacheprovider "$@"
