#!/usr/bin/env bash
# Create or update .venv at the repository root and install the GPU service (idempotent).
#   EXTRAS   extras to install beside `gpu` (default: "xtts,runtime,evaluator,dev"; "" for the service alone)
#   PYTHON   interpreter to build the venv with (default: python3)
set -euo pipefail
cd "$(dirname "$0")"
PYTHON=${PYTHON:-python3}
EXTRAS=${EXTRAS-xtts,runtime,evaluator,dev}
TORCH_VERSION=2.13.0

if [ ! -x .venv/bin/python ]; then
  echo "[setup] creating .venv with $($PYTHON --version)"
  "$PYTHON" -m venv .venv
fi
PY=.venv/bin/python
"$PY" -m pip install -q --upgrade pip >/dev/null

# torch first, pinned, so nothing later pulls another build. macOS wheels carry MPS; Linux wheels
# carry CUDA. Where pip's configuration offers a local CPU wheel (as on our CI machines) it is
# taken; set TORCH_INDEX_URL to a CPU-only index to avoid the CUDA packages on a laptop.
if ! "$PY" -c "import torch,sys; sys.exit(0 if torch.__version__.split('+')[0]=='$TORCH_VERSION' else 1)" 2>/dev/null; then
  echo "[setup] installing torch==$TORCH_VERSION"
  "$PY" -m pip install -q "torch==$TORCH_VERSION" ${TORCH_INDEX_URL:+--index-url "$TORCH_INDEX_URL"}
fi

spec=".[gpu${EXTRAS:+,$EXTRAS}]"
echo "[setup] installing $spec"
"$PY" -m pip install -q -e "$spec"

# coqui-tts (XTTS) imports torchaudio; no torchaudio is built for torch $TORCH_VERSION, so the
# newest one is installed without its dependencies and its compiled ops (built against another
# torch) are removed: XTTS uses only torchaudio's pure-Python transforms and resampling.
if [[ ",$EXTRAS," == *",xtts,"* ]]; then
  if ! "$PY" -c "import torchaudio" 2>/dev/null; then
    echo "[setup] installing torchaudio (python parts) and torchcodec for coqui-tts"
    "$PY" -m pip install -q --no-deps "torchaudio==2.11.0" "torchcodec==0.11.0"
    "$PY" - <<'PYEOF'
import importlib.util, pathlib
spec = importlib.util.find_spec("torchaudio")
lib = pathlib.Path(spec.origin).parent / "lib"
for so in lib.glob("*.so"):
    so.unlink()
    print(f"[setup] removed mismatched torchaudio extension {so.name}")
PYEOF
  fi
fi

"$PY" - <<'PYEOF'
from gpu_service.device import probe, resolve_device
cuda, mps, detail = probe()
dev = resolve_device("auto")
print(f"[setup] device found: {dev.name} ({detail}); cuda={cuda} mps={mps}")
PYEOF
echo "[setup] done. Start the service with ./run_gpu_service.sh"
