"""Where the evaluator's phoneme timings come from: the runtime's timing.json when it fits the video, else DTW.

The video is the talking head's real render of a Piper sentence (tests/evaluator/real_summaries.py);
the fallback's second synthesis is a real Piper run, served over HTTP as the GPU service serves
its WAVs.
"""

from __future__ import annotations

import functools
import http.server
import io
import os
import threading

import pytest
import soundfile as sf

from evaluator.align import runtime_phonemes
from evaluator.metrics.phonemes import BILABIALS
from evaluator.runner import RunConfig, Runner
from tests.evaluator.real_summaries import TEXT, rendered


@pytest.fixture(scope="module")
def render(tmp_path_factory):
    """The shared render (once per session with the CLI and report tests)."""
    folder = str(tmp_path_factory.getbasetemp() / "eval_render")
    os.makedirs(folder, exist_ok=True)
    return rendered(folder)


def _timing(render: dict, shift_s: float = 0.0) -> dict:
    """timing.json as the runtime writes it for this video (optionally claiming a longer video)."""
    return {"fps": 25, "duration_s": render["duration_s"] + shift_s,
            "phonemes": [{"phoneme": p, "start_s": s, "end_s": e} for p, s, e in render["phonemes"]], "words": []}


def test_timing_json_is_checked_against_the_video(render):
    video_s = render["duration_s"]
    assert runtime_phonemes(_timing(render), video_s) == [(p, float(s), float(e)) for p, s, e in render["phonemes"]]
    with pytest.raises(ValueError, match=r"covers .* s but the video's audio lasts"):
        runtime_phonemes(_timing(render, shift_s=0.5), video_s)
    with pytest.raises(ValueError, match="no phonemes"):
        runtime_phonemes({**_timing(render), "phonemes": []}, video_s)
    backwards = _timing(render)
    backwards["phonemes"] = backwards["phonemes"][::-1]
    with pytest.raises(ValueError, match="time order"):
        runtime_phonemes(backwards, video_s)
    with pytest.raises(ValueError, match="phoneme without"):
        runtime_phonemes({"phonemes": [{"phoneme": "a"}]}, video_s)


@pytest.fixture(scope="module")
def resynthesis(tmp_path_factory):
    """A second Piper synthesis of the text (a different rendition), its WAV served over real HTTP."""
    from gpu_service.speech.protocol import SpeechRequest
    from gpu_service.speech.engines.piper import PiperEngine

    folder = tmp_path_factory.mktemp("artifacts")
    piper = PiperEngine()
    piper.load("cpu")
    speech = piper.synthesize(SpeechRequest(text=TEXT))
    buf = io.BytesIO()
    sf.write(buf, speech.audio, speech.sample_rate, format="WAV", subtype="PCM_16")
    (folder / "speech.wav").write_bytes(buf.getvalue())
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(folder))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{server.server_address[1]}"
    yield url, {"audio_url": f"{url}/speech.wav", "duration_s": len(speech.audio) / speech.sample_rate,
                "phonemes": [{"phoneme": p.phoneme, "start_s": p.start_s, "end_s": p.end_s} for p in speech.phonemes]}
    server.shutdown()
    thread.join()


def test_the_runtimes_timings_are_used_and_a_stale_file_falls_back_to_dtw(render, resynthesis):
    url, tts = resynthesis
    runner = Runner(RunConfig(runtime_url="http://127.0.0.1:9", gpu_url=url, out_dir=render["good"].parent))
    try:
        exact = runner._analyse("exact", render["good"], render["portrait"], tts, timing=_timing(render))
        assert exact["phoneme_source"] == "runtime" and "timing.json" in exact["phoneme_timings"]
        n_bilabial = sum(p in BILABIALS for p, _, _ in render["phonemes"])
        assert exact["n_bilabial"] == n_bilabial and exact["bilabial_closed"] is not None
        assert "phoneme_stretch" not in exact  # exact timings are taken as they are

        stale = runner._analyse("stale", render["good"], render["portrait"], tts, timing=_timing(render, 0.5))
        assert stale["phoneme_source"] == "dtw" and "DTW" in stale["phoneme_timings"]
        assert any("timing.json not used" in n for n in stale["notes"]), stale["notes"]
        assert stale["n_bilabial"] == sum(p["phoneme"] in BILABIALS for p in tts["phonemes"])

        older = runner._analyse("older runtime", render["good"], render["portrait"], tts)
        assert older["phoneme_source"] == "dtw" and older["bilabial_closed"] == stale["bilabial_closed"]
    finally:
        runner.close()
