"""The Endpoint Worker (``hpcgate control health``): probes, readiness, expiry, publishing."""
