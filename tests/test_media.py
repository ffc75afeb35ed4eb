"""media.py: what a media cell resolves to, what it refuses, and how files are streamed into request bodies."""

from __future__ import annotations

import asyncio
import base64
import json
import os
from pathlib import Path
from typing import Any

import pytest

from batchrunner.errors import MediaProblem
from batchrunner.media import CHUNK_BYTES, EncodedBody, Media, MediaLimitsBytes, MediaReader, encode_body, sniff

PNG = b"\x89PNG\r\n\x1a\n" + b"\x00" * 40
JPEG = b"\xff\xd8\xff\xe0" + b"\x01" * 40
PDF = b"%PDF-1.4\n1 0 obj << /Type /Page /Parent 2 0 R >> endobj\n2 0 obj << /Type /Pages >> endobj\n"
WAV = b"RIFF\x24\x00\x00\x00WAVEfmt " + b"\x00" * 40


def test_sniff_reads_types_from_magic_bytes_not_names() -> None:
    """Each supported type is told by its first bytes; a BMP is named as what it is."""
    assert sniff(PNG) == "image/png"
    assert sniff(JPEG) == "image/jpeg"
    assert sniff(b"GIF89a....") == "image/gif"
    assert sniff(b"RIFF\x00\x00\x00\x00WEBPVP8 ") == "image/webp"
    assert sniff(PDF) == "application/pdf"
    assert sniff(WAV) == "audio/wav"
    assert sniff(b"ID3\x04\x00") == "audio/mpeg"
    assert sniff(b"fLaC\x00") == "audio/flac"
    assert sniff(b"\x00\x00\x00\x20ftypM4A ") == "audio/mp4"
    assert sniff(b"BM\x00\x00") == "image/bmp"
    assert sniff(b"hello world") is None


def test_https_url_is_sent_as_it_is(tmp_path: Path) -> None:
    """An https URL is not fetched or changed: it goes in the request as written."""
    assert MediaReader(tmp_path).resolve("image", " https://cdn.example.com/a.png ", column="photo") == (
        "https://cdn.example.com/a.png"
    )


@pytest.mark.parametrize(
    ("kind", "value", "says"),
    [
        ("image", "http://cdn.example.com/a.png", "is not https"),
        ("image", "ftp://cdn.example.com/a.png", "ftp: URLs are not sent"),
        ("image", "", "the cell is empty"),
        ("image", None, "the cell is empty"),
        ("audio", "https://cdn.example.com/a.wav", "audio is sent as data, not a URL"),
        ("image", "data:image/png,abc", "not base64"),
        ("image", "data:image/png;base64,@@@", "malformed"),
    ],
)
def test_cells_that_cannot_be_sent_say_why(tmp_path: Path, kind: str, value: object, says: str) -> None:
    """Each kind of unusable cell is a MediaProblem naming the column and the fix."""
    with pytest.raises(MediaProblem, match=says) as caught:
        MediaReader(tmp_path).resolve(kind, value, column="photo")
    assert str(caught.value).startswith("photo: ")


def test_files_that_cannot_be_sent_say_why(tmp_path: Path) -> None:
    """A missing file, a folder, a file of the wrong type and an oversized one are refused unread past their head."""
    (tmp_path / "notes.png").write_text("this is text, whatever its name says")
    (tmp_path / "big.png").write_bytes(PNG + b"\x00" * 2000)
    (tmp_path / "folder.png").mkdir()
    (tmp_path / "empty.png").write_bytes(b"")
    small = MediaReader(tmp_path, limits=MediaLimitsBytes(image=1000))
    cases = {
        "missing.png": f"no such file (relative paths start at {tmp_path})",
        "folder.png": "is a folder",
        "notes.png": "not a file type batchrunner recognises, not a supported image; convert it to PNG",
        "big.png": "is 0.00195 MB, over the 0.000954 MB limit for images (media_limits_mb.image)",
        "empty.png": "is empty",
    }
    for name, says in cases.items():
        with pytest.raises(MediaProblem) as caught:
            small.resolve("image", name, column="photo")
        assert says in str(caught.value), (name, str(caught.value))
    with pytest.raises(MediaProblem, match="a application/pdf file, not a supported image"):
        (tmp_path / "doc.png").write_bytes(PDF)
        small.resolve("image", "doc.png", column="photo")


