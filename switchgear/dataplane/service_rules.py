"""What a service's config lets a request carry, checked before any upstream is called. Pure.

The seed's config describes its services with facts that are limits in all but name; the
config loader keeps them as service metadata, and this module enforces them on the agent:

- `max_file_size_bytes` (from `max_file_size: "50MB"`): the document — `payload.file.content_base64`
  decoded, or `payload.text` as UTF-8 — is at most this many bytes.
- `supported_formats` (`["pdf", "docx", ...]`): the document's name (`payload.file.name`, or
  `payload.filename` beside `text`) ends in one of them, case-blind; a bare `text` with no
  name is not a file and passes.
- `max_documents` (GraphRAG's `max_documents: 1000`): one call carries at most this many
  `payload.documents` (an `index` call); the agent cannot see what earlier calls indexed.
- `collections` (Chroma's `["documents", "chunks", "embeddings"]`): a call that names a
  collection (`payload.collection`, or `payload.name` for collections.create/get/delete) names
  one of these, exactly; `payload.collection_id` is refused (an id cannot be checked against
  names). collections.list and heartbeat name none and pass.

A broken rule is the caller's mistake: `RequestError` naming the payload field and the config
key (INVALID_ARGUMENT on gRPC, HTTP 400 on the front door), raised before any attempt, so it
counts against no endpoint, breaker or budget. Metadata the loader did not write (a service
registered through the Admin API with odd values) is ignored rather than guessed at.
"""

from __future__ import annotations

import posixpath
from collections.abc import Mapping
from typing import Any

from switchgear.dataplane.convert import RequestError
from switchgear.dataplane.snapshot import ServiceView

#: The config keys (metadata, as the file writes them) this module enforces.
ENFORCED = ("max_file_size", "supported_formats", "max_documents", "collections")

#: Methods that name a collection by `payload.name` rather than `payload.collection`.
_NAMED_BY_NAME = frozenset({"collections.create", "collections.get", "collections.delete"})


def check_request(service: ServiceView, method: str, payload: Mapping[str, Any]) -> None:
    """Raise RequestError when `payload` breaks a limit of `service`'s config (module docstring)."""
    metadata = service.metadata
    if not metadata:
        return
    limit = _int(metadata.get("max_file_size_bytes"))
    if limit is not None:
        _check_size(payload, limit, metadata.get("max_file_size", f"{limit}B"))
    formats = _listed(metadata.get("supported_formats"), lower=True)
    if formats:
        _check_format(payload, formats)
    most = _int(metadata.get("max_documents"))
    if most is not None:
        _check_documents(payload, most)
    collections = _listed(metadata.get("collections"))
    if collections:
        _check_collection(method, payload, collections)


def _int(text: str | None) -> int | None:
    return int(text) if text is not None and text.isdigit() else None


def _listed(text: str | None, lower: bool = False) -> frozenset[str]:
    """A comma-joined metadata list (the loader joins YAML lists with ","). Formats compare
    case-blind (".PDF" is a pdf); collection names exactly, as Chroma does."""
    items = (item.strip() for item in (text or "").split(","))
    return frozenset(item.lower() if lower else item for item in items if item)


def document_size(payload: Mapping[str, Any]) -> tuple[str, int] | None:
    """(payload field, bytes) of the document a call carries, or None. Base64 is measured
    without decoding: 3 bytes per 4 characters, less the padding."""
    file = payload.get("file")
    if isinstance(file, Mapping):
        encoded = file.get("content_base64")
        if isinstance(encoded, str):
            data = encoded.strip()
            return "payload.file.content_base64", len(data) * 3 // 4 - (len(data) - len(data.rstrip("=")))
    text = payload.get("text")
    if isinstance(text, str):
        return "payload.text", len(text.encode("utf-8", "surrogatepass"))
    return None


def _check_size(payload: Mapping[str, Any], limit: int, written: str) -> None:
    measured = document_size(payload)
    if measured is not None and measured[1] > limit:
        field, size = measured
        raise RequestError(field, f"the document is {size} bytes; this service's max_file_size is {written} "
                                  f"({limit} bytes)")


def _check_format(payload: Mapping[str, Any], formats: frozenset[str]) -> None:
    file = payload.get("file")
    name: Any
    if isinstance(file, Mapping):
        field, name = "payload.file.name", file.get("name")
    elif "filename" in payload:
        field, name = "payload.filename", payload.get("filename")
    else:
        return  # no named document: a bare text, or a payload the adapter will refuse itself
    extension = posixpath.splitext(str(name or "").lower())[1].lstrip(".")
    if extension not in formats:
        shown = f"{extension!r}" if extension else "no extension"
        raise RequestError(field, f"format {shown} is not among this service's supported_formats "
                                  f"({', '.join(sorted(formats))})")


def _check_documents(payload: Mapping[str, Any], most: int) -> None:
    documents = payload.get("documents")
    if isinstance(documents, list) and len(documents) > most:
        raise RequestError("payload.documents", f"{len(documents)} documents in one call; this service's "
                                                f"max_documents is {most}")


def _check_collection(method: str, payload: Mapping[str, Any], allowed: frozenset[str]) -> None:
    if "collection_id" in payload:
        raise RequestError("payload.collection_id", "this service allows only the collections "
                           f"{', '.join(sorted(allowed))} (its config's collections); name one in "
                           "payload.collection, an id cannot be checked against them")
    field = "payload.name" if method in _NAMED_BY_NAME else "payload.collection"
    name = payload.get(field.rsplit(".", 1)[1])
    if isinstance(name, str) and name not in allowed:
        raise RequestError(field, f"collection {name[:64]!r} is not among this service's collections "
                                  f"({', '.join(sorted(allowed))})")
