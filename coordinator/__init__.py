"""Coordinator: discovery, placement, the pipeline trunk, and the HTTP API."""
