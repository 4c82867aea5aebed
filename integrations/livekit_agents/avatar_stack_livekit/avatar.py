"""`AvatarSession`: the avatar-stack GPU service as a livekit-agents voice agent's face.

As livekit-agents' own avatar plugins do (bitHuman's custom-URL mode, Hedra, Tavus, Simli): mint a
token for the avatar's own participant (`lk.publish_on_behalf` = the agent's identity, so the room
shows the avatar's tracks as the agent's), ask the service's `POST /launch` to join the room with
it, and route the agent's speech to that participant with `DataStreamAudioOutput` (byte streams
on `lk.audio_stream`; `lk.clear_buffer` on interruptions; the avatar answers with
`lk.playback_finished`).

    avatar = AvatarSession(api_url="http://gpu-host:8001", api_key="...", avatar_id="astronaut")
    await avatar.start(session, room=ctx.room)
    await session.start(agent=..., room=ctx.room)
"""

from __future__ import annotations

import asyncio
import io
import os
from pathlib import Path
from typing import Any, Optional, Union

import aiohttp
from livekit import api, rtc
from livekit.agents import AgentSession, utils
from livekit.agents.types import ATTRIBUTE_PUBLISH_ON_BEHALF
from livekit.agents.voice.avatar import DataStreamAudioOutput

DEFAULT_IDENTITY = "avatar-stack-avatar"


class AvatarStackError(Exception):
    """The GPU service refused or could not start the avatar; `status` and `body` are its answer, if any."""

    def __init__(self, message: str, status: Optional[int] = None, body: Any = None) -> None:
        super().__init__(message)
        self.status, self.body = status, body


ImageLike = Union[bytes, str, Path, Any]  # bytes, a file path, or a PIL image


