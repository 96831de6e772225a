"""Separation bounds eval: the clamp's per-token, expected damage and Cantelli firing bounds against held-out tokens."""
