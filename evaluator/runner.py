"""Runs a suite against live services and builds the summary: speed, memory and quality per scenario.

A scenario never crashes the run: an absent endpoint (404/405) makes it `skipped` with the
reason, any other error makes it `failed` with the service's message, and the run goes on.
"""

from __future__ import annotations

import base64
import io
import logging
import math
import secrets
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable, Optional

import cv2
import httpx
import numpy as np
import soundfile as sf
from scipy.signal import resample_poly

from evaluator import memory, scenarios
from evaluator.client import EndpointMissing, GpuClient, RuntimeClient, ServiceError
from evaluator.align import runtime_phonemes, warp_phonemes
from evaluator.metrics.face import read_audio
from evaluator.quality import AUDIO_RATE, analyse_video

log = logging.getLogger(__name__)

SCHEMA = "avatar-eval/1"
# Stages of the runtime's timings that are parts of `total` (others, e.g. tts_engine, overlap them).
STAGES = ("queue", "tts", "video", "join", "mux", "captions_thumbnail")
# Per-run URLs are the runtime's to expire; they stay out of the summary.
_RUN_URLS = ("video_url", "timing_url")


@dataclass
class RunConfig:
    """Everything one evaluation needs to know."""

    runtime_url: str
    gpu_url: str
    suite: str = "quick"
    out_dir: Path = Path("eval_reports")
    portrait_path: Optional[Path] = None
    api_key: Optional[str] = None
    gpu_pid: Optional[int] = None
    runtime_pid: Optional[int] = None
    keep_videos: bool = True
    job_timeout_s: float = 900.0
    preset_dir: Optional[Path] = None
    """Local copy of the GPU service's preset avatars (<id>/portrait.*), for identity of presets."""


def load_portrait(path: Optional[Path]) -> np.ndarray:
    """The custom portrait as RGB uint8: the file given, else skimage's astronaut."""
    if path is None:
        import skimage.data

        return np.ascontiguousarray(skimage.data.astronaut())
    img = cv2.imread(str(path), cv2.IMREAD_COLOR)
    if img is None:
        raise ValueError(f"--portrait {path} is not an image OpenCV can read")
    return cv2.cvtColor(img, cv2.COLOR_BGR2RGB)


def preset_portrait(preset_dir: Optional[Path], avatar_id: str) -> Optional[np.ndarray]:
    """The portrait of a preset avatar from a local preset folder, or None when it is not there."""
    if preset_dir is None or not (Path(preset_dir) / avatar_id).is_dir():
        return None
    for path in sorted((Path(preset_dir) / avatar_id).iterdir()):
        if path.suffix.lower() in (".jpg", ".jpeg", ".png", ".webp"):
            img = cv2.imread(str(path), cv2.IMREAD_COLOR)
            if img is not None:
                return cv2.cvtColor(img, cv2.COLOR_BGR2RGB)
    return None


def fresh_copy(portrait: np.ndarray) -> np.ndarray:
    """The portrait with a random, invisible change in one corner pixel.

    The GPU service caches encodings by image hash, so the same bytes would be "warm" on a
    second evaluation; a fresh copy makes the first use in this run really cold.
    """
    img = portrait.copy()
    img[0, 0] = np.frombuffer(secrets.token_bytes(3), np.uint8)
    return img


