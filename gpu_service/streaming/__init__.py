"""Real-time streaming sessions: gpu_service/streaming/ (see PROJECT_SPEC.md, "Streaming")."""
