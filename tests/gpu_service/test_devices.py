"""Several devices in one GPU service: DEVICES, replicas, placement, per-device avatar LRU, /health, OOM halving, fp16.

Without a GPU the devices are CPU replicas (`DEVICES=cpu:0,cpu:1`): every engine that runs on a
device gets a copy on each, with its own slots and its own avatar LRU, as on two GPUs.
"""

from __future__ import annotations

import asyncio
import contextlib

import cv2
import numpy as np
import pytest
import torch
from pydantic import ValidationError
from skimage import data

from gpu_service import oom
from gpu_service.device import parse_devices, resolve_device
from gpu_service.errors import ConfigurationError, DeviceOutOfMemory
from gpu_service.registry import EngineEntry
from gpu_service.scheduler import EngineSlots
from gpu_service.settings import Settings
from gpu_service.talking_head.avatars import AvatarStore
from gpu_service.talking_head.encoding import Encoding
from gpu_service.talking_head.render_torch import TorchRenderer
from gpu_service.talking_head.renderer import Renderer
from tests.conftest import running_app
from tests.talking_head.test_render import CLOSED_MOUTHS, kit_portrait, random_controls

TWO = "cpu:0,cpu:1"

# fp16/bf16 against fp32, in grey levels of 0..255: mean abs difference per pixel, and the largest.
HALF_MEAN_MAX = 1.5
HALF_MAX = 12


def png(image: np.ndarray) -> bytes:
    ok, buf = cv2.imencode(".png", np.ascontiguousarray(image[..., ::-1]))
    assert ok
    return buf.tobytes()


class LimitedTorch(TorchRenderer):
    """Fault injection at the device boundary: a device with room for at most `room` frames in one batch.

    Above that its batch call raises torch's own CUDA out-of-memory error, as the allocator would;
    everything else (the halving, the counting, the 503) is the real render path.
    """

    def __init__(self, device: str, batch: int, room: int) -> None:
        super().__init__(device, batch=batch)
        self.room = room
        self.tried: list[int] = []

    def render_block(self, enc, weights, head):
        self.tried.append(len(weights))
        if len(weights) > self.room:
            raise torch.cuda.OutOfMemoryError(f"CUDA out of memory. Tried to allocate {len(weights) * 64} MiB")
        return super().render_block(enc, weights, head)


def limited(device: str, batch: int, room: int) -> Renderer:
    """A torch Renderer on `device` whose device has room for `room` frames per batch."""
    renderer = Renderer(device, backend="torch", batch=batch)
    renderer._impl = LimitedTorch(device, batch, room)
    return renderer


@pytest.fixture(scope="module")
def astro() -> Encoding:
    from gpu_service.talking_head.encoding import encode_image

    return encode_image(data.astronaut())


# -- DEVICES ---------------------------------------------------------------------------------

def test_devices_setting_parses_lists_and_refuses_bad_ones():
    assert parse_devices("auto") is None and parse_devices(" ") is None
    assert parse_devices("cpu,cpu") == ["cpu:0", "cpu:1"]
    assert parse_devices("CPU:0, cpu:1") == ["cpu:0", "cpu:1"]
    assert parse_devices("cuda,cuda:1") == ["cuda:0", "cuda:1"]
    assert parse_devices("cuda") == ["cuda"] and parse_devices("mps") == ["mps"]
    for bad, needle in [("gpu0", "not a device"), ("cuda:0,cpu", "one kind"), ("cuda:1,cuda:1", "more than once"),
                        ("mps:1", "only one MPS")]:
        with pytest.raises(ValueError, match=needle):
            parse_devices(bad)
    assert Settings(devices="cpu,cpu").devices == TWO
    with pytest.raises(ValidationError, match="one kind"):
        Settings(devices="cuda:0,cpu:1")


def test_resolve_device_keeps_one_device_as_before_and_checks_lists():
    one = resolve_device("cpu")
    assert (one.name, one.devices) == ("cpu", ("cpu",))
    two = resolve_device("auto", TWO)
    assert (two.name, two.devices) == ("cpu", ("cpu:0", "cpu:1"))
    with pytest.raises(ConfigurationError, match="DEVICE=cpu but DEVICES=cuda:0"):
        resolve_device("cpu", "cuda:0")
    if torch.cuda.device_count() < 8:
        with pytest.raises(ConfigurationError, match="lists cuda:7 but torch sees"):
            resolve_device("auto", "cuda:7")