def png_bytes(rgb: np.ndarray) -> bytes:
    """Lossless PNG of an RGB image (lossless, so identity is judged against exactly what was sent)."""
    ok, buf = cv2.imencode(".png", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
    if not ok:
        raise ValueError("could not encode the portrait as PNG")
    return buf.tobytes()


def percentile(values: list[float], q: float) -> Optional[float]:
    """The q-th percentile (linear interpolation), None for no values."""
    return float(np.percentile(values, q)) if values else None


class Runner:
    """Executes scenarios and collects their records; `run()` returns the summary dict."""

    def __init__(self, cfg: RunConfig, progress: Optional[Callable[[int, str], None]] = None) -> None:
        self.cfg = cfg
        self.gpu = GpuClient(cfg.gpu_url)
        self.rt = RuntimeClient(cfg.runtime_url, cfg.api_key, timeout_s=cfg.job_timeout_s)
        self.progress = progress or (lambda n, name: None)
        self.portrait = fresh_copy(load_portrait(cfg.portrait_path))
        self.portrait_b64 = base64.b64encode(png_bytes(self.portrait)).decode()
        self.videos = Path(cfg.out_dir) / "videos"
        self._tts_cache: dict[tuple, dict] = {}

    # -- building blocks -----------------------------------------------------------------------
    def _avatar_fields(self, params: dict) -> dict:
        if params.get("avatar") == "preset":
            return {"avatar_id": params["avatar_id"]}
        return {"avatar_image": self.portrait_b64}

    def _job_once(self, params: dict) -> dict:
        """Submit one runtime job, wait for it, and return its run record (never raises for a failed job)."""
        body = {"text": params["text"], **self._avatar_fields(params)}
        if params.get("engine"):
            body["engine"] = params["engine"]
        t0 = time.perf_counter()
        try:
            accepted = self.rt.submit(body)
            job = self.rt.wait(accepted["task_id"], self.cfg.job_timeout_s)
        except EndpointMissing:
            raise
        except (ServiceError, httpx.HTTPError, TimeoutError) as exc:
            return {"ok": False, "error": f"{type(exc).__name__}: {exc}", "latency_s": time.perf_counter() - t0}
        latency = time.perf_counter() - t0
        if job["status"] != "succeeded":
            return {"ok": False, "error": f"{job.get('error_type')}: {job.get('reason')}", "latency_s": latency,
                    "task_id": job["task_id"]}
        return {"ok": True, "latency_s": latency, "task_id": job["task_id"], "duration_s": job.get("duration_s"),
                "timings_ms": job.get("timings", {}), "chunks": job.get("chunks_total"), "video_url": job["video_url"],
                "timing_url": job.get("timing_url")}

    def _phonemes(self, text: str, engine: Optional[str]) -> dict:
        """Speech facts of the same text from GPU /tts/generate (phonemes, length, engine RTF); cached."""
        key = (text, engine)
        if key not in self._tts_cache:
            self._tts_cache[key] = self.gpu.tts(text, engine)
        return self._tts_cache[key]

    def _save(self, name: str, data: bytes) -> Path:
        self.videos.mkdir(parents=True, exist_ok=True)
        path = self.videos / (name.replace("/", "_") + ".mp4")
        path.write_bytes(data)
        return path

    def _analyse(self, name: str, path: Path, portrait: Optional[np.ndarray], tts: Optional[dict],
                 exact: bool = False, timing: Optional[dict] = None) -> dict:
        """Quality of one video, judged against the best phoneme timings there are.

        In order: the runtime's timing.json for this very video (source "runtime"); the video's own
        synthesis (exact, source "synthesis"); a second synthesis moved onto the video's audio by DTW
        (source "dtw"), or stretched to its length when DTW fails (source "stretch").
        """
        phon, how, source, notes = None, None, "none", []
        if timing is not None:
            try:
                audio = read_audio(str(path), AUDIO_RATE)
                if audio is None:
                    raise ValueError("the video has no audio track")
                phon = runtime_phonemes(timing, len(audio) / AUDIO_RATE)
                how, source = "exact (the runtime's timing.json of this video)", "runtime"
            except ValueError as exc:
                log.warning("runtime timings unusable", extra={"scenario": name, "error": str(exc)})
                notes.append(f"runtime timing.json not used ({exc}): fell back to re-synthesis")
        if phon is None:
            phon = [(p["phoneme"], p["start_s"], p["end_s"]) for p in (tts or {}).get("phonemes") or []] or None
            if exact and phon:
                how, source = "exact (the video's own synthesis)", "synthesis"
        if phon and source == "none":
            try:
                ref = self._tts_audio(tts["audio_url"])
                video_audio = read_audio(str(path), AUDIO_RATE)
                if video_audio is None:
                    raise ValueError("the video has no audio track")
                phon = warp_phonemes(phon, ref, video_audio, AUDIO_RATE)
                how, source = "re-synthesised, aligned to the video's audio by DTW", "dtw"
            except (ValueError, ServiceError, OSError) as exc:
                log.warning("phoneme alignment failed", extra={"scenario": name, "error": str(exc)})
                how, source = f"re-synthesised, stretched to the video's length (DTW failed: {exc})", "stretch"
        quality = analyse_video(str(path), portrait=portrait, phonemes=phon,
                                phonemes_duration_s=tts.get("duration_s") if (tts and source == "stretch") else None,
                                keep_series=True)
        quality["phoneme_timings"] = how or "none"
        quality["phoneme_source"] = source
        quality["notes"] = notes + quality.get("notes", [])
        return quality

    def _tts_audio(self, url: str) -> np.ndarray:
        """A GPU-service WAV artifact as mono float32 at AUDIO_RATE."""
        audio, sr = sf.read(io.BytesIO(self.gpu.download(url)), dtype="float32", always_2d=True)
        mono = audio.mean(axis=1)
        if sr != AUDIO_RATE:
            g = math.gcd(int(sr), AUDIO_RATE)
            mono = resample_poly(mono, AUDIO_RATE // g, int(sr) // g).astype(np.float32)
        return mono

    # -- scenario kinds ------------------------------------------------------------------------
    def _runtime(self, sc: scenarios.Scenario, rec: dict) -> None:
        runs = []
        for i in range(sc.runs):
            runs.append(self._job_once(sc.params))
            self.progress(1, sc.name)
        rec["runs"] = [{k: v for k, v in r.items() if k not in _RUN_URLS} for r in runs]
        good = [r for r in runs if r["ok"]]
        if not good:
            rec.update(status="failed", reason=runs[0]["error"])
            return
        rec["speed"] = _speed_of(good)
        if sc.analyse:
            first = good[0]
            path = self._save(sc.name, self.rt.download(first["video_url"]))
            timing = None
            if first.get("timing_url"):  # older runtimes have none: their videos are timed by DTW
                try:
                    timing = self.rt.json(first["timing_url"])
                except (ServiceError, httpx.HTTPError, ValueError) as exc:
                    rec.setdefault("notes", []).append(f"runtime timing.json unreadable: {exc}")
            tts = None
            try:
                # Also the engine's own speed (tts_rtf_engine); its phonemes are the fallback when timing.json is not used.
                tts = self._phonemes(sc.params["text"], sc.params.get("engine"))
                rec["speed"]["tts_rtf_engine"] = tts["generation_time_ms"] / 1000.0 / max(tts["duration_s"], 1e-6)
            except ServiceError as exc:
                rec.setdefault("notes", []).append(f"no phoneme timings from GPU /tts/generate: {exc}")
            portrait = (preset_portrait(self.cfg.preset_dir, sc.params["avatar_id"])
                        if sc.params.get("avatar") == "preset" else self.portrait)
            rec["quality"] = self._analyse(sc.name, path, portrait, tts, timing=timing)
            rec["video"] = str(path)
            if not self.cfg.keep_videos:
                path.unlink(missing_ok=True)

    def _video(self, sc: scenarios.Scenario, rec: dict) -> None:
        tts = self.gpu.tts(sc.params["text"], sc.params.get("engine"))
        t0 = time.perf_counter()
        answer = self.gpu.video({"avatar_image": self.portrait_b64, "audio_url": tts["audio_url"],
                                 "phonemes": tts["phonemes"], "text": sc.params["text"]})
        wall = time.perf_counter() - t0
        self.progress(1, sc.name)
        timings = answer.get("timings_ms") or {}
        render_ms = timings.get("render_encode") or timings.get("render") or timings.get("total") or wall * 1000
        rec["runs"] = [{"ok": True, "latency_s": wall, "frames": answer.get("frames"), "timings_ms": timings,
                        "device": answer.get("device")}]
        rec["speed"] = {"latency_p50_s": wall, "video_s": answer.get("duration_s"),
                        "render_fps": answer["frames"] / (render_ms / 1000.0) if answer.get("frames") else None,
                        "first_frame_s": timings["first_frame"] / 1000.0 if "first_frame" in timings else None,
                        "tts_rtf_engine": tts["generation_time_ms"] / 1000.0 / max(tts["duration_s"], 1e-6)}
        path = self._save(sc.name, self.gpu.download(answer["video_url"]))
        # Same synthesis as the video's: the timings are exact.
        rec["quality"] = self._analyse(sc.name, path, self.portrait, tts, exact=True)
        rec["video"] = str(path)
        if not self.cfg.keep_videos:
            path.unlink(missing_ok=True)

    def _stream(self, sc: scenarios.Scenario, rec: dict) -> None:
        runs = []
        for _ in range(sc.runs):
            runs.append(self.gpu.tts_stream_first_audio(sc.params["text"], sc.params.get("engine")))
            self.progress(1, sc.name)
        rec["runs"] = runs
        firsts = [r["first_audio_s"] for r in runs if r["first_audio_s"] is not None]
        rec["speed"] = {"first_audio_s": percentile(firsts, 50), "stream_total_s": percentile([r["total_s"] for r in runs], 50)}

    def _avatar_encode(self, sc: scenarios.Scenario, rec: dict) -> None:
        png = png_bytes(fresh_copy(self.portrait))
        cold = self.gpu.upload_avatar(png)
        warm = self.gpu.upload_avatar(png)
        self.progress(1, sc.name)
        rec["runs"] = [{"use": "cold", **cold}, {"use": "warm", **warm}]
        rec["speed"] = {"encode_cold_ms": cold.get("encode_time_ms"), "encode_warm_ms": warm.get("encode_time_ms"),
                        "warm_was_cached": bool(warm.get("cached"))}

    def _concurrency(self, sc: scenarios.Scenario, rec: dict) -> None:
        levels = []
        for n in sc.params["levels"]:
            t0 = time.perf_counter()
            with ThreadPoolExecutor(n) as pool:
                runs = list(pool.map(lambda _: self._job_once(sc.params), range(n)))
            wall = time.perf_counter() - t0
            self.progress(n, sc.name)
            good = [r for r in runs if r["ok"]]
            made = sum(r["duration_s"] or 0.0 for r in good)
            levels.append({
                "clients": n, "wall_s": wall, "ok": len(good), "failed": len(runs) - len(good),
                "latency_p50_s": percentile([r["latency_s"] for r in good], 50),
                "latency_max_s": max((r["latency_s"] for r in good), default=None),
                "throughput": made / wall if wall > 0 else None,
                "errors": [r["error"] for r in runs if not r["ok"]][:3],
                "runs": [{k: v for k, v in r.items() if k not in _RUN_URLS} for r in runs],
            })
        rec["levels"] = levels
        rec["speed"] = {"throughput_by_clients": {str(lv["clients"]): lv["throughput"] for lv in levels},
                        "throughput": max((lv["throughput"] or 0.0) for lv in levels)}
        if all(lv["ok"] == 0 for lv in levels):
            rec.update(status="failed", reason="; ".join(levels[0]["errors"]) or "every job failed")

    def _lipsync(self, sc: scenarios.Scenario, rec: dict) -> None:
        engine = sc.params.get("engine")
        # The source clip is the talking head's own output, with its own speech.
        src_tts = self.gpu.tts(sc.params["source_text"], engine)
        t0 = time.perf_counter()
        clip = self.gpu.video({"avatar_image": self.portrait_b64, "audio_url": src_tts["audio_url"],
                               "phonemes": src_tts["phonemes"]})
        clip_s = time.perf_counter() - t0
        src = self.gpu.download(clip["video_url"])
        new_tts = self.gpu.tts(sc.params["new_text"], engine)
        t1 = time.perf_counter()
        answer = self.gpu.lipsync(src, new_tts["audio_url"], new_tts["phonemes"])
        lip_s = time.perf_counter() - t1
        self.progress(1, sc.name)
        url = answer.get("video_url")
        if not url:
            raise ServiceError(200, f"/lipsync/generate answered without a video_url: {sorted(answer)}")
        path = self._save(sc.name, self.gpu.download(url))
        frames = answer.get("frames") or clip.get("frames")
        rec["runs"] = [{"ok": True, "source_clip_s": clip_s, "lipsync_s": lip_s, "answer": {
            k: v for k, v in answer.items() if k not in ("video_url",)}}]
        rec["speed"] = {"latency_p50_s": lip_s, "lipsync_fps": (frames / lip_s) if frames else None,
                        "source_clip_s": clip_s, "frames_without_face": answer.get("frames_without_face")}
        rec["quality"] = self._analyse(sc.name, path, self.portrait, new_tts, exact=True)  # the new speech is muxed in as it is
        rec["video"] = str(path)

    # -- the whole run -------------------------------------------------------------------------
    def plan(self) -> tuple[list[scenarios.Scenario], dict]:
        """Ask the services what they have and build the suite's scenarios; also the environment record."""
        gpu_health = self.gpu.health()
        try:
            rt_health = self.rt.health()
        except (ServiceError, httpx.HTTPError, OSError) as exc:
            # The run goes on: each runtime scenario then fails with this reason.
            rt_health = {"error": f"runtime unreachable: {exc}"}
        engines = [e for e in gpu_health.get("engines", []) if e.get("capability") == "tts"]
        available = [e["name"] for e in engines if e.get("available") and e.get("loaded")]
        unavailable = {e["name"]: e.get("reason") or "not loaded" for e in engines if e["name"] not in available}
        try:
            presets = [a["avatar_id"] for a in self.gpu.avatars() if a.get("preset")]
        except (ServiceError, httpx.HTTPError):
            presets = []
        default = available[0] if available else None
        plan = scenarios.build(self.cfg.suite, available, default, presets, unavailable)
        env = {"device": gpu_health.get("device", "unknown"), "gpu_health": gpu_health, "runtime_health": rt_health,
               "tts_engines": available, "unavailable_engines": unavailable, "presets": presets}
        return plan, env

    def run(self, plan: Optional[list[scenarios.Scenario]] = None, env: Optional[dict] = None) -> dict:
        """Execute every scenario and return the summary (see evaluator.report for its use)."""
        if plan is None:
            plan, env = self.plan()
        started = time.time()
        records = []
        for sc in plan:
            rec = {"name": sc.name, "kind": sc.kind, "status": "ok", "params": _public_params(sc.params)}
            t0 = time.perf_counter()
            try:
                if "skip" in sc.params:
                    rec.update(status="skipped", reason=sc.params["skip"])
                    self.progress(sc.steps(), sc.name)
                else:
                    getattr(self, "_" + sc.kind)(sc, rec)
            except EndpointMissing as exc:
                rec.update(status="skipped", reason=str(exc))
            except (ServiceError, httpx.HTTPError, TimeoutError, OSError, ValueError, KeyError) as exc:
                log.warning("scenario failed", extra={"scenario": sc.name, "error": str(exc)})
                rec.update(status="failed", reason=f"{type(exc).__name__}: {exc}")
            rec["wall_s"] = time.perf_counter() - t0
            records.append(rec)
        return assemble(records, suite=self.cfg.suite, runtime_url=self.cfg.runtime_url, gpu_url=self.cfg.gpu_url,
                        environment=env or {}, memory=self.memory(env or {}), wall_s=time.time() - started)

    def memory(self, env: dict) -> dict:
        """Peak memory of both services after the run."""
        try:
            gpu_health = self.gpu.health()
        except (ServiceError, httpx.HTTPError, OSError):
            gpu_health = env.get("gpu_health")
        try:
            rt_health = self.rt.health()
        except (ServiceError, httpx.HTTPError, OSError):
            rt_health = env.get("runtime_health")
        return {"gpu_service": memory.peak_memory(gpu_health, self.cfg.gpu_pid, self.cfg.gpu_url),
                "runtime": memory.peak_memory(rt_health, self.cfg.runtime_pid, self.cfg.runtime_url)}

    def close(self) -> None:
        """Close both HTTP clients."""
        self.gpu.close()
        self.rt.close()


def assemble(records: list[dict], *, suite: str, runtime_url: str, gpu_url: str, environment: dict, memory: dict,
             wall_s: float) -> dict:
    """The summary document of a run: scenario records plus suite-wide speed, quality and memory."""
    return {
        "schema": SCHEMA,
        "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "suite": suite,
        "runtime_url": runtime_url,
        "gpu_url": gpu_url,
        "wall_s": wall_s,
        "environment": dict(environment),
        "scenarios": records,
        "speed": aggregate_speed(records),
        "quality": aggregate_quality(records),
        "memory": memory,
    }


def runtime_record(name: str, runs: list[dict], quality: Optional[dict] = None, params: Optional[dict] = None) -> dict:
    """A runtime scenario's record from its run records (latency_s, duration_s, timings_ms, ok)."""
    good = [r for r in runs if r.get("ok")]
    rec = {"name": name, "kind": "runtime", "status": "ok" if good else "failed", "params": params or {}, "runs": runs}
    if good:
        rec["speed"] = _speed_of(good)
    else:
        rec["reason"] = runs[0].get("error") if runs else "no runs"
    if quality is not None:
        rec["quality"] = quality
    return rec


def _public_params(params: dict) -> dict:
    return {k: v for k, v in params.items() if k != "skip"}


def _speed_of(runs: list[dict]) -> dict:
    """Latency percentiles, stage shares, RTF and render fps of successful runtime runs."""
    lat = [r["latency_s"] for r in runs]
    out = {"latency_p50_s": percentile(lat, 50), "latency_p95_s": percentile(lat, 95),
           "latency_p99_s": percentile(lat, 99), "video_s": percentile([r["duration_s"] or 0 for r in runs], 50)}
    out.update(_derived(runs))
    return out


def _derived(runs: list[dict]) -> dict:
    """Stage shares of the runtime's total, pipeline TTS real-time factor and render fps."""
    totals = {s: 0.0 for s in STAGES}
    total_ms = tts_ms = video_ms = video_s = 0.0
    for r in runs:
        t = r.get("timings_ms") or {}
        if not t.get("total"):
            continue
        total_ms += t["total"]
        for s in STAGES:
            totals[s] += float(t.get(s, 0.0))
        tts_ms += float(t.get("tts", 0.0))
        video_ms += float(t.get("video", 0.0))
        video_s += float(r.get("duration_s") or 0.0)
    out: dict = {}
    if total_ms > 0:
        # The runtime times some stages on separate clocks (queue wait vs the worker's total), so their
        # sum can exceed `total` by a little; shares are then of that sum, and "other" is zero.
        denom = max(total_ms, sum(totals.values()))
        shares = {s: v / denom for s, v in totals.items() if v > 0}
        shares["other"] = max(0.0, 1.0 - sum(shares.values()))
        out["stage_share"] = shares
    if video_s > 0:
        out["tts_rtf"] = tts_ms / 1000.0 / video_s
        # Frames the video stage made per second of its time (25 fps output is the runtime's default).
        out["render_fps"] = video_s * 25.0 / (video_ms / 1000.0) if video_ms > 0 else None
    return out


def aggregate_speed(records: list[dict]) -> dict:
    """Suite-wide speed: latency percentiles over every runtime job, failure rate, shares, RTF, fps, throughput."""
    jobs = []
    for rec in records:
        if rec["kind"] == "runtime":
            jobs += rec.get("runs", [])
        elif rec["kind"] == "concurrency":
            for lv in rec.get("levels", []):
                jobs += lv["runs"]
    good = [j for j in jobs if j.get("ok")]
    lat = [j["latency_s"] for j in good]
    out = {"jobs": len(jobs), "failed_jobs": len(jobs) - len(good),
           "failure_rate": (len(jobs) - len(good)) / len(jobs) if jobs else None,
           "latency_p50_s": percentile(lat, 50), "latency_p95_s": percentile(lat, 95), "latency_p99_s": percentile(lat, 99)}
    out.update(_derived(good))
    engine_rtf = [r["speed"]["tts_rtf_engine"] for r in records if "tts_rtf_engine" in r.get("speed", {})]
    out["tts_rtf_engine"] = percentile(engine_rtf, 50)
    firsts = [r["speed"]["first_audio_s"] for r in records if r["kind"] == "stream" and r.get("speed", {}).get("first_audio_s")]
    out["first_audio_s"] = percentile(firsts, 50)
    direct = next((r for r in records if r["kind"] == "video" and r.get("speed", {}).get("first_frame_s")), None)
    out["first_frame_s"] = direct["speed"]["first_frame_s"] if direct else None
    out["first_frame_note"] = ("time to first frame is the GPU talking head's own (its first_frame timing); the runtime "
                               "does not stream video, so a client gets the first frame with the finished MP4")
    if direct and direct["speed"].get("render_fps"):
        out["render_fps_gpu"] = direct["speed"]["render_fps"]
    conc = next((r for r in records if r["kind"] == "concurrency" and "speed" in r), None)
    if conc:
        out["throughput"] = conc["speed"]["throughput"]
        out["throughput_by_clients"] = conc["speed"]["throughput_by_clients"]
    cold = next((r for r in records if r["name"].endswith("/cold") and r["status"] == "ok"), None)
    warm = next((r for r in records if r["name"] == cold["name"].replace("/cold", "/warm")), None) if cold else None
    if cold and warm and warm.get("speed"):
        out["cold_latency_s"] = cold["speed"]["latency_p50_s"]
        out["warm_latency_s"] = warm["speed"]["latency_p50_s"]
    enc = next((r for r in records if r["kind"] == "avatar_encode" and r["status"] == "ok"), None)
    if enc:
        out["encode_cold_ms"] = enc["speed"]["encode_cold_ms"]
        out["encode_warm_ms"] = enc["speed"]["encode_warm_ms"]
    return out


QUALITY_KEYS = ("av_offset_ms", "lip_audio_corr", "bilabial_closed", "vowel_open", "identity_ssim", "jitter",
                "jitter_still", "blink_rate_per_min", "silence_closed")


def aggregate_quality(records: list[dict]) -> dict:
    """Mean of each quality figure over the scenarios that measured it (|offset| for the offset)."""
    out = {}
    for key in QUALITY_KEYS:
        vals = [r["quality"].get(key) for r in records if r.get("quality")]
        vals = [abs(v) if key == "av_offset_ms" else v for v in vals if isinstance(v, (int, float)) and math.isfinite(v)]
        out[key if key != "av_offset_ms" else "abs_av_offset_ms"] = float(np.mean(vals)) if vals else None
    out["videos_measured"] = sum(1 for r in records if r.get("quality"))
    return out
