"""edge.imageio on real camera-trap JPEGs and on the bad-input corpus (real files, real decoders)."""

from __future__ import annotations

import io
import os
import subprocess
import sys
import textwrap
from datetime import datetime, timedelta, timezone
from pathlib import Path

import cv2
import numpy as np
import pytest
from PIL import Image

from edge.imageio import (
    ImageError,
    _reduce_factor,
    file_complete,
    has_end_marker,
    is_ready,
    one_line,
    parse_exif_datetime,
    read_image,
    show_path,
)

sys.path.insert(0, str(Path(__file__).parent))
from badinputs import HUGE_SIZE, big_png, make_bad_corpus, real_frames

# production filters this at import; pytest resets warning filters per test
pytestmark = pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return make_bad_corpus(tmp_path_factory.mktemp("bad") / "watch")


def test_corpus_quarantine_reasons_are_one_line_naming_the_file(corpus):
    seen = {"quarantine": 0, "ok": 0}
    for name, (path, expected) in corpus.items():
        if expected == "quarantine":
            with pytest.raises(ImageError) as ei:
                read_image(path)
            msg = str(ei.value)
            assert "\n" not in msg and "\r" not in msg, name
            assert msg.startswith(show_path(path) + ": "), (name, msg)
            assert ei.value.reason and ei.value.path == Path(path)
            seen["quarantine"] += 1
        elif expected in ("ok", "reject"):  # reject = ingest's job; the bytes themselves are fine
            im = read_image(path, max_side=1280)
            assert im.bgr.dtype == np.uint8 and im.bgr.ndim == 3 and im.bgr.shape[2] == 3, name
            assert max(im.bgr.shape[:2]) <= 1280
            seen["ok"] += 1
        else:
            raise AssertionError(f"unknown expectation {expected!r} for {name}")
    assert seen["quarantine"] >= 7 and seen["ok"] >= 10


@pytest.mark.parametrize("name,needle", [
    ("zero_bytes", "empty file"),
    ("truncated_jpeg", "truncated JPEG"),
    ("truncated_png", "truncated PNG"),
    ("text_named_jpg", "not an image"),
    ("html_named_jpg", "not an image"),
    ("gif_named_jpg", "unsupported format GIF"),
    ("odd_newline_truncated", "truncated JPEG"),
])
def test_quarantine_reason_says_what_is_wrong(corpus, name, needle):
    with pytest.raises(ImageError, match=needle):
        read_image(corpus[name][0])


def test_newline_in_file_name_is_escaped(corpus):
    with pytest.raises(ImageError) as ei:
        read_image(corpus["odd_newline_truncated"][0])
    assert "line\\nbreak.jpg" in str(ei.value)


def test_non_utf8_file_name_reads_and_prints(corpus):
    path = corpus["odd_non_utf8_bytes"][0]
    assert read_image(path).bgr.shape == (360, 512, 3)
    assert "latin1-\\xe9t\\xe9.jpg" in show_path(path)
    show_path(path).encode("utf-8")  # printable in a UTF-8 log


@pytest.mark.parametrize("name", ["odd_unicode", "odd_spaces", "odd_hash", "odd_leading_dash"])
def test_odd_file_names_read(corpus, name):
    assert read_image(corpus[name][0]).bgr.shape == (360, 512, 3)


def test_real_reconyx_frame_exif_and_grey():
    im = read_image(real_frames()[0])
    assert im.bgr.shape == (1440, 2048, 3)
    assert im.orig_size == (2048, 1440) and im.scale == 1.0
    assert im.taken_at == datetime(2021, 4, 11, 20, 43, 9)  # naive: the camera's local clock
    assert (im.make, im.model) == ("RECONYX", "HYPERFIRE 2 COVERT")
    assert im.is_grey  # IR frame stored as 3 channels, with a coloured logo in the corner
    assert im.format == "JPEG"


def test_max_side_shrinks_and_reports_scale():
    im = read_image(real_frames()[0], max_side=1280)
    assert im.bgr.shape == (900, 1280, 3)
    assert im.orig_size == (2048, 1440)
    assert im.scale == pytest.approx(1280 / 2048)


def test_exif_rotation_applied_explicitly(corpus):
    path = corpus["exif_rotated"][0]
    im = read_image(path)
    assert im.orientation == 6
    assert im.bgr.shape == (80, 40, 3) and im.orig_size == (40, 80)
    top, bottom = im.bgr[5, 20], im.bgr[-5, 20]
    assert top[2] > 200 and top[0] < 50 and bottom.max() < 50  # stored left half red -> on top
    raw = cv2.imdecode(np.fromfile(path, np.uint8), cv2.IMREAD_COLOR | cv2.IMREAD_IGNORE_ORIENTATION)
    assert raw.shape == (40, 80, 3)  # the stored pixels really are landscape
    assert im.make == "TestCam" and not im.is_grey


