"""Pieces of scripts/bench_convert.py: synthetic full-width checkpoints, measurements, the report."""
