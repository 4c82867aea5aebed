#!/usr/bin/env bash
# The test command: installs exactly the lock into .venv (a no-op when it already matches), then
# runs every tier. Test files run in parallel on TEST_WORKERS processes (default: the number of
# cores, at most 4; a file's tests stay on one worker so its module fixtures are made once), and
# the slowest tests are listed at the end.
# Extra arguments go to pytest, e.g. `scripts/test.sh -m "not slow"` or `scripts/test.sh tests/gpu_service`.
set -euo pipefail
cd "$(dirname "$0")/.."
EXTRAS="${EXTRAS-xtts,runtime,evaluator,dev}" ./setup_gpu_service.sh
cores=$(nproc 2>/dev/null || echo 2)
workers=${TEST_WORKERS:-$(( cores < 4 ? cores : 4 ))}
exec .venv/bin/python -m pytest -q -p no:cacheprovider -n "$workers" --dist loadfile --durations=15 "$@"
