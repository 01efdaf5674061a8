"""Benchmarks: ``clipping`` (ghost clipping against non-private and Opacus) and ``batches`` (length-sorted
physical batches)."""
