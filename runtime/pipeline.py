"""One job's generation: text -> chunks -> (speech -> video) per chunk -> one MP4 + captions + timings + thumbnail.

Stages overlap: speech runs ahead of video (the next chunks' speech is made while this chunk's
video renders), a chunk's video is asked for with the speech's own audio_url (the audio stays on
the GPU service; nothing is uploaded back), and the WAV the final mux needs is downloaded while
the video renders.

Each chunk is placed on one GPU service (`GPUClient.place`: avatar affinity under bounded load);
its speech, video and downloads all go to that service. When the service fails mid-chunk
(unreachable, 5xx, 429) the chunk is made again at once on another one, within the same attempt.

Each finished chunk is saved in the job's store (`runtime.storage`: its folder, or object storage
that every runtime reaches), its metadata file written last, atomically, so a retried or recovered
job resumes at the first missing chunk, on any runtime, and never generates a finished one again.
The final files are written atomically under fixed names: however many times a job runs, it has
one output.
"""

from __future__ import annotations

import contextvars
import json
import logging
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import soundfile as sf

from avatar_contracts.gpu import TTSRequest, TTSResponse, VideoRequest
from avatar_contracts.runtime import GenerateRequest
from runtime import media, storage
from runtime.captions import Word, align_words, to_webvtt
from runtime.errors import GPUServiceError
from runtime.gpu_client import GPUClient, Placement, ServiceClient, affinity_key
from runtime.settings import Settings
from runtime.storage import JobFiles, OutputStore
from avatar_contracts.text import chunk_text

log = logging.getLogger("runtime.pipeline")

VIDEO_NAME = "video.mp4"
CAPTIONS_NAME = "captions.vtt"
TIMING_NAME = "timing.json"
THUMBNAIL_NAME = "thumbnail.jpg"
OUTPUTS = (VIDEO_NAME, CAPTIONS_NAME, TIMING_NAME, THUMBNAIL_NAME)

Progress = Callable[[int, int, str], None]
Observe = Callable[[str, float], None]
"""Told each stage's duration in seconds: `tts` and `video` per chunk, `mux` and `assemble` per job."""


def _unobserved(stage: str, seconds: float) -> None:
    """The default Observe: nobody is counting."""


def _write_json(path: Path, data: dict) -> None:
    media.write_atomic(path, json.dumps(data).encode("utf-8"))


def _chunk_names(index: int) -> tuple[str, str, str]:
    stem = f"chunk_{index:04d}"
    return f"{stem}.wav", f"{stem}.mp4", f"{stem}.json"


def _chunk_paths(workdir: Path, index: int) -> tuple[Path, Path, Path]:
    wav, mp4, meta = _chunk_names(index)
    return workdir / wav, workdir / mp4, workdir / meta


SPEECH_AHEAD = 2
"""Chunks whose speech may be made before their video starts: enough to keep speech busy while
video renders, few enough that one job does not hold the speech engine for all its text."""


@dataclass
class Speech:
    """One chunk's synthesized speech, waiting for its video."""

    tts: TTSResponse
    elapsed_ms: float


def synthesize_chunk(gpu: ServiceClient, req: GenerateRequest, text: str) -> Speech:
    """Speech for one chunk: its audio_url and phonemes (the audio stays on the GPU service)."""
    t0 = time.perf_counter()
    speech = gpu.tts(
        TTSRequest(text=text, language=req.language, engine=req.engine, voice=req.voice, speaker_wav=req.speaker_wav)
    )
    return Speech(speech, (time.perf_counter() - t0) * 1000)


def render_chunk(
    gpu: ServiceClient, req: GenerateRequest, text: str, speech: Speech, wav: "Future[bytes]", fps: int,
    files: JobFiles, index: int,
) -> dict:
    """Video for one chunk's speech (by its audio_url); saves wav, mp4 and (last) the metadata json."""
    wav_name, mp4_name, meta_name = _chunk_names(index)
    t1 = time.perf_counter()
    try:
        meta, mp4 = gpu.video(
            VideoRequest(
                avatar_id=req.avatar_id,
                avatar_image=req.avatar_image,
                face_index=req.face_index,
                background=req.background,
                audio_url=speech.tts.audio_url,
                phonemes=speech.tts.phonemes,
                text=text,
                emotion=req.emotion or "neutral",
                fps=fps,
                include_audio=False,
                response="json",
            )
        )
    except GPUServiceError as exc:
        if exc.status == 404 and "audio_url" in exc.message:  # the speech expired there: a retry makes it anew
            exc.transient = True
        raise
    t2 = time.perf_counter()
    files.put(wav_name, wav.result())
    files.put(mp4_name, mp4)
    if meta is not None:
        frames, rate, width, height = meta.frames, meta.fps, meta.width, meta.height
    else:  # the service sent the bytes only: measure them
        mp4_path = files.path(mp4_name)
        info = media.probe(mp4_path)
        frames, rate, width, height = media.count_frames(mp4_path), int(round(info.fps or fps)), info.width, info.height
    record = {
        "index": index,
        "text": text,
        "frames": frames,
        "fps": rate,
        "width": width,
        "height": height,
        "speech_s": speech.tts.duration_s,
        "phonemes": [p.model_dump() for p in speech.tts.phonemes],
        "timings_ms": {"tts": speech.elapsed_ms, "video": (t2 - t1) * 1000},
        "gpu_service": gpu.label,
    }
    files.put(meta_name, json.dumps(record).encode("utf-8"))
    return record


