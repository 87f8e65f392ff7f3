"""Metrics, traces and health of the server process (README, "Observability")."""
