"""The GPU service's /metrics after real requests (Piper in process), its request ids in the logs, its GPU figures."""

from __future__ import annotations

import asyncio
import io
import json
import logging
import threading
from types import SimpleNamespace

import pytest

from avatar_contracts.logs import JsonFormatter
from gpu_service.metrics import GpuMemoryCollector, GpuMetrics, record_oom_retry
from tests.helpers import parse_metrics as parse
from tests.conftest import running_app
from tests.runtime.conftest import astronaut_b64

FAMILIES = {
    "avatar_gpu_http_requests": "counter", "avatar_gpu_http_request_duration_seconds": "histogram",
    "avatar_gpu_stage_duration_seconds": "histogram", "avatar_gpu_slots": "gauge", "avatar_gpu_queue_depth": "gauge",
    "avatar_gpu_stream_sessions_active": "gauge", "avatar_gpu_oom_retries": "counter",
    "avatar_gpu_chunks_generated": "counter", "process_cpu_seconds": "counter", "python_info": "gauge",
}


def run(coro):
    """Run one async scenario to completion."""
    return asyncio.run(coro)


async def scrape(client) -> tuple[dict, dict]:
    resp = await client.get("/metrics")
    assert resp.status_code == 200 and resp.headers["content-type"].startswith("text/plain; version=0.0.4")
    return parse(resp.text)


def value(values: dict, name: str, **labels) -> float:
    """One sample's value (0 when the series does not exist yet)."""
    return values.get((name, tuple(sorted(labels.items()))), 0.0)


def test_families_exist_and_counters_move_with_real_requests(gpu_settings):
    async def scenario():
        async with running_app(gpu_settings) as client:
            types, before = await scrape(client)
            for name, kind in FAMILIES.items():
                assert types.get(name) == kind, (name, types.get(name))
            assert not any(name.startswith("avatar_gpu_memory") or name == "avatar_gpu_utilization_ratio"
                           for name in types), "GPU memory families on a CPU service"

            ok = await client.post("/tts/generate", json={"text": "Counting one chunk of speech."})
            assert ok.status_code == 200, ok.text
            art_id = ok.json()["audio_url"].rsplit("/", 1)[1]
            assert (await client.get(f"/artifacts/{art_id}")).status_code == 200
            bad = await client.post("/tts/generate", json={"text": ""})
            assert bad.status_code == 422
            assert (await client.get("/no/such/path")).status_code == 404
            _, after = await scrape(client)

            def moved(name: str, **labels) -> float:
                return value(after, name, **labels) - value(before, name, **labels)

            assert moved("avatar_gpu_chunks_generated_total", kind="tts") == 1  # the 422 made nothing
            assert moved("avatar_gpu_chunks_generated_total", kind="video") == 0
            assert moved("avatar_gpu_stage_duration_seconds_count", stage="tts") == 1
            assert moved("avatar_gpu_stage_duration_seconds_sum", stage="tts") > 0
            requests = "avatar_gpu_http_requests_total"
            assert moved(requests, method="POST", route="/tts/generate", status="200") == 1
            assert moved(requests, method="POST", route="/tts/generate", status="422") == 1
            # route templates, never raw paths: the artifact id is no label value
            assert moved(requests, method="GET", route="/artifacts/{art_id}", status="200") == 1
            assert moved(requests, method="GET", route="unmatched", status="404") == 1
            assert not any(art_id in dict(labels).get("route", "") for _, labels in after)
            assert moved("avatar_gpu_http_request_duration_seconds_count", method="POST", route="/tts/generate") == 2
            assert value(after, "avatar_gpu_slots", device="cpu", state="busy") == 0
            # speech, talking head and lip-sync, each with ENGINE_SLOTS slots
            assert value(after, "avatar_gpu_slots", device="cpu", state="free") == gpu_settings.engine_slots * 3
            assert value(after, "avatar_gpu_stream_sessions_active") == 0
            assert "/metrics" not in (await client.get("/openapi.json")).json()["paths"]

    run(scenario())


