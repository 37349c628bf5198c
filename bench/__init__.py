"""Benchmarks that print figures: `bench/train.py` (training), `bench/serve.py` (serving)."""
