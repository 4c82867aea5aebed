"""Phoneme timings from speech (gpu_service/speech/alignment.py): accuracy on real clips, and cost.

Prints figures; asserts nothing. For each clip of --kit (WAVs with a .txt and an .align.json beside
them, as in the media kit's audio/ folder), and with --piper for Piper speech of two sentences:

- words (forced alignment, with the text): error of each word start against the reference;
- m/b/p (both modes): for each reference m/b/p, the distance from its onset (and from its release,
  its end) to the nearest derived m/b/p; the share found within 50 and 80 ms; derived m/b/p with
  no reference one within 80 ms (false closures);
- sealed: the share of reference m/b/p whose centre frame (25 fps) has mouth_open <= 0.02 in the
  controls drive() makes from the timings and the audio, as the service drives a video; pauses:
  the share of frames inside reference silences that are closed (evaluator.metrics.phonemes).
  Baselines, same run: `envelope` (audio alone: the volume meter this replaces) and `reference`
  (the reference timings themselves: what the driving does with perfect timings);
- with --video: each derived m/b/p of the kit's talking-face clips against the filmed lips
  (MediaPipe's inner-lip gap at its centre frame), the real mouth as the reference;
- cost: seconds of alignment per second of audio, median of --runs after one warm-up call, wall
  and CPU (the one-off decoder build is printed apart).

References: the kit's timings are pocketsphinx forced alignment with the same model, so forced
alignment against them is partly circular; phone recognition (no text) against them is the honest
figure. A kit clip with word timings only (a01) takes its word-initial m/b/p, with a 60 ms span.
Piper's timings are its own durations (exact for its audio, but its m/b/p spans are 25-60 ms: they
hold the release, not the whole closure), an independent reference for forced alignment.

    PYTHONPATH=. .venv/bin/python benchmarks/bench_alignment.py --kit KIT/audio [--piper] [--video KIT/video] [--runs 5]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from evaluator.metrics.phonemes import phoneme_agreement  # noqa: E402
from gpu_service.speech import alignment  # noqa: E402
from gpu_service.speech.protocol import Phone  # noqa: E402
from gpu_service.talking_head.driving import drive  # noqa: E402
from tests.speech_kit import FIXTURES, bilabial_onsets, load_clip, nearest_errors, word_starts  # noqa: E402

FPS = 25.0
MODES = ("forced_alignment", "phone_recognition", "envelope", "reference")
PIPER_TEXTS = (
    "Please bring me the map of the moon. Well, we will meet them by the pool at noon, "
    "and then, maybe, we shall see who wins the big prize.",
    "Good morning, and welcome to the weekly update. Sales grew in every region this quarter, "
    "and the new support portal cut waiting times in half. Thank you all for your hard work.",
)


@dataclass
class Reference:
    """A clip and the timings it is judged against."""

    name: str
    audio: np.ndarray
    sample_rate: int
    text: str
    words: list[float]
    """Reference word starts."""
    phones: list[Phone]
    """IPA phones: m/b/p spans and, when `pauses`, the silences."""
    pauses: bool = True

    @property
    def duration_s(self) -> float:
        """Length of the audio."""
        return len(self.audio) / float(self.sample_rate)

    @property
    def bilabials(self) -> list[Phone]:
        """The reference m/b/p."""
        return [p for p in self.phones if p.phoneme in ("m", "b", "p")]


def kit_references(folder: Path) -> list[Reference]:
    """The kit's clips in `folder`, their ARPAbet timings in IPA."""
    out = []
    for wav in sorted(folder.glob("*.wav")):
        if not wav.with_suffix(".align.json").exists():
            continue
        clip = load_clip(wav)
        phones = [Phone(alignment.ipa(p, e - s), s, e) for p, s, e in (clip.phones or clip.bilabials())]
        out.append(Reference(clip.name, clip.audio, clip.sample_rate, clip.text, [s for _, s, _ in clip.words],
                             phones, pauses=bool(clip.phones)))
    return out


def piper_references() -> list[Reference]:
    """Piper (bundled voice, no duration noise) speaking PIPER_TEXTS, judged by its own timings."""
    from gpu_service.speech.engines.piper import PiperEngine
    from gpu_service.speech.protocol import SpeechRequest

    engine = PiperEngine(noise_w_scale=0.0)
    engine.load("cpu")
    out = []
    for k, text in enumerate(PIPER_TEXTS):
        r = engine.synthesize(SpeechRequest(text=text))
        out.append(Reference(f"piper_{k + 1}", r.audio, r.sample_rate, text, word_starts(r.phonemes), r.phonemes))
    return out


