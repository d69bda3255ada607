"""Benchmarks: speed, FLOPs, MFU, boundary-evaluation speed (README.md here). The library never
imports this package."""
