"""An emulator of Unstructured's partition API: `POST /general/v0/general`.

Multipart form: one or more `files` parts plus form fields (`strategy`: auto | fast | hi_res
| ocr_only, `languages` repeated, `coordinates`, `encoding`, `unique_element_ids`, ...).
The answer is a JSON list of elements `{"type", "element_id", "text", "metadata":
{"filename", "filetype", "languages", "page_number", "parent_id"?}}` like the real API's.

Partitioning is a small faithful subset of `unstructured`'s own rules, for text-like files:
text/markdown (paragraphs by blank lines; a short line without end punctuation is a Title,
"- "/"* "/"1." lines are ListItems, else NarrativeText; markdown "#" headings are Titles)
and HTML (h1–h6 Title, li ListItem, p NarrativeText). Other types answer 400 `{"detail":
"File type ... is not supported."}` as the real API does for types it lacks extras for.
This emulator adds fault injection; `unstructured_server.py` serves the same API around the
real `unstructured` library (tests/test_real_unstructured.py).

Errors are FastAPI's `{"detail": ...}`: 400, 401 (`unstructured-api-key` when a key is
set), 422 (missing `files`, bad strategy), and the injected 429 / 5xx of `emulators.common`.
CLI: `switchgear emulate unstructured --port P [--api-key K]`.
"""

from __future__ import annotations

import argparse
import hashlib
import re
from html.parser import HTMLParser
from typing import Any, ClassVar

from aiohttp import web

from switchgear.emulators import common

STRATEGIES = ("auto", "fast", "hi_res", "ocr_only", "vlm")
_TEXT_TYPES = {".txt": "text/plain", ".md": "text/markdown", ".html": "text/html", ".htm": "text/html"}


def render(status: int, message: str, kind: str) -> web.Response:
    if kind == "auth":
        message = "API key is malformed, please type the API key correctly in the header."
    return common.json_response({"detail": message}, status)


def _auth_ok(request: web.Request) -> bool:
    expected = request.app[common.INSTANCE].spec.api_key
    return expected is None or request.headers.get("unstructured-api-key") == expected


def _element_id(filename: str, index: int, text: str) -> str:
    return hashlib.sha256(f"{filename}:{index}:{text}".encode()).hexdigest()[:32]


def classify_block(block: str) -> str:
    first = block.strip()
    if re.match(r"^(#{1,6}\s)", first):
        return "Title"
    if re.match(r"^([-*•]\s|\d+[.)]\s)", first):
        return "ListItem"
    if "\n" not in first and len(first.split()) <= 10 and not re.search(r"[.!?:;,]$", first):
        return "Title"
    return "NarrativeText"


def partition_text(text: str) -> list[tuple[str, str]]:
    """(type, text) per element of a plain-text or markdown document."""
    out: list[tuple[str, str]] = []
    for block in re.split(r"\n\s*\n", text):
        block = block.strip()
        if not block:
            continue
        lines = block.splitlines()
        if all(re.match(r"^([-*•]\s|\d+[.)]\s)", ln.strip()) for ln in lines) and len(lines) > 1:
            out.extend(("ListItem", re.sub(r"^([-*•]\s|\d+[.)]\s)", "", ln.strip())) for ln in lines)
            continue
        kind = classify_block(block)
        clean = re.sub(r"^#{1,6}\s+", "", block) if kind == "Title" else block
        clean = re.sub(r"^([-*•]\s|\d+[.)]\s)", "", clean) if kind == "ListItem" else clean
        out.append((kind, " ".join(clean.split())))
    return out


class _Html(HTMLParser):
    TAGS: ClassVar[dict[str, str]] = {
        "h1": "Title",
        "h2": "Title",
        "h3": "Title",
        "h4": "Title",
        "h5": "Title",
        "h6": "Title",
        "p": "NarrativeText",
        "li": "ListItem",
        "td": "Text",
    }

    def __init__(self) -> None:
        super().__init__()
        self.elements: list[tuple[str, str]] = []
        self._kind: str | None = None
        self._text: list[str] = []

    def handle_starttag(self, tag: str, attrs: Any) -> None:
        if tag in self.TAGS:
            self._kind, self._text = self.TAGS[tag], []

    def handle_endtag(self, tag: str) -> None:
        if tag in self.TAGS and self._kind is not None:
            text = " ".join("".join(self._text).split())
            if text:
                self.elements.append((self._kind, text))
            self._kind = None

    def handle_data(self, data: str) -> None:
        if self._kind is not None:
            self._text.append(data)


def partition(filename: str, content: bytes, encoding: str) -> list[tuple[str, str]] | None:
    """Elements of a supported document; None for an unsupported type."""
    suffix = "." + filename.rsplit(".", 1)[-1].lower() if "." in filename else ".txt"
    if suffix not in _TEXT_TYPES:
        return None
    text = content.decode(encoding or "utf-8", "replace")
    if _TEXT_TYPES[suffix] == "text/html":
        parser = _Html()
        parser.feed(text)
        return parser.elements
    return partition_text(text)


async def general(request: web.Request) -> web.StreamResponse:
    if not request.content_type.startswith("multipart/"):
        return render(422, "There was an error parsing the body: expected multipart/form-data", "invalid")
    form = await request.post()
    files = [f for f in form.getall("files", []) if isinstance(f, web.FileField)]
    if not files:
        return common.json_response(
            {"detail": [{"type": "missing", "loc": ["body", "files"], "msg": "Field required"}]}, 422
        )
    strategy = str(form.get("strategy", "auto"))
    if strategy not in STRATEGIES:
        return render(422, f"Invalid strategy {strategy!r}: must be one of {', '.join(STRATEGIES)}", "invalid")
    languages = [str(v) for v in form.getall("languages", [])] or ["eng"]
    encoding = str(form.get("encoding", "utf-8"))
    elements: list[dict[str, Any]] = []
    for upload in files:
        name = upload.filename or "document"
        parts = partition(name, upload.file.read(), encoding)
        if parts is None:
            return render(400, f"File type {upload.content_type} is not supported.", "invalid")
        filetype = _TEXT_TYPES.get("." + name.rsplit(".", 1)[-1].lower(), "text/plain")
        parent: str | None = None
        for i, (kind, text) in enumerate(parts):
            element_id = _element_id(name, i, text)
            metadata: dict[str, Any] = {
                "filename": name,
                "filetype": filetype,
                "languages": languages,
                "page_number": 1,
            }
            if kind != "Title" and parent:
                metadata["parent_id"] = parent
            if kind == "Title":
                parent = element_id
            elements.append({"type": kind, "element_id": element_id, "text": text, "metadata": metadata})
    return common.json_response(elements)


async def healthcheck(request: web.Request) -> web.StreamResponse:
    return common.json_response({"healthcheck": "HEALTHCHECK STATUS: EVERYTHING OK!"})


def build_app(
    api_key: str | None = None, *, latency_ms: float = 0.0, faults: common.Faults | None = None
) -> web.Application:
    spec = common.InstanceSpec(
        name="unstructured", api_key=api_key, latency_ms=latency_ms, faults=faults or common.Faults()
    )
    app = common.new_app(spec, [common.gated(render, _auth_ok)])
    app.router.add_post("/general/v0/general", general)
    app.router.add_get("/healthcheck", healthcheck)
    return app


async def start(api_key: str | None = None, **kwargs: Any) -> common.Running:
    return await common.run_app(build_app(api_key, **kwargs))


def _build(args: argparse.Namespace) -> web.Application:
    return build_app(args.api_key, latency_ms=args.latency_ms)


main = common.cli("unstructured", _build)