def _ms(errors) -> dict:
    """Median and nearest-rank p90 in ms; a miss (inf) counts, and a figure it decides is None."""
    v = np.asarray(errors, dtype=np.float64) * 1000
    if not v.size:
        return {"median_ms": None, "p90_ms": None}
    fig = [float(np.median(v)), float(np.percentile(v, 90, method="higher"))]
    return dict(zip(("median_ms", "p90_ms"), (round(x, 1) if np.isfinite(x) else None for x in fig)))


def _pair(fig) -> str:
    """"median/p90" for the table ("miss" for a figure decided by a miss)."""
    if not isinstance(fig, dict):
        return "-" if fig is None else "n/a"
    return "/".join("miss" if fig[k] is None else f"{fig[k]:.0f}" for k in ("median_ms", "p90_ms"))


def _timed(ref: Reference, text: Optional[str], runs: int) -> tuple[list[Phone], str, float, float]:
    """align() on the clip: (phones, source, median wall s, median CPU s) over `runs` calls after a warm-up."""
    alignment.align(ref.audio, ref.sample_rate, text)
    walls, cpus = [], []
    for _ in range(runs):
        w, c = time.perf_counter(), time.process_time()
        phones, source = alignment.align(ref.audio, ref.sample_rate, text)
        walls.append(time.perf_counter() - w)
        cpus.append(time.process_time() - c)
    return phones, source, statistics.median(walls), statistics.median(cpus)


def measure(ref: Reference, runs: int) -> tuple[dict, dict]:
    """Every figure of one clip per mode, and the raw errors (seconds) per mode for pooling."""
    bil = ref.bilabials
    out = {"clip": ref.name, "duration_s": round(ref.duration_s, 3), "n_words": len(ref.words),
           "n_bilabials": len(bil), "modes": {}}
    raw: dict = {}
    for mode in MODES:
        row: dict = {}
        errors: dict = {}
        if mode in ("forced_alignment", "phone_recognition"):
            phones, source, wall, cpu = _timed(ref, ref.text if mode == "forced_alignment" else None, runs)
            row.update(source=source, wall_s_per_s=round(wall / ref.duration_s, 4),
                       cpu_s_per_s=round(cpu / ref.duration_s, 4))
        else:
            phones = ref.phones if mode == "reference" else []
        if mode == "forced_alignment":
            starts = word_starts(phones)
            if len(starts) == len(ref.words):
                errors["word_start"] = np.abs(np.array(starts) - ref.words)
                row["word_start"] = _ms(errors["word_start"])
            else:
                row["word_start"] = f"{len(starts)} words found, {len(ref.words)} in the reference"
        if mode != "envelope":
            found = [p for p in phones if p.phoneme in ("m", "b", "p")]
            errors["bilabial_onset"] = err = nearest_errors([p.start_s for p in bil], bilabial_onsets(found))
            release = nearest_errors([p.end_s for p in bil], [p.end_s for p in found])
            false = nearest_errors(bilabial_onsets(found), [p.start_s for p in bil]) > 0.08
            row["bilabial_onset"] = {**_ms(err), "found_50ms": round(float((err <= 0.05).mean()), 3),
                                     "found_80ms": round(float((err <= 0.08).mean()), 3),
                                     "release_median_ms": _ms(release)["median_ms"],
                                     # a proxy reference (word-initial m/b/p only) cannot tell a false one
                                     "false": f"{int(false.sum())}/{len(found)}" if ref.pauses else "-"}
        ctl = drive(ref.duration_s, FPS, phonemes=phones or None, audio=ref.audio, sample_rate=ref.sample_rate,
                    head_motion=False)
        agree = phoneme_agreement(ref.phones, ctl.mouth_open, FPS)
        row["sealed"] = round(agree.bilabial_closed, 3)
        row["pause_closed"] = round(agree.pause_closed, 3) if ref.pauses else None
        out["modes"][mode] = row
        raw[mode] = errors
    return out, raw


def pool(results: list[dict], raws: list[dict]) -> dict:
    """Figures over a set of clips: errors pooled, sealing weighted by bilabials, cost by duration."""
    total_s = sum(r["duration_s"] for r in results)
    n_bil = sum(r["n_bilabials"] for r in results)
    pooled: dict = {}
    for mode in MODES:
        sealed = sum(r["modes"][mode]["sealed"] * r["n_bilabials"] for r in results) / n_bil
        entry: dict = {"sealed": round(sealed, 3), "n_bilabials": n_bil}
        for key in ("bilabial_onset", "word_start"):
            parts = [raw[mode][key] for raw in raws if key in raw[mode]]
            if parts:
                e = np.concatenate(parts)
                entry[key] = _ms(e)
                if key == "bilabial_onset":
                    entry[key]["found_80ms"] = round(float((e <= 0.08).mean()), 3)
        for key in ("wall_s_per_s", "cpu_s_per_s"):
            if key in results[0]["modes"][mode]:
                entry[key] = round(sum(r["modes"][mode][key] * r["duration_s"] for r in results) / total_s, 4)
        pooled[mode] = entry
    return pooled


