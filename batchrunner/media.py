"""Images, documents, audio and video named by a row's cells: resolved, hashed, and streamed into requests.

A media cell is an https URL (sent as it is), a local path (relative to the input file's
folder, or absolute), or bytes (a Parquet binary column, or a `data:` URL). Local files and
bytes are sent as base64, with their type read from their first bytes, never from a name:
a file that is not an image, a PDF, audio or video of a kind the providers take is not
sent at all (so a stray path to a private file cannot leak its content to a provider).

A local file is read twice and never held: once when its request is fingerprinted (the
checkpoint key holds its SHA-256, not its path, so moving the folder re-asks nothing and
replacing one image re-asks its row alone), and again, in chunks, while its request body is
being sent (`encode_body`). The body's last chunk is held back until the file's hash is
checked, so a file changed in between never reaches the server as a complete request.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import os
import re
import stat
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

import orjson

from batchrunner.errors import MediaProblem
from batchrunner.jsontext import non_finite

KINDS = ("image", "file", "audio", "video")
MIB = 1024 * 1024
CHUNK_BYTES = 3 * 64 * 1024  # a multiple of 3: each chunk's base64 joins the next's without padding
IMAGE_TYPES = {"image/png", "image/jpeg", "image/webp", "image/gif"}  # what OpenRouter's image_url takes
FILE_TYPES = {"application/pdf"}
AUDIO_FORMATS = {  # MIME type -> input_audio.format
    "audio/wav": "wav",
    "audio/mpeg": "mp3",
    "audio/flac": "flac",
    "audio/ogg": "ogg",
    "audio/mp4": "m4a",
    "audio/aiff": "aiff",
    "audio/aac": "aac",
}
VIDEO_TYPES = {"video/mp4", "video/webm", "video/quicktime", "video/mpeg"}
ALLOWED = {"image": IMAGE_TYPES, "file": FILE_TYPES, "audio": set(AUDIO_FORMATS), "video": VIDEO_TYPES}
FIX = {
    "image": "convert it to PNG, JPEG, WebP or GIF",
    "file": "give a PDF",
    "audio": "convert it to wav, mp3, flac, ogg, m4a, aiff or aac",
    "video": "convert it to mp4, webm, mov or mpeg",
}
_PDF_PAGE = re.compile(rb"/Type\s{0,8}/Page[^a-zA-Z]")  # a page object, not the /Pages tree


def sniff(head: bytes) -> str | None:
    """The MIME type the first bytes of a file say it has (magic numbers), or None."""
    if head.startswith(b"\x89PNG\r\n\x1a\n"):
        return "image/png"
    if head.startswith(b"\xff\xd8\xff"):
        return "image/jpeg"
    if head[:6] in (b"GIF87a", b"GIF89a"):
        return "image/gif"
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "image/webp"
    if head[:4] == b"RIFF" and head[8:12] == b"WAVE":
        return "audio/wav"
    if head.startswith(b"%PDF-"):
        return "application/pdf"
    if head.startswith(b"fLaC"):
        return "audio/flac"
    if head.startswith(b"OggS"):
        return "audio/ogg"
    if head[:4] == b"FORM" and head[8:12] in (b"AIFF", b"AIFC"):
        return "audio/aiff"
    if head.startswith(b"ID3") or (len(head) > 1 and head[0] == 0xFF and head[1] & 0xE6 == 0xE2):
        return "audio/mpeg"  # an ID3 tag, or an MPEG-1/2 layer III frame
    if len(head) > 1 and head[0] == 0xFF and head[1] & 0xF6 == 0xF0:
        return "audio/aac"  # an ADTS frame
    if head[4:8] == b"ftyp":
        brand = head[8:12]
        if brand in (b"M4A ", b"M4B "):
            return "audio/mp4"
        return "video/quicktime" if brand == b"qt  " else "video/mp4"
    if head.startswith(b"\x1a\x45\xdf\xa3"):
        return "video/webm"
    if head.startswith(b"\x00\x00\x01\xba") or head.startswith(b"\x00\x00\x01\xb3"):
        return "video/mpeg"
    if head.startswith((b"BM", b"II*\x00", b"MM\x00*")):
        return "image/bmp" if head.startswith(b"BM") else "image/tiff"
    return None


@dataclass(frozen=True, slots=True)
class Media:
    """File content a request sends as base64: a local file (read when sent) or bytes from the input."""

    kind: str  # image, file, audio or video
    mime: str
    size: int  # bytes
    sha256: str
    path: Path | None = None  # a local file, read again while its request is sent
    data: bytes | None = field(default=None, repr=False)  # bytes from the input
    pages: int | None = None  # a PDF's pages, as counted from its page objects

    @property
    def prefix(self) -> str:
        """What comes before the base64: a data URL's header; audio's `data` is bare base64."""
        return "" if self.kind == "audio" else f"data:{self.mime};base64,"

    @property
    def identity(self) -> str:
        """What the checkpoint key knows of it: its type and content, not where it lies."""
        return f"{self.kind}:{self.mime}:{self.sha256}"

    @property
    def encoded_length(self) -> int:
        """Bytes of its JSON string in a request body: quotes, prefix and base64."""
        return 2 + len(self.prefix) + 4 * ((self.size + 2) // 3)


@dataclass(frozen=True)
class MediaLimitsBytes:
    """The largest file of each kind sent; larger ones fail their row."""

    image: int = 20 * MIB
    file: int = 32 * MIB
    audio: int = 20 * MIB
    video: int = 20 * MIB

    def of(self, kind: str) -> int:
        return int(getattr(self, kind))


class MediaReader:
    """Resolves a media cell into what its request sends: a URL string, or a Media."""

    def __init__(self, folder: Path, *, limits: MediaLimitsBytes | None = None, urls_only: bool = False) -> None:
        self.folder = folder  # relative paths resolve against the input file's folder
        self.limits = limits or MediaLimitsBytes()
        self.urls_only = urls_only  # the Batch API takes URLs only: file content fails its row

    def resolve(self, kind: str, value: Any, *, column: str | None) -> str | Media:
        """An https URL as it is, or the content of a local file or bytes; MediaProblem says why not."""
        where = f"{column}: " if column else ""
        if isinstance(value, (bytes, bytearray, memoryview)):
            return self._content(kind, bytes(value), where, "the bytes")
        if value is None or (isinstance(value, str) and not value.strip()):
            raise MediaProblem(f"{where}no {kind} in this row (the cell is empty)")
        text = str(value).strip()
        scheme = re.match(r"^([a-zA-Z][a-zA-Z0-9+.-]*):", text)
        if text.lower().startswith("https://"):
            if kind == "audio":
                raise MediaProblem(
                    f"{where}{_short(text)}: audio is sent as data, not a URL (OpenRouter does not fetch audio); "
                    "give a local file or bytes"
                )
            return text
        if text.lower().startswith("http://"):
            raise MediaProblem(f"{where}{_short(text)} is not https; use an https URL or a local file")
        if text.lower().startswith("data:"):
            return self._content(kind, _data_url(text, where), where, "the data: URL")
        if scheme and len(scheme.group(1)) > 1:  # a scheme, not a Windows drive letter
            raise MediaProblem(
                f"{where}{_short(text)}: {scheme.group(1)}: URLs are not sent; use https or a local file"
            )
        return self._file(kind, text, where)

    def _content(self, kind: str, data: bytes, where: str, what: str) -> Media:
        if self.urls_only:
            raise MediaProblem(f"{where}the Batch API takes media as https URLs only, not {what}; use mode: live")
        self._check_size(kind, len(data), where, what)
        mime = self._check_type(kind, data[:64], where, what)
        pages = len(_PDF_PAGE.findall(data)) if mime == "application/pdf" else None
        return Media(kind, mime, len(data), hashlib.sha256(data).hexdigest(), data=data, pages=pages)

    def _file(self, kind: str, text: str, where: str) -> Media:
        path = Path(os.path.expanduser(text))
        path = path if path.is_absolute() else self.folder / path
        shown = _short(text)
        if self.urls_only:
            raise MediaProblem(
                f"{where}{shown}: the Batch API takes media as https URLs only, not files; use mode: live"
            )
        try:
            with open_regular(path) as handle:
                info = os.fstat(handle.fileno())
                if not stat.S_ISREG(info.st_mode):
                    raise MediaProblem(f"{where}{shown} is not a regular file (a pipe, a device?)")
                self._check_size(kind, info.st_size, where, shown)
                head = handle.read(64)
                mime = self._check_type(kind, head, where, shown)
                content = _Content()
                content.feed(head)
                for chunk in iter(lambda: handle.read(CHUNK_BYTES), b""):
                    content.feed(chunk)
        except FileNotFoundError:
            raise MediaProblem(f"{where}{shown}: no such file (relative paths start at {self.folder})") from None
        except IsADirectoryError:
            raise MediaProblem(f"{where}{shown} is a folder, not a file") from None
        except PermissionError:
            raise MediaProblem(f"{where}{shown}: permission denied; make it readable") from None
        except OSError as exc:
            raise MediaProblem(f"{where}{shown}: cannot read it ({exc.strerror or exc})") from None
        pages = content.pages if mime == "application/pdf" else None
        return Media(kind, mime, content.size, content.digest.hexdigest(), path=path, pages=pages)

    def _check_size(self, kind: str, size: int, where: str, shown: str) -> None:
        limit = self.limits.of(kind)
        if size > limit:
            raise MediaProblem(
                f"{where}{shown} is {size / MIB:.3g} MB, over the {limit / MIB:.3g} MB limit for {kind}s "
                f"(media_limits_mb.{kind}); shrink it, or raise the limit if your provider takes more"
            )
        if size == 0:
            raise MediaProblem(f"{where}{shown} is empty")

    @staticmethod
    def _check_type(kind: str, head: bytes, where: str, shown: str) -> str:
        mime = sniff(head)
        if mime not in ALLOWED[kind]:
            found = f"a {mime} file" if mime else "not a file type batchrunner recognises"
            raise MediaProblem(f"{where}{shown} is {found}, not a supported {kind}; {FIX[kind]}")
        return mime


def open_regular(path: Path) -> BinaryIO:
    """Open a file for reading without blocking: a named pipe in a column would otherwise hang the run
    waiting for a writer. The caller checks it is a regular file before reading."""
    descriptor = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    try:
        if stat.S_ISREG(os.fstat(descriptor).st_mode):
            os.set_blocking(descriptor, True)
        return os.fdopen(descriptor, "rb")
    except BaseException:
        os.close(descriptor)
        raise


class _Content:
    """A file's hash, size and PDF page count, fed chunk by chunk."""

    def __init__(self) -> None:
        self.digest = hashlib.sha256()
        self.size = 0
        self.pages = 0
        self._carry = b""  # the end of the last chunk: a page marker may straddle two chunks

    def feed(self, chunk: bytes) -> None:
        self.digest.update(chunk)
        self.size += len(chunk)
        window = self._carry + chunk
        self.pages += sum(1 for match in _PDF_PAGE.finditer(window) if match.end() > len(self._carry))
        self._carry = window[-32:]


