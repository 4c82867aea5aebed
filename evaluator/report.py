"""Reports of a summary: a self-contained HTML page (PNG plots inline as data URIs, and written
beside it) and a Markdown table of the headline figures.
"""

from __future__ import annotations

import base64
import html
import logging
import math
from pathlib import Path
from typing import Optional

import matplotlib

matplotlib.use("Agg")  # headless: the evaluator runs in containers and CI
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

log = logging.getLogger(__name__)

QUALITY_COLUMNS = (
    ("av_offset_ms", "A/V offset ms", "{:+.0f}"),
    ("lip_audio_corr", "lip-audio corr", "{:.3f}"),
    ("bilabial_closed", "m/b/p closed", "{:.0%}"),
    ("vowel_open", "vowels open", "{:.0%}"),
    ("silence_closed", "silence closed", "{:.0%}"),
    ("identity_ssim", "identity SSIM", "{:.3f}"),
    ("jitter", "jitter", "{:.4f}"),
    ("jitter_still", "jitter still", "{:.4f}"),
    ("blink_rate_per_min", "blinks/min", "{:.1f}"),
    ("phoneme_source", "phoneme timings", "{}"),  # runtime | synthesis | dtw | stretch | none
)
SPEED_ROWS = (
    ("latency_p50_s", "End-to-end latency p50", "{:.2f} s"),
    ("latency_p95_s", "End-to-end latency p95", "{:.2f} s"),
    ("latency_p99_s", "End-to-end latency p99", "{:.2f} s"),
    ("failure_rate", "Failure rate", "{:.1%}"),
    ("tts_rtf", "TTS real-time factor (pipeline)", "{:.3f}"),
    ("tts_rtf_engine", "TTS real-time factor (engine)", "{:.3f}"),
    ("render_fps", "Render fps (runtime video stage)", "{:.0f}"),
    ("render_fps_gpu", "Render + encode fps (GPU /video/generate)", "{:.0f}"),
    ("throughput", "Throughput (s of video / s of wall)", "{:.2f}"),
    ("first_audio_s", "Time to first audio (/tts/stream)", "{:.3f} s"),
    ("first_frame_s", "Time to first frame (talking head)", "{:.3f} s"),
    ("cold_latency_s", "Latency, new portrait (cold)", "{:.2f} s"),
    ("warm_latency_s", "Latency, same portrait (warm)", "{:.2f} s"),
    ("encode_cold_ms", "Avatar encoding, cold", "{:.0f} ms"),
    ("encode_warm_ms", "Avatar encoding, warm", "{:.0f} ms"),
)


def fmt(value, spec: str) -> str:
    """A number formatted by spec; "n/a" for missing or non-finite values."""
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "n/a"
    return spec.format(value)


# -- plots --------------------------------------------------------------------------------------
def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def plot_latency(summary: dict, path: Path) -> Optional[Path]:
    """Per-scenario latency p50 with the p95 as a whisker."""
    recs = [r for r in summary["scenarios"] if r.get("speed", {}).get("latency_p50_s") is not None]
    if not recs:
        return None
    fig, ax = plt.subplots(figsize=(8, 0.45 * len(recs) + 1.5))
    p50 = [r["speed"]["latency_p50_s"] for r in recs]
    p95 = [r["speed"].get("latency_p95_s") or v for r, v in zip(recs, p50)]
    y = np.arange(len(recs))
    ax.barh(y, p50, color="#4c78a8", xerr=[np.zeros(len(recs)), np.subtract(p95, p50)], capsize=3)
    ax.set_yticks(y, [r["name"] for r in recs])
    ax.invert_yaxis()
    ax.set_xlabel("seconds (bar p50, whisker p95)")
    ax.set_title("End-to-end latency per scenario")
    return _save(fig, path)


def plot_stages(summary: dict, path: Path) -> Optional[Path]:
    """Share of each runtime stage in the total job time."""
    shares = summary.get("speed", {}).get("stage_share")
    if not shares:
        return None
    fig, ax = plt.subplots(figsize=(8, 1.8))
    left = 0.0
    colours = plt.cm.tab10.colors
    for i, (stage, share) in enumerate(sorted(shares.items(), key=lambda kv: -kv[1])):
        ax.barh([0], [share], left=left, color=colours[i % 10], label=f"{stage} {share:.0%}")
        left += share
    ax.set_xlim(0, 1)
    ax.set_yticks([])
    ax.legend(ncol=4, fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.25))
    ax.set_title("Share of each stage in the runtime's job time")
    return _save(fig, path)


