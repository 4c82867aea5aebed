"""Talking-head metrics from frames and audio: face measurements, A/V sync, phoneme agreement, identity, stability.

Pure numpy/scipy/opencv/mediapipe/scikit-image; never imports torch or gpu_service, so the
evaluator's slim image can run it.
"""
