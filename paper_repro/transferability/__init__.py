"""Choosing what to transfer and what to train together, checked against runs (see README.md)."""
