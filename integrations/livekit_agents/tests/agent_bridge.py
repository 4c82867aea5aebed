"""The agent's side of tests/streaming/test_livekit_agents_interop.py: livekit-agents' own DataStreamAudioOutput
(1.8.9, in this package's environment) speaking to the GPU service's room worker through a bridge.

No LiveKit server can be had in the test, so the room between the two is a JSON-lines socket on
127.0.0.1 carrying what the server would: byte-stream headers, chunks and trailers, and RPCs both
ways. The agent's code is the real one: it opens one stream per utterance, calls lk.clear_buffer,
and its wait_for_playout() returns only when the avatar's lk.playback_finished (or its own 2 s
fallback, which this script detects and reports) arrives.

Usage: python agent_bridge.py  (prints `PORT <n>`, serves one worker, prints `RESULT <json>` and exits)
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import sys
import time
import types

import numpy as np
from livekit import rtc
from livekit.agents.voice.avatar import DataStreamAudioOutput

AGENT, AVATAR = "agent-1", "avatar-worker"


class _Warnings(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


class Bridge:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer
        self.calls: dict[int, asyncio.Future] = {}
        self.next_call = 0
        self.handlers: dict = {}

    def send(self, **msg) -> None:
        self.writer.write((json.dumps(msg) + "\n").encode())

    async def rpc(self, method: str, payload: str) -> str:
        self.next_call += 1
        fut = asyncio.get_running_loop().create_future()
        self.calls[self.next_call] = fut
        self.send(op="rpc", call=self.next_call, method=method, payload=payload)
        return await asyncio.wait_for(fut, 10)

    async def serve(self) -> None:
        while line := await self.reader.readline():
            msg = json.loads(line)
            if msg["op"] == "rpc_result":
                fut = self.calls.pop(msg["call"])
                if msg.get("error"):
                    fut.set_exception(rtc.RpcError(msg["error"], "remote error"))
                else:
                    fut.set_result(msg["result"])
            elif msg["op"] == "rpc":  # the avatar calls one of the agent's methods
                handler = self.handlers.get(msg["method"])
                if handler is None:
                    self.send(op="rpc_result", call=msg["call"], error=1400)
                    continue
                data = rtc.RpcInvocationData(str(msg["call"]), AVATAR, msg["payload"], 5.0)
                result = handler(data)
                if asyncio.iscoroutine(result):
                    result = await result
                self.send(op="rpc_result", call=msg["call"], result=result)


class _Writer:
    def __init__(self, bridge: Bridge, stream_id: str) -> None:
        self.bridge, self.stream_id = bridge, stream_id

    async def write(self, data: bytes) -> None:
        self.bridge.send(op="chunk", id=self.stream_id, data=base64.b64encode(bytes(data)).decode())
        await self.bridge.writer.drain()

    async def aclose(self) -> None:
        self.bridge.send(op="close", id=self.stream_id)
        await self.bridge.writer.drain()


class _LocalParticipant:
    def __init__(self, bridge: Bridge) -> None:
        self.identity = AGENT
        self._bridge = bridge
        self._rpc_handlers = bridge.handlers
        self._streams = 0

    def register_rpc_method(self, method, handler=None):
        self._rpc_handlers[method] = handler
        return handler

    async def perform_rpc(self, *, destination_identity: str, method: str, payload: str, response_timeout=None):
        assert destination_identity == AVATAR
        return await self._bridge.rpc(method, payload)

    async def stream_bytes(self, *, name: str, topic: str, destination_identities=None, attributes=None, **_):
        assert destination_identities == [AVATAR]
        self._streams += 1
        stream_id = f"{name}-{self._streams}"
        self._bridge.send(op="stream", id=stream_id, topic=topic, attributes=attributes or {})
        return _Writer(self._bridge, stream_id)


class BridgedRoom:
    """What DataStreamAudioOutput touches of rtc.Room, over the bridge."""

    def __init__(self, bridge: Bridge) -> None:
        self.name = "room-1"
        self.local_participant = _LocalParticipant(bridge)
        avatar = types.SimpleNamespace(identity=AVATAR, kind=rtc.ParticipantKind.PARTICIPANT_KIND_AGENT,
                                       state=rtc.ParticipantState.PARTICIPANT_STATE_ACTIVE, attributes={})
        self.remote_participants = {AVATAR: avatar}

    def isconnected(self) -> bool:
        return True

    def on(self, event, callback=None):
        return callback

    def off(self, event, callback=None):
        pass


def frames(seconds: float, rate: int = 24_000, chunk_s: float = 0.1):
    t = np.arange(int(seconds * rate)) / rate
    x = (0.4 * np.sin(2 * np.pi * 220 * t) * (0.55 + 0.45 * np.sin(2 * np.pi * 4 * t)) * 32767).astype(np.int16)
    step = int(chunk_s * rate)
    for i in range(0, len(x), step):
        part = x[i:i + step]
        yield rtc.AudioFrame(part.tobytes(), rate, 1, len(part))


async def utterance(out: DataStreamAudioOutput, seconds: float, realtime: float) -> None:
    for frame in frames(seconds):
        await out.capture_frame(frame)
        await asyncio.sleep(frame.duration / realtime)
    out.flush()


async def main() -> None:
    warnings = _Warnings()
    logging.getLogger("livekit.agents").addHandler(warnings)
    connected = asyncio.get_running_loop().create_future()

    async def accept(reader, writer):
        connected.set_result(Bridge(reader, writer))

    server = await asyncio.start_server(accept, "127.0.0.1", 0)
    print("PORT", server.sockets[0].getsockname()[1], flush=True)
    bridge: Bridge = await asyncio.wait_for(connected, 120)
    serving = asyncio.create_task(bridge.serve())
    out = DataStreamAudioOutput(BridgedRoom(bridge), destination_identity=AVATAR)
    results: dict = {}

    # 1: an utterance that plays out
    t0 = time.monotonic()
    await utterance(out, 1.0, realtime=5.0)
    ev = await asyncio.wait_for(out.wait_for_playout(), 15)
    results["played"] = {"position": ev.playback_position, "interrupted": ev.interrupted,
                         "wait_s": time.monotonic() - t0}

    # 2..4: interrupted mid-speech (as AgentSession does on a user's barge-in), three times
    results["interrupted"] = []
    for _ in range(3):
        speaking = asyncio.create_task(utterance(out, 4.0, realtime=2.0))
        await asyncio.sleep(1.2)
        t_clear = time.monotonic()
        out.clear_buffer()
        ev = await asyncio.wait_for(out.wait_for_playout(), 10)
        answered = time.monotonic() - t_clear
        speaking.cancel()
        try:
            await speaking
        except asyncio.CancelledError:
            pass
        out.flush()
        results["interrupted"].append({"position": ev.playback_position, "interrupted": ev.interrupted,
                                       "answered_s": answered})
        await asyncio.sleep(0.3)

    # 5: speech still plays after the interruptions
    t0 = time.monotonic()
    await utterance(out, 0.6, realtime=5.0)
    ev = await asyncio.wait_for(out.wait_for_playout(), 15)
    results["after"] = {"position": ev.playback_position, "interrupted": ev.interrupted,
                        "wait_s": time.monotonic() - t0}
    results["warnings"] = warnings.messages
    print("RESULT", json.dumps(results), flush=True)
    serving.cancel()
    bridge.writer.close()
    server.close()


if __name__ == "__main__":
    asyncio.run(main())
    sys.exit(0)