def test_cmyk_jpeg_colours(corpus):
    im = read_image(corpus["cmyk_jpeg"][0])
    b, g, r = (int(v) for v in im.bgr[24, 32])
    assert abs(r - 200) < 12 and abs(g - 30) < 12 and abs(b - 40) < 12
    assert not im.is_grey


def test_grey_single_channel_jpeg(corpus):
    im = read_image(corpus["grey_ir_1ch"][0])
    assert im.is_grey and im.bgr.shape == (360, 512, 3)
    assert np.array_equal(im.bgr[..., 0], im.bgr[..., 2])


def test_png_reads(corpus):
    im = read_image(corpus["png"][0])
    assert im.format == "PNG" and im.bgr.shape == (360, 512, 3) and im.taken_at is None


def test_jpeg_with_trailer_after_eoi_is_not_truncated(corpus):
    path = corpus["jpeg_trailer"][0]
    assert not has_end_marker(path.read_bytes(), "JPEG")
    assert read_image(path).bgr.shape == (1440, 2048, 3)


def test_huge_jpeg_decoded_reduced_when_the_limit_allows(corpus):
    w, h = HUGE_SIZE
    im = read_image(corpus["huge_100mp"][0], max_side=1280, max_pixels=150_000_000)
    assert im.orig_size == (w, h)
    assert max(im.bgr.shape[:2]) == 1280 and im.scale == pytest.approx(1280 / w)
    hh, ww = im.bgr.shape[:2]
    assert im.bgr[hh // 4, ww // 4].tolist() == pytest.approx([0, 0, 255], abs=8)  # red top-left
    assert im.bgr[hh // 4, 3 * ww // 4].tolist() == pytest.approx([0, 255, 0], abs=8)
    assert im.bgr[3 * hh // 4, ww // 4].tolist() == pytest.approx([255, 0, 0], abs=8)


@pytest.mark.parametrize("which", ["png_55mp", "jpeg_100mp"])
def test_images_above_max_megapixels_are_refused_from_the_header(corpus, tmp_path, which):
    """watch.max_megapixels is one rule for every format, applied before decoding (issue 7.4:
    a 55 MP PNG under the 50 MP default was decoded in full, RSS 176 -> 648 MB)."""
    if which == "png_55mp":
        path, dims = corpus["huge_png_55mp"][0], "7500x7334 (55.0 MP)"
    else:
        path, dims = corpus["huge_100mp"][0], "12000x8400 (100.8 MP)"
    code = textwrap.dedent(f"""
        import resource
        from edge.imageio import ImageError, read_image
        read_image({str(real_frames()[0])!r}, max_side=640)   # warm up: imports, codecs
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        try:
            read_image({str(path)!r}, max_side=640, max_pixels=50_000_000)
            print("decoded")
        except ImageError as e:
            print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) // 1024, e)
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert "decoded" not in out, out
    grew_mb, msg = out.strip().split(" ", 1)
    assert int(grew_mb) < 20, out  # a full decode of either would take > 160 MB
    assert msg.startswith(show_path(path) + ": ") and "\n" not in msg
    assert f"{dims} is above the 50 MP limit (watch.max_megapixels)" in msg, msg
    assert "refused without decoding" in msg


def test_limit_is_inclusive_and_default_is_the_config_default(tmp_path):
    from edge.config import WatchSection
    from edge.imageio import DEFAULT_MAX_PIXELS

    assert WatchSection.model_fields["max_megapixels"].default * 1_000_000 == DEFAULT_MAX_PIXELS
    p = big_png(tmp_path / "small.png", 40, 30)
    assert read_image(p, max_pixels=1200).bgr.shape == (30, 40, 3)  # exactly at the limit: read
    with pytest.raises(ImageError, match=r"40x30 \(0.0012 MP\) is above the 0.0012 MP limit"):
        read_image(p, max_pixels=1199)


def test_file_too_large_for_any_image_within_the_limit_is_refused_unread(tmp_path):
    p = tmp_path / "huge.jpg"
    with open(p, "wb") as f:
        f.truncate(8 * 1000 + 16 * 1024 * 1024 + 1)  # sparse: no disk used
    with pytest.raises(ImageError, match=r"larger than any image within the 0\.001 MP limit"):
        read_image(p, max_pixels=1000)


def test_huge_jpeg_memory_stays_bounded(corpus):
    """Peak RSS of reading the 100 MP JPEG (allowed by a raised limit) must stay far below a
    full decode (302 MB): it is decoded reduced straight from the DCT."""
    code = textwrap.dedent(f"""
        import resource, sys
        from edge.imageio import read_image
        read_image({str(real_frames()[0])!r}, max_side=1280)   # warm up: imports, codecs
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        im = read_image({str(corpus["huge_100mp"][0])!r}, max_side=1280, max_pixels=150_000_000)
        after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        print((after - before) // 1024, im.bgr.shape)
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    grew_mb = int(out.stdout.split()[0])
    assert grew_mb < 80, out.stdout


def test_reduce_factor():
    """The largest DCT reduction that still covers the model input (libjpeg rounds sizes up)."""
    assert _reduce_factor(2048, 1440, 1280) == 1
    assert _reduce_factor(2048, 1440, 1024) == 2
    assert _reduce_factor(2048, 1440, 640) == 2
    assert _reduce_factor(2048, 1440, 512) == 4
    assert _reduce_factor(2048, 1440, 160) == 8
    assert _reduce_factor(4096, 3072, 1280) == 2
    assert _reduce_factor(12000, 8400, 1280) == 8
    assert _reduce_factor(12000, 8400, None) == 1
    assert _reduce_factor(100, 100, 1280) == 1
    assert _reduce_factor(2049, 1440, 256) == 8  # ceil(2049 / 8) = 257 >= 256


@pytest.mark.parametrize("side", [160, 320, 640])
def test_real_frame_decoded_reduced_to_the_model_input(side):
    """A 2048x1440 Reconyx frame read for a ``side`` px model: long side exactly ``side``, and
    the pixels agree with a full decode area-averaged to the same size (DCT scaling averages
    too; measured 0.6-0.9 levels of 255). A bilinear resize of the full frame, which
    ultralytics' predict does, aliases and differs by 1.2-4 levels."""
    path = real_frames()[0]
    im = read_image(path, max_side=side)
    assert im.orig_size == (2048, 1440) and max(im.bgr.shape[:2]) == side
    full = cv2.imread(str(path), cv2.IMREAD_COLOR | cv2.IMREAD_IGNORE_ORIENTATION)
    ref = cv2.resize(full, (im.bgr.shape[1], im.bgr.shape[0]), interpolation=cv2.INTER_AREA)
    diff = np.abs(ref.astype(np.int16) - im.bgr.astype(np.int16))
    assert diff.mean() < 1.5, diff.mean()


def test_is_ready_and_file_complete(tmp_path, corpus):
    good = real_frames()[0]
    assert is_ready(good) and is_ready(good, prev_size=good.stat().st_size)
    assert not is_ready(good, prev_size=good.stat().st_size - 1)  # size still changing
    assert not is_ready(corpus["truncated_jpeg"][0]) and not file_complete(corpus["truncated_jpeg"][0])
    assert not is_ready(corpus["zero_bytes"][0]) and not file_complete(corpus["zero_bytes"][0])
    assert not is_ready(corpus["text_named_jpg"][0])  # complete as far as we can tell, but no image
    assert file_complete(corpus["png"][0]) and not file_complete(corpus["truncated_png"][0])
    assert not is_ready(tmp_path / "missing.jpg")
    data = good.read_bytes()
    p = tmp_path / "growing.jpg"
    with open(p, "wb") as f:
        for i in range(0, len(data), 65536):  # every prefix of a real JPEG is "not ready"
            f.write(data[i:i + 65536])
            f.flush()
            if i + 65536 < len(data):
                assert not file_complete(p) and not is_ready(p)
    assert file_complete(p) and is_ready(p)


def test_parse_exif_datetime():
    assert parse_exif_datetime("2021:04:11 20:43:09") == datetime(2021, 4, 11, 20, 43, 9)
    assert parse_exif_datetime(b"2021:04:11 20:43:09\x00") == datetime(2021, 4, 11, 20, 43, 9)
    assert parse_exif_datetime("2021:04:11 20:43:09", "25") == datetime(2021, 4, 11, 20, 43, 9, 250000)
    aware = parse_exif_datetime("2021:04:11 20:43:09", None, "+01:00")
    assert aware == datetime(2021, 4, 11, 19, 43, 9, tzinfo=timezone.utc)
    assert aware.utcoffset() == timedelta(hours=1)
    assert parse_exif_datetime("0000:00:00 00:00:00") is None
    assert parse_exif_datetime("    ") is None and parse_exif_datetime(None) is None
    assert parse_exif_datetime("garbage") is None


def test_datetime_fallback_and_subsec(tmp_path):
    exif = Image.Exif()
    exif[0x0132] = "2022:01:02 03:04:05"  # DateTime only (IFD0)
    buf = io.BytesIO()
    Image.new("RGB", (16, 16), (10, 200, 10)).save(buf, "JPEG", exif=exif.tobytes())
    p = tmp_path / "dt.jpg"
    p.write_bytes(buf.getvalue())
    assert read_image(p).taken_at == datetime(2022, 1, 2, 3, 4, 5)
    exif.get_ifd(0x8769)[0x9003] = "2022:01:02 03:04:06"
    exif.get_ifd(0x8769)[0x9291] = "5"
    buf = io.BytesIO()
    Image.new("RGB", (16, 16), (10, 200, 10)).save(buf, "JPEG", exif=exif.tobytes())
    p.write_bytes(buf.getvalue())
    assert read_image(p).taken_at == datetime(2022, 1, 2, 3, 4, 6, 500000)  # Original wins


def test_one_line():
    assert one_line("a\nb\tc") == "a\\nb\\tc"
    assert one_line(os.fsdecode(b"x\xff.jpg")) == "x\\xff.jpg"
    assert one_line("ñandú 鹿") == "ñandú 鹿"


def test_directory_and_missing_file(tmp_path):
    with pytest.raises(ImageError, match="directory"):
        read_image(tmp_path)
    with pytest.raises(ImageError, match="vanished"):
        read_image(tmp_path / "nope.jpg")


@pytest.mark.parametrize("reader", ["read_image", "file_complete"])
def test_a_fifo_named_like_an_image_is_refused_not_waited_on(tmp_path, reader):
    """Opening a FIFO blocks until someone writes to it: `camtrap-edge classify x.jpg` on one hung
    forever. Anything but a regular file is refused before it is opened."""
    import threading

    from edge import imageio

    fifo = tmp_path / "pipe.jpg"
    os.mkfifo(fifo)
    outcome: list[object] = []

    def run() -> None:
        try:
            outcome.append(getattr(imageio, reader)(fifo))
        except imageio.ImageError as e:
            outcome.append(e)

    worker = threading.Thread(target=run, daemon=True)
    worker.start()
    worker.join(5)
    if not outcome:  # unblock the reader so the thread ends, then fail
        with open(fifo, "wb"):
            pass
        pytest.fail(f"{reader} blocked on a FIFO")
    if reader == "read_image":
        assert isinstance(outcome[0], imageio.ImageError) and "not a regular file" in str(outcome[0])
    else:
        assert outcome[0] is False


def _exif_jpeg(tags: dict[int, str], patch: dict[str, bytes]) -> bytes:
    """A small JPEG whose Exif sub-IFD holds ``tags`` as ASCII, with ``patch`` replacing placeholder
    text by raw bytes of the same length in the EXIF block (what a camera's firmware writes, not
    what Pillow would)."""
    exif = Image.Exif()
    for tag, text in tags.items():
        exif.get_ifd(0x8769)[tag] = text
    raw = exif.tobytes()
    for placeholder, data in patch.items():
        assert len(placeholder) == len(data) and raw.count(placeholder.encode()) == 1
        raw = raw.replace(placeholder.encode(), data)
    buf = io.BytesIO()
    Image.new("RGB", (16, 16), (10, 200, 10)).save(buf, "JPEG", exif=raw)
    return buf.getvalue()


def test_odd_characters_in_exif_time_fields_never_raise():
    """EXIF ASCII fields are read as Latin-1, where ¹ ² ³ are 'digits' to str.isdigit() but not to
    int(): a SubSecTimeOriginal byte 0xB2 raised ValueError out of read_image, killing the reader
    thread (the daemon stopped; the frame counted as a crash until quarantined). Every Latin-1
    character in every position of the date, sub-second and offset fields: a datetime or None."""
    base, sub, off = "2026:11:30 10:00:00", "12", "+01:00"
    for code in range(256):
        c = bytes([code]).decode("latin-1")
        for k in range(len(base)):
            parse_exif_datetime(base[:k] + c + base[k + 1:], sub, off)
        for k in range(len(sub)):
            parse_exif_datetime(base, sub[:k] + c + sub[k + 1:], off)
        for k in range(len(off)):
            parse_exif_datetime(base, sub, off[:k] + c + off[k + 1:])
    assert parse_exif_datetime(base, "\u00b2", None) == datetime(2026, 11, 30, 10)  # the sub-second part is dropped


def test_a_frame_with_a_latin1_digit_in_its_subsecond_field_is_read_with_its_time(tmp_path):
    p = tmp_path / "sup.jpg"
    p.write_bytes(_exif_jpeg({0x9003: "2026:11:30 10:00:00", 0x9291: "Q", 0x9011: "+RR:00"},
                             {"Q": b"\xb2", "RR": b"\xb9\xb9"}))
    assert read_image(p).taken_at == datetime(2026, 11, 30, 10)
