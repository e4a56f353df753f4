"""The make-style pipeline's pure parts: stage stamps (stamps.py) and qualification suites (suite.py)."""
