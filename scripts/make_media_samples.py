"""Generate the sample images and PDFs in sample_data/ (deterministic, no network, standard library only).

python scripts/make_media_samples.py

- sample_data/shapes/img_NNN.png: 36 PNGs of one coloured shape (circle, square, triangle) on white,
  in four colours and three sizes and places; sample_data/shapes.csv lists them with the answers.
- sample_data/invoices/inv_NNN.pdf: 8 one-page invoices (text PDFs); sample_data/invoices.csv
  lists them with each invoice's category.
"""

from __future__ import annotations

import random
import struct
import zlib
from pathlib import Path

OUT = Path(__file__).resolve().parent.parent / "sample_data"
SIZE = 96
COLOURS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220), "yellow": (240, 210, 40)}
SHAPES = ("circle", "square", "triangle")
INVOICES = [
    ("Acme Cloud Ltd", "software", "Annual software licence, 25 seats", "1,200.00"),
    ("Northwind Computers", "hardware", "Two laptops and a docking station (hardware)", "3,480.50"),
    ("Rail Europe", "travel", "Train tickets Paris - Berlin, travel for the sales team", "412.90"),
    ("Paper & Co", "office_supplies", "Printer paper, toner and other office supplies", "96.40"),
    ("Globex Software GmbH", "software", "Software subscription, monthly plan", "49.00"),
    ("Contoso Devices", "hardware", "Replacement hardware: 4 monitors", "780.00"),
    ("SkyHigh Airlines", "travel", "Flight LHR - JFK, travel for the conference", "1,045.20"),
    ("Staples Direct", "office_supplies", "Pens, notebooks and office supplies for Q3", "132.75"),
]


def png(pixels: list[list[tuple[int, int, int]]]) -> bytes:
    """An 8-bit RGB PNG of the rows, unfiltered."""
    height, width = len(pixels), len(pixels[0])
    raw = b"".join(b"\x00" + bytes(channel for pixel in row for channel in pixel) for row in pixels)

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw, 9)) + chunk(b"IEND", b"")


def inside(shape: str, x: int, y: int, cx: int, cy: int, r: int) -> bool:
    if shape == "circle":
        return (x - cx) ** 2 + (y - cy) ** 2 <= r * r
    if shape == "square":
        return abs(x - cx) <= r and abs(y - cy) <= r
    # a triangle pointing up: the base at cy + r, the apex at cy - r
    if not cy - r <= y <= cy + r:
        return False
    half = (y - (cy - r)) / 2
    return abs(x - cx) <= half


def shape_image(shape: str, colour: tuple[int, int, int], rng: random.Random) -> bytes:
    r = rng.randint(18, 34)
    cx, cy = rng.randint(r + 4, SIZE - r - 5), rng.randint(r + 4, SIZE - r - 5)
    white = (255, 255, 255)
    return png([[colour if inside(shape, x, y, cx, cy, r) else white for x in range(SIZE)] for y in range(SIZE)])


def pdf(lines: list[str]) -> bytes:
    """A one-page PDF with the lines in Helvetica, its content stream uncompressed (so it can be read back)."""

    def escape(text: str) -> str:
        return text.replace("\\", "\\\\").replace("(", "\\(").replace(")", "\\)")

    text = " ".join(f"({escape(line)}) Tj 0 -22 Td" for line in lines)
    stream = f"BT /F1 14 Tf 72 720 Td {text} ET".encode("latin-1")
    objects = [
        b"<< /Type /Catalog /Pages 2 0 R >>",
        b"<< /Type /Pages /Kids [3 0 R] /Count 1 >>",
        b"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 792] /Contents 4 0 R "
        b"/Resources << /Font << /F1 5 0 R >> >> >>",
        b"<< /Length " + str(len(stream)).encode() + b" >>\nstream\n" + stream + b"\nendstream",
        b"<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica >>",
    ]
    out = bytearray(b"%PDF-1.4\n")
    offsets = []
    for number, body in enumerate(objects, start=1):
        offsets.append(len(out))
        out += f"{number} 0 obj\n".encode() + body + b"\nendobj\n"
    xref = len(out)
    out += f"xref\n0 {len(objects) + 1}\n0000000000 65535 f \n".encode()
    out += b"".join(f"{offset:010d} 00000 n \n".encode() for offset in offsets)
    out += f"trailer\n<< /Size {len(objects) + 1} /Root 1 0 R >>\nstartxref\n{xref}\n%%EOF\n".encode()
    return bytes(out)


def main() -> None:
    rng = random.Random(14)
    (OUT / "shapes").mkdir(parents=True, exist_ok=True)
    lines = ["id,photo,expected_shape,expected_colour"]
    number = 0
    for _ in range(3):  # three sizes and places of each
        for shape in SHAPES:
            for name, colour in COLOURS.items():
                number += 1
                path = f"shapes/img_{number:03d}.png"
                (OUT / path).write_bytes(shape_image(shape, colour, rng))
                lines.append(f"shape-{number:03d},{path},{shape},{name}")
    (OUT / "shapes.csv").write_text("\n".join(lines) + "\n")

    (OUT / "invoices").mkdir(parents=True, exist_ok=True)
    lines = ["id,scan,expected_category"]
    for number, (vendor, category, item, total) in enumerate(INVOICES, start=1):
        path = f"invoices/inv_{number:03d}.pdf"
        body = [
            "INVOICE",
            f"Invoice number: 2026-{number:04d}",
            f"Vendor: {vendor}",
            f"Item: {item}",
            f"Total: {total} USD",
        ]
        (OUT / path).write_bytes(pdf(body))
        lines.append(f"inv-{number:03d},{path},{category}")
    (OUT / "invoices.csv").write_text("\n".join(lines) + "\n")
    print(f"wrote {number} invoices and 36 shapes under {OUT}")


if __name__ == "__main__":
    main()
