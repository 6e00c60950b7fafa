"""Coordinator: the cluster session (discovery, placement, shards), benchmarks and the HTTP API."""
