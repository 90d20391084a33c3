"""Reproductions of published claims and tables, one subpackage per study (see README.md)."""
