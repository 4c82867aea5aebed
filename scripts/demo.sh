#!/usr/bin/env bash
# The main job end to end on a fresh machine: set up, start the GPU service and the runtime,
# turn text into a talking-avatar MP4 under ./out/, print its path, stop both services.
#   scripts/demo.sh ["Text to speak."]      DEMO_TEXT, GPU_PORT, RUNTIME_PORT, DEMO_TIMEOUT_S override
#   SKIP_SETUP=1 skips ./setup_gpu_service.sh (it is idempotent, but a re-run still checks pip).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
TEXT=${1:-${DEMO_TEXT:-"Hello! I am your self-hosted talking avatar. Type any text, and I will say it with matching lips, blinks and a little head motion."}}
TIMEOUT_S=${DEMO_TIMEOUT_S:-300}
mkdir -p out/logs

if [ "${SKIP_SETUP:-0}" != "1" ]; then
  EXTRAS=${EXTRAS-runtime,dev} ./setup_gpu_service.sh
fi
PY=.venv/bin/python

port_or_free() {  # the default port when it is free, else any free one
  "$PY" - "$1" <<'PYEOF'
import socket, sys
want = int(sys.argv[1])
for port in (want, 0):
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            continue
        print(s.getsockname()[1]); break
PYEOF
}
GPU_PORT=${GPU_PORT:-$(port_or_free 8001)}
RUNTIME_PORT=${RUNTIME_PORT:-$(port_or_free 8000)}
GPU_URL="http://127.0.0.1:$GPU_PORT"
RT_URL="http://127.0.0.1:$RUNTIME_PORT"

PIDS=()
cleanup() {
  for pid in "${PIDS[@]:-}"; do
    [ -n "$pid" ] && kill "$pid" 2>/dev/null || true
  done
  for pid in "${PIDS[@]:-}"; do
    [ -n "$pid" ] && wait "$pid" 2>/dev/null || true
  done
}
trap cleanup EXIT INT TERM

echo "[demo] starting the GPU service on $GPU_URL (log: out/logs/gpu_service.log)"
HOST=127.0.0.1 PORT=$GPU_PORT "$PY" -m gpu_service >out/logs/gpu_service.log 2>&1 &
PIDS+=($!)
echo "[demo] starting the runtime on $RT_URL (log: out/logs/runtime.log)"
HOST=127.0.0.1 PORT=$RUNTIME_PORT GPU_SERVICE_URL=$GPU_URL RUNTIME_API_KEYS= "$PY" -m runtime >out/logs/runtime.log 2>&1 &
PIDS+=($!)

"$PY" - "$GPU_URL" "$RT_URL" "$TEXT" "$TIMEOUT_S" "$ROOT/out" <<'PYEOF'
import base64, io, sys, time, pathlib
import httpx

gpu, rt, text, timeout_s, out = sys.argv[1], sys.argv[2], sys.argv[3], float(sys.argv[4]), pathlib.Path(sys.argv[5])
deadline = time.monotonic() + timeout_s
for name, url in (("GPU service", gpu), ("runtime", rt)):
    while True:
        try:
            if httpx.get(f"{url}/ready", timeout=2).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline:
            sys.exit(f"[demo] the {name} was not ready within {timeout_s:.0f}s; see out/logs/")
        time.sleep(0.5)
    print(f"[demo] {name} ready")

avatars = httpx.get(f"{gpu}/avatars", timeout=30).json()
presets = [a for a in avatars if a.get("preset")] or avatars
if presets:
    avatar = {"avatar_id": presets[0]["avatar_id"]}
    print(f"[demo] avatar: preset {presets[0]['avatar_id']!r}")
else:  # no preset shipped: the astronaut portrait that scikit-image carries
    from PIL import Image
    from skimage import data

    buf = io.BytesIO()
    Image.fromarray(data.astronaut()).save(buf, format="PNG")
    avatar = {"avatar_image": base64.b64encode(buf.getvalue()).decode()}
    print("[demo] avatar: skimage astronaut portrait (no preset avatar found)")

started = time.perf_counter()
resp = httpx.post(f"{rt}/api/v1/generate", json={"text": text, "language": "en", **avatar}, timeout=timeout_s)
if resp.status_code != 200:
    sys.exit(f"[demo] generation failed: {resp.status_code} {resp.text}")
job = resp.json()
video = httpx.get(job["video_url"], timeout=60)
video.raise_for_status()
path = out / f"demo_{job['task_id'][:8]}.mp4"
path.write_bytes(video.content)
(out / f"demo_{job['task_id'][:8]}.vtt").write_text(httpx.get(job["captions_url"], timeout=30).text)
stages = ", ".join(f"{k} {v:.0f} ms" for k, v in job["timings"].items())
print(f"[demo] {job['duration_s']:.1f} s of video in {time.perf_counter() - started:.1f} s ({stages})")
print(path.resolve())
PYEOF
