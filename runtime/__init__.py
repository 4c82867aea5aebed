"""The runtime: the public API (text in, talking-avatar MP4 out), jobs, and the GPU-service client.

It never imports torch or the GPU service; it speaks to the GPU service over HTTP with the
shared `avatar_contracts`.
"""