# -- placement ---------------------------------------------------------------------------------

def _entry(policy: str, queue: int = 0) -> tuple[EngineEntry, list[object]]:
    """An engine entry with two loaded replicas on cpu:0 and cpu:1, each one slot (the engines are not called)."""
    engines = [object(), object()]
    entry = EngineEntry("landmark", "video", engines[0], EngineSlots("video:landmark@cpu:0", 1, queue), loaded=True,
                        settled=True, device="cpu:0", placement=policy)
    entry.add_replica("cpu:1", engines[1], EngineSlots("video:landmark@cpu:1", 1, queue)).loaded = True
    return entry, engines


def test_round_robin_alternates_and_skips_a_full_device():
    async def scenario():
        entry, _ = _entry("round_robin")
        assert [entry.place().device for _ in range(4)] == ["cpu:0", "cpu:1", "cpu:0", "cpu:1"]
        async with entry.replicas[0].slots.acquire():  # cpu:0 full (one slot, no queue): its turn goes to cpu:1
            assert [entry.place().device for _ in range(2)] == ["cpu:1", "cpu:1"]
        assert [r.placed for r in entry.replicas] == [2, 4]
        assert (entry.slots.slots, entry.slots.busy) == (2, 0)

    asyncio.run(scenario())


def test_least_loaded_picks_the_idle_device_then_the_warm_one():
    async def scenario():
        entry, engines = _entry("least_loaded", queue=4)
        async with entry.replicas[0].slots.acquire():
            assert [entry.place().device for _ in range(3)] == ["cpu:1"] * 3
            async with entry.replicas[1].slots.acquire():
                assert entry.slots.busy == 2
                assert entry.place().device in ("cpu:0", "cpu:1")  # both busy: either queues
        async with entry.replicas[1].slots.acquire():
            assert entry.place().device == "cpu:0"
        # Both idle: the one holding the request's avatar, whatever the turn.
        assert [entry.place(prefer=lambda e: e is engines[1]).device for _ in range(3)] == ["cpu:1"] * 3
        assert {entry.place().device for _ in range(2)} == {"cpu:0", "cpu:1"}  # no preference: in turn

    asyncio.run(scenario())


# -- per-device avatar LRU -----------------------------------------------------------------------

def test_each_device_keeps_its_own_lru_and_evicts_its_oldest(tmp_path):
    images = [png(data.astronaut()), png(kit_portrait("p01")), png(kit_portrait("p06"))]
    warm = AvatarStore(tmp_path / "warm", 1 << 40, 10 << 20)
    sizes = [warm.encode_bytes(raw)[1].nbytes for raw in images]
    budget = sorted(sizes)[-1] + sorted(sizes)[-2]  # the two largest fit, never three
    assert sum(sizes) > budget
    store = AvatarStore(tmp_path / "warm", budget, 10 << 20)  # the same disk cache: nothing is encoded again
    gone: dict[str, list[Encoding]] = {"cpu:0": [], "cpu:1": []}
    for device in gone:
        store.on_evict(device, gone[device].append)
    ids = [store.add(raw, avatar_id=f"a{i}", device="cpu:0").avatar_id for i, raw in enumerate(images)]
    keys = [store.record(i).key for i in ids]
    cpu0 = store.device_cache("cpu:0")
    assert cpu0.keys() == keys[1:] and cpu0.nbytes <= budget  # the oldest left cpu:0, and its renderer was told
    assert len(gone["cpu:0"]) == 1 and gone["cpu:0"][0].image.shape == data.astronaut().shape
    assert len(store.device_cache("cpu:1")) == 0 and not store.is_cached("a0", "cpu:0")
    assert (store.cache_stats("cpu:0").hits, store.cache_stats("cpu:0").misses) == (0, 3)
    # cpu:1 has its own LRU: it takes a2 from cpu:0's memory (shared, not read again) and a0 from disk.
    a2 = store.get("a2", "cpu:1")
    assert a2 is cpu0.peek(keys[2])
    store.get("a0", "cpu:1")
    assert store.device_cache("cpu:1").keys() == [keys[2], keys[0]] and cpu0.keys() == keys[1:]
    assert store.is_cached("a0", "cpu:1") and store.cache_stats("cpu:1").size == 2
    assert store.cache_stats("cpu:1").misses == 2 and not gone["cpu:1"]
    # Using a1 on cpu:0 makes a2 the oldest there: the next avatar evicts a2, not a1.
    store.get("a1", "cpu:0")
    store.get("a0", "cpu:0")
    assert cpu0.keys() == [keys[1], keys[0]] and gone["cpu:0"][-1] is a2
    # Deleting an upload drops it from every device (their renderers are told).
    store.delete("a0")
    assert keys[0] not in cpu0 and keys[0] not in store.device_cache("cpu:1")
    assert gone["cpu:1"] and gone["cpu:1"][-1].image.shape == data.astronaut().shape


