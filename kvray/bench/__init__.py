"""Benchmarks that print their figures: `kvray bench generate`, ..."""
