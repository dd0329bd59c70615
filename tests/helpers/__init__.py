"""Helpers shared by test modules (no test imports another test module)."""