def test_an_evicted_avatar_frees_what_the_renderer_prepared(astro):
    renderer = Renderer("cpu:1", backend="torch", batch=2)
    c = random_controls(2, 0, mouth_open=(0, 1))
    renderer.render(astro, c)
    prepared = renderer._impl._prepared
    assert prepared.get(astro) is prepared.get(astro)  # held: built once
    held = prepared.get(astro)
    renderer.forget(astro)
    assert prepared.get(astro) is not held  # dropped, so built again


# -- out of memory ---------------------------------------------------------------------------

def test_a_batch_out_of_memory_is_halved_counted_and_renders_the_same_frames(astro):
    c = random_controls(13, 2, mouth_open=(0, 1), blink=(0, 1), head_roll=(-0.05, 0.05))
    whole = Renderer("cpu:1", backend="torch", batch=8).render(astro, c)
    seen: list[str] = []
    oom.RETRY_HOOKS.append(seen.append)
    try:
        before = oom.retries("cpu:1")
        renderer = limited("cpu:1", batch=8, room=2)
        frames = renderer.render(astro, c)
        # 8 does not fit, nor 4; 2 does, and the rest of the clip keeps batches of 2.
        assert renderer._impl.tried == [8, 4, 2, 2, 2, 2, 2, 2, 1]
        assert np.array_equal(frames, whole)
        assert oom.retries("cpu:1") - before == 2 and seen == ["cpu:1", "cpu:1"]
        # The next call starts where the last one left off: at 2.
        renderer._impl.tried.clear()
        assert np.array_equal(renderer.render(astro, c), whole) and renderer._impl.tried == [2] * 6 + [1]
        # After `recover_frames` frames without running out of memory a larger batch is tried again.
        seen.clear()
        probing = limited("cpu:1", batch=8, room=2)
        probing._impl.recover_frames = 4
        assert np.array_equal(probing.render(astro, c), whole)
        assert probing._impl.tried == [8, 4, 2, 2, 4, 2, 2, 4, 2, 2, 1] and len(seen) == 4

        seen.clear()
        nothing_fits = limited("cpu:1", batch=8, room=0)
        with pytest.raises(DeviceOutOfMemory, match="out of memory for even one frame") as err:
            nothing_fits.render(astro, c)
        assert nothing_fits._impl.tried == [8, 4, 2, 1] and seen == ["cpu:1"] * 3
        assert err.value.status_code == 503 and err.value.headers == {"Retry-After": "2"}
    finally:
        oom.RETRY_HOOKS.remove(seen.append)


def test_only_out_of_memory_errors_are_retried():
    assert oom.is_out_of_memory(torch.cuda.OutOfMemoryError("CUDA out of memory"))
    assert oom.is_out_of_memory(RuntimeError("MPS backend out of memory (MPS allocated: 9 GB)"))
    assert not oom.is_out_of_memory(RuntimeError("shape mismatch"))

    class Broken(TorchRenderer):
        def render_block(self, enc, weights, head):
            raise RuntimeError("shape mismatch")

    before = oom.retries("cpu:3")
    with pytest.raises(RuntimeError, match="shape mismatch"):
        list(Broken("cpu:3", batch=4).frames(None, np.zeros((4, 8), np.float32), None))
    assert oom.retries("cpu:3") == before


# -- precision -------------------------------------------------------------------------------

