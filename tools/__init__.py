"""Helpers for operators and tests: starting lhfs processes, waiting on conditions."""
