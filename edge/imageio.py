"""Reading trigger images safely: bytes in, a BGR array or one clear error line out.

Camera traps, FTP servers and SD-card syncs hand us half-written files, junk named ``.jpg``,
CMYK or greyscale JPEGs, rotated phone shots and the odd 100-megapixel image. Everything here
turns such input into either a :class:`LoadedImage` or an :class:`ImageError` whose message is one
line naming the file, so the daemon can quarantine it, count it and carry on.

Design choices (why):
- Bytes are read once with ``np.fromfile`` and decoded from memory with ``cv2.imdecode``, so
  non-ASCII paths work (``cv2.imread`` fails on them on some platforms) and the header, the
  EXIF and the pixels all come from the same bytes (no race with a writer).
- One size rule for every format, applied before any pixel is decoded: Pillow only parses
  headers and EXIF (lazy ``Image.open``: the JPEG SOF or the PNG IHDR), so an image above
  ``max_pixels`` (the device's ``watch.max_megapixels``) is refused from its header with one line,
  and a file too large to hold any image within the limit is refused from its size before it is
  read. Decoded memory is therefore at most ``max_pixels`` x 3 bytes, whatever the format.
- A JPEG is decoded at the largest reduced scale (libjpeg's DCT scaling, ``IMREAD_REDUCED_*``
  1/2, 1/4, 1/8) whose long side still covers ``max_side`` (the models' input size): a
  2048x1440 Reconyx frame for a 640 px model is decoded at 1024x720, for 160 px at 256x180.
- Orientation is explicit: OpenCV's ``imread`` and ``imdecode`` apply EXIF orientation by
  default (checked on OpenCV 5.0, also with ``IMREAD_REDUCED_*``: an Orientation=6 JPEG stored
  80x40 decodes 40 wide by 80 high), but ``imdecode`` ignored it in older builds. So we always
  decode with ``IMREAD_IGNORE_ORIENTATION`` and rotate/flip from the tag Pillow read: one
  behaviour on every OpenCV, and ``orig_size`` is known from the header before decoding.
- A JPEG must end with the EOI marker (FF D9, trailing 00/FF padding tolerated). OpenCV 5.0
  refuses truncated JPEGs, but older builds and plain libjpeg fill the rest with grey and only
  warn, so a missing marker is checked before decoding (and the reason is clearer); when
  the marker is missing but data follows a complete image (some cameras append trailers),
  Pillow's draft-mode decode (1/8 scale, cheap) settles whether the entropy data is complete.
"""

from __future__ import annotations

import io
import os
import stat
import warnings
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path

import cv2
import numpy as np
from PIL import Image, UnidentifiedImageError

# We never let Pillow decode full pixels (draft mode only), and bound memory ourselves below,
# so its decompression-bomb *warning* is noise here. Its hard error above ~179 MP
# (2 x Image.MAX_IMAGE_PIXELS) still applies, which is why watch.max_megapixels stops there.
warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)

JPEG_EOI = b"\xff\xd9"
PNG_IEND = b"\x00\x00\x00\x00IEND\xaeB`\x82"
SUPPORTED_FORMATS = {"JPEG": "JPEG", "MPO": "JPEG", "PNG": "PNG"}  # MPO: multi-picture JPEG
GREY_MODES = {"1", "L", "LA", "I", "I;16", "I;16B", "I;16L", "F"}
DEFAULT_MAX_MEGAPIXELS = 50.0  # the default of watch.max_megapixels: larger images are refused
DEFAULT_MAX_PIXELS = int(DEFAULT_MAX_MEGAPIXELS * 1_000_000)
# Pillow refuses to open anything above 2 x MAX_IMAGE_PIXELS (a decompression bomb) whatever we
# ask, so a configured limit cannot usefully exceed this.
PILLOW_MAX_MEGAPIXELS = 2 * Image.MAX_IMAGE_PIXELS // 1_000_000 if Image.MAX_IMAGE_PIXELS else 10_000
# Largest file that can hold an image within the limit: an uncompressed 16-bit RGBA PNG
# (8 bytes a pixel) plus headers and EXIF. Anything bigger is refused before it is read.
MAX_BYTES_PER_PIXEL = 8
FILE_SLACK_BYTES = 16 * 1024 * 1024

