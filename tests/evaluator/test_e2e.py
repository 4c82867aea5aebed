"""The quick suite end to end: the real GPU service and runtime as processes, `python -m evaluator run`."""

from __future__ import annotations

import glob
import json
import os
import subprocess
import sys

import httpx
import pytest

from tests.helpers import REPO, free_port, service_process

pytestmark = pytest.mark.slow

PYTHON = str(REPO / ".venv" / "bin" / "python") if (REPO / ".venv" / "bin" / "python").exists() else sys.executable


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    """GPU service (Piper, the repository's presets) and a runtime pointing at it, both real processes."""
    tmp = tmp_path_factory.mktemp("eval_stack")
    gpu_port, rt_port = free_port(), free_port()
    gpu_url, rt_url = f"http://127.0.0.1:{gpu_port}", f"http://127.0.0.1:{rt_port}"
    gpu_env = {"HOST": "127.0.0.1", "PORT": str(gpu_port), "DATA_DIR": str(tmp / "gpu"), "TTS_ENGINES": "piper",
               "PRESET_AVATARS_DIR": str(REPO / "preset_avatars"), "DEVICE": "cpu"}
    with service_process([PYTHON, "-m", "gpu_service"], gpu_env, f"{gpu_url}/ready", tmp / "gpu.log") as gpu:
        probe = httpx.post(f"{gpu_url}/video/generate", json={}, timeout=30)
        # A missing route is a routing regression, not a reason to skip.
        assert probe.status_code == 422, f"POST /video/generate answered {probe.status_code}: {probe.text[:300]}"
        rt_env = {"HOST": "127.0.0.1", "PORT": str(rt_port), "GPU_SERVICE_URL": gpu_url, "DATA_DIR": str(tmp / "rt"),
                  "REDIS_URL": "", "RUNTIME_API_KEYS": "eval-key-0123456789"}
        with service_process([PYTHON, "-m", "runtime"], rt_env, f"{rt_url}/ready", tmp / "runtime.log") as rt:
            yield {"gpu_url": gpu_url, "rt_url": rt_url, "gpu_pid": gpu.pid, "rt_pid": rt.pid, "tmp": tmp}


def test_quick_suite_end_to_end_with_gate(stack, tmp_path):
    out = tmp_path / "report"
    res = subprocess.run(
        [PYTHON, "-m", "evaluator", "run", "--runtime-url", stack["rt_url"], "--gpu-url", stack["gpu_url"],
         "--suite", "quick", "--out", str(out), "--api-key", "eval-key-0123456789", "--gate",
         "--gpu-pid", str(stack["gpu_pid"]), "--runtime-pid", str(stack["rt_pid"])],
        cwd=REPO, capture_output=True, text=True, timeout=300, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert res.returncode in (0, 1), res.stdout[-3000:] + res.stderr[-3000:]
    assert "quick suite" in res.stderr  # the tqdm progress bar
    (path,) = glob.glob(str(out / "summary_report_*.json"))
    summary = json.loads(open(path).read())
    by_name = {s["name"]: s for s in summary["scenarios"]}

    # Every scenario either ran or says why not; nothing crashed the run.
    assert all(s["status"] in ("ok", "skipped", "failed") for s in by_name.values())
    assert all(s.get("reason") for s in by_name.values() if s["status"] != "ok"), by_name
    for name in ("short/custom/cold", "short/custom/warm", "medium/custom/warm", "video/direct", "engine/piper",
                 "stream/piper", "avatar/encode", "concurrency"):
        assert by_name[name]["status"] == "ok", (name, by_name[name].get("reason"))
    lipsync_served = summary["environment"]["gpu_health"]["models"].get("lipsync")
    assert by_name["lipsync"]["status"] == ("ok" if lipsync_served else "skipped"), by_name["lipsync"]
    if lipsync_served:
        assert by_name["lipsync"]["quality"]["face_found_share"] > 0.95
    else:
        assert "404" in by_name["lipsync"]["reason"] or "405" in by_name["lipsync"]["reason"]

    speed = summary["speed"]
    assert speed["failed_jobs"] == 0 and speed["jobs"] >= 6
    assert 0 < speed["latency_p50_s"] <= speed["latency_p95_s"] <= speed["latency_p99_s"]
    assert speed["tts_rtf"] > 0 and speed["render_fps"] > 0 and speed["throughput"] > 0
    assert 0 < speed["first_audio_s"] < 10 and speed["first_frame_s"] > 0
    assert set(speed["throughput_by_clients"]) == {"1", "2"}
    assert sum(speed["stage_share"].values()) == pytest.approx(1.0)
    assert summary["environment"]["device"] == "cpu"
    for svc in ("gpu_service", "runtime"):
        mem = summary["memory"][svc]
        assert mem["peak_mb"] > 20 and "VmHWM" in mem["source"], mem

    # Quality was measured on the downloaded MP4s, against phoneme timings and the portrait.
    q = by_name["medium/custom/warm"]["quality"]
    assert q["face_found_share"] > 0.95 and q["frames"] > 100
    assert abs(q["av_offset_ms"]) <= 320 and -1 <= q["lip_audio_corr"] <= 1
    assert q["n_bilabial"] >= 5 and 0 <= q["bilabial_closed"] <= 1 and q["n_vowel"] >= 10
    assert 0 < q["identity_ssim"] <= 1 and q["jitter"] > 0
    # Runtime videos are judged against the runtime's own timing.json; the direct video against its synthesis.
    runtime_sources = {n: s["quality"]["phoneme_source"] for n, s in by_name.items() if s["kind"] == "runtime" and s.get("quality")}
    assert runtime_sources and set(runtime_sources.values()) == {"runtime"}, runtime_sources
    assert "timing.json" in q["phoneme_timings"]
    assert by_name["video/direct"]["quality"]["phoneme_source"] == "synthesis"
    assert by_name["video/direct"]["quality"]["phoneme_timings"].startswith("exact")
    assert all("timing_url" not in run for s in by_name.values() for run in s.get("runs", []))
    assert by_name["avatar/encode"]["speed"]["warm_was_cached"] is True
    if summary["environment"]["presets"]:
        assert by_name["short/preset"]["status"] == "ok"

    # The gate's verdict matches the exit code and names each miss.
    gate = summary["gate"]
    assert (res.returncode == 0) == gate["passed"]
    for miss in gate["misses"]:
        assert miss["text"] in res.stdout
    html = (out / "report.html").read_text()
    assert html.count("data:image/png;base64,") == len(list(out.glob("*.png"))) >= 4