def _short(text: str) -> str:
    return text if len(text) <= 120 else text[:117] + "..."


def decode_data_url(text: str) -> bytes:
    """The bytes of a `data:<type>;base64,...` URL; else a ValueError whose text completes "a data: URL ..."."""
    header, comma, payload = text.partition(",")
    if not comma or not header.lower().endswith(";base64"):
        raise ValueError("that is not base64 (data:<type>;base64,...)")
    try:
        return base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise ValueError("whose base64 is malformed") from None


def _data_url(text: str, where: str) -> bytes:
    try:
        return decode_data_url(text)
    except ValueError as exc:
        raise MediaProblem(f"{where}a data: URL {exc}") from None


def audio_format(media: Media) -> str:
    """input_audio's `format` for the audio's type."""
    return AUDIO_FORMATS[media.mime]


# -- request bodies -----------------------------------------------------------------------


@dataclass
class EncodedBody:
    """A request body as JSON bytes, with each Media's base64 streamed in its place.

    `length` is exact (so the request carries a Content-Length, not chunked encoding);
    `failure` is set when a file could not be read or changed since it was fingerprinted,
    and the body stopped before its end (the server never saw a whole request)."""

    parts: list[bytes | Media]
    length: int
    failure: MediaProblem | None = None

    @property
    def streamed(self) -> bool:
        return any(isinstance(part, Media) for part in self.parts)

    def whole(self) -> bytes:
        """The body in one piece (no Media in it)."""
        return b"".join(part for part in self.parts if isinstance(part, bytes))

    async def chunks(self) -> AsyncIterator[bytes]:
        try:
            for part in self.parts:
                if isinstance(part, bytes):
                    yield part
                else:
                    yield f'"{part.prefix}'.encode()
                    for chunk in self._base64(part):
                        yield chunk
                    yield b'"'
        except MediaProblem as exc:
            self.failure = exc
            raise

    @staticmethod
    def _base64(media: Media) -> Iterator[bytes]:
        if media.data is not None:
            for start in range(0, len(media.data), CHUNK_BYTES):
                yield base64.b64encode(media.data[start : start + CHUNK_BYTES])
            return
        assert media.path is not None
        digest, size, held = hashlib.sha256(), 0, b""
        try:
            with open_regular(media.path) as handle:
                for chunk in iter(lambda: handle.read(CHUNK_BYTES), b""):
                    digest.update(chunk)
                    size += len(chunk)
                    if held:
                        yield held
                    held = base64.b64encode(chunk)
        except OSError as exc:
            raise MediaProblem(
                f"{media.path}: cannot read it any more ({exc.strerror or exc}); nothing was sent"
            ) from None
        if size != media.size or digest.hexdigest() != media.sha256:
            raise MediaProblem(
                f"{media.path} changed while the run was sending it; nothing was sent: rerun to ask about the new content"
            )
        yield held  # the last chunk goes only once the whole file is known to be the one fingerprinted


