"""The HTML/Markdown reports, from summaries measured on real rendered video (tests/evaluator/real_summaries.py)."""

from __future__ import annotations

import re

import pytest

from evaluator.report import fmt, markdown_summary, write_report
from tests.evaluator.real_summaries import SHIFT_S, summary


@pytest.fixture(scope="module")
def render_dir(tmp_path_factory):
    """One shared render folder, so the CLI and report tests render the video once per session."""
    return str(tmp_path_factory.getbasetemp() / "eval_render")


@pytest.fixture(scope="module")
def good(render_dir):
    import os

    os.makedirs(render_dir, exist_ok=True)
    return summary(render_dir, "good")


@pytest.fixture(scope="module")
def late(render_dir, good):
    return summary(render_dir, "late")


def test_measured_summaries_see_the_audio_shift(good, late):
    q_good, q_late = good["scenarios"][0]["quality"], late["scenarios"][0]["quality"]
    assert q_good["face_found_share"] == 1.0 and q_good["frames"] > 50
    assert abs(q_good["av_offset_ms"]) <= 40, q_good["av_offset_ms"]
    # Audio 120 ms later = video early = a negative lag of about three frames.
    assert q_late["av_offset_ms"] == pytest.approx(-1000 * SHIFT_S, abs=40), q_late["av_offset_ms"]
    assert late["quality"]["abs_av_offset_ms"] > good["quality"]["abs_av_offset_ms"]
    speed = good["speed"]
    assert speed["jobs"] == 1 and speed["failure_rate"] == 0.0
    assert speed["latency_p50_s"] == speed["latency_p99_s"] > 0
    assert set(speed["stage_share"]) >= {"tts", "video"} and sum(speed["stage_share"].values()) == pytest.approx(1.0)
    assert good["memory"]["evaluator"]["peak_mb"] > 50  # this very process, from /proc VmHWM


def test_html_report_is_self_contained_with_the_pngs_beside_it(good, tmp_path):
    page = write_report(good, tmp_path)
    html = page.read_text()
    pngs = sorted(tmp_path.glob("*.png"))
    names = {p.name for p in pngs}
    assert {"latency.png", "stages.png", "identity.png", "sync_short_custom_warm.png"} <= names, names
    for p in pngs:
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and p.stat().st_size > 2000
    inline = re.findall(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', html)
    assert len(inline) == len(pngs)
    assert not re.search(r'src="(?!data:)', html), "the page must not reference external files"
    q = good["scenarios"][0]["quality"]
    assert fmt(q["identity_ssim"], "{:.3f}") in html and fmt(q["lip_audio_corr"], "{:.3f}") in html
    assert "POST /lipsync/generate is not served here" in html  # skipped scenario keeps its reason


def test_markdown_summary_has_speed_memory_and_quality_rows(good):
    md = markdown_summary(good)
    assert "| End-to-end latency p50 | " + fmt(good["speed"]["latency_p50_s"], "{:.2f} s") + " |" in md
    assert "| Peak memory, evaluator |" in md
    row = next(line for line in md.splitlines() if line.startswith("| short/custom/warm |"))
    assert fmt(good["scenarios"][0]["quality"]["av_offset_ms"], "{:+.0f}") in row
    assert "- lipsync: skipped" in md
