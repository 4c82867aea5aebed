"""Lip-sync: re-voice an existing video with new speech, reusing the talking-head renderer."""