_MARKER = f"\ue000media-{uuid.uuid4().hex}-"  # stands for a Media in the JSON text; no prompt can guess it
_HOLE = re.compile(f'"{re.escape(_MARKER)}(\\d+)"'.encode())
# what orjson would write natively but json does not: left to `default`, as json leaves them (a Media is a dataclass)
_AS_JSON_WRITES = orjson.OPT_PASSTHROUGH_DATACLASS | orjson.OPT_PASSTHROUGH_DATETIME


def _holds_non_finite(data: bytes, body: dict[str, Any]) -> bool:
    """Whether `body`, which orjson wrote as `data`, holds NaN or an infinity: orjson writes them as null, so the
    values are looked through only if `data` holds a null value (or text that looks like one)."""
    at = data.find(b"null")
    while at != -1 and data[at - 1] not in b":,[":  # "null" in a string ("type": ["string", "null"])
        at = data.find(b"null", at + 4)
    return at != -1 and bool(non_finite(body))


def encode_body(body: dict[str, Any]) -> EncodedBody:
    """`body` as JSON, each Media left as a hole to stream its base64 into."""
    found: list[Media] = []

    def hole(value: Any) -> str:
        if isinstance(value, Media):
            found.append(value)
            return f"{_MARKER}{len(found) - 1}"
        raise TypeError(f"{type(value).__name__} is not JSON serializable")

    data: bytes | None
    try:  # orjson: 10x as fast as json for a request's body, the same JSON but for spaces and what it refuses
        data = orjson.dumps(body, default=hole, option=_AS_JSON_WRITES)
    except orjson.JSONEncodeError:  # a number past 64 bits, a key that is not a string: as json writes them
        data = None
    # orjson writes NaN and the infinities as null, another request (a server's default temperature), answered and
    # paid for: json writes them as before, a body the server refuses
    if data is None or _holds_non_finite(data, body):
        found.clear()
        data = json.dumps(body, ensure_ascii=False, default=hole).encode()
    if not found:
        return EncodedBody([data], len(data))
    parts: list[bytes | Media] = []
    pieces = _HOLE.split(data)
    for position, piece in enumerate(pieces):
        if position % 2:
            parts.append(found[int(piece)])
        elif piece:
            parts.append(piece)
    length = sum(len(p) if isinstance(p, bytes) else p.encoded_length for p in parts)
    return EncodedBody(parts, length)