def test_a_file_is_known_by_its_content_not_its_path(tmp_path: Path) -> None:
    """The same bytes at two paths (or as bytes) have one identity; other bytes another."""
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "one.png").write_bytes(PNG)
    (tmp_path / "two.png").write_bytes(PNG)
    (tmp_path / "three.png").write_bytes(PNG + b"x")
    media = MediaReader(tmp_path)
    one = media.resolve("image", "a/one.png", column=None)
    two = media.resolve("image", str(tmp_path / "two.png"), column=None)
    three = media.resolve("image", "three.png", column=None)
    inline = media.resolve("image", PNG, column=None)
    data_url = media.resolve("image", "data:image/png;base64," + base64.b64encode(PNG).decode(), column=None)
    assert isinstance(one, Media) and isinstance(two, Media) and isinstance(three, Media)
    assert isinstance(inline, Media) and isinstance(data_url, Media)
    assert one.identity == two.identity == inline.identity == data_url.identity != three.identity
    assert (one.mime, one.size, one.path) == ("image/png", len(PNG), tmp_path / "a" / "one.png")


def test_pdf_pages_are_counted_across_chunk_boundaries(tmp_path: Path) -> None:
    """Page objects are counted, /Pages is not, and a marker split between two read chunks counts once."""
    marker = b"/Type /Page "
    filler = b"%PDF-1.4\n" + b" " * (CHUNK_BYTES - 9 - 5)
    content = filler + marker + b"/Type /Pages " + b" " * 100 + marker + b"/Type /Page\n"
    assert content.index(marker) < CHUNK_BYTES < content.index(marker) + len(marker)  # the first straddles
    (tmp_path / "doc.pdf").write_bytes(content)
    media = MediaReader(tmp_path).resolve("file", "doc.pdf", column=None)
    assert isinstance(media, Media) and media.pages == 3
    inline = MediaReader(tmp_path).resolve("file", content, column=None)
    assert isinstance(inline, Media) and inline.pages == 3


def test_the_batch_api_takes_urls_only(tmp_path: Path) -> None:
    """With urls_only, a local file and bytes are refused (the Batch API rejects base64); a URL is not."""
    (tmp_path / "a.png").write_bytes(PNG)
    media = MediaReader(tmp_path, urls_only=True)
    assert media.resolve("image", "https://x.example/a.png", column=None) == "https://x.example/a.png"
    for value in ("a.png", PNG):
        with pytest.raises(MediaProblem, match="the Batch API takes media as https URLs only"):
            media.resolve("image", value, column="photo")


async def collect(encoded: EncodedBody) -> bytes:
    return b"".join([chunk async for chunk in encoded.chunks()])


def test_a_body_streams_to_the_json_it_stands_for(tmp_path: Path) -> None:
    """The streamed body parses to the request with each file as base64 data, and is exactly `length` bytes."""
    big = b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 3000  # several read chunks
    (tmp_path / "big.png").write_bytes(big)
    (tmp_path / "talk.wav").write_bytes(WAV)
    media = MediaReader(tmp_path)
    image, audio = media.resolve("image", "big.png", column=None), media.resolve("audio", "talk.wav", column=None)
    inline = media.resolve("image", JPEG, column=None)
    body = {
        "model": "m",
        "messages": [
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": 'quotes " and \u00e9'},
                    {"type": "image_url", "image_url": {"url": image}},
                    {"type": "input_audio", "input_audio": {"data": audio, "format": "wav"}},
                    {"type": "image_url", "image_url": {"url": inline, "detail": "low"}},
                ],
            }
        ],
    }
    encoded = encode_body(body)
    assert encoded.streamed
    data = asyncio.run(collect(encoded))
    assert len(data) == encoded.length
    parts = json.loads(data)["messages"][0]["content"]
    assert parts[0]["text"] == 'quotes " and \u00e9'
    assert parts[1]["image_url"]["url"] == "data:image/png;base64," + base64.b64encode(big).decode()
    assert parts[2]["input_audio"] == {"data": base64.b64encode(WAV).decode(), "format": "wav"}
    assert parts[3]["image_url"] == {
        "url": "data:image/jpeg;base64," + base64.b64encode(JPEG).decode(),
        "detail": "low",
    }


