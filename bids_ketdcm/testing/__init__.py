"""Test-data generators (synthetic datasets, simulation experiments); never imported by the runtime."""