_ORIENT_SWAPS = {5, 6, 7, 8}
_TAG_ORIENTATION, _TAG_MAKE, _TAG_MODEL, _TAG_DATETIME = 0x0112, 0x010F, 0x0110, 0x0132
_IFD_EXIF = 0x8769
_TAG_DT_ORIGINAL, _TAG_OFFSET_ORIGINAL, _TAG_SUBSEC_ORIGINAL = 0x9003, 0x9011, 0x9291
_TAG_OFFSET, _TAG_SUBSEC = 0x9010, 0x9290


class ImageError(Exception):
    """An image we cannot (or must not) process; ``str()`` is one line naming the file."""

    def __init__(self, path: str | os.PathLike, reason: str):
        self.path = Path(path)
        self.reason = one_line(reason)
        super().__init__(f"{show_path(path)}: {self.reason}")


@dataclass(frozen=True)
class LoadedImage:
    """A decoded image and what the rest of the product needs to know about it.

    ``bgr`` may be smaller than the original (reduced decoding, ``max_side``): ``scale`` is
    bgr pixels per original pixel, so a box found on ``bgr`` maps back by dividing by it.
    ``orig_size`` is (width, height) of the full image after EXIF orientation.
    """

    bgr: np.ndarray  # uint8 HxWx3, orientation applied
    orig_size: tuple[int, int]
    taken_at: datetime | None  # EXIF DateTimeOriginal, else DateTime; naive = camera clock
    make: str | None
    model: str | None
    is_grey: bool  # single-channel file, or colour channels (nearly) equal: IR night frame
    format: str  # "JPEG" | "PNG"
    orientation: int = 1
    scale: float = 1.0


def show_path(path: str | os.PathLike) -> str:
    """The path as one printable line: control characters and undecodable bytes escaped."""
    return one_line(os.fspath(path))


def one_line(text: str) -> str:
    """Escape what would break a log line: newlines and other control characters in a file name,
    and lone surrogates (undecodable bytes of a non-UTF-8 name, shown as \\xNN)."""
    out = []
    for ch in str(text):
        o = ord(ch)
        if 0xDC80 <= o <= 0xDCFF:  # os.fsdecode's surrogateescape for byte o - 0xDC00
            out.append(f"\\x{o - 0xDC00:02x}")
        elif 0xD800 <= o <= 0xDFFF or not ch.isprintable():
            out.append(ch.encode("unicode_escape", "backslashreplace").decode("ascii"))
        else:
            out.append(ch)
    return "".join(out)


def has_end_marker(data: bytes | np.ndarray, fmt: str) -> bool:
    """True when the bytes end like a complete file of ``fmt`` ("JPEG" or "PNG")."""
    tail = bytes(data[-4096:])
    if fmt == "PNG":
        return tail.endswith(PNG_IEND)
    tail = tail.rstrip(b"\x00")
    while tail.endswith(b"\xff\xff"):  # FF fill bytes after the marker
        tail = tail[:-1]
    return tail.endswith(JPEG_EOI)


def sniff_format(head: bytes) -> str | None:
    """JPEG / PNG from the first bytes (cheap, no Pillow)."""
    if head.startswith(b"\xff\xd8\xff"):
        return "JPEG"
    if head.startswith(b"\x89PNG\r\n\x1a\n"):
        return "PNG"
    return None