def test_a_body_without_files_is_one_piece() -> None:
    """A text-only body is plain JSON, not streamed."""
    encoded = encode_body({"model": "m", "messages": [{"role": "user", "content": "hi"}]})
    assert not encoded.streamed
    assert json.loads(encoded.whole()) == {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
    assert encoded.length == len(encoded.whole())


@pytest.mark.parametrize(
    "body",
    [
        {"model": "m", "n": 2**70, "messages": []},  # past 64 bits: orjson refuses it
        {"model": "m", "metadata": {1: "x"}, "messages": []},  # a key that is not a string
        {"model": "m", "messages": [{"role": "user", "content": 'quotes " \\ \u2028 \x00 \u00e9 \U0001f600'}]},
    ],
)
def test_a_body_is_the_json_the_standard_library_writes(body: dict[str, Any]) -> None:
    """However the body is written (orjson, or json for what orjson refuses), it is the same JSON json.dumps writes,
    to the value."""
    encoded = encode_body(body)
    assert json.loads(encoded.whole()) == json.loads(json.dumps(body))
    assert encoded.length == len(encoded.whole())


@pytest.mark.parametrize(
    "body",
    [
        {"model": "m", "temperature": float("nan"), "messages": []},
        {"model": "m", "logit_bias": {"50256": float("-inf")}, "messages": []},
        {"model": "m", "top_p": float("inf"), "stop": [None], "messages": []},
    ],
)
def test_a_number_json_cannot_carry_is_never_sent_as_null(body: dict[str, Any]) -> None:
    """NaN and the infinities go out as json writes them (which a server refuses, unpaid), never as the null orjson
    writes for them: null is another request (the server's default temperature), answered and paid for. A JobSpec
    made in Python (`batchrunner.run(JobSpec(...))`) is not put through the spec file's check that refuses them.
    Found by writing odd values with orjson and with json and comparing what they decode to."""
    encoded = encode_body(body)
    assert repr(json.loads(encoded.whole())) == repr(json.loads(json.dumps(body)))
    assert encoded.length == len(encoded.whole())


def test_a_file_is_streamed_in_place_whichever_encoder_wrote_the_body(tmp_path: Path) -> None:
    """A body json must write (a number past 64 bits) still has its file streamed in place, not serialized as a
    dataclass's fields."""
    (tmp_path / "a.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"a" * 100)
    image = MediaReader(tmp_path).resolve("image", "a.png", column=None)
    for extra in ({}, {"seed": 2**70}):
        body = {
            "model": "m",
            **extra,
            "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": image}}]}],
        }
        encoded = encode_body(body)
        data = asyncio.run(collect(encoded))
        assert len(data) == encoded.length
        url = json.loads(data)["messages"][0]["content"][0]["image_url"]["url"]
        assert url == "data:image/png;base64," + base64.b64encode(b"\x89PNG\r\n\x1a\n" + b"a" * 100).decode()


@pytest.mark.parametrize("change", ["replace", "remove"])
def test_a_file_changed_after_its_fingerprint_never_goes_out_whole(tmp_path: Path, change: str) -> None:
    """A file replaced (or removed) between fingerprint and send: the stream stops short of its end, and says so."""
    original = b"\x89PNG\r\n\x1a\n" + b"a" * (3 * CHUNK_BYTES)
    (tmp_path / "a.png").write_bytes(original)
    image = MediaReader(tmp_path).resolve("image", "a.png", column=None)
    if change == "replace":
        (tmp_path / "a.png").write_bytes(original[:-1] + b"b")  # same size, other content
    else:
        (tmp_path / "a.png").unlink()
    encoded = encode_body(
        {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": image}}]}]}
    )
    sent: list[bytes] = []

    async def drain() -> None:
        async for chunk in encoded.chunks():
            sent.append(chunk)

    with pytest.raises(MediaProblem, match=r"changed while the run was sending it|cannot read it any more"):
        asyncio.run(drain())
    assert encoded.failure is not None
    assert len(b"".join(sent)) < encoded.length  # the server never got a whole request


def test_a_named_pipe_or_device_is_refused_without_waiting(tmp_path: Path) -> None:
    """A FIFO in a column (open() would wait forever for a writer) and /dev/zero (endless) are refused at once."""
    os.mkfifo(tmp_path / "pipe.png")
    media = MediaReader(tmp_path)
    for value in ("pipe.png", "/dev/zero"):
        with pytest.raises(MediaProblem, match="is not a regular file"):
            media.resolve("image", value, column="photo")
