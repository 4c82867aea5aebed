#!/usr/bin/env bash
# Start the GPU service from .venv. HOST (default 127.0.0.1; use 0.0.0.0 on a remote GPU VM
# behind a firewall) and PORT (default 8001) come from the environment, like every other setting.
set -euo pipefail
cd "$(dirname "$0")"
if [ ! -x .venv/bin/python ]; then
  echo "run_gpu_service: .venv is missing; run ./setup_gpu_service.sh first" >&2
  exit 1
fi
export HOST=${HOST:-127.0.0.1} PORT=${PORT:-8001}
exec .venv/bin/python -m gpu_service