def file_complete(path: str | os.PathLike) -> bool:
    """Cheap readiness test used by ingest: the file ends with its format's end marker.

    Reads the first 8 and last 4096 bytes only. Unknown formats count as complete (the reader
    will reject them with a reason; waiting would not help).
    """
    try:
        if not stat.S_ISREG(os.stat(path).st_mode):  # a FIFO would block the open
            return False
        with open(path, "rb") as f:
            head = f.read(8)
            size = os.fstat(f.fileno()).st_size
            if size == 0:
                return False
            f.seek(max(0, size - 4096))
            tail = f.read()
    except OSError:
        return False
    fmt = sniff_format(head)
    return True if fmt is None else has_end_marker(tail, fmt)


def is_ready(path: str | os.PathLike, prev_size: int | None = None, *, decode: bool = True) -> bool:
    """Full readiness: size unchanged since ``prev_size`` (when given), end marker present,
    and (``decode=True``) the image decodes. Never raises."""
    try:
        size = os.stat(path).st_size
    except OSError:
        return False
    if size == 0 or (prev_size is not None and size != prev_size):
        return False
    if not file_complete(path):
        return False
    if decode:
        try:
            read_image(path, max_side=256)
        except ImageError:
            return False
    return True


def read_image(path: str | os.PathLike, max_side: int | None = None,
               max_pixels: int = DEFAULT_MAX_PIXELS) -> LoadedImage:
    """Decode ``path`` to BGR uint8 with EXIF orientation applied, or raise :class:`ImageError`.

    ``max_side``: the long side of the returned array is at most this (pass the models' input
    size); a JPEG is decoded reduced (1/2, 1/4, 1/8) straight from the DCT as far as its long
    side still covers ``max_side``, then resized down to exactly it with bilinear interpolation
    (the letterbox's and ultralytics' own; area interpolation costs 6x more at non-integer ratios).
    ``max_pixels``: an image with more pixels than this (width x height from its header) is
    refused before decoding, in every format; so is a file larger than such an image could be.
    """
    try:
        st = os.stat(path)
        if stat.S_ISDIR(st.st_mode):
            raise IsADirectoryError(path)
        if not stat.S_ISREG(st.st_mode):  # opening a FIFO blocks until a writer comes; a device never ends
            raise ImageError(path, "not a regular file (a pipe, socket or device): refused unopened")
        size = st.st_size
        if size > max_pixels * MAX_BYTES_PER_PIXEL + FILE_SLACK_BYTES:
            raise ImageError(path, f"file of {size / 1e6:.0f} MB is larger than any image within the "
                             f"{_mp(max_pixels)} MP limit (watch.max_megapixels) could be: refused unread")
        data = np.fromfile(os.fspath(path), dtype=np.uint8)
    except FileNotFoundError:
        raise ImageError(path, "file vanished before it could be read") from None
    except IsADirectoryError:
        raise ImageError(path, "is a directory, not an image") from None
    except OSError as e:
        raise ImageError(path, f"cannot read: {e.strerror or e}") from None
    if data.size == 0:
        raise ImageError(path, "empty file (0 bytes)")

    raw = data.tobytes()
    pil, fmt = _open_header(path, raw)
    w, h = pil.size
    if w * h > max_pixels:
        raise ImageError(path, f"{fmt} of {w}x{h} ({_mp(w * h)} MP) is above the {_mp(max_pixels)} MP "
                         "limit (watch.max_megapixels): refused without decoding")
    exif = _exif(pil)
    tag = exif.get(_TAG_ORIENTATION)
    orientation = tag if isinstance(tag, int) and tag in range(1, 9) else 1
    if orientation not in range(1, 9):
        orientation = 1

    if not has_end_marker(raw, fmt):
        if fmt == "PNG" or not _jpeg_entropy_complete(raw):
            raise ImageError(path, f"truncated {fmt} (no end marker; {data.size} bytes): still being "
                             "written or cut off")

    factor = _reduce_factor(w, h, max_side) if fmt == "JPEG" else 1
    flag = {1: cv2.IMREAD_COLOR, 2: cv2.IMREAD_REDUCED_COLOR_2, 4: cv2.IMREAD_REDUCED_COLOR_4,
            8: cv2.IMREAD_REDUCED_COLOR_8}[factor]
    bgr = cv2.imdecode(data, flag | cv2.IMREAD_IGNORE_ORIENTATION)
    del data, raw
    if bgr is None or bgr.ndim != 3 or bgr.shape[2] != 3 or bgr.size == 0:
        raise ImageError(path, f"{fmt} decode failed (corrupt data; header says {w}x{h} {pil.mode})")

    bgr = _apply_orientation(bgr, orientation)
    ow, oh = (h, w) if orientation in _ORIENT_SWAPS else (w, h)
    if max_side is not None and max(bgr.shape[:2]) > max_side:
        s = max_side / max(bgr.shape[:2])
        bgr = cv2.resize(bgr, (max(1, round(bgr.shape[1] * s)), max(1, round(bgr.shape[0] * s))),
                         interpolation=cv2.INTER_LINEAR)
    bgr = np.ascontiguousarray(bgr)
    return LoadedImage(
        bgr=bgr,
        orig_size=(ow, oh),
        taken_at=_taken_at(exif),
        make=_text(exif.get(_TAG_MAKE)),
        model=_text(exif.get(_TAG_MODEL)),
        is_grey=pil.mode in GREY_MODES or channels_equal(bgr),
        format=fmt,
        orientation=orientation,
        scale=bgr.shape[1] / ow,
    )


