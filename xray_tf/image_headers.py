"""What an image file is and what its header declares, found before anything decodes it.

Some files must be refused by name before decoding: a path that is no regular readable file
(``file_problem``: opening a FIFO would block for ever) and an image whose header declares more
pixels than ``max_pixels`` (``precheck``: a few hundred bytes may claim 23000 x 23000
pixels, gigabytes once decoded). ``precheck`` does both and estimates what decoding the rest
costs, so that callers can bound the memory of their parallel decodes (``Precheck.decodes_alone``).

Only the standard library is imported: headers are read with ``os`` and a few seeks, never the
image data, so code without TensorFlow (the data index, say) can ask the same questions.
"""

from __future__ import annotations

import dataclasses
import errno
import io
import os
import stat

# Formats told apart by their first bytes: which header to read, and what a file that does not decode is.
_SIGNATURES = (
    (b"\xff\xd8\xff", "JPEG"),
    (b"\x89PNG\r\n\x1a\n", "PNG"),
    (b"GIF8", "GIF"),
    (b"BM", "BMP"),
    (b"II*\x00", "TIFF"),
    (b"MM\x00*", "TIFF"),
    (b"\x00\x00\x00\x0cjP  \r\n\x87\n", "JPEG 2000"),
    (b"\xff\x4f\xff\x51", "JPEG 2000"),
)
UNSUPPORTED_FORMATS = ("TIFF", "DICOM", "JPEG 2000")  # recognised, so that a refusal can name them
_FORMATS_DECODED = ("JPEG", "PNG", "GIF", "BMP", "WebP")  # what decode.decode_image tells apart by their first bytes


def sniff_format(head: bytes) -> str | None:
    """The image format that the first 132 bytes of a file announce, or None if none is known."""
    if head[128:132] == b"DICM":
        return "DICOM"
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "WebP"
    return next((name for magic, name in _SIGNATURES if head.startswith(magic)), None)


# What stat says a path is, for the paths that are no regular file.
_KINDS = {stat.S_IFDIR: "is a directory", stat.S_IFIFO: "is a FIFO (named pipe)", stat.S_IFSOCK: "is a socket",
          stat.S_IFCHR: "is a device", stat.S_IFBLK: "is a device"}


def file_problem(path: str) -> str | None:
    """None for a regular file this process may read; else what ``path`` is instead, in words.

    Only ``stat`` and ``lstat`` look at the path: opening a FIFO would wait for a writer for ever.
    """
    try:
        mode = os.stat(path).st_mode
    except OSError as error:
        if error.errno == errno.ELOOP:
            return "is a symlink loop"
        if error.errno == errno.EACCES:
            return "cannot be read: permission denied"
        if error.errno not in (errno.ENOENT, errno.ENOTDIR):
            return f"cannot be read: {error.strerror}"
        return f"is a broken symlink to {os.readlink(path)}" if os.path.islink(path) else "does not exist"
    if not stat.S_ISREG(mode):
        return _KINDS.get(stat.S_IFMT(mode), "is not a regular file")
    return None if os.access(path, os.R_OK) else "cannot be read: permission denied"


@dataclasses.dataclass(frozen=True)
class Header:
    """What an image file's header declares, read without decoding it."""

    width: int
    height: int
    channels: int  # of the array TensorFlow decodes the file to, at most
    sample_bytes: int = 1  # 2 for 16-bit PNG

    @property
    def pixels(self) -> int:
        return self.width * self.height


_JPEG_SOF = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}  # start-of-frame markers (DHT, JPG, DAC excluded)
_JPEG_NO_LENGTH = frozenset([0x01, *range(0xD0, 0xD8)])  # TEM and RSTn stand alone, without a length


def _jpeg_header(handle: io.BufferedReader) -> Header | None:
    """Walk a JPEG's markers to its start-of-frame, seeking over segments (so a big EXIF costs nothing)."""
    handle.seek(2)
    for _ in range(65536):  # far more segments than any real file has before its frame
        byte, stray = handle.read(1), 0
        while byte and byte != b"\xff" and stray < 65536:  # libjpeg skips stray bytes before a marker
            byte, stray = handle.read(1), stray + 1
        while byte == b"\xff":  # and fill bytes
            byte = handle.read(1)
        if not byte or byte in (b"\xd9", b"\xda"):  # the end, or the image data, before any frame
            return None
        if byte[0] in _JPEG_NO_LENGTH:
            continue
        length = int.from_bytes(handle.read(2), "big")
        if byte[0] in _JPEG_SOF:
            body = handle.read(6)  # precision, height, width, components
            return Header(int.from_bytes(body[3:5], "big"), int.from_bytes(body[1:3], "big"), body[5]) \
                if len(body) == 6 else None
        if length < 2:
            return None
        handle.seek(length - 2, os.SEEK_CUR)
    return None


def _skip_sub_blocks(handle: io.BufferedReader) -> bool:
    """Seek past a GIF's chain of sized sub-blocks; False if the file ends first."""
    size = handle.read(1)
    while size and size != b"\x00":
        handle.seek(size[0], os.SEEK_CUR)
        size = handle.read(1)
    return bool(size)


