"""What a suite measures: the scenarios of `quick` and `full`, and the texts they speak.

A scenario is a plain description; evaluator.runner executes it. Which scenarios can run is
decided at run time from the services themselves (engines listed by GPU /health, presets
listed by GET /avatars), so a suite adapts to the stack it is pointed at.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Optional

# Bilabials (m, b, p), open vowels and a pause in each, so every quality figure has material.
SHORT = "Please bring me the map of the moon."
MEDIUM = ("Maybe we should meet by the pool at noon. "
          "Bring a map, a pen and some paper, and we will plan the trip together.")
LONG = ("Public libraries began as small rooms of books that members paid to borrow. "
        "Over the years they became places where anybody may read, study, or simply sit and think. "
        "Many people remember the first book they borrowed, and the patient librarian who helped them find it. "
        "Today a library lends music, films and even tools, and it teaches people how to use computers. "
        "Some libraries open early in the morning and close late at night, so that people who work "
        "long hours may still come. Maybe the best thing about a library is that it belongs to everybody.")
# Re-voicing speaks a sentence other than the clip's own, so the mouth must change.
LIPSYNC_SOURCE = "Bring me the blue paper, please."
LIPSYNC_NEW = "Maybe a bit more of the warm soup."

SUITES = ("quick", "full")
Kind = Literal["runtime", "video", "concurrency", "stream", "lipsync", "avatar_encode"]


@dataclass
class Scenario:
    """One measured situation; `params` are what the runner needs for its kind."""

    name: str
    kind: Kind
    params: dict = field(default_factory=dict)
    runs: int = 1
    analyse: bool = False
    """Measure the quality of the first run's video (MediaPipe on every frame)."""

    def steps(self) -> int:
        """Units of work for the progress bar."""
        if self.kind == "concurrency":
            return sum(self.params["levels"])
        return self.runs


def build(suite: str, tts_engines: list[str], default_engine: Optional[str], presets: list[str],
          unavailable: Optional[dict[str, str]] = None) -> list[Scenario]:
    """The scenarios of a suite for the engines and presets this stack has."""
    if suite not in SUITES:
        raise ValueError(f"unknown suite {suite!r}; choose one of {', '.join(SUITES)}")
    full = suite == "full"
    runs = 3 if full else 1
    out = [
        # Cold: the first use of a portrait the GPU service has never seen (encoding included).
        Scenario("short/custom/cold", "runtime", {"text": SHORT, "avatar": "custom"}, 1, analyse=True),
        Scenario("short/custom/warm", "runtime", {"text": SHORT, "avatar": "custom"}, runs, analyse=True),
        Scenario("medium/custom/warm", "runtime", {"text": MEDIUM, "avatar": "custom"}, runs, analyse=True),
    ]
    # The talking head alone, fed the exact phoneme timings of its speech: quality without the
    # uncertainty of re-synthesised timings, and the GPU side's own render speed and first frame.
    out.append(Scenario("video/direct", "video", {"text": MEDIUM, "engine": default_engine}, 1, analyse=True))
    if full:
        out.append(Scenario("long/custom/warm", "runtime", {"text": LONG, "avatar": "custom"}, 1, analyse=True))
    if presets:
        out.append(Scenario("short/preset", "runtime", {"text": SHORT, "avatar": "preset", "avatar_id": presets[0]},
                            runs, analyse=True))
    else:
        out.append(Scenario("short/preset", "runtime", {"skip": "the GPU service lists no preset avatars"}))
    for engine in tts_engines:
        out.append(Scenario(f"engine/{engine}", "runtime", {"text": MEDIUM if full else SHORT, "avatar": "custom",
                                                             "engine": engine}, 1, analyse=True))
        out.append(Scenario(f"stream/{engine}", "stream", {"text": MEDIUM, "engine": engine}, runs))
    for engine, why in sorted((unavailable or {}).items()):
        out.append(Scenario(f"engine/{engine}", "runtime", {"skip": f"speech engine {engine} unavailable: {why}"}))
    out.append(Scenario("avatar/encode", "avatar_encode", {}, 1))
    out.append(Scenario("concurrency", "concurrency", {"text": SHORT, "avatar": "custom",
                                                       "levels": [1, 2, 4, 8] if full else [1, 2]}))
    out.append(Scenario("lipsync", "lipsync", {"source_text": LIPSYNC_SOURCE, "new_text": LIPSYNC_NEW,
                                               "engine": default_engine}, 1, analyse=True))
    return out
