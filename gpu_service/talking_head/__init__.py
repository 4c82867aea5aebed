"""Talking head: one portrait and speech in, a talking face out."""