def _round(t: float) -> float:
    return round(t, 4)


def speech_timeline(records: list[dict]) -> dict:
    """Phoneme, word and chunk timings in seconds of the final video, from each chunk's engine timings.

    A chunk starts where the previous one's video ends (frames / fps). Its speech is padded with
    silence (or trimmed) to that length, so the padding is a pause ("_") and phonemes past a
    trimmed end are cut: the phonemes then tile the whole video without gaps. An engine that
    gives no phoneme timings (XTTS) leaves its chunks without phonemes rather than inventing them.
    """
    phonemes: list[dict] = []
    words: list[Word] = []
    chunks: list[dict] = []
    offset = 0.0
    for rec in records:
        seconds = rec["frames"] / rec["fps"]
        first = len(phonemes)
        cursor = 0.0
        for ph in rec["phonemes"]:
            start, end = float(ph["start_s"]), min(float(ph["end_s"]), seconds)
            if start >= seconds:
                break  # speech trimmed to the video: this phoneme is not in the final file
            if start > cursor + 1e-6:  # unlabelled audio before this phoneme: silence by the engine's account
                phonemes.append({"phoneme": "_", "start_s": offset + cursor, "end_s": offset + start})
            phonemes.append({"phoneme": ph["phoneme"], "start_s": offset + start, "end_s": offset + end})
            cursor = max(cursor, end)
        speech_end = cursor if rec["phonemes"] else None
        if rec["phonemes"] and seconds - cursor > 1e-6:  # the silence the audio was padded with to fill the chunk's video
            if len(phonemes) > first and phonemes[-1]["phoneme"] == "_":
                phonemes[-1]["end_s"] = offset + seconds
            else:
                phonemes.append({"phoneme": "_", "start_s": offset + cursor, "end_s": offset + seconds})
        words.extend(align_words(rec["text"], rec["phonemes"], offset, seconds))
        chunks.append({"index": rec["index"], "start_s": _round(offset), "end_s": _round(offset + seconds),
                       "speech_end_s": None if speech_end is None else _round(offset + speech_end)})
        offset += seconds
    return {
        "fps": records[0]["fps"],
        "duration_s": _round(offset),
        "phonemes": [{**p, "start_s": _round(p["start_s"]), "end_s": _round(p["end_s"])} for p in phonemes],
        "words": [{"text": w.text, "start_s": _round(w.start_s), "end_s": _round(w.end_s)} for w in words],
        "chunks": chunks,
    }


def assemble(workdir: Path, records: list[dict]) -> dict:
    """Join the chunks into the final MP4 (+ captions, speech timings and thumbnail); returns facts about it."""
    t0 = time.perf_counter()
    fps = records[0]["fps"]
    parts, pcm, starts = [], [], []
    rate: Optional[int] = None
    offset = 0.0
    for rec in records:
        wav_path, mp4_path, _ = _chunk_paths(workdir, rec["index"])
        seconds = rec["frames"] / rec["fps"]
        audio, sr = media.read_wav(wav_path)
        if rate is None:
            rate = sr
        elif sr != rate:  # engines of one job share a rate; guard anyway rather than play it at the wrong speed
            raise media.MediaError(f"chunk {rec['index']} has sample rate {sr}, expected {rate}")
        pcm.append(media.fit_audio(audio, sr, seconds))
        parts.append(mp4_path)
        starts.append(offset)
        offset += seconds
    full_wav = workdir / "speech.wav"
    sf.write(full_wav, np.concatenate(pcm), rate, subtype="PCM_16")
    t1 = time.perf_counter()
    # the thumbnail's frame, taken from the chunk that holds it while the mux runs: the mux copies those
    # very frames into the final video, so it is the same picture
    at_s = min(1.0, offset / 2)
    k = max(i for i, start in enumerate(starts) if start <= at_s)
    thumb = media.start_thumbnail(parts[k], workdir / THUMBNAIL_NAME, at_s - starts[k])
    media.mux_chunks(parts, full_wav, workdir / VIDEO_NAME)
    t2 = time.perf_counter()
    timeline = speech_timeline(records)
    words = [Word(w["text"], w["start_s"], w["end_s"]) for w in timeline["words"]]
    media.write_atomic(workdir / CAPTIONS_NAME, to_webvtt(words).encode("utf-8"))
    _write_json(workdir / TIMING_NAME, timeline)
    thumb.wait()
    t3 = time.perf_counter()
    return {
        "duration_s": round(offset, 4),
        "frames": sum(r["frames"] for r in records),
        "fps": fps,
        "width": records[0].get("width"),
        "height": records[0].get("height"),
        "speech_timing": True,
        "timings_ms": {"join": (t1 - t0) * 1000, "mux": (t2 - t1) * 1000, "captions_thumbnail": (t3 - t2) * 1000},
    }


