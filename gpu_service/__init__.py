"""The GPU service: speech, talking-head video and lip-sync engines behind one HTTP API."""
