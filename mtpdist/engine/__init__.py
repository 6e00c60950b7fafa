"""Decoding: sampling, the speculative loop, and text-level generation."""
