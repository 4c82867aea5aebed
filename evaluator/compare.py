"""Compare two summaries: what changed, whether it is better or worse, and by how much.

Each figure has a direction: lower latency, memory, offset and jitter are better; higher
correlation, fps, throughput and shares are better; a blink rate is better the closer it is to
a natural 15 per minute. Changes within a small relative tolerance are reported as "same".
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

BLINK_TARGET = 15.0
REL_TOLERANCE = 0.02

# (path in the summary, label, direction: "lower" | "higher" | "abs_lower" | "target:<x>", unit)
GLOBAL = (
    ("speed.latency_p50_s", "latency p50", "lower", "s"),
    ("speed.latency_p95_s", "latency p95", "lower", "s"),
    ("speed.latency_p99_s", "latency p99", "lower", "s"),
    ("speed.failure_rate", "failure rate", "lower", ""),
    ("speed.tts_rtf", "TTS real-time factor (pipeline)", "lower", "x"),
    ("speed.tts_rtf_engine", "TTS real-time factor (engine)", "lower", "x"),
    ("speed.render_fps", "render fps", "higher", "fps"),
    ("speed.render_fps_gpu", "render fps (GPU)", "higher", "fps"),
    ("speed.first_frame_s", "time to first frame", "lower", "s"),
    ("speed.throughput", "throughput (video s / wall s)", "higher", "x"),
    ("speed.first_audio_s", "time to first audio", "lower", "s"),
    ("speed.encode_cold_ms", "avatar encode (cold)", "lower", "ms"),
    ("memory.gpu_service.peak_mb", "GPU service peak memory", "lower", "MiB"),
    ("memory.runtime.peak_mb", "runtime peak memory", "lower", "MiB"),
    ("quality.abs_av_offset_ms", "|A/V offset|", "lower", "ms"),
    ("quality.lip_audio_corr", "lip-audio correlation", "higher", ""),
    ("quality.bilabial_closed", "m/b/p lips closed", "higher", ""),
    ("quality.vowel_open", "vowels open", "higher", ""),
    ("quality.silence_closed", "silence mouth closed", "higher", ""),
    ("quality.identity_ssim", "identity SSIM", "higher", ""),
    ("quality.jitter", "landmark jitter", "lower", ""),
    ("quality.jitter_still", "jitter when still", "lower", ""),
    ("quality.blink_rate_per_min", "blink rate", f"target:{BLINK_TARGET}", "/min"),
)
PER_SCENARIO = (
    ("speed.latency_p50_s", "latency p50", "lower", "s"),
    ("speed.throughput", "throughput", "higher", "x"),
    ("speed.first_audio_s", "time to first audio", "lower", "s"),
    ("quality.av_offset_ms", "A/V offset", "abs_lower", "ms"),
    ("quality.lip_audio_corr", "lip-audio correlation", "higher", ""),
    ("quality.bilabial_closed", "m/b/p lips closed", "higher", ""),
    ("quality.vowel_open", "vowels open", "higher", ""),
    ("quality.silence_closed", "silence mouth closed", "higher", ""),
    ("quality.identity_ssim", "identity SSIM", "higher", ""),
    ("quality.jitter", "landmark jitter", "lower", ""),
)


@dataclass
class Change:
    """One figure in both summaries."""

    scope: str
    label: str
    old: float
    new: float
    direction: str
    unit: str

    @property
    def delta(self) -> float:
        """new - old."""
        return self.new - self.old

    @property
    def relative(self) -> Optional[float]:
        """delta / |old|, None when old is 0."""
        return self.delta / abs(self.old) if self.old else None

    @property
    def verdict(self) -> str:
        """better, worse or same, according to the figure's direction."""
        d = self.direction
        if d == "lower":
            gain = self.old - self.new
        elif d == "higher":
            gain = self.new - self.old
        elif d == "abs_lower":
            gain = abs(self.old) - abs(self.new)
        else:
            target = float(d.split(":", 1)[1])
            gain = abs(self.old - target) - abs(self.new - target)
        scale = max(abs(self.old), abs(self.new), 1e-9)
        if abs(gain) <= REL_TOLERANCE * scale or abs(gain) < 1e-9:
            return "same"
        return "better" if gain > 0 else "worse"

    def line(self) -> str:
        """One aligned line: scope, figure, old -> new, delta (and %), verdict."""
        rel = f" ({100 * self.relative:+.1f}%)" if self.relative is not None else ""
        unit = f" {self.unit}" if self.unit else ""
        return (f"{self.verdict.upper():6s} {self.scope:24s} {self.label:34s} {_fmt(self.old)} -> {_fmt(self.new)}{unit}"
                f"  [{self.delta:+.4g}{rel}]")


