#!/usr/bin/env bash
# The test command: installs exactly the lock into .venv (a no-op when it already matches), then
# runs every tier. Test files run in parallel on TEST_WORKERS processes (default: the number of
# cores, at most 4; a file's tests stay on one worker so its module fixtures are made once), and
# the slowest tests are listed at the end.
# Extra arguments go to pytest, e.g. `scripts/test.sh -m "not slow"` or `scripts/test.sh tests/gpu_service`.
set -euo pipefail
cd "$(dirname "$0")/.."
EXTRAS="${EXTRAS-xtts,runtime,evaluator,dev}" ./setup_gpu_service.sh
# The browser tests (tests/browser) drive Debian's Chromium with Playwright (no browser download): installed here
# when missing and we are root with apt-get; otherwise those tests skip, saying how to install it.
if [ -z "${CHROMIUM:-}" ] && ! [ -x /usr/bin/chromium ] && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null \
   && [ "${TEST_INSTALL_CHROMIUM:-1}" = 1 ]; then
  echo "installing chromium and chromium-driver for the browser tests (TEST_INSTALL_CHROMIUM=0 skips this)" >&2
  { apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium chromium-driver; } >&2 \
    || echo "could not install chromium: the browser tests will skip" >&2
fi
cores=$(nproc 2>/dev/null || echo 2)
workers=${TEST_WORKERS:-$(( cores < 4 ? cores : 4 ))}
exec .venv/bin/python -m pytest -q -p no:cacheprovider -n "$workers" --dist loadfile --durations=15 "$@"
