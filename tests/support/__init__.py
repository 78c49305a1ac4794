"""Helpers shared by the test suite: real services, subprocesses and readiness probes."""
