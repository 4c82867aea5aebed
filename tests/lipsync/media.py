"""Real media for the lip-sync tests: talking clips rendered by this project's own talking head."""

from __future__ import annotations

import subprocess
from pathlib import Path

import cv2
import numpy as np

from gpu_service.talking_head.video import encode_mp4, ffmpeg_exe

SENTENCE_A = "Please bring the big map to the harbour before noon."
SENTENCE_B = "Wow, all of you look so happy today, open up and say aah!"


def astronaut_portrait(size: int = 320) -> np.ndarray:
    """skimage's astronaut cropped around her face and resized to size x size (face about 40% of the width)."""
    from skimage import data

    img = data.astronaut()
    crop = img[10:250, 105:345]  # a square around the face (box about x 179-271, y 71-178 at 512 px)
    return cv2.resize(crop, (size, size), interpolation=cv2.INTER_AREA)


def speak(piper, text: str):
    """Piper speech for text: (audio float32, sample rate, phoneme tuples)."""
    from gpu_service.speech.protocol import SpeechRequest

    res = piper.synthesize(SpeechRequest(text=text))
    return res.audio, res.sample_rate, [(p.phoneme, p.start_s, p.end_s) for p in res.phonemes]


def talking_clip(piper, text: str, path: Path, size: int = 320, fps: int = 25, portrait=None) -> dict:
    """Render the astronaut saying `text` with the talking head (no head motion), H.264 + AAC, to `path`."""
    from gpu_service.talking_head.driving import drive
    from gpu_service.talking_head.encoding import encode_image
    from gpu_service.talking_head.renderer import Renderer

    image = astronaut_portrait(size) if portrait is None else portrait
    audio, sr, phones = speak(piper, text)
    enc = encode_image(image)
    controls = drive(len(audio) / sr, fps, phonemes=phones, audio=audio, sample_rate=sr, head_motion=False)
    frames = Renderer("cpu").frames(enc, controls, head_motion=False)
    data, facts = encode_mp4(frames, fps, (image.shape[1], image.shape[0]), audio=audio, sample_rate=sr)
    path.write_bytes(data)
    return {"audio": audio, "sample_rate": sr, "phonemes": phones, "frames": facts["frames"], "controls": controls}


def transcode(src: Path, dst: Path, *args: str) -> Path:
    """Run ffmpeg src -> dst with extra output args (e.g. a codec), raising on failure."""
    subprocess.run([ffmpeg_exe(), "-hide_banner", "-loglevel", "error", "-y", "-i", str(src), *args, str(dst)],
                   check=True, capture_output=True)
    return dst