def _gif_header(handle: io.BufferedReader) -> Header | None:
    """The largest of a GIF's screen and frames: its decoder holds every frame, sized by its own header."""
    head = handle.read(13)
    if len(head) < 13:
        return None
    width, height = int.from_bytes(head[6:8], "little"), int.from_bytes(head[8:10], "little")
    if head[10] & 0x80:  # a global colour table follows the screen descriptor
        handle.seek(3 << ((head[10] & 7) + 1), os.SEEK_CUR)
    for _ in range(65536):  # blocks: frames and extensions, up to the trailer
        block = handle.read(1)
        if block == b"\x3b":
            return Header(width, height, 3)
        if block == b"\x2c":  # a frame: left, top, width, height, flags, [colour table], code size, data
            frame = handle.read(9)
            if len(frame) < 9:
                return None
            width = max(width, int.from_bytes(frame[4:6], "little"))
            height = max(height, int.from_bytes(frame[6:8], "little"))
            if frame[8] & 0x80:
                handle.seek(3 << ((frame[8] & 7) + 1), os.SEEK_CUR)
            handle.seek(1, os.SEEK_CUR)
        elif block != b"\x21" or not handle.read(1):  # else an extension, with its label
            return None
        if not _skip_sub_blocks(handle):
            return None
    return None


def _fixed_header(found: str, head: bytes) -> Header | None:
    """PNG, BMP or WebP sizes, at fixed places in their first 30 bytes."""
    if found == "PNG" and head[12:16] == b"IHDR" and len(head) >= 26:
        channels = {0: 1, 2: 3, 3: 4, 4: 2, 6: 4}.get(head[25], 4)  # a palette may expand to RGBA
        return Header(int.from_bytes(head[16:20], "big"), int.from_bytes(head[20:24], "big"), channels,
                      2 if head[24] == 16 else 1)
    if found == "BMP" and len(head) >= 30:
        if int.from_bytes(head[14:18], "little") == 12:  # the old OS/2 header: 16-bit sides
            width, height, bits = (int.from_bytes(head[at : at + 2], "little") for at in (18, 20, 24))
        else:
            width, height = (abs(int.from_bytes(head[at : at + 4], "little", signed=True)) for at in (18, 22))
            bits = int.from_bytes(head[28:30], "little")
        return Header(width, height, 4 if bits > 24 else 3 if bits > 8 else 1)
    if found == "WebP" and head[12:16] == b"VP8 " and head[23:26] == b"\x9d\x01\x2a":
        return Header(int.from_bytes(head[26:28], "little") & 0x3FFF, int.from_bytes(head[28:30], "little") & 0x3FFF, 4)
    if found == "WebP" and head[12:16] == b"VP8L" and head[20:21] == b"\x2f":
        bits = int.from_bytes(head[21:25], "little")
        return Header((bits & 0x3FFF) + 1, ((bits >> 14) & 0x3FFF) + 1, 4)
    if found == "WebP" and head[12:16] == b"VP8X":
        return Header(int.from_bytes(head[24:27], "little") + 1, int.from_bytes(head[27:30], "little") + 1, 4)
    return None


def _inspect(path: str) -> tuple[str | None, Header | None]:
    """The format that ``path``'s first bytes announce and what its header declares, each None if unknown.

    Reads a few bytes (a JPEG's marker headers, a GIF's extension lengths), never the image data;
    the file is opened without blocking and left alone unless it is a regular file.
    """
    try:
        descriptor = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    except OSError:
        return None, None
    with os.fdopen(descriptor, "rb") as handle:
        if not stat.S_ISREG(os.fstat(descriptor).st_mode):
            return None, None
        head = handle.read(132)
        found = sniff_format(head)
        if found == "JPEG":
            return found, _jpeg_header(handle)
        if found == "GIF":
            handle.seek(0)
            return found, _gif_header(handle)
        return found, _fixed_header(found, head)


def read_header(path: str) -> Header | None:
    """Width, height and channels that the header of a JPEG, PNG, GIF, BMP or WebP file declares; None if unknown."""
    return _inspect(path)[1]


def _over_budget(header: Header, max_pixels: int) -> str | None:
    if header.pixels <= max_pixels:
        return None
    return (f"header declares {header.width} x {header.height} = {header.pixels / 1e6:.3g} megapixels, above "
            f"--max_pixels={max_pixels}; raise --max_pixels to decode it")


# Bytes that the decodes running at one time may hold together; see Precheck.decodes_alone.
DECODE_MEMORY = 2 * 2**30


@dataclasses.dataclass(frozen=True)
class Precheck:
    """What is known of a file before decoding it: why it is refused, else what decoding it may cost."""

    problem: str | None  # file_problem's or the pixel budget's words; None: decode it
    memory: int | None  # bytes its decode may hold at once; None: its header could not be read

    def decodes_alone(self, parallel: int) -> bool:
        """Whether to decode this file while no other decode runs, so that decodes ``parallel`` at a
        time hold at most ``DECODE_MEMORY`` together (or one file's own cost, when that is more)."""
        return self.memory is None or self.memory > DECODE_MEMORY // parallel


def precheck(path: str, max_pixels: int) -> Precheck:
    """Refuse what must not be decoded (no regular readable file, more pixels than ``max_pixels``) and
    estimate the memory of decoding the rest.

    The estimate is the file (read whole) plus twice the array its header declares (the decoded
    image and at most one conversion copy: 16-bit to 8-bit, RGBA to RGB). A file that announces a
    format TensorFlow decodes but whose header cannot be read has no estimate (None); a file of
    any other format fails before allocating anything and costs its size.
    """
    problem = file_problem(path)
    if problem is not None:
        return Precheck(problem, None)
    found, header = _inspect(path)
    if header is not None:
        problem = _over_budget(header, max_pixels)
        return Precheck(problem, os.path.getsize(path) + 2 * header.pixels * header.channels * header.sample_bytes)
    return Precheck(None, None if found in _FORMATS_DECODED else os.path.getsize(path))