def channels_equal(bgr: np.ndarray, tol: int = 8, max_fraction: float = 0.01) -> bool:
    """True when B, G and R agree within ``tol`` on all but ``max_fraction`` of pixels.

    IR night frames are saved as 3-channel JPEGs of grey content; chroma subsampling and a
    coloured maker logo (Reconyx: 0.27% of pixels) make them not exactly equal.
    """
    step = max(1, int(np.sqrt(bgr.shape[0] * bgr.shape[1] / 250_000)))  # ~250k pixels sampled
    s = bgr[::step, ::step].astype(np.int16)
    d = np.maximum(np.abs(s[..., 0] - s[..., 1]), np.abs(s[..., 0] - s[..., 2]))
    return float((d > tol).mean()) <= max_fraction


def _open_header(path, raw: bytes) -> tuple[Image.Image, str]:
    try:
        pil = Image.open(io.BytesIO(raw))
    except UnidentifiedImageError:
        raise ImageError(path, f"not an image (unrecognised content, starts with {_describe_head(raw)})") \
            from None
    except Image.DecompressionBombError as e:
        raise ImageError(path, f"image above Pillow's {PILLOW_MAX_MEGAPIXELS} MP bound: refused without "
                         f"decoding ({e})") from None
    except (OSError, SyntaxError, ValueError) as e:
        raise ImageError(path, f"unreadable image header ({e})") from None
    fmt = SUPPORTED_FORMATS.get(pil.format or "")
    if fmt is None:
        raise ImageError(path, f"unsupported format {pil.format} (JPEG and PNG are read)")
    return pil, fmt


def _describe_head(raw: bytes) -> str:
    head = raw[:16]
    try:
        text = head.decode("utf-8")
        if all(c.isprintable() or c in "\r\n\t" for c in text):
            return f"text {text[:12]!r}"
    except UnicodeDecodeError:
        pass
    return f"bytes {head[:8].hex(' ')}"


