"""A corpus of awkward inputs a field device really gets, built into a folder on demand.

``make_bad_corpus(dir)`` returns ``{name: (path, expected)}`` where ``expected`` is
- ``"quarantine"``: ``edge.imageio.read_image`` raises ``ImageError`` (one line naming the file);
- ``"ok"``: it reads (and the daemon classifies it);
- ``"reject"``: ingest refuses it before reading (a symlink leading out of the watch folder;
  ``Ingest`` calls ``on_reject``). read_image alone would happily follow it.
Real-camera bytes (the Reconyx night burst) are the base wherever a JPEG is needed.
Shared by test_imageio, test_ingest and the daemon's end-to-end tests.
"""

from __future__ import annotations

import functools
import io
import os
import struct
import zlib
from pathlib import Path

import cv2
import numpy as np
from PIL import Image

REAL_BURST = Path(__file__).resolve().parents[1] / "data" / "real-frames" / "reconyx-heron-night-burst"
HUGE_SIZE = (12000, 8400)  # 100.8 megapixels (w, h)


def real_frames() -> list[Path]:
    return sorted(REAL_BURST.glob("*.JPG"))


@functools.lru_cache(maxsize=1)
def huge_jpeg_bytes() -> bytes:
    """A 12000x8400 JPEG (four flat colour quadrants: tiny file, ~1 s to encode once)."""
    w, h = HUGE_SIZE
    a = np.zeros((h, w, 3), np.uint8)
    a[: h // 2, : w // 2] = (0, 0, 255)  # BGR: red top-left
    a[: h // 2, w // 2 :] = (0, 255, 0)  # green top-right
    a[h // 2 :, : w // 2] = (255, 0, 0)  # blue bottom-left
    a[h // 2 :, w // 2 :] = (255, 255, 255)
    ok, enc = cv2.imencode(".jpg", a, [cv2.IMWRITE_JPEG_QUALITY, 80])
    assert ok
    return enc.tobytes()


def big_png(path: Path, w: int, h: int) -> Path:
    """A valid RGB PNG of w x h black pixels, written row by row (never held whole in memory)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    z = zlib.compressobj(9)
    row = bytes(1 + 3 * w)  # filter byte 0 + black pixels
    idat = b"".join(z.compress(row) for _ in range(h)) + z.flush()
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0))
                     + chunk(b"IDAT", idat) + chunk(b"IEND", b""))
    return path


def rotated_jpeg_bytes() -> bytes:
    """80 wide x 40 high stored pixels, left half red, EXIF Orientation=6 (display: rotate 90 CW),
    so the upright image is 40 wide x 80 high with red on top."""
    a = np.zeros((40, 80, 3), np.uint8)
    a[:, :40] = (255, 0, 0)  # RGB red
    exif = Image.Exif()
    exif[0x0112] = 6
    exif[0x010F] = "TestCam"
    buf = io.BytesIO()
    Image.fromarray(a).save(buf, "JPEG", exif=exif.tobytes(), quality=95)
    return buf.getvalue()


def make_bad_corpus(dir: str | os.PathLike) -> dict[str, tuple[Path, str]]:
    """Write the corpus into ``dir`` (created); an ``outside/`` sibling holds the symlink target."""
    d = Path(dir)
    d.mkdir(parents=True, exist_ok=True)
    real = real_frames()[0].read_bytes()
    out: dict[str, tuple[Path, str]] = {}

    def put(name: str, filename: str, data: bytes, expected: str) -> Path:
        p = d / filename
        p.write_bytes(data)
        out[name] = (p, expected)
        return p

    put("zero_bytes", "zero.jpg", b"", "quarantine")
    put("truncated_jpeg", "truncated.jpg", real[: len(real) * 6 // 10], "quarantine")
    put("text_named_jpg", "notes.jpg", b"hello, this is a text file\nnot a picture\n", "quarantine")
    put("html_named_jpg", "error-page.JPG", b"<html><body>503 Service Unavailable</body></html>", "quarantine")
    gif = io.BytesIO()
    Image.new("RGB", (8, 8), (1, 2, 3)).save(gif, "GIF")
    put("gif_named_jpg", "animated.jpg", gif.getvalue(), "quarantine")

    rgb = cv2.cvtColor(cv2.imdecode(np.frombuffer(real, np.uint8), cv2.IMREAD_REDUCED_COLOR_4),
                       cv2.COLOR_BGR2RGB)  # 512x360 of the real heron frame
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, "PNG")
    put("png", "frame.png", buf.getvalue(), "ok")
    put("truncated_png", "cut.png", buf.getvalue()[: len(buf.getvalue()) // 2], "quarantine")

    buf = io.BytesIO()
    Image.new("RGB", (64, 48), (200, 30, 40)).convert("CMYK").save(buf, "JPEG", quality=95)
    put("cmyk_jpeg", "cmyk.jpg", buf.getvalue(), "ok")

    buf = io.BytesIO()
    Image.fromarray(rgb).convert("L").save(buf, "JPEG", quality=90)
    put("grey_ir_1ch", "ir-grey.jpg", buf.getvalue(), "ok")
    out["grey_ir_real"] = (d / "RCNX-real-ir.JPG", "ok")
    (d / "RCNX-real-ir.JPG").write_bytes(real)  # 3-channel IR frame with a colour logo

    put("exif_rotated", "rotated.jpg", rotated_jpeg_bytes(), "ok")
    put("huge_100mp", "huge-100mp.jpg", huge_jpeg_bytes(), "quarantine")  # above watch.max_megapixels (50)
    out["huge_png_55mp"] = (big_png(d / "huge-55mp.png", 7500, 7334), "quarantine")  # issue 7.4
    put("jpeg_trailer", "trailer.jpg", real + b"CAMERA-TRAILER-DATA" * 4, "ok")  # bytes after EOI

    outside = d.parent / f"{d.name}-outside"
    outside.mkdir(exist_ok=True)
    (outside / "elsewhere.jpg").write_bytes(real)
    link = d / "link-out.jpg"
    if link.is_symlink() or link.exists():
        link.unlink()
    link.symlink_to(outside / "elsewhere.jpg")
    out["symlink_out"] = (link, "reject")

    small = cv2.imencode(".jpg", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))[1].tobytes()
    put("odd_unicode", "ñandú 鹿 Ελάφι.jpg", small, "ok")
    put("odd_spaces", "  two  spaces .jpg", small, "ok")
    put("odd_hash", "#1 trigger%20 &.jpg", small, "ok")
    put("odd_leading_dash", "-rf --help.jpg", small, "ok")
    put("odd_newline_truncated", "line\nbreak.jpg", real[:5000], "quarantine")
    bad_bytes = os.fsencode(str(d)) + b"/latin1-\xe9t\xe9.jpg"  # not valid UTF-8
    with open(bad_bytes, "wb") as f:
        f.write(small)
    out["odd_non_utf8_bytes"] = (Path(os.fsdecode(bad_bytes)), "ok")
    return out
