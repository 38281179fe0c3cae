"""Agent overhead benchmark: see run.py and README.md."""
