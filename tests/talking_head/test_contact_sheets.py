"""scripts/contact_sheet.py and scripts/contact_sheets_kit.py: which frames they pick, and a real run on the fixtures."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from gpu_service.talking_head.controls import Controls

ROOT = Path(__file__).resolve().parents[2]
FIXTURES = ROOT / "tests" / "fixtures" / "media"


def _script(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # the kit script imports contact_sheet by name
    spec.loader.exec_module(module)
    return module


cs = _script("contact_sheet")


def _clip(opening: list[float], phones: list[tuple[str, float, float]], fps: float = 10.0):
    ctl = Controls.neutral(len(opening), fps)
    ctl.mouth_open[:] = np.asarray(opening, np.float32)
    return cs.Clip(np.zeros((len(opening), 4, 4, 3), np.uint8), ctl, phones, len(opening) / fps)


def test_closure_prefers_a_bilabial_after_an_opening_over_the_seal_from_rest():
    # Frames at 10 fps, centres 0.05, 0.15, ...: "b" at frame 0 (from rest), "m" at frame 5 after an opening.
    phones = [("b", 0.0, 0.1), ("ɑ", 0.1, 0.5), ("m", 0.5, 0.6), ("ɑ", 0.6, 0.8)]
    clip = _clip([0.0, 0.2, 0.3, 0.3, 0.2, 0.05, 0.2, 0.3], phones)
    assert cs.closure(clip) == 5
    assert cs.widest(clip) == 2
    assert cs.phone_at(phones, 0.55) == "m" and cs.phone_at(phones, 0.95) == ""


def test_closure_without_bilabials_is_the_most_closed_frame_inside_speech():
    phones = [("_", 0.0, 0.2), ("ɑ", 0.2, 0.4), ("t", 0.4, 0.5), ("ɑ", 0.5, 0.8), ("_", 0.8, 1.0)]
    clip = _clip([0.0, 0.0, 0.3, 0.2, 0.1, 0.25, 0.3, 0.2, 0.0, 0.0], phones)
    assert cs.closure(clip) == 4  # not the silent frames 0-1 or 8-9


def test_strip_wraps_onto_lines_with_equal_counts():
    tiles = [np.zeros((10, 100, 3), np.uint8)] * 8
    row = cs.strip(tiles, gap=0, max_width=700)
    assert row.shape[:2] == (20, 400)  # two lines of 4, not 7 and a lone 1
    assert cs.strip(tiles, gap=0, max_width=10**6).shape[:2] == (10, 800)


def test_kit_run_on_the_fixtures_writes_sheets_overview_and_summary(tmp_path):
    from gpu_service.speech import alignment

    if not alignment.available():
        pytest.skip("pocketsphinx is not installed: the real clip would not be force-aligned")
    kit = _script("contact_sheets_kit")
    kit.main(["--kit", str(FIXTURES), "--only", "p01", "--clip", "a03", "--seconds", "1.6", "--run", "3",
              "--out", str(tmp_path)])
    summary = json.loads((tmp_path / "summary.json").read_text(encoding="utf-8"))
    assert [(s["take"], s["timing_source"]) for s in summary] == [
        ("piper", "piper"), ("a03_cmu_goforward_male", "forced_alignment")]
    for s in summary:
        assert s["frames"] == 40 and s["size"] == [360, 288]
        assert 0 <= s["closure"]["frame"] < 40 and s["widest"]["open"] > s["closure"]["open"]
        sheet = Image.open(tmp_path / s["sheet"])
        assert sheet.mode == "RGB" and sheet.width > 360 and sheet.height > 288
    assert summary[0]["closure"]["phone"] in ("m", "b", "p")  # "Bob, my mother ..." seals within 1.6 s
    overview = Image.open(tmp_path / "overview.png")
    assert overview.width >= 5 * kit.TILE  # the input mouth, then widest and closed for both takes
    with pytest.raises(SystemExit, match="inside the repository"):
        kit.main(["--kit", str(FIXTURES), "--only", "p01", "--clip", "a03", "--out", str(ROOT / "sheets_here")])
