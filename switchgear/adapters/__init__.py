"""Upstream protocol adapters, one module per protocol, behind `base.Adapter`.

| protocol | module | methods |
| --- | --- | --- |
| openai (OpenAI, vLLM, llama.cpp, Ollama) | openai | chat.completions (streams), embeddings |
| anthropic | anthropic | messages, chat.completions (both stream) |
| unstructured | unstructured | partition |
| graphrag | graphrag | query, index, index.status, health |
| chroma | chroma | heartbeat, collections.{create,list,get,delete}, add, upsert, update, query, get, delete, count |
| pinecone | pinecone | describe_index, upsert, query, fetch, delete, describe_index_stats |
| http_json | http_json | request |
"""

from __future__ import annotations

from switchgear.adapters.anthropic import AnthropicAdapter
from switchgear.adapters.base import Adapter
from switchgear.adapters.chroma import ChromaAdapter
from switchgear.adapters.graphrag import GraphRAGAdapter
from switchgear.adapters.http_json import HttpJsonAdapter
from switchgear.adapters.openai import OpenAIAdapter
from switchgear.adapters.pinecone import PineconeAdapter
from switchgear.adapters.unstructured import UnstructuredAdapter


def builtin_adapters() -> dict[str, Adapter]:
    """A fresh protocol-name → adapter mapping of the adapters shipped with Switchgear."""
    adapters: list[Adapter] = [
        OpenAIAdapter(),
        AnthropicAdapter(),
        UnstructuredAdapter(),
        GraphRAGAdapter(),
        ChromaAdapter(),
        PineconeAdapter(),
        HttpJsonAdapter(),
    ]
    return {adapter.protocol: adapter for adapter in adapters}
