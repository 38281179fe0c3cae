"""The Unstructured adapter against the real `unstructured` library behind its partition API
(switchgear/emulators/unstructured_server.py, in .venv-unstructured from `make upstreams`)."""

from __future__ import annotations

import base64
import io
import zipfile
from collections.abc import AsyncIterator, Iterator

import httpx
import orjson
import pytest

from switchgear.adapters.base import AdapterRequest, ErrorKind, Target, UpstreamError
from switchgear.adapters.transport import pooled_client
from switchgear.adapters.unstructured import UnstructuredAdapter, parse_options
from switchgear.emulators.real import RealServer, start_unstructured

pytestmark = pytest.mark.timeout(180)
KEY = "unstructured-test-key"
TEXT = "Quarterly Report\n\nRevenue grew by ten percent this quarter.\n\n- first point\n- second point\n"


def minimal_docx(paragraphs: list[tuple[str, str]]) -> bytes:
    """A Word file with (style, text) paragraphs, built from its XML parts."""
    ns = 'xmlns:w="http://schemas.openxmlformats.org/wordprocessingml/2006/main"'
    body = "".join(
        f'<w:p><w:pPr><w:pStyle w:val="{style}"/></w:pPr><w:r><w:t>{text}</w:t></w:r></w:p>'
        for style, text in paragraphs
    )
    files = {
        "[Content_Types].xml": '<?xml version="1.0"?><Types xmlns="http://schemas.openxmlformats.org/package/2006/content-types">'
        '<Default Extension="rels" ContentType="application/vnd.openxmlformats-package.relationships+xml"/>'
        '<Default Extension="xml" ContentType="application/xml"/>'
        '<Override PartName="/word/document.xml" '
        'ContentType="application/vnd.openxmlformats-officedocument.wordprocessingml.document.main+xml"/></Types>',
        "_rels/.rels": '<?xml version="1.0"?><Relationships xmlns="http://schemas.openxmlformats.org/package/2006/relationships">'
        '<Relationship Id="rId1" Type="http://schemas.openxmlformats.org/officeDocument/2006/relationships/officeDocument" '
        'Target="word/document.xml"/></Relationships>',
        "word/document.xml": f'<?xml version="1.0"?><w:document {ns}><w:body>{body}</w:body></w:document>',
    }
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for name, content in files.items():
            archive.writestr(name, content)
    return buffer.getvalue()


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RealServer]:
    running = start_unstructured(tmp_path_factory.mktemp("unstructured"), api_key=KEY)
    try:
        yield running
    finally:
        running.stop()


@pytest.fixture
async def client() -> AsyncIterator[httpx.AsyncClient]:
    async with pooled_client() as c:
        yield c


def target(server: RealServer, key: str = KEY) -> Target:
    return Target(server.url, api_key=key, options=parse_options({"default_strategy": "fast"}))


def file_payload(name: str, content: bytes) -> dict[str, object]:
    return {"file": {"name": name, "content_base64": base64.b64encode(content).decode()}}


async def test_text_and_markdown_and_docx_partition(server: RealServer, client: httpx.AsyncClient) -> None:
    adapter = UnstructuredAdapter()
    text = await adapter.invoke(client, target(server), AdapterRequest("partition", {"text": TEXT}, 60))
    elements = orjson.loads(text.body)
    assert [(e["type"], e["text"]) for e in elements] == [
        ("Title", "Quarterly Report"),
        ("NarrativeText", "Revenue grew by ten percent this quarter."),
        ("ListItem", "first point"),
        ("ListItem", "second point"),
    ]
    assert elements[1]["metadata"]["parent_id"] == elements[0]["element_id"]
    assert text.usage.estimated and text.usage.output_tokens > 0
    docx = minimal_docx([("Heading1", "Annual Plan"), ("Normal", "We will ship the scheduler in spring.")])
    parsed = await adapter.invoke(
        client, target(server), AdapterRequest("partition", file_payload("plan.docx", docx), 60)
    )
    docx_elements = orjson.loads(parsed.body)
    assert [e["text"] for e in docx_elements] == ["Annual Plan", "We will ship the scheduler in spring."]
    assert docx_elements[0]["metadata"]["filename"] == "plan.docx"  # (no styles part: types are not asserted)
    md = await adapter.invoke(
        client,
        target(server),
        AdapterRequest(
            "partition", file_payload("n.md", b"# Notes\n\nThe scheduler picks an endpoint for each request."), 60
        ),
    )
    md_elements = orjson.loads(md.body)
    assert [e["text"] for e in md_elements] == ["Notes", "The scheduler picks an endpoint for each request."]
    assert md_elements[0]["type"] == "Title" and md_elements[0]["metadata"]["filetype"] == "text/markdown"


async def test_errors_from_the_real_service(server: RealServer, client: httpx.AsyncClient) -> None:
    adapter = UnstructuredAdapter()
    with pytest.raises(UpstreamError) as unsupported:
        await adapter.invoke(
            client, target(server), AdapterRequest("partition", file_payload("x.bin", b"\x00\x01\x02garbage"), 60)
        )
    assert unsupported.value.kind is ErrorKind.CLIENT and unsupported.value.status == 400
    with pytest.raises(UpstreamError) as strategy:
        await adapter.invoke(
            client, target(server), AdapterRequest("partition", {"text": "x", "strategy": "magic"}, 60)
        )
    assert strategy.value.kind is ErrorKind.CLIENT and strategy.value.status == 422
    with pytest.raises(UpstreamError) as auth:
        await adapter.invoke(client, target(server, "wrong-key-000"), AdapterRequest("partition", {"text": "x"}, 60))
    assert auth.value.kind is ErrorKind.AUTH
