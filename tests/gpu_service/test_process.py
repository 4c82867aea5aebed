"""Tier 3: the real `run_gpu_service.sh` process on a free port, polled until /ready."""

from __future__ import annotations

import subprocess
import sys
import time

import httpx
import pytest

from tests.helpers import REPO, free_port, service_process

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def gpu_process(tmp_path_factory):
    """A real GPU service process (Piper only) for this module: its URL and its Popen."""
    tmp = tmp_path_factory.mktemp("gpu")
    port = free_port()
    env = {"PORT": str(port), "DEVICE": "cpu", "DATA_DIR": str(tmp / "data"), "TTS_ENGINES": "piper", "PRESET_AVATARS_DIR": str(tmp / "presets")}
    url = f"http://127.0.0.1:{port}"
    with service_process([str(REPO / "run_gpu_service.sh")], env, f"{url}/ready", tmp / "gpu.log") as proc:
        yield url, proc


@pytest.fixture(scope="module")
def gpu_url(gpu_process):
    """The URL of the module's GPU service process."""
    return gpu_process[0]


def threads_of(pid: int) -> int:
    """How many threads the process has now (Linux /proc)."""
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("Threads:"):
            return int(line.split()[1])
    raise RuntimeError("no Threads line")


def test_process_serves_speech_and_artifacts(gpu_url):
    health = httpx.get(f"{gpu_url}/health").json()
    assert health["status"] == "healthy" and health["models"]["tts"] is True
    resp = httpx.post(f"{gpu_url}/tts/generate", json={"text": "The service is running as a real process."}, timeout=60)
    assert resp.status_code == 200, resp.text
    body = resp.json()
    assert body["audio_url"].startswith(gpu_url + "/artifacts/")
    wav = httpx.get(body["audio_url"])
    assert wav.status_code == 200 and wav.content[:4] == b"RIFF"
    bad = httpx.post(f"{gpu_url}/tts/generate", content=b"{", headers={"content-type": "application/json"})
    assert bad.status_code == 422 and bad.json()["request_id"]


def test_stream_first_audio_arrives_long_before_the_end(gpu_url):
    text = " ".join(["Streaming speech arrives sentence by sentence, so a listener hears it early."] * 8)
    started = time.perf_counter()
    first_at = None
    received = 0
    with httpx.stream("POST", f"{gpu_url}/tts/stream", json={"text": text}, timeout=120) as resp:
        assert resp.status_code == 200
        for piece in resp.iter_bytes():
            received += len(piece)
            if first_at is None and received > 44:
                first_at = time.perf_counter() - started
    total = time.perf_counter() - started
    assert (received - 44) / 2 / 22050 > 25
    # A buffered reply would deliver its first audio at the very end; a streamed one delivers it while
    # most of the text is still to be spoken. The halfway line leaves room for a loaded CI host.
    assert first_at is not None and first_at < total / 2, f"first audio at {first_at:.3f}s of {total:.3f}s"


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="counts threads in /proc")
def test_dropped_streams_end_their_threads_and_free_the_engine(gpu_process):
    url, proc = gpu_process
    text = " ".join(["A listener who hangs up must not keep a worker busy for ever."] * 12)
    assert httpx.post(f"{url}/tts/generate", json={"text": "Warm up."}, timeout=60).status_code == 200
    baseline = threads_of(proc.pid)
    for _ in range(8):  # more than a 2-core host's default thread pool (6 workers)
        with httpx.stream("POST", f"{url}/tts/stream", json={"text": text}, timeout=60) as resp:
            assert resp.status_code == 200
            assert len(next(resp.iter_raw())) > 44  # the header and the first audio: mid-body
        # leaving the block with the body unread closes the connection: the client is gone
    started = time.monotonic()
    resp = httpx.post(f"{url}/tts/generate", json={"text": "Still answering."}, timeout=25)
    assert resp.status_code == 200, resp.text
    assert time.monotonic() - started < 20
    deadline = time.monotonic() + 15
    while threads_of(proc.pid) > baseline + 2 and time.monotonic() < deadline:
        time.sleep(0.2)
    assert threads_of(proc.pid) <= baseline + 2, (baseline, threads_of(proc.pid))
    piper = next(e for e in httpx.get(f"{url}/health").json()["engines"] if e["name"] == "piper")
    assert piper["busy"] == 0 and piper["queued"] == 0


def test_impossible_cuda_device_fails_at_start_with_a_clear_message(tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    env = {"PORT": str(free_port()), "DEVICE": "cuda", "DATA_DIR": str(tmp_path)}
    import os

    proc = subprocess.run(
        [str(REPO / "run_gpu_service.sh")], env={**os.environ, **env}, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode != 0
    assert "DEVICE=cuda was requested but no CUDA device" in proc.stderr
    assert "Traceback" not in proc.stderr


BAD_SETTINGS = [
    ({"PORT": "abc"}, "PORT"),
    ({"PORT": "70000"}, "PORT"),
    ({"TTS_ENGINES": "piper,nope"}, "TTS_ENGINES"),
    ({"LIPSYNC_ENGINES": '["wav2lip"]'}, "LIPSYNC_ENGINES"),
    ({"TTS_ENGINES": "piper", "DEFAULT_TTS_ENGINE": "xtts"}, "DEFAULT_TTS_ENGINE"),
]


@pytest.mark.parametrize("env,setting", BAD_SETTINGS)
def test_a_bad_setting_exits_2_with_one_line_naming_it(env, setting, tmp_path):
    import os
    import sys

    full = {**os.environ, "DATA_DIR": str(tmp_path), **env}
    proc = subprocess.run([sys.executable, "-m", "gpu_service"], cwd=REPO, env=full, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and setting in lines[0], proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
