"""The GPU service: speech, talking-head video and lip-sync engines behind one HTTP API."""

import os

# NumPy's per-frame products here are small (a frame's mode weights times its fields, pixels times
# luminance weights): OpenBLAS's worker threads gain nothing on them and spin between calls, taking a
# core from ffmpeg and the engines' own threads. Measured on 2 cores: lip-sync at 720p spent about 8 ms
# of CPU a frame in that spinning; the talking head's render at 512x512 took 1.05 ms of CPU a frame with
# one thread against 1.4-2.0 with two, and ran faster. OpenBLAS reads this when it loads, so it applies
# where this package is imported before NumPy (the service and its benchmarks); set it to override.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