def test_slots_are_busy_while_a_request_holds_one_and_the_queue_shows_the_waiting(gpu_settings):
    gpu_settings.engine_slots = 1
    gpu_settings.engine_queue = 1

    async def scenario():
        async with running_app(gpu_settings) as client:
            piper = client.app.state.registry.speech["piper"].engine
            release, entered = threading.Event(), threading.Event()
            synthesize = piper.synthesize

            def held(request):  # the real synthesis, once the test lets it go
                entered.set()
                release.wait(60)
                return synthesize(request)

            piper.synthesize = held
            try:
                first = asyncio.create_task(client.post("/tts/generate", json={"text": "Holding the only slot."}))
                await asyncio.to_thread(entered.wait, 60)
                second = asyncio.create_task(client.post("/tts/generate", json={"text": "Waiting for it."}))
                for _ in range(600):  # bounded: until the second request is in the queue
                    _, during = await scrape(client)
                    if value(during, "avatar_gpu_queue_depth") == 1:
                        break
                    await asyncio.sleep(0.05)
                assert value(during, "avatar_gpu_slots", device="cpu", state="busy") == 1
                assert value(during, "avatar_gpu_queue_depth") == 1
                # the speech engine's one slot is taken; the talking head's and lip-sync's are still free
                assert value(during, "avatar_gpu_slots", device="cpu", state="free") == 2
            finally:
                release.set()
            assert (await first).status_code == 200 and (await second).status_code == 200
            _, after = await scrape(client)
            assert value(after, "avatar_gpu_slots", device="cpu", state="busy") == 0
            assert value(after, "avatar_gpu_queue_depth") == 0
            assert value(after, "avatar_gpu_chunks_generated_total", kind="tts") == 2

    run(scenario())


def test_every_log_line_of_a_request_carries_its_request_id_and_video_counts(gpu_settings):
    """Lines logged in the engine's slot thread and in asyncio.to_thread (portrait encoding, alignment, driving)
    carry the id the client sent, as do the error lines; and one /video/generate is one video chunk."""
    gpu_settings.log_level = "debug"
    lines = io.StringIO()
    handler = logging.StreamHandler(lines)
    handler.setFormatter(JsonFormatter())

    async def scenario():
        async with running_app(gpu_settings) as client:
            speech = await client.post("/tts/generate", json={"text": "Hello there."})
            _, before = await scrape(client)
            logging.getLogger().addHandler(handler)
            try:
                # no phonemes: the service aligns the speech to its text before it drives the face
                resp = await client.post("/video/generate", headers={"X-Request-ID": "trace-0123-abcd"}, json={
                    "avatar_image": astronaut_b64(), "audio_url": speech.json()["audio_url"], "text": "Hello there.",
                    "fps": 10, "response": "json"})
                bad = await client.post("/video/generate", json={"avatar_id": "nobody", "audio_url": "/x"},
                                        headers={"X-Request-ID": "trace-bad"})
            finally:
                logging.getLogger().removeHandler(handler)
            assert resp.status_code == 200, resp.text
            assert resp.headers["X-Request-ID"] == "trace-0123-abcd" and bad.status_code in (404, 422)
            _, after = await scrape(client)
            assert value(after, "avatar_gpu_chunks_generated_total", kind="video") - \
                value(before, "avatar_gpu_chunks_generated_total", kind="video") == 1
            for stage in ("align", "render", "encode"):
                assert value(after, "avatar_gpu_stage_duration_seconds_count", stage=stage) - \
                    value(before, "avatar_gpu_stage_duration_seconds_count", stage=stage) == 1, stage

    run(scenario())
    records = [json.loads(line) for line in lines.getvalue().splitlines()]
    ours = [r for r in records if r["logger"].startswith("gpu_service")]
    assert {"avatar registered", "aligned", "driven", "request done"} <= {r["msg"] for r in ours}, ours
    assert all(r.get("request_id") in ("trace-0123-abcd", "trace-bad") for r in ours), ours
    done = {(r["route"], r["status"], r["request_id"]) for r in ours if r["msg"] == "request done"}
    assert ("/video/generate", 200, "trace-0123-abcd") in done and len(done) == 2