def plot_concurrency(summary: dict, path: Path) -> Optional[Path]:
    """Throughput and latency against the number of concurrent clients."""
    rec = next((r for r in summary["scenarios"] if r["kind"] == "concurrency" and r.get("levels")), None)
    if not rec:
        return None
    lv = rec["levels"]
    n = [x["clients"] for x in lv]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(n, [x["throughput"] or 0 for x in lv], "o-", color="#4c78a8", label="throughput")
    ax.set_xlabel("concurrent clients")
    ax.set_ylabel("seconds of video per second", color="#4c78a8")
    ax.set_xticks(n)
    ax2 = ax.twinx()
    ax2.plot(n, [x["latency_p50_s"] or 0 for x in lv], "s--", color="#e45756", label="latency p50")
    ax2.set_ylabel("latency p50 (s)", color="#e45756")
    ax.set_title("Concurrency sweep")
    return _save(fig, path)


def plot_sync(rec: dict, path: Path) -> Optional[Path]:
    """One video's mouth opening against its speech envelope (both standardised) and the lag curve."""
    q = rec.get("quality") or {}
    gap, env = q.get("series_mouth_gap"), q.get("series_envelope_db")
    if not gap or not env:
        return None
    fps = q["fps"]
    g = np.array([np.nan if v is None else v for v in gap], dtype=float)
    e = np.array(env, dtype=float)

    def z(x):
        return (x - np.nanmean(x)) / (np.nanstd(x) + 1e-9)

    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(10, 3.2), gridspec_kw={"width_ratios": [3, 1]})
    t = np.arange(len(g)) / fps
    ax.plot(t, z(e), color="#bbbbbb", label="speech envelope")
    ax.plot(t, z(g), color="#e45756", label="mouth opening")
    ax.set_xlabel("seconds")
    ax.legend(fontsize=8)
    ax.set_title(f"{rec['name']}: mouth vs speech")
    curve = q.get("series_corr_curve")
    if curve:
        k = (len(curve) - 1) // 2
        lags = (np.arange(len(curve)) - k) * 1000.0 / fps
        ax2.plot(lags, curve, "o-", color="#4c78a8")
        ax2.axvline(0, color="#999999", lw=0.8)
        ax2.set_xlabel("lag ms (video late > 0)")
        ax2.set_title("correlation by lag")
    return _save(fig, path)


def plot_identity(summary: dict, path: Path) -> Optional[Path]:
    """Per-frame identity SSIM of every measured video, with the gate's threshold."""
    recs = [r for r in summary["scenarios"] if (r.get("quality") or {}).get("series_identity")]
    if not recs:
        return None
    fig, ax = plt.subplots(figsize=(8, 3.2))
    for r in recs:
        s = r["quality"]["series_identity"]
        ax.plot(np.array(s["frames"]) / r["quality"]["fps"], s["ssim"], ".-", label=r["name"], lw=0.8)
    limit = (summary.get("gate") or {}).get("thresholds", {}).get("identity_ssim", {}).get("min")
    if limit is not None:
        ax.axhline(limit, color="#e45756", ls="--", lw=1, label=f"gate {limit}")
    ax.set_xlabel("seconds")
    ax.set_ylabel("SSIM vs portrait")
    ax.legend(fontsize=7)
    ax.set_title("Identity preservation per frame")
    return _save(fig, path)


