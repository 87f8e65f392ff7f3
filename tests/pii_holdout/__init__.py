"""Held-out PII/secret corpus (README.md here); generate.py writes and checks it."""
