"""Shared helpers for the test suite (tiny models, host-tier utilities)."""
