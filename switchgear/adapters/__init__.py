"""Upstream protocol adapters, one module per protocol, behind `base.Adapter`."""

from __future__ import annotations

from switchgear.adapters.base import Adapter
from switchgear.adapters.openai import OpenAIAdapter


def builtin_adapters() -> dict[str, Adapter]:
    """A fresh protocol-name → adapter mapping of the adapters shipped with Switchgear."""
    return {OpenAIAdapter.protocol: OpenAIAdapter()}