def _jpeg_entropy_complete(raw: bytes) -> bool:
    """Does libjpeg (via Pillow, at 1/8 scale) find all the scan data? Handles trailer bytes."""
    try:
        im = Image.open(io.BytesIO(raw))
        im.draft("RGB", (max(1, im.size[0] // 8), max(1, im.size[1] // 8)))
        im.load()
        return True
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError):
        return False


def _reduce_factor(w: int, h: int, max_side: int | None) -> int:
    """JPEG DCT scaling 1/2/4/8: the largest reduction whose long side (libjpeg rounds up) is
    still >= ``max_side``, so the detector loses no detail; 1 without ``max_side``."""
    factor = 1
    if max_side is not None:
        while factor < 8 and -(-max(w, h) // (factor * 2)) >= max_side:
            factor *= 2
    return factor


def _mp(pixels: float) -> str:
    """Megapixels for a message: 50, 55.0, 100.8, 0.0012."""
    v = pixels / 1e6
    return str(int(v)) if v == int(v) else f"{v:.1f}" if v >= 1 else f"{v:.2g}"


def _apply_orientation(a: np.ndarray, o: int) -> np.ndarray:
    """EXIF orientation 1..8 -> upright pixels."""
    if o == 2:
        return cv2.flip(a, 1)
    if o == 3:
        return cv2.rotate(a, cv2.ROTATE_180)
    if o == 4:
        return cv2.flip(a, 0)
    if o == 5:
        return cv2.flip(cv2.rotate(a, cv2.ROTATE_90_CLOCKWISE), 1)
    if o == 6:
        return cv2.rotate(a, cv2.ROTATE_90_CLOCKWISE)
    if o == 7:
        return cv2.flip(cv2.rotate(a, cv2.ROTATE_90_COUNTERCLOCKWISE), 1)
    if o == 8:
        return cv2.rotate(a, cv2.ROTATE_90_COUNTERCLOCKWISE)
    return a


def _exif(pil: Image.Image) -> dict[int, object]:
    """IFD0 and Exif sub-IFD tags in one dict; a corrupt EXIF block yields {} (pixels still count)."""
    try:
        ex = pil.getexif()
        tags: dict[int, object] = dict(ex)
        try:
            tags.update(ex.get_ifd(_IFD_EXIF))
        except (KeyError, OSError, ValueError, TypeError):
            pass
        return tags
    except Exception:  # Pillow raises assorted types on malformed EXIF
        return {}


def _text(v: object) -> str | None:
    if v is None:
        return None
    if isinstance(v, bytes):
        v = v.decode("utf-8", "replace")
    s = str(v).replace("\x00", "").strip()
    return s or None


def parse_exif_datetime(value: object, subsec: object = None, offset: object = None) -> datetime | None:
    """'YYYY:MM:DD HH:MM:SS' (+ SubSecTime, + OffsetTime '+01:00') -> datetime, None if unset/bad;
    a bad sub-second or offset field is dropped. Never raises: it runs inside the reader thread,
    whose failure stops the daemon."""
    s = _text(value)
    if not s or s.startswith("0000"):
        return None
    try:
        dt = datetime.strptime(s[:19], "%Y:%m:%d %H:%M:%S")
    except ValueError:
        try:
            dt = datetime.strptime(s[:19].replace("-", ":"), "%Y:%m:%d %H:%M:%S")
        except ValueError:
            return None
    sub = _text(subsec)
    if sub and sub.isascii() and sub.isdigit():  # Latin-1 '²' is a digit to isdigit(), not to int()
        dt = dt.replace(microsecond=int((sub + "000000")[:6]))
    off = _text(offset)
    if off and len(off) == 6 and off[0] in "+-" and off[3] == ":" and off.isascii():
        try:
            sign = 1 if off[0] == "+" else -1
            dt = dt.replace(tzinfo=timezone(sign * timedelta(hours=int(off[1:3]), minutes=int(off[4:6]))))
        except ValueError:
            pass
    return dt


def _taken_at(exif: dict[int, object]) -> datetime | None:
    dt = parse_exif_datetime(exif.get(_TAG_DT_ORIGINAL), exif.get(_TAG_SUBSEC_ORIGINAL),
                             exif.get(_TAG_OFFSET_ORIGINAL))
    if dt is None:
        dt = parse_exif_datetime(exif.get(_TAG_DATETIME), exif.get(_TAG_SUBSEC), exif.get(_TAG_OFFSET))
    return dt
