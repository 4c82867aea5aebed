"""Evaluator: measures rendered talking-head videos (no torch, no gpu_service imports)."""
