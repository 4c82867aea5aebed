"""Speech: text in, audio with phoneme timings out (Piper, optionally XTTS-v2)."""