def test_oom_retries_count_in_the_metrics_of_the_app_whose_work_it_is():
    one, other = GpuMetrics(), GpuMetrics()
    token = one.bind()
    try:
        record_oom_retry("cuda")
        # an engine's worker thread runs in a copy of the request's context (EngineSlots.run)
        import contextvars

        thread = threading.Thread(target=contextvars.copy_context().run, args=(record_oom_retry, "cuda:1"))
        thread.start()
        thread.join()
    finally:
        token.var.reset(token)
    _, first = parse(_text(one))
    _, second = parse(_text(other))
    assert value(first, "avatar_gpu_oom_retries_total", device="cuda:0") == 1
    assert value(first, "avatar_gpu_oom_retries_total", device="cuda:1") == 1
    assert not any(name == "avatar_gpu_oom_retries_total" for name, _ in second)


def _text(metrics: GpuMetrics) -> str:
    from prometheus_client import generate_latest

    return generate_latest(metrics.registry).decode()


class _Nvml:
    """NVML's answers for a machine of three GPUs, the second a MIG-like device without utilisation."""

    class NVMLError(Exception):
        pass

    uuids = {"GPU-aaa": 0, "GPU-bbb": 1, "GPU-ccc": 2}

    def nvmlDeviceGetCount(self):  # noqa: N802 - NVML's names
        return 3

    def nvmlDeviceGetHandleByIndex(self, index):  # noqa: N802
        if not 0 <= index < 3:
            raise self.NVMLError("invalid argument")
        return index

    def nvmlDeviceGetHandleByUUID(self, uuid):  # noqa: N802
        if uuid not in self.uuids:
            raise self.NVMLError("not found")
        return self.uuids[uuid]

    def nvmlDeviceGetMemoryInfo(self, handle):  # noqa: N802
        return SimpleNamespace(used=(handle + 1) * 2**30, total=80 * 2**30, free=0)

    def nvmlDeviceGetUtilizationRates(self, handle):  # noqa: N802
        if handle == 1:
            raise self.NVMLError("not supported")
        return SimpleNamespace(gpu=25 * (handle + 1), memory=0)


def _collect(collector) -> dict:
    out = {}
    for family in collector.collect():
        for sample in family.samples:
            out[(sample.name, sample.labels["device"])] = sample.value
    return out


def test_gpu_figures_follow_cuda_visible_devices_and_skip_what_nvml_cannot_tell(monkeypatch):
    collector = GpuMemoryCollector("cuda", nvml=_Nvml())
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    every = _collect(collector)
    assert every[("avatar_gpu_memory_used_bytes", "cuda:2")] == 3 * 2**30
    assert every[("avatar_gpu_memory_total_bytes", "cuda:0")] == 80 * 2**30
    assert every[("avatar_gpu_utilization_ratio", "cuda:0")] == 0.25
    assert ("avatar_gpu_utilization_ratio", "cuda:1") not in every  # not supported there: left out, no error

    # torch numbers the visible devices from 0 in the listed order and stops at the first it cannot find
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2,GPU-aaa,7,1")
    visible = _collect(collector)
    assert visible[("avatar_gpu_memory_used_bytes", "cuda:0")] == 3 * 2**30
    assert visible[("avatar_gpu_memory_used_bytes", "cuda:1")] == 1 * 2**30
    assert {device for _, device in visible} == {"cuda:0", "cuda:1"}

    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    assert _collect(collector) == {}


def test_gpu_figures_are_absent_on_cpu_and_never_fail_a_scrape():
    assert _collect(GpuMemoryCollector("cpu")) == {}
    assert _collect(GpuMemoryCollector("mps")) == {}

    class Broken(_Nvml):
        def nvmlDeviceGetCount(self):  # noqa: N802
            raise RuntimeError("driver went away")

    assert _collect(GpuMemoryCollector("cuda", nvml=Broken())) == {}


@pytest.mark.gpu
def test_gpu_figures_from_the_real_nvml_on_cuda():
    import torch

    if not torch.cuda.is_available():
        pytest.skip("no CUDA device (torch.cuda.is_available() is false)")
    figures = _collect(GpuMemoryCollector("cuda"))
    total = figures[("avatar_gpu_memory_total_bytes", "cuda:0")]
    assert total == pytest.approx(torch.cuda.get_device_properties(0).total_memory, rel=0.05)
    assert 0 < figures[("avatar_gpu_memory_used_bytes", "cuda:0")] <= total