def make_plots(summary: dict, out_dir: Path) -> list[Path]:
    """Write every applicable PNG into out_dir; returns their paths in display order."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = [plot_latency(summary, out_dir / "latency.png"), plot_stages(summary, out_dir / "stages.png"),
             plot_concurrency(summary, out_dir / "concurrency.png")]
    for rec in summary["scenarios"]:
        if rec.get("quality"):
            paths.append(plot_sync(rec, out_dir / f"sync_{rec['name'].replace('/', '_')}.png"))
    paths.append(plot_identity(summary, out_dir / "identity.png"))
    return [p for p in paths if p is not None]


# -- HTML ---------------------------------------------------------------------------------------
def _table(head: list[str], rows: list[list[str]]) -> str:
    th = "".join(f"<th>{html.escape(h)}</th>" for h in head)
    body = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><thead><tr>{th}</tr></thead><tbody>{body}</tbody></table>"


def _img(path: Path) -> str:
    data = base64.b64encode(path.read_bytes()).decode()
    return f'<figure><img alt="{html.escape(path.stem)}" src="data:image/png;base64,{data}"></figure>'


def render_html(summary: dict, plots: list[Path]) -> str:
    """The report page; every image is inline, so the file stands alone."""
    esc = html.escape
    sp, mem, env = summary.get("speed", {}), summary.get("memory", {}), summary.get("environment", {})
    gate = summary.get("gate")
    parts = [f"<h1>Avatar stack evaluation: {esc(summary['suite'])} suite</h1>",
             f"<p>{esc(summary['created_at'])} &middot; device <b>{esc(str(env.get('device', 'unknown')))}</b> &middot; "
             f"runtime {esc(summary['runtime_url'])} &middot; GPU service {esc(summary['gpu_url'])} &middot; "
             f"{summary.get('wall_s', 0):.0f} s</p>"]
    if gate:
        verdict = "PASSED" if gate["passed"] else "FAILED"
        parts.append(f'<h2>Quality gate: <span class="{verdict.lower()}">{verdict}</span></h2>')
        if gate["misses"]:
            parts.append("<ul>" + "".join(f"<li>{esc(m['text'])}</li>" for m in gate["misses"]) + "</ul>")
    parts.append("<h2>Speed</h2>")
    rows = [[esc(label), fmt(sp.get(key), spec)] for key, label, spec in SPEED_ROWS]
    for n, v in (sp.get("throughput_by_clients") or {}).items():
        rows.append([f"Throughput with {esc(n)} client(s)", fmt(v, "{:.2f}")])
    rows.append(["Jobs (failed)", f"{sp.get('jobs', 0)} ({sp.get('failed_jobs', 0)})"])
    parts.append(_table(["figure", "value"], rows))
    if sp.get("first_frame_note"):
        parts.append(f"<p class=note>{esc(sp['first_frame_note'])}</p>")
    parts.append("<h2>Peak memory</h2>")
    parts.append(_table(["service", "peak", "source"], [
        [esc(name), fmt(m.get("peak_mb"), "{:.0f} MiB"), esc(m.get("source", "unknown"))] for name, m in mem.items()]))
    parts.append("<h2>Quality per video</h2>")
    qrows = []
    for r in summary["scenarios"]:
        q = r.get("quality")
        if q:
            qrows.append([esc(r["name"])] + [fmt(q.get(k), spec) for k, _, spec in QUALITY_COLUMNS]
                         + [esc("; ".join(q.get("notes", [])))])
    parts.append(_table(["scenario"] + [label for _, label, _ in QUALITY_COLUMNS] + ["notes"], qrows)
                 if qrows else "<p>No video was measured.</p>")
    parts.append("<h2>Scenarios</h2>")
    parts.append(_table(["scenario", "kind", "status", "wall s", "reason / notes"], [
        [esc(r["name"]), esc(r["kind"]), f'<span class="{esc(r["status"])}">{esc(r["status"])}</span>',
         fmt(r.get("wall_s"), "{:.1f}"), esc(r.get("reason") or "; ".join(r.get("notes", [])))]
        for r in summary["scenarios"]]))
    parts.append("<h2>Plots</h2>" + "".join(_img(p) for p in plots))
    style = ("body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;color:#222}"
             "table{border-collapse:collapse;margin:.5em 0 1.5em}td,th{border:1px solid #ccc;padding:.25em .6em;"
             "font-size:.9em;text-align:left}th{background:#f3f3f3}img{max-width:100%}.passed,.ok{color:#2a7}"
             ".failed{color:#c33}.skipped{color:#a70}.note{color:#666;font-size:.9em}")
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>Evaluation {esc(summary['created_at'])}"
            f"</title><style>{style}</style></head><body>{''.join(parts)}</body></html>")


def write_report(summary: dict, out_dir: Path) -> Path:
    """Write the PNGs and report.html into out_dir; returns the HTML path."""
    out_dir = Path(out_dir)
    plots = make_plots(summary, out_dir)
    path = out_dir / "report.html"
    path.write_text(render_html(summary, plots), encoding="utf-8")
    log.info("report written", extra={"path": str(path), "plots": len(plots)})
    return path


def markdown_summary(summary: dict) -> str:
    """Headline figures as Markdown tables (speed, memory, quality per video, gate)."""
    sp, env = summary.get("speed", {}), summary.get("environment", {})
    lines = [f"Evaluation, {summary['suite']} suite, device {env.get('device', 'unknown')}, {summary['created_at']}", "",
             "| figure | value |", "|---|---|"]
    for key, label, spec in SPEED_ROWS:
        if sp.get(key) is not None:
            lines.append(f"| {label} | {fmt(sp.get(key), spec)} |")
    for n, v in (sp.get("throughput_by_clients") or {}).items():
        lines.append(f"| Throughput with {n} client(s) | {fmt(v, '{:.2f}')} |")
    for name, m in summary.get("memory", {}).items():
        lines.append(f"| Peak memory, {name} | {fmt(m.get('peak_mb'), '{:.0f} MiB')} |")
    lines += ["", "| scenario | " + " | ".join(label for _, label, _ in QUALITY_COLUMNS) + " |",
              "|---" * (len(QUALITY_COLUMNS) + 1) + "|"]
    for r in summary["scenarios"]:
        if r.get("quality"):
            q = r["quality"]
            lines.append(f"| {r['name']} | " + " | ".join(fmt(q.get(k), s) for k, _, s in QUALITY_COLUMNS) + " |")
    skipped = [r for r in summary["scenarios"] if r["status"] != "ok"]
    if skipped:
        lines.append("")
        lines += [f"- {r['name']}: {r['status']} ({r.get('reason')})" for r in skipped]
    gate = summary.get("gate")
    if gate:
        lines += ["", f"Quality gate: {'passed' if gate['passed'] else 'failed'}"]
        lines += [f"- {m['text']}" for m in gate["misses"]]
    return "\n".join(lines) + "\n"
