"""What a sandbox model perceives of a message's images, PDFs and audio, and what they count in tokens.

The sandbox cannot see, but it can read the simple files the project makes itself
(scripts/make_media_samples.py): a PNG of one coloured shape on white is seen as "a red
circle" (the shape from how much of its bounding box it fills), a PDF's uncompressed text
is read, a WAV's length is heard. That text is added to what the simulated model answers
from, so a labeling job's enum answers can be right or wrong as a model's would. Other
files are seen as "an image" or "a document". Token counts follow the providers' published
rules roughly: 85 tokens for a low-detail image, 85 + 170 per 512-pixel tile otherwise
(OpenAI's), 800 per PDF page, 32 tokens a second of audio (Gemini's).
"""

from __future__ import annotations

import base64
import binascii
import math
import re
import struct
import zlib
from dataclasses import dataclass, field
from typing import Any

from batchrunner.media import IMAGE_TYPES, decode_data_url, sniff

COLOURS = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (240, 210, 40),
    "orange": (245, 140, 30),
    "purple": (140, 60, 180),
    "black": (20, 20, 20),
    "gray": (128, 128, 128),
}
TOKENS_PER_PAGE = 800  # between a page parsed to text (~300) and one read as an image (Anthropic: 1,500-3,000)
AUDIO_TOKENS_PER_S = 32


class Unreadable(ValueError):
    """A part the sandbox (like a provider) cannot take: a malformed data URL, a type it is not."""


@dataclass
class Perceived:
    """What the parts of a request carry, as a model would take them in."""

    text: list[str] = field(default_factory=list)  # descriptions, added to the prompt's text
    tokens: int = 0  # image and document tokens
    audio_tokens: int = 0
    images: int = 0
    kinds: set[str] = field(default_factory=set)  # image, file, audio, video


def perceive(messages: list[dict[str, Any]]) -> Perceived:
    """Read every media part of the messages; Unreadable for a part a provider would refuse."""
    seen = Perceived()
    for message in messages:
        content = message.get("content")
        if not isinstance(content, list):
            continue
        for part in content:
            kind = part.get("type") if isinstance(part, dict) else None
            if kind == "image_url":
                image = part["image_url"]
                _see_image(seen, str(image.get("url", "")), image.get("detail"))
            elif kind == "file":
                _read_file(seen, str(part["file"].get("file_data", "")))
            elif kind == "input_audio":
                _hear(seen, str(part["input_audio"].get("data", "")), str(part["input_audio"].get("format", "")))
            elif kind in ("video_url", "input_video"):
                seen.kinds.add("video")
                seen.text.append("[a video]")
                seen.tokens += 258 * 10
    return seen


def _data(url: str, what: str) -> bytes | None:
    """The bytes of a data: URL; None for an https URL (the sandbox has no network to fetch it)."""
    if url.startswith("https://"):
        return None
    if not url.startswith("data:"):
        raise Unreadable(f"{what} must be an https URL or a base64 data: URL")
    try:
        return decode_data_url(url)
    except ValueError as exc:
        raise Unreadable(f"{what}: a data: URL {exc}") from None


def _see_image(seen: Perceived, url: str, detail: Any) -> None:
    seen.kinds.add("image")
    seen.images += 1
    data = _data(url, "image_url.url")
    if data is None:
        seen.text.append("[an image]")
        seen.tokens += 85 if detail == "low" else 765
        return
    if sniff(data[:64]) not in IMAGE_TYPES:
        raise Unreadable("image_url: not a PNG, JPEG, WebP or GIF image (invalid_image)")
    pixels = _png_pixels(data)
    if pixels is None:
        seen.text.append("[an image]")
        seen.tokens += 85 if detail == "low" else 765
        return
    width, height, _ = pixels
    seen.text.append(f"[image: {describe(pixels)}]")
    seen.tokens += 85 if detail == "low" else image_tokens(width, height)


def image_tokens(width: int, height: int) -> int:
    """OpenAI's rule for a high-detail image: fit in 2048x2048, shortest side to 768, 170 per 512-pixel tile."""
    fit = min(1.0, 2048 / max(width, height))
    shrink = min(1.0, 768 / (min(width, height) * fit))
    return 85 + 170 * math.ceil(width * fit * shrink / 512) * math.ceil(height * fit * shrink / 512)


