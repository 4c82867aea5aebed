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
# The agent-side LiveKit package (integrations/livekit_agents) needs livekit-agents, which cannot share
# .venv (livekit >= 1.1 and protobuf >= 5 against mediapipe's protobuf 4): it gets .venv-agents from its
# own lock (about 400 MB, 1-4 min the first time; a stamp makes later runs a no-op). Its own tests and
# tests/streaming/test_livekit_agents_interop.py then run against it. TEST_LIVEKIT_AGENTS=0 skips both.
AGENTS_LOCK=integrations/livekit_agents/requirements.lock
if [ "${TEST_LIVEKIT_AGENTS:-1}" = 1 ]; then
  agents_stamp=$(cat "$AGENTS_LOCK" integrations/livekit_agents/pyproject.toml | sha256sum | cut -c1-16)
  if [ "$(cat .venv-agents/.setup-stamp 2>/dev/null)" != "$agents_stamp" ]; then
    echo "[test] building .venv-agents from $AGENTS_LOCK" >&2
    rm -rf .venv-agents
    python3 -m venv .venv-agents
    .venv-agents/bin/python -m pip install -q --disable-pip-version-check -r "$AGENTS_LOCK"
    .venv-agents/bin/python -m pip install -q --disable-pip-version-check --no-deps -e integrations/livekit_agents
    echo "$agents_stamp" > .venv-agents/.setup-stamp
  fi
  export AVATAR_STACK_AGENTS_PYTHON="$PWD/.venv-agents/bin/python"
fi
cores=$(nproc 2>/dev/null || echo 2)
workers=${TEST_WORKERS:-$(( cores < 4 ? cores : 4 ))}
status=0
.venv/bin/python -m pytest -q -p no:cacheprovider -n "$workers" --dist loadfile --durations=15 "$@" || status=$?
if [ "${TEST_LIVEKIT_AGENTS:-1}" = 1 ] && [ $# -eq 0 ]; then
  echo "[test] integrations/livekit_agents in .venv-agents" >&2
  (cd integrations/livekit_agents && AVATAR_STACK_GPU_PYTHON="$OLDPWD/.venv/bin/python" \
     "$AVATAR_STACK_AGENTS_PYTHON" -m pytest -q -p no:cacheprovider tests) || status=$?
fi
exit $status
