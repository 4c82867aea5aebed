"""AvatarSession.start() against the real GPU service's POST /launch, with a stand-in for the agent's room.

Runs in this package's own environment (livekit-agents 1.8.9, livekit 1.1.21, protobuf 5+), never in
the GPU service's: `pip install -r requirements.lock -e .[test]` (see README). The GPU service is
started natively from this repository with its own interpreter (AVATAR_STACK_GPU_PYTHON, default
<repo>/.venv/bin/python); without it the tests skip. No LiveKit server can be had here, so the worker
the service starts cannot join: the tests check everything up to that point (the token, the form,
the service's answer and its worker's record of the room, the avatar identity and the agent it
speaks for) and that the agent's audio is routed to the avatar with DataStreamAudioOutput.
"""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

pytest.importorskip("livekit.agents", reason="runs in this package's own environment (see README), not the "
                                             "GPU service's")

import jwt  # noqa: E402
from livekit.agents import AgentSession  # noqa: E402
from livekit.agents.voice.avatar import DataStreamAudioOutput  # noqa: E402

from avatar_stack_livekit import AvatarSession, AvatarStackError  # noqa: E402

REPO = Path(__file__).resolve().parents[3]
GPU_PYTHON = Path(os.environ.get("AVATAR_STACK_GPU_PYTHON", REPO / ".venv" / "bin" / "python"))
KEY = "launch-key-for-tests-0123456789"
LK_KEY, LK_SECRET = "APIagenttest", "agent-side-secret-0123456789abcdef"
PORTRAIT = REPO / "tests" / "fixtures" / "media" / "p05_glasses_older_woman_grace_hopper.jpg"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def gpu_service(tmp_path_factory):
    if not GPU_PYTHON.exists():
        pytest.skip(f"no GPU-service interpreter at {GPU_PYTHON} (set AVATAR_STACK_GPU_PYTHON)")
    port = _free_port()
    data = tmp_path_factory.mktemp("gpu")
    env = {**os.environ, "PYTHONPATH": str(REPO), "HOST": "127.0.0.1", "PORT": str(port), "DEVICE": "cpu",
           "TTS_ENGINES": "piper", "DATA_DIR": str(data), "PRESET_AVATARS_DIR": str(REPO / "preset_avatars"),
           "LIVEKIT__LAUNCH_API_KEY": KEY, "LIVEKIT__JOIN_TIMEOUT_S": "10"}
    log = open(data / "service.log", "wb")
    proc = subprocess.Popen([str(GPU_PYTHON), "-m", "gpu_service"], cwd=REPO, env=env, stdout=log,
                            stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180
        while True:
            if proc.poll() is not None:
                raise RuntimeError("the GPU service exited: " + (data / "service.log").read_text()[-2000:])
            try:
                with urllib.request.urlopen(f"{url}/ready", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError("the GPU service never became ready")
            time.sleep(0.5)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


class _LocalParticipant:
    def __init__(self, identity: str) -> None:
        self.identity = identity
        self._rpc_handlers: dict = {}

    def register_rpc_method(self, method, handler=None):
        self._rpc_handlers[method] = handler
        return handler


class StandInRoom:
    """The agent's side of the room, as far as AvatarSession and DataStreamAudioOutput touch it."""

    def __init__(self, name: str = "room-1", identity: str = "agent-1") -> None:
        self.name = name
        self.local_participant = _LocalParticipant(identity)
        self.remote_participants: dict = {}
        self._callbacks: dict = {}

    def isconnected(self) -> bool:
        return True

    def on(self, event, callback=None):
        self._callbacks.setdefault(event, []).append(callback)
        return callback

    def off(self, event, callback=None):
        if callback in self._callbacks.get(event, []):
            self._callbacks[event].remove(callback)


def _closed_port_url() -> str:
    return f"ws://127.0.0.1:{_free_port()}"


def _status(avatar: AvatarSession, want, timeout_s: float = 30) -> dict:
    async def poll():
        deadline = time.monotonic() + timeout_s
        while True:
            status = await avatar.status()
            if want(status) or time.monotonic() > deadline:
                return status
            await asyncio.sleep(0.2)
    return poll()


def test_start_launches_the_avatar_and_routes_the_agents_audio(gpu_service):
    async def main():
        room = StandInRoom()
        session = AgentSession()
        avatar = AvatarSession(api_url=gpu_service, api_key=KEY, avatar_id="astronaut", size="128x128",
                               async_mode=True, wait_for_avatar_s=None)
        await avatar.start(session, room, livekit_url=_closed_port_url(), livekit_api_key=LK_KEY,
                           livekit_api_secret=LK_SECRET)
        answer = avatar.launch_answer
        assert answer["worker_id"] == avatar.worker_id and answer["room_name"] == "room-1"
        assert answer["state"] in ("starting", "joining")
        assert isinstance(session.output.audio, DataStreamAudioOutput)
        assert session.output.audio._destination_identity == "avatar-stack-avatar"
        await asyncio.sleep(0)  # DataStreamAudioOutput registers lk.playback_finished once the room is connected
        assert "lk.playback_finished" in room.local_participant._rpc_handlers

        status = await _status(avatar, lambda s: s["state"] == "failed")
        assert status["state"] == "failed" and "Connection refused" in status["reason"], status
        assert status["identity"] is None and status["agent_identity"] == "agent-1"
        assert status["livekit_url"].startswith("ws://127.0.0.1:")

        token = avatar.token("room-1", "agent-1", LK_KEY, LK_SECRET)
        claims = jwt.decode(token, LK_SECRET, algorithms=["HS256"])
        assert claims["sub"] == "avatar-stack-avatar" and claims["iss"] == LK_KEY and claims["kind"] == "agent"
        assert claims["video"]["roomJoin"] is True and claims["video"]["room"] == "room-1"
        assert claims["attributes"] == {"lk.publish_on_behalf": "agent-1"}

    asyncio.run(main())


def test_an_uploaded_portrait_and_the_services_refusals(gpu_service):
    async def main():
        room = StandInRoom(name="room-2", identity="agent-2")
        avatar = AvatarSession(api_url=gpu_service, api_key=KEY, avatar_image=PORTRAIT, size="128x128",
                               async_mode=True, wait_for_avatar_s=None)
        await avatar.start(AgentSession(), room, livekit_url=_closed_port_url(), livekit_api_key=LK_KEY,
                           livekit_api_secret=LK_SECRET)
        status = await _status(avatar, lambda s: s["state"] == "failed")
        assert status["room_name"] == "room-2" and status["agent_identity"] == "agent-2"

        # without async_mode the service answers once the worker is in the room: here, that it could not join
        sync = AvatarSession(api_url=gpu_service, api_key=KEY, avatar_id="astronaut", size="128x128")
        with pytest.raises(AvatarStackError) as err:
            await sync.start(AgentSession(), room, livekit_url=_closed_port_url(), livekit_api_key=LK_KEY,
                             livekit_api_secret=LK_SECRET)
        assert err.value.status == 502 and "could not join" in str(err.value)

        wrong = AvatarSession(api_url=gpu_service, api_key="not-the-key-0123456789", avatar_id="astronaut")
        with pytest.raises(AvatarStackError) as err:
            await wrong.start(AgentSession(), room, livekit_url=_closed_port_url(), livekit_api_key=LK_KEY,
                              livekit_api_secret=LK_SECRET)
        assert err.value.status == 401

        unknown = AvatarSession(api_url=gpu_service, api_key=KEY, avatar_id="nobody")
        with pytest.raises(AvatarStackError) as err:
            await unknown.start(AgentSession(), room, livekit_url=_closed_port_url(), livekit_api_key=LK_KEY,
                                livekit_api_secret=LK_SECRET)
        assert err.value.status == 404 and "nobody" in str(err.value)

        with pytest.raises(AvatarStackError, match="exactly one"):
            AvatarSession(api_url=gpu_service, avatar_id="a", avatar_image=b"x")

    asyncio.run(main())


def test_the_package_does_not_need_the_gpu_service():
    assert "gpu_service" not in sys.modules and "mediapipe" not in sys.modules