def describe(pixels: tuple[int, int, list[list[tuple[int, int, int]]]]) -> str:
    """The colour of what is not background, and its shape from how much of its box it fills: "a red circle".
    Every other pixel of every other row is looked at: enough for shapes, four times faster."""
    _, _, rows = pixels
    background = rows[0][0]
    found = [
        (x, y, rgb)
        for y in range(0, len(rows), 2)
        for x, rgb in enumerate(rows[y][::2])
        if rgb != background and _distance(rgb, background) > 60
    ]
    if not found:
        return "a blank image"
    xs, ys = [x for x, _, _ in found], [y for _, y, _ in found]
    box = (max(xs) - min(xs) + 1) * ((max(ys) - min(ys)) // 2 + 1)
    fill = len(found) / box
    shape = "square" if fill > 0.92 else "circle" if fill > 0.68 else "triangle"
    mean = tuple(sum(rgb[i] for _, _, rgb in found) // len(found) for i in range(3))
    colour = min(COLOURS, key=lambda name: _distance(COLOURS[name], mean))
    return f"a {colour} {shape}"


def _distance(a: tuple[int, ...], b: tuple[int, ...]) -> float:
    return math.sqrt(sum((x - y) ** 2 for x, y in zip(a, b, strict=True)))


def _png_pixels(data: bytes) -> tuple[int, int, list[list[tuple[int, int, int]]]] | None:
    """The RGB rows of an 8-bit, non-interlaced grey, RGB or RGBA PNG of at most 1024x1024; else None."""
    if not data.startswith(b"\x89PNG\r\n\x1a\n"):
        return None
    position, header, idat = 8, None, []
    while position + 8 <= len(data):
        (length,) = struct.unpack(">I", data[position : position + 4])
        kind = data[position + 4 : position + 8]
        body = data[position + 8 : position + 8 + length]
        if kind == b"IHDR":
            header = struct.unpack(">IIBBBBB", body[:13])
        elif kind == b"IDAT":
            idat.append(body)
        elif kind == b"IEND":
            break
        position += 12 + length
    if header is None:
        return None
    width, height, depth, colour_type, _, _, interlace = header
    channels = {0: 1, 2: 3, 6: 4}.get(colour_type)
    if depth != 8 or channels is None or interlace or width * height > 1024 * 1024:
        return None
    stride = width * channels
    try:  # no more than the image holds: a zlib bomb stops here
        raw = zlib.decompressobj().decompress(b"".join(idat), height * (stride + 1))
    except zlib.error:
        return None
    if len(raw) < height * (stride + 1):
        return None
    rows, previous = [], bytearray(stride)
    for y in range(height):
        start = y * (stride + 1)
        line = _unfilter(raw[start], bytearray(raw[start + 1 : start + 1 + stride]), previous, channels)
        previous = line
        if channels == 1:
            rows.append([(v, v, v) for v in line])
        else:
            rows.append(list(zip(line[0::channels], line[1::channels], line[2::channels], strict=True)))
    return width, height, rows


def _unfilter(kind: int, line: bytearray, previous: bytearray, step: int) -> bytearray:
    if kind == 0:
        return line
    for i in range(len(line)):
        left = line[i - step] if i >= step else 0
        up = previous[i]
        corner = previous[i - step] if i >= step else 0
        if kind == 1:
            line[i] = (line[i] + left) & 0xFF
        elif kind == 2:
            line[i] = (line[i] + up) & 0xFF
        elif kind == 3:
            line[i] = (line[i] + (left + up) // 2) & 0xFF
        elif kind == 4:
            guess = left + up - corner
            near = min((abs(guess - left), 0, left), (abs(guess - up), 1, up), (abs(guess - corner), 2, corner))
            line[i] = (line[i] + near[2]) & 0xFF
    return line


def _read_file(seen: Perceived, url: str) -> None:
    seen.kinds.add("file")
    data = _data(url, "file.file_data")
    if data is None:
        seen.text.append("[a document]")
        seen.tokens += TOKENS_PER_PAGE
        return
    if not data.startswith(b"%PDF-"):
        raise Unreadable("file: not a PDF")
    pages = max(1, len(re.findall(rb"/Type\s*/Page[^a-zA-Z]", data)))
    text = " ".join(part.decode("latin-1") for part in re.findall(rb"\(((?:[^()\\]|\\.)*)\)\s*Tj", data))
    seen.text.append(f"[document: {text[:2000]}]" if text else "[a document]")
    seen.tokens += pages * TOKENS_PER_PAGE + len(text) // 4


def _hear(seen: Perceived, data_text: str, audio_format: str) -> None:
    seen.kinds.add("audio")
    if data_text.startswith(("http://", "https://", "data:")):
        raise Unreadable("input_audio.data must be base64 audio, not a URL")
    try:
        data = base64.b64decode(data_text, validate=True)
    except (binascii.Error, ValueError):
        raise Unreadable("input_audio.data: malformed base64") from None
    seconds = len(data) / 16_000
    if audio_format == "wav" and data[:4] == b"RIFF" and len(data) >= 44:
        byte_rate = struct.unpack("<I", data[28:32])[0]
        seconds = (len(data) - 44) / byte_rate if byte_rate else 0.0
    seen.text.append(f"[audio: {seconds:.1f} s]")
    seen.audio_tokens += math.ceil(seconds * AUDIO_TOKENS_PER_S)
