"""Emotions a viewer can read, measured by MediaPipe on a real portrait (the kit's p05, with glasses).

Each emotion is driven as a request would drive it (driving.drive), its first frame rendered on
p05 and measured against the neutral frame, in face heights (landmarks 10-152):

- brows: the brows' mean height above the eye corners (the corners stay where the lids move);
- eyes: the mean of three upper/lower lid pairs per eye (the eye's opening);
- corners: the mouth corners' height above the inner lips' centre.

Each emotion must move what it shows by a visible amount, VISIBLE = 0.005 face heights (1 px on
this 201 px face), and not move it the other way. Eye widening is held to WIDER: the lid's warp can
raise the lid by a third of the eye's opening before the iris reads stretched (renderer.EYE_WIDEN),
which MediaPipe reads as 0.004 here.
"""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from gpu_service.talking_head import landmarks as L
from gpu_service.talking_head.driving import EMOTIONS, drive
from gpu_service.talking_head.encoding import encode_image
from gpu_service.talking_head.renderer import Renderer
from tests.helpers import REPO

PORTRAIT = REPO / "tests" / "fixtures" / "media" / "p05_glasses_older_woman_grace_hopper.jpg"
VISIBLE = 0.005
WIDER = 0.003
LID_PAIRS = ((160, 144), (159, 145), (158, 153), (385, 380), (386, 374), (387, 373))
EYE_CORNERS = (33, 133, 362, 263)
# What each emotion shows: +1 raises/widens, -1 lowers/narrows; absent: free.
SHOWS = {
    "happy": {"corners": +1, "eyes": -1},
    "sad": {"corners": -1, "brows": -1},
    "angry": {"brows": -1, "eyes": -1},
    "surprised": {"brows": +1, "eyes": +1},
    "fearful": {"brows": +1, "eyes": +1},
    "disgusted": {"brows": -1, "eyes": -1, "corners": -1},
}


def features(frame: np.ndarray) -> dict[str, float]:
    """Brow height, eye opening and mouth-corner height of the one face in an RGB frame, in face heights."""
    lm = L.detect_faces(frame)[0]
    fh = float(np.linalg.norm(lm[L.CHIN] - lm[L.FOREHEAD]))
    brows = lm[list(EYE_CORNERS), 1].mean() - lm[L.BROW_LEFT + L.BROW_RIGHT, 1].mean()
    eyes = np.mean([lm[lo, 1] - lm[up, 1] for up, lo in LID_PAIRS])
    corners = (lm[13, 1] + lm[14, 1]) / 2 - (lm[L.MOUTH_LEFT, 1] + lm[L.MOUTH_RIGHT, 1]) / 2
    return {"brows": float(brows) / fh, "eyes": float(eyes) / fh, "corners": float(corners) / fh}


@pytest.fixture(scope="module")
def measured() -> dict[str, dict[str, float]]:
    """Each emotion's features minus neutral's, from the first (unblinking) frame a request would get."""
    image = cv2.cvtColor(cv2.imread(str(PORTRAIT)), cv2.COLOR_BGR2RGB)
    enc = encode_image(image)
    renderer = Renderer("cpu")
    out = {}
    for emotion in EMOTIONS:
        ctl = drive(1.0, 25.0, emotion=emotion, head_motion=False).slice(0, 1)
        assert ctl.blink[0] == 0.0
        out[emotion] = features(renderer.render(enc, ctl, head_motion=False)[0])
    return {e: {k: v - out["neutral"][k] for k, v in f.items()} for e, f in out.items() if e != "neutral"}


@pytest.mark.parametrize("emotion", list(SHOWS))
def test_each_emotion_moves_what_shows_it_by_a_visible_amount(measured, emotion):
    moved = measured[emotion]
    for feature, sign in SHOWS[emotion].items():
        least = WIDER if (feature, sign) == ("eyes", +1) else VISIBLE
        assert sign * moved[feature] >= least, (emotion, feature, moved)


def test_emotions_are_told_apart_by_their_brows_and_eyes(measured):
    # Surprise and fear lift the brows, anger and disgust lower them; no two of those read the same.
    assert min(measured[e]["brows"] for e in ("surprised", "fearful")) > 0 > max(measured[e]["brows"] for e in ("angry", "disgusted"))
    assert min(measured[e]["eyes"] for e in ("surprised", "fearful")) > 0 > max(measured[e]["eyes"] for e in ("angry", "disgusted"))
    # A smile is the corners, not the brows.
    assert abs(measured["happy"]["brows"]) < measured["happy"]["corners"]
