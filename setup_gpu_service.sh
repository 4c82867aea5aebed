#!/usr/bin/env bash
# Create or update .venv at the repository root with exactly the locked versions (idempotent).
#   EXTRAS          extras to install beside `gpu` (default: "xtts,runtime,evaluator,dev"; "" for the service alone)
#   PYTHON          interpreter to build the venv with (default: python3; CPython 3.11 or newer)
#   TORCH_INDEX_URL an index to take torch from (e.g. https://download.pytorch.org/whl/cpu on a
#                   Linux laptop, to avoid the CUDA packages); the version is the lock's either way
# Every package comes from requirements/lock.txt (scripts/lock.sh regenerates it). A second run
# with the same lock, extras and interpreter does nothing: a stamp in .venv records what was installed.
set -euo pipefail
cd "$(dirname "$0")"
PYTHON=${PYTHON:-python3}
EXTRAS=${EXTRAS-xtts,runtime,evaluator,dev}
LOCK=requirements/lock.txt
NO_DEPS=requirements/no-deps.txt
PIP_VERSION=26.3

if [ ! -x .venv/bin/python ]; then
  echo "[setup] creating .venv with $($PYTHON --version)"
  "$PYTHON" -m venv .venv
fi
PY=.venv/bin/python
"$PY" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else 1)' || {
  echo "[setup] .venv has $("$PY" --version); the lock is for CPython 3.11 or newer: remove .venv and set PYTHON" >&2
  exit 2
}

stamp_now=$(cat "$LOCK" "$NO_DEPS" pyproject.toml | sha256sum | cut -c1-16)-$("$PY" -c 'import sys; print("%d.%d" % sys.version_info[:2])')-"gpu,$EXTRAS"
if [ "$(cat .venv/.setup-stamp 2>/dev/null)" = "$stamp_now" ] && [ "${SETUP_FORCE:-0}" != 1 ]; then
  echo "[setup] .venv already matches the lock (gpu,$EXTRAS); SETUP_FORCE=1 re-installs"
  exit 0
fi
rm -f .venv/.setup-stamp

pip_install() { "$PY" -m pip install -q --disable-pip-version-check "$@"; }
pip_install "pip==$PIP_VERSION"
# The project is installed editable without build isolation, so its build backend is the locked one.
pip_install -c "$LOCK" setuptools wheel

# torch first, so the platform's own build of the locked version is chosen before anything else
# asks for torch: a CPU wheel where pip's configuration offers one (as on our CI machines), MPS on
# macOS, CUDA on a Linux GPU VM.
torch_version=$(sed -n 's/^torch==\([^ ;]*\).*/\1/p' "$LOCK")
if ! "$PY" -c "import torch,sys; sys.exit(0 if torch.__version__.split('+')[0]=='$torch_version' else 1)" 2>/dev/null; then
  echo "[setup] installing torch==$torch_version"
  pip_install -c "$LOCK" "torch==$torch_version" ${TORCH_INDEX_URL:+--index-url "$TORCH_INDEX_URL"}
fi

spec=".[gpu${EXTRAS:+,$EXTRAS}]"
echo "[setup] installing $spec from $LOCK"
pip_install -c "$LOCK" --no-build-isolation -e "$spec"

# coqui-tts (XTTS) imports torchaudio; no torchaudio is built for the locked torch, so the pinned
# one is installed without its dependencies and its compiled ops (built against another torch)
# are removed: XTTS uses only torchaudio's pure-Python transforms and resampling.
if [[ ",$EXTRAS," == *",xtts,"* ]]; then
  echo "[setup] installing torchaudio's python parts and torchcodec for coqui-tts ($NO_DEPS)"
  pip_install --no-deps -r "$NO_DEPS"
  "$PY" - <<'PYEOF'
import importlib.util, pathlib
spec = importlib.util.find_spec("torchaudio")
lib = pathlib.Path(spec.origin).parent / "lib"
for so in lib.glob("*.so"):
    so.unlink()
    print(f"[setup] removed mismatched torchaudio extension {so.name}")
PYEOF
fi

# What is installed must be what is locked: no package outside the lock, none at another version,
# nothing missing that an installed package needs.
"$PY" scripts/check_lock.py
# (torchaudio and torchcodec are the known exceptions above: they name another torch.)
broken=$("$PY" -m pip check 2>&1 | grep -v -E '^(torchaudio|torchcodec) |^No broken requirements' || true)
if [ -n "$broken" ]; then
  echo "[setup] pip check: $broken" >&2
  exit 1
fi

"$PY" - <<'PYEOF'
from gpu_service.device import probe, resolve_device
cuda, mps, detail = probe()
dev = resolve_device("auto")
print(f"[setup] device found: {dev.name} ({detail}); cuda={cuda} mps={mps}")
PYEOF
echo "$stamp_now" > .venv/.setup-stamp
echo "[setup] done. Start the service with ./run_gpu_service.sh"