def assert_close_to_float32(low: np.ndarray, ref: np.ndarray) -> None:
    """Half-precision frames within HALF_MEAN_MAX grey levels on average per pixel and HALF_MAX at most of float32's."""
    diff = np.abs(low.astype(np.int16) - ref.astype(np.int16))
    assert diff.mean() <= HALF_MEAN_MAX and diff.max() <= HALF_MAX, (float(diff.mean()), int(diff.max()))


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_half_precision_renders_what_float32_renders_on_the_cpu(astro, dtype):
    from gpu_service.talking_head.encoding import encode_image

    c = random_controls(8, 4, mouth_open=(0, 1.2), mouth_round=(0, 1), smile=(-1, 1), blink=(0, 1), brow=(-1, 1),
                        head_roll=(-0.05, 0.05), head_dx=(-0.02, 0.02), head_dy=(-0.03, 0.03))
    ref = Renderer("cpu", backend="torch", batch=4, dtype="float32")
    low = Renderer("cpu", backend="torch", batch=4, dtype=dtype)
    assert low.precision.startswith(dtype) and low.health().precision == low.precision
    assert low._impl._prep(astro).bases.dtype == getattr(torch, dtype)  # the fields really are half precision
    assert_close_to_float32(low.render(astro, c), ref.render(astro, c))
    closed = encode_image(kit_portrait("p06"))  # a closed mouth opened: all of the interior drawn
    assert_close_to_float32(low.render(closed, c), ref.render(closed, c))


def test_render_dtype_auto_is_float32_on_the_cpu():
    assert Renderer("cpu:0", backend="torch").precision == "float32"
    assert Renderer("cpu").precision == "float32"  # the cv2 path


@pytest.mark.gpu
def test_float16_on_cuda_renders_what_float32_renders(astro):
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device (torch.cuda.is_available() is false)")
    c = random_controls(24, 5, mouth_open=(0, 1.2), mouth_round=(0, 1), smile=(-1, 1), blink=(0, 1), brow=(-1, 1),
                        head_roll=(-0.05, 0.05), head_dx=(-0.02, 0.02), head_dy=(-0.03, 0.03))
    half = Renderer("cuda", batch=16)  # RENDER_DTYPE=auto
    assert half.precision in ("float16", "bfloat16", "float16 fields, float32 sampling", "bfloat16 fields, float32 sampling")
    full = Renderer("cuda", batch=16, dtype="float32")
    assert_close_to_float32(half.render(astro, c), full.render(astro, c))
    for name in CLOSED_MOUTHS:
        from gpu_service.talking_head.encoding import encode_image

        enc = encode_image(kit_portrait(name))
        assert_close_to_float32(half.render(enc, c), full.render(enc, c))


@pytest.mark.gpu
def test_a_real_cuda_allocator_limit_halves_the_batch(astro):
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device (torch.cuda.is_available() is false)")
    c = random_controls(64, 6, mouth_open=(0, 1), head_roll=(-0.05, 0.05))
    whole = Renderer("cuda", batch=64, dtype="float32").render(astro, c)
    renderer = Renderer("cuda", batch=64, dtype="float32")
    renderer.render(astro, random_controls(1, 6))  # the avatar's tensors resident first
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    # Leave room for about a dozen frames: a batch of 64 no longer fits, a smaller one does.
    per_frame = 3 * 4 * astro.crop.height * astro.crop.width * 12
    limit = (torch.cuda.memory_allocated() + 12 * per_frame) / torch.cuda.get_device_properties(0).total_memory
    before = oom.retries("cuda")
    torch.cuda.set_per_process_memory_fraction(limit)
    try:
        frames = renderer.render(astro, c)
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0)
    assert oom.retries("cuda") > before
    assert np.abs(frames.astype(np.int16) - whole.astype(np.int16)).max() <= 1  # as blocks vs whole on CUDA


# -- the app on two CPU devices --------------------------------------------------------------

@pytest.fixture
def two_devices(gpu_settings):
    """The in-process service on cpu:0 and cpu:1, with Piper, the talking head and lip-sync."""
    return gpu_settings.model_copy(update={"devices": TWO})


async def _speech(client) -> dict:
    tts = await client.post("/tts/generate", json={"text": "Hello there."})
    assert tts.status_code == 200, tts.text
    return tts.json()


