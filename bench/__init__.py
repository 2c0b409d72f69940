"""convsync's throughput benchmark: ``python -m bench`` (see bench/README.md)."""