def make_chunk(
    gpu: GPUClient, req: GenerateRequest, key: str, text: str, placement: Placement, speech: "Future[Speech]",
    wav_pool: ThreadPoolExecutor, fps: int, files: JobFiles, index: int,
) -> dict:
    """One chunk on its placed service (speech already asked for); when that service fails, made again at once on
    another ready one. Every placement is released; the last failure stands when no other service can take it."""
    tried = [placement.service]
    pending: Optional[Future[Speech]] = speech
    try:
        while True:
            service = placement.service
            try:
                said = pending.result() if pending is not None else synthesize_chunk(service, req, text)
                wav = wav_pool.submit(contextvars.copy_context().run, service.fetch, said.tts.audio_url,
                                      "speech download")  # for the mux, meanwhile; with the job's request id
                return render_chunk(service, req, text, said, wav, fps, files, index)
            except GPUServiceError as exc:
                moved = gpu.failover(placement, exc, key, tried, req.avatar_id)
                if moved is None:
                    raise
                placement, pending = moved, None
                tried.append(placement.service)
    finally:
        placement.release()


def run(
    gpu: GPUClient,
    settings: Settings,
    job_id: str,
    body: dict,
    progress: Progress,
    store: Optional[OutputStore] = None,
    observe: Observe = _unobserved,
) -> dict:
    """Generate a job's outputs in its store, resuming from finished chunks; returns its result record."""
    files = (store or storage.build(settings)).open_job(job_id)
    try:
        return _run(gpu, settings, job_id, body, progress, files, observe)
    finally:
        files.close()


def _run(gpu: GPUClient, settings: Settings, job_id: str, body: dict, progress: Progress, files: JobFiles,
         observe: Observe) -> dict:
    req = GenerateRequest.model_validate(body)
    chunks = chunk_text(req.text, settings.chunk_chars, settings.first_chunk_chars or None)
    total = len(chunks)
    key = affinity_key(req.avatar_id, req.avatar_image)
    records: list[dict] = []
    resumed = 0
    pending = iter([i for i in range(total) if not files.has(_chunk_names(i)[2])])
    # one speech call at a time, up to SPEECH_AHEAD chunks ahead of the video being rendered
    speech_pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"tts-{job_id[:8]}")
    wav_pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"wav-{job_id[:8]}")
    ahead: dict[int, tuple[Placement, Future[Speech]]] = {}

    def top_up() -> None:
        while len(ahead) < SPEECH_AHEAD and (following := next(pending, None)) is not None:
            placement = gpu.place(key, job_id, req.avatar_id)
            # in this thread's context: the GPU calls made in the pool carry the job's request id
            ahead[following] = (placement, speech_pool.submit(
                contextvars.copy_context().run, synthesize_chunk, placement.service, req, chunks[following]))

    try:
        top_up()
        for index, text in enumerate(chunks):
            meta_name = _chunk_names(index)[2]
            if files.has(meta_name):  # finished in an earlier attempt (on any runtime)
                records.append(json.loads(files.read(meta_name)))
                resumed += 1
                continue
            progress(index, total, f"generating chunk {index + 1} of {total}")
            placement, speech = ahead.pop(index)
            top_up()
            records.append(make_chunk(gpu, req, key, text, placement, speech, wav_pool, settings.fps, files, index))
            observe("tts", records[-1]["timings_ms"]["tts"] / 1000)
            observe("video", records[-1]["timings_ms"]["video"] / 1000)
            log.info("chunk done", extra={"job_id": job_id, "chunk": index + 1, "chunks": total,
                                          "gpu_service": records[-1]["gpu_service"]})
    finally:  # a failed chunk fails the attempt: speech not yet started is not made for nothing
        speech_pool.shutdown(wait=True, cancel_futures=True)
        wav_pool.shutdown(wait=True, cancel_futures=True)
        for placement, _ in ahead.values():
            placement.release()
    progress(total, total, "joining chunks")
    for rec in records:  # chunks of an earlier attempt come from the store when they are not here
        for name in _chunk_names(rec["index"])[:2]:
            files.fetch(name)
    assembling = time.perf_counter()
    facts = assemble(files.dir, records)
    observe("mux", facts["timings_ms"]["mux"] / 1000)
    observe("assemble", time.perf_counter() - assembling)
    for name in OUTPUTS:  # in the store before the job is recorded as succeeded
        files.save(name)
    # tts and video are each summed over chunks; after the first chunk they overlap in time
    timings = {
        "tts": sum(r["timings_ms"]["tts"] for r in records),
        "video": sum(r["timings_ms"]["video"] for r in records),
        **facts.pop("timings_ms"),
    }
    return {**facts, "chunks": total, "chunks_resumed": resumed, "timings_ms": {k: round(v, 1) for k, v in timings.items()}}


def drop_scratch(store: OutputStore, job_id: str) -> None:
    """Remove a finished job's chunk files (called once its success is recorded, so a crash before that resumes)."""
    store.delete(job_id, [name for name in store.names(job_id) if name not in OUTPUTS])