async def _video(client, avatar_id: str, tts: dict):
    return await client.post("/video/generate", json={"avatar_id": avatar_id, "audio_url": tts["audio_url"],
                                                      "phonemes": tts["phonemes"], "head_motion": False})


def test_two_devices_have_replicas_round_robin_alternates_and_health_shows_both(two_devices):
    settings = two_devices.model_copy(update={"placement": "round_robin"})

    async def scenario():
        async with running_app(settings) as client:
            registry = client.app.state.registry
            heads = registry.talking_head["landmark"]
            assert [r.device for r in heads.replicas] == ["cpu:0", "cpu:1"]
            assert heads.replicas[0].engine is not heads.replicas[1].engine
            assert [r.device for r in registry.lipsync["landmark"].replicas] == ["cpu:0", "cpu:1"]
            assert [r.device for r in registry.speech["piper"].replicas] == ["cpu:0"]  # Piper runs once

            health = (await client.get("/health")).json()
            assert health["status"] == "healthy" and health["device"] == "cpu"
            for key in ("capabilities", "models", "active_workers", "available_slots", "contract_version", "engines"):
                assert key in health
            assert health["available_slots"] == 5 and health["active_workers"] == 0  # piper 1, video 2, lipsync 2
            engines = {e["name"] + ":" + e["capability"]: e for e in health["engines"]}
            assert engines["landmark:video"]["replicas"] == ["cpu:0", "cpu:1"] and engines["landmark:video"]["slots"] == 2
            assert engines["piper:tts"]["replicas"] == ["cpu:0"] and engines["piper:tts"]["slots"] == 1
            devices = health["devices"]
            assert [d["name"] for d in devices] == ["cpu:0", "cpu:1"] and {d["kind"] for d in devices} == {"cpu"}
            assert devices[0]["engines"] == ["tts:piper", "video:landmark", "lipsync:landmark"]
            assert devices[1]["engines"] == ["video:landmark", "lipsync:landmark"]
            assert [d["slots_total"] for d in devices] == [3, 2] and all(d["slots_busy"] == 0 for d in devices)

            up = await client.post("/avatars", files={"image": ("a.png", png(data.astronaut()), "image/png")})
            assert up.status_code == 200, up.text
            avatar = up.json()["avatar_id"]
            tts = await _speech(client)
            served = []
            for _ in range(4):
                resp = await _video(client, avatar, tts)
                assert resp.status_code == 200, resp.text
                served.append(resp.headers["X-Device"])
            assert served == ["cpu:1", "cpu:0", "cpu:1", "cpu:0"]  # each in turn (the upload went to cpu:0)

            devices = (await client.get("/health")).json()["devices"]
            # Both rendered the avatar: each holds it in its own LRU. Placed: the upload, the videos, Piper's speech.
            assert [d["cached_avatars"] for d in devices] == [1, 1]
            assert [d["placed"] for d in devices] == [1 + 2 + 1, 2]

    asyncio.run(scenario())