def _fmt(x: float) -> str:
    return f"{x:.4g}"


def _get(obj: dict, path: str):
    for part in path.split("."):
        if not isinstance(obj, dict) or part not in obj:
            return None
        obj = obj[part]
    return obj if isinstance(obj, (int, float)) and not isinstance(obj, bool) and math.isfinite(obj) else None


def compare(a: dict, b: dict) -> dict:
    """Changes from summary a (before) to b (after): figures, scenario status changes, scenarios added/removed."""
    changes: list[Change] = []
    for path, label, direction, unit in GLOBAL:
        old, new = _get(a, path), _get(b, path)
        if old is not None and new is not None:
            changes.append(Change("overall", label, old, new, direction, unit))
    sa = {r["name"]: r for r in a.get("scenarios", [])}
    sb = {r["name"]: r for r in b.get("scenarios", [])}
    status = []
    for name in sa.keys() & sb.keys():
        if sa[name].get("status") != sb[name].get("status"):
            status.append({"scenario": name, "old": sa[name].get("status"), "new": sb[name].get("status"),
                           "reason": sb[name].get("reason")})
        for path, label, direction, unit in PER_SCENARIO:
            old, new = _get(sa[name], path), _get(sb[name], path)
            if old is not None and new is not None:
                changes.append(Change(name, label, old, new, direction, unit))
    return {
        "changes": changes,
        "status_changes": sorted(status, key=lambda s: s["scenario"]),
        "only_in_a": sorted(sa.keys() - sb.keys()),
        "only_in_b": sorted(sb.keys() - sa.keys()),
        "notes": [f"suites differ ({a.get('suite')} vs {b.get('suite')}): scenarios of the same name may speak "
                  "other texts or run other counts"] if a.get("suite") != b.get("suite") else [],
        "better": sum(c.verdict == "better" for c in changes),
        "worse": sum(c.verdict == "worse" for c in changes),
    }


def render(result: dict, name_a: str = "A", name_b: str = "B", show_same: bool = False) -> str:
    """The comparison as text for a terminal."""
    lines = [f"Comparing {name_a} (before) with {name_b} (after): "
             f"{result['better']} better, {result['worse']} worse, "
             f"{len(result['changes']) - result['better'] - result['worse']} unchanged"]
    lines += [f"  note: {n}" for n in result.get("notes", [])]
    order = {"worse": 0, "better": 1, "same": 2}
    for c in sorted(result["changes"], key=lambda c: (order[c.verdict], c.scope != "overall", c.scope)):
        if c.verdict != "same" or show_same:
            lines.append("  " + c.line())
    for s in result["status_changes"]:
        why = f" ({s['reason']})" if s.get("reason") else ""
        lines.append(f"  STATUS {s['scenario']}: {s['old']} -> {s['new']}{why}")
    if result["only_in_a"]:
        lines.append("  only in before: " + ", ".join(result["only_in_a"]))
    if result["only_in_b"]:
        lines.append("  only in after: " + ", ".join(result["only_in_b"]))
    return "\n".join(lines)
