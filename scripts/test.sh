#!/usr/bin/env bash
# The test command: installs what the tests need (idempotent), then runs every tier.
# Extra arguments go to pytest, e.g. `scripts/test.sh -m "not slow"` or `scripts/test.sh tests/gpu_service`.
set -euo pipefail
cd "$(dirname "$0")/.."
EXTRAS="${EXTRAS-xtts,runtime,evaluator,dev}" ./setup_gpu_service.sh
exec .venv/bin/python -m pytest -q -p no:cacheprovider --durations=15 "$@"