def test_least_loaded_takes_the_idle_device_warm_avatars_stay_and_oom_is_a_503(two_devices):
    settings = two_devices.model_copy(update={"lipsync_engines": []})

    async def scenario():
        async with running_app(settings) as client:
            heads = client.app.state.registry.talking_head["landmark"]
            cpu0, cpu1 = heads.replicas
            up = await client.post("/avatars", files={"image": ("a.png", png(data.astronaut()), "image/png")})
            avatar = up.json()["avatar_id"]
            tts = await _speech(client)
            # One device busy (its one slot held): the request goes to the idle one, either way round.
            for busy, idle in ((cpu0, "cpu:1"), (cpu1, "cpu:0")):
                async with busy.slots.acquire():
                    resp = await _video(client, avatar, tts)
                assert resp.status_code == 200 and resp.headers["X-Device"] == idle, resp.text

            # A new portrait is encoded on one device: with both idle its videos stay where it is warm.
            up = await client.post("/avatars", files={"image": ("p.png", png(kit_portrait("p01")), "image/png")})
            portrait = up.json()["avatar_id"]
            warm = [r.device for r in heads.replicas if r.engine.is_warm(portrait)]
            assert len(warm) == 1
            for _ in range(2):
                resp = await _video(client, portrait, tts)
                assert resp.headers["X-Device"] == warm[0], resp.text
            assert {d["name"]: d["cached_avatars"] for d in (await client.get("/health")).json()["devices"]} == \
                {warm[0]: 2, ({"cpu:0", "cpu:1"} - set(warm)).pop(): 1}

            # A device that cannot fit even one frame: halved 8 -> 4 -> 2 -> 1, then a 503 with Retry-After.
            real = {r.device: r.engine.renderer for r in heads.replicas}
            for r in heads.replicas:
                r.engine.renderer = limited(r.device, batch=8, room=0)
            before = {d["name"]: d["oom_retries"] for d in (await client.get("/health")).json()["devices"]}
            resp = await _video(client, avatar, tts)
            assert resp.status_code == 503 and resp.headers["Retry-After"] == "2", resp.text
            err = resp.json()
            assert err["error_type"] == "out_of_memory" and "out of memory" in err["error"]
            assert len(err["request_id"]) >= 16 and "Traceback" not in resp.text
            health = (await client.get("/health")).json()
            after = {d["name"]: d["oom_retries"] for d in health["devices"]}
            assert sorted(after[d] - before[d] for d in after) == [0, 3]
            assert health["status"] == "healthy" and all(d["slots_busy"] == 0 for d in health["devices"])
            # Room for two frames per batch: the video is made, two halvings counted.
            for r in heads.replicas:
                r.engine.renderer = limited(r.device, batch=8, room=2)
            resp = await _video(client, avatar, tts)
            assert resp.status_code == 200, resp.text
            again = {d["name"]: d["oom_retries"] for d in (await client.get("/health")).json()["devices"]}
            assert again[resp.headers["X-Device"]] - after[resp.headers["X-Device"]] == 2
            for r in heads.replicas:
                r.engine.renderer = real[r.device]

    asyncio.run(scenario())


def test_one_device_behaves_and_reports_as_before(gpu_settings):
    settings = gpu_settings.model_copy(update={"lipsync_engines": [], "engine_queue": 0})

    async def scenario():
        async with running_app(settings) as client:
            registry = client.app.state.registry
            heads = registry.talking_head["landmark"]
            assert registry.devices == ["cpu"] and [r.device for r in heads.replicas] == ["cpu"]
            assert heads.slots is heads.replicas[0].slots and heads.slots.name == "video:landmark"
            health = (await client.get("/health")).json()
            assert health["device"] == "cpu" and health["available_slots"] == 2
            assert [(d["name"], d["slots_total"], d["cached_avatars"]) for d in health["devices"]] == [("cpu", 2, 0)]
            video = next(e for e in health["engines"] if e["capability"] == "video")
            assert (video["device"], video["providers"], video["replicas"]) == ("cpu", ["cv2"], ["cpu"])
            up = await client.post("/avatars", files={"image": ("a.png", png(data.astronaut()), "image/png")})
            tts = await _speech(client)
            resp = await _video(client, up.json()["avatar_id"], tts)
            assert resp.status_code == 200 and resp.headers["X-Device"] == "cpu"
            # The one slot busy and no queue: a 429 naming the engine as before.
            async with heads.slots.acquire():
                busy = await _video(client, up.json()["avatar_id"], tts)
            assert busy.status_code == 429 and "'video:landmark' is busy" in busy.json()["error"]

    asyncio.run(scenario())


def test_a_replica_that_failed_to_load_does_not_refuse_what_the_others_serve():
    """The entry's engine (validation, shared records) is a loaded replica's, not the first one's when that failed."""
    from gpu_service.registry import EngineEntry
    from gpu_service.scheduler import EngineSlots

    class Copy:
        def __init__(self, name: str) -> None:
            self.name = name

    entry = EngineEntry("e", "tts", Copy("cpu:0"), EngineSlots("tts:e@cpu:0", 1, 1), device="cpu:0")
    entry.add_replica("cpu:1", Copy("cpu:1"), EngineSlots("tts:e@cpu:1", 1, 1))
    entry.replicas[0].settled, entry.replicas[0].reason = True, "out of memory at load"
    entry.replicas[1].loaded = entry.replicas[1].settled = True
    assert entry.loaded and entry.engine.name == "cpu:1"
    assert entry.place().device == "cpu:1"