def report(title: str, refs: list[Reference], runs: int) -> dict:
    """Measure and print one set of clips; return its figures."""
    results, raws = zip(*[measure(r, runs) for r in refs])
    print(f"\n{title}")
    print(f"{'clip':<12}{'mode':<19}{'words med/p90':>14}{'m/b/p med/p90':>15}{'rel.med':>8}{'<=50':>6}{'<=80':>6}"
          f"{'false':>7}{'sealed':>8}{'pauses':>8}{'wall s/s':>10}{'cpu s/s':>9}")
    for r in results:
        for mode, row in r["modes"].items():
            b = row.get("bilabial_onset") or {}
            rel = b.get("release_median_ms")
            print(f"{r['clip'][:11]:<12}{mode:<19}{_pair(row.get('word_start')):>14}{_pair(b or None):>15}"
                  f"{'-' if rel is None else f'{rel:.0f}':>8}{b.get('found_50ms', '-'):>6}{b.get('found_80ms', '-'):>6}"
                  f"{b.get('false', '-'):>7}{row['sealed']:>8}"
                  f"{'-' if row['pause_closed'] is None else row['pause_closed']:>8}"
                  f"{row.get('wall_s_per_s', '-'):>10}{row.get('cpu_s_per_s', '-'):>9}")
    pooled = pool(list(results), list(raws))
    print(f"pooled over {len(results)} clips ({sum(r['duration_s'] for r in results):.1f} s of speech):")
    for mode, entry in pooled.items():
        print(f"  {mode:<18} {json.dumps(entry)}")
    return {"clips": list(results), "pooled": pooled}


def filmed_closures(folder: Path) -> dict:
    """Derived m/b/p of the kit's talking-face clips (mp4 + wav + txt) against the filmed lips.

    The filmed inner-lip gap (MediaPipe, face heights) at each derived m/b/p's centre frame: closed
    when <= CLOSED_GAP. The real mouth is the reference here, not a recogniser's timings.
    """
    import soundfile as sf

    from evaluator.metrics.face import measure_frames, read_video
    from evaluator.metrics.phonemes import CLOSED_GAP

    out: dict = {}
    print(f"\nfilmed lips in {folder} (gap at the centre of each derived m/b/p; closed <= {CLOSED_GAP})")
    for mp4 in sorted(folder.glob("*.mp4")):
        wav, txt = mp4.with_suffix(".wav"), mp4.with_suffix(".txt")
        if not (wav.exists() and txt.exists()):
            continue
        frames, fps, _ = read_video(str(mp4), with_audio=False)
        gap = measure_frames(frames).mouth_gap
        audio, rate = sf.read(wav, dtype="float32")
        for mode, text in (("forced_alignment", txt.read_text().strip()), ("phone_recognition", None)):
            phones, _ = alignment.align(audio, rate, text)
            found = [(p.phoneme, round(float(gap[int(0.5 * (p.start_s + p.end_s) * fps)]), 3))
                     for p in phones if p.phoneme in ("m", "b", "p")]
            out.setdefault(mp4.stem, {})[mode] = found
            closed = sum(g <= CLOSED_GAP for _, g in found)
            print(f"  {mp4.stem[:32]:<33}{mode:<19} {closed}/{len(found)} filmed closed  {found}")
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kit", type=Path, default=FIXTURES, help="folder of WAVs with .txt and .align.json")
    parser.add_argument("--piper", action="store_true", help="also judge Piper speech by Piper's own timings")
    parser.add_argument("--video", type=Path, help="also check derived m/b/p against the filmed lips of the "
                        "talking-face clips (mp4 + wav + txt) in this folder, e.g. the kit's video/")
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()
    if not alignment.available():
        sys.exit("pocketsphinx is not installed: pip install pocketsphinx==5.1.1")
    started = time.perf_counter()
    alignment.warmup()
    print(f"decoder build: {(time.perf_counter() - started) * 1000:.0f} ms (once per decoder, at most "
          f"{alignment.MAX_DECODERS} per process)")
    figures = {"bench": "alignment", "runs": args.runs,
               "kit": report(f"kit clips in {args.kit} (reference: pocketsphinx forced alignment)",
                             kit_references(args.kit), args.runs)}
    if args.piper:
        figures["piper"] = report("Piper speech (reference: Piper's own timings)", piper_references(), args.runs)
    if args.video:
        figures["filmed"] = filmed_closures(args.video)
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
