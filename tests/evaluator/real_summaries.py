"""Real summaries for the CLI/report/compare/gate tests, built from measured data, not typed numbers.

Piper speaks a sentence (without sampling noise, so every run measures the same clip), the
talking head renders it on the astronaut in process (the same engine the GPU service serves),
and evaluator.quality measures the MP4. A second video is the same one
with its audio moved 120 ms later (video early by three frames), so it is measurably worse in
sync. Speeds are the wall times of those calls. The records go through evaluator.runner's own
aggregation, exactly as a live run's do.
"""

from __future__ import annotations

import functools
import io
import subprocess
import time
from pathlib import Path

import numpy as np

TEXT = "Please bring me the map of the moon, and maybe a pen."
SHIFT_S = 0.12


@functools.lru_cache(maxsize=1)
def rendered(tmp: str) -> dict:
    """Render once per session: the portrait, the MP4 paths, phonemes and measured stage times."""
    import imageio_ffmpeg
    import skimage.data
    from PIL import Image

    from gpu_service.speech.protocol import SpeechRequest
    from gpu_service.speech.engines.piper import PiperEngine
    from gpu_service.talking_head.engines.landmark import LandmarkTalkingHead
    from gpu_service.talking_head.protocol import VideoJob

    out = Path(tmp)
    portrait = np.ascontiguousarray(skimage.data.astronaut())
    buf = io.BytesIO()
    Image.fromarray(portrait).save(buf, format="PNG")
    piper = PiperEngine(noise_scale=0.0, noise_w_scale=0.0)  # the same speech every run: the sync figures repeat
    piper.load("cpu")
    head = LandmarkTalkingHead(cache_dir=out / "cache", cache_bytes=64 * 1024 * 1024, max_image_bytes=10 * 1024 * 1024,
                               presets_dir=out / "no_presets")
    head.load("cpu")
    t0 = time.perf_counter()
    speech = piper.synthesize(SpeechRequest(text=TEXT))
    t1 = time.perf_counter()
    avatar = head.add_avatar(buf.getvalue())
    phon = [(p.phoneme, p.start_s, p.end_s) for p in speech.phonemes]
    t2 = time.perf_counter()
    result = head.generate(VideoJob(avatar.avatar_id, speech.audio, speech.sample_rate, phonemes=phon, text=TEXT))
    t3 = time.perf_counter()
    good = out / "good.mp4"
    good.write_bytes(result.mp4)
    late = out / "audio_late.mp4"
    ff = imageio_ffmpeg.get_ffmpeg_exe()
    # adelay pads the start with silence, so the delay is in the samples, not in container timestamps.
    subprocess.run([ff, "-y", "-v", "error", "-i", str(good), "-map", "0:v", "-map", "0:a", "-c:v", "copy",
                    "-af", f"adelay={int(SHIFT_S * 1000)}:all=1", "-c:a", "aac", "-t", f"{result.duration_s:.3f}",
                    str(late)], check=True)
    return {"portrait": portrait, "good": good, "late": late, "phonemes": phon, "duration_s": result.duration_s,
            "timings_ms": {"tts": (t1 - t0) * 1000, "video": (t3 - t2) * 1000, "total": (t3 - t0) * 1000}}


def summary(tmp: str, which: str = "good") -> dict:
    """A summary with one runtime-style scenario whose video is `which` (good | late), fully measured."""
    from evaluator.quality import analyse_video
    from evaluator.runner import assemble, runtime_record

    r = rendered(tmp)
    quality = analyse_video(str(r[which]), portrait=r["portrait"], phonemes=r["phonemes"], keep_series=True)
    run = {"ok": True, "latency_s": r["timings_ms"]["total"] / 1000, "duration_s": r["duration_s"],
           "timings_ms": r["timings_ms"]}
    rec = runtime_record("short/custom/warm", [run], quality, {"text": TEXT, "avatar": "custom"})
    skipped = {"name": "lipsync", "kind": "lipsync", "status": "skipped", "params": {},
               "reason": "HTTP 404: POST /lipsync/generate is not served here"}
    from evaluator.memory import peak_memory
    import os

    mem = {"evaluator": peak_memory(None, os.getpid(), "http://127.0.0.1:1")}
    return assemble([rec, skipped], suite="quick", runtime_url="in-process", gpu_url="in-process",
                    environment={"device": "cpu"}, memory=mem, wall_s=r["timings_ms"]["total"] / 1000)