class AvatarSession:
    """One avatar in one agent's room, through the GPU service's POST /launch."""

    def __init__(self, *, api_url: Optional[str] = None, api_key: Optional[str] = None,
                 avatar_id: Optional[str] = None, avatar_image: Optional[ImageLike] = None,
                 avatar_image_url: Optional[str] = None, size: Optional[str] = None, async_mode: bool = False,
                 avatar_participant_identity: str = DEFAULT_IDENTITY,
                 avatar_participant_name: Optional[str] = None, token_ttl_s: float = 6 * 3600,
                 wait_for_avatar_s: Optional[float] = 30.0, launch_timeout_s: float = 60.0,
                 wait_playback_start: bool = False) -> None:
        """
        api_url: the GPU service (env AVATAR_STACK_URL), e.g. http://gpu-host:8001.
        api_key: its LIVEKIT__LAUNCH_API_KEY, sent as a Bearer token (env AVATAR_STACK_API_KEY).
        avatar_id / avatar_image / avatar_image_url: exactly one: an avatar the service knows (a preset or an
            upload), a portrait (bytes, a file path or a PIL image) or a URL the service fetches.
        size: "WxH" of the video (the portrait's own size, evened, when None).
        async_mode: the service answers at once instead of once the avatar is in the room.
        wait_for_avatar_s: how long start() waits for the avatar to join the room (None: do not wait).
        wait_playback_start: take lk.playback_started (which the avatar sends) as the start of playback.
        """
        given = [n for n, v in (("avatar_id", avatar_id), ("avatar_image", avatar_image),
                                ("avatar_image_url", avatar_image_url)) if v is not None]
        if len(given) != 1:
            raise AvatarStackError("give exactly one of avatar_id, avatar_image or avatar_image_url"
                                   + (f" (got {', '.join(given)})" if given else ""))
        self._api_url = (api_url or os.getenv("AVATAR_STACK_URL") or "").rstrip("/")
        if not self._api_url:
            raise AvatarStackError("api_url (or AVATAR_STACK_URL) must name the GPU service, e.g. http://gpu-host:8001")
        self._api_key = api_key or os.getenv("AVATAR_STACK_API_KEY")
        self._avatar_id, self._avatar_image_url, self._size = avatar_id, avatar_image_url, size
        self._image = _image_bytes(avatar_image) if avatar_image is not None else None
        self._async_mode = async_mode
        self._identity = avatar_participant_identity
        self._name = avatar_participant_name or avatar_participant_identity
        self._token_ttl_s = token_ttl_s
        self._wait_for_avatar_s = wait_for_avatar_s
        self._launch_timeout_s = launch_timeout_s
        self._wait_playback_start = wait_playback_start
        self.worker_id: Optional[str] = None
        self.launch_answer: Optional[dict] = None
        self.audio_output: Optional[DataStreamAudioOutput] = None

    @property
    def avatar_identity(self) -> str:
        return self._identity

    def token(self, room_name: str, agent_identity: str, api_key: str, api_secret: str) -> str:
        """The avatar participant's token: its own identity, allowed into `room_name`, publishing for the agent."""
        from datetime import timedelta

        return (api.AccessToken(api_key=api_key, api_secret=api_secret)
                .with_kind("agent")
                .with_identity(self._identity)
                .with_name(self._name)
                .with_ttl(timedelta(seconds=self._token_ttl_s))
                .with_grants(api.VideoGrants(room_join=True, room=room_name))
                .with_attributes({ATTRIBUTE_PUBLISH_ON_BEHALF: agent_identity})
                .to_jwt())

    async def start(self, agent_session: AgentSession, room: rtc.Room, *, livekit_url: Optional[str] = None,
                    livekit_api_key: Optional[str] = None, livekit_api_secret: Optional[str] = None) -> None:
        """Launch the avatar into `room` and send the agent's speech to it (call before agent_session.start)."""
        livekit_url = livekit_url or os.getenv("LIVEKIT_URL")
        livekit_api_key = livekit_api_key or os.getenv("LIVEKIT_API_KEY")
        livekit_api_secret = livekit_api_secret or os.getenv("LIVEKIT_API_SECRET")
        if not (livekit_url and livekit_api_key and livekit_api_secret):
            raise AvatarStackError("livekit_url, livekit_api_key and livekit_api_secret must be given "
                                   "(or LIVEKIT_URL, LIVEKIT_API_KEY, LIVEKIT_API_SECRET)")
        token = self.token(room.name, room.local_participant.identity, livekit_api_key, livekit_api_secret)
        self.launch_answer = await self._launch(livekit_url, token, room.name)
        self.worker_id = self.launch_answer.get("worker_id")
        if self._wait_for_avatar_s is not None:
            try:
                await asyncio.wait_for(utils.wait_for_participant(room=room, identity=self._identity),
                                       self._wait_for_avatar_s)
            except asyncio.TimeoutError:
                raise AvatarStackError(f"the avatar {self._identity!r} did not join room {room.name!r} within "
                                       f"{self._wait_for_avatar_s:g} s (GET {self._api_url}/launch/{self.worker_id} "
                                       "says why)") from None
        self.audio_output = DataStreamAudioOutput(room=room, destination_identity=self._identity,
                                                  wait_playback_start=self._wait_playback_start)
        agent_session.output.audio = self.audio_output

    def _form(self, livekit_url: str, token: str, room_name: str) -> aiohttp.FormData:
        form = aiohttp.FormData()
        form.add_field("livekit_url", livekit_url)
        form.add_field("livekit_token", token)
        form.add_field("room_name", room_name)
        form.add_field("async_mode", "true" if self._async_mode else "false")
        if self._size:
            form.add_field("size", self._size)
        if self._avatar_id is not None:
            form.add_field("avatar_id", self._avatar_id)
        elif self._avatar_image_url is not None:
            form.add_field("avatar_image_url", self._avatar_image_url)
        else:
            form.add_field("avatar_image", io.BytesIO(self._image or b""), filename="avatar",
                           content_type="application/octet-stream")
        return form

    def _headers(self) -> dict:
        return {"Authorization": f"Bearer {self._api_key}"} if self._api_key else {}

    async def _launch(self, livekit_url: str, token: str, room_name: str) -> dict:
        timeout = aiohttp.ClientTimeout(total=self._launch_timeout_s)
        try:
            async with aiohttp.ClientSession(timeout=timeout) as http:
                async with http.post(f"{self._api_url}/launch", data=self._form(livekit_url, token, room_name),
                                     headers=self._headers()) as response:
                    try:
                        body = await response.json(content_type=None)
                    except ValueError:
                        body = {"error": (await response.text())[:500]}
                    if response.status not in (200, 202):
                        message = body.get("error") if isinstance(body, dict) else body
                        raise AvatarStackError(f"POST /launch answered {response.status}: {message}",
                                               status=response.status, body=body)
                    return body
        except aiohttp.ClientError as exc:
            raise AvatarStackError(f"the GPU service at {self._api_url} could not be reached ({exc})") from exc
        except asyncio.TimeoutError:
            raise AvatarStackError(f"POST /launch did not answer within {self._launch_timeout_s:g} s") from None

    async def status(self) -> dict:
        """The service's word on this avatar's worker (GET /launch/{worker_id})."""
        if self.worker_id is None:
            raise AvatarStackError("start() has not launched a worker")
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as http:
            async with http.get(f"{self._api_url}/launch/{self.worker_id}", headers=self._headers()) as response:
                return await response.json(content_type=None)

    async def aclose(self) -> None:
        """Make the avatar leave the room now (it also leaves by itself when the agent does)."""
        if self.worker_id is None:
            return
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as http:
            async with http.delete(f"{self._api_url}/launch/{self.worker_id}", headers=self._headers()):
                pass


def _image_bytes(image: ImageLike) -> bytes:
    if isinstance(image, (bytes, bytearray)):
        return bytes(image)
    if isinstance(image, (str, Path)):
        return Path(image).read_bytes()
    if hasattr(image, "save"):  # a PIL image
        buf = io.BytesIO()
        image.convert("RGB").save(buf, format="JPEG", quality=95)
        return buf.getvalue()
    raise AvatarStackError(f"avatar_image must be bytes, a file path or a PIL image, not {type(image).__name__}")
