"""Switchgear: one place through which an AI application calls every external service."""

__version__ = "0.1.0"
