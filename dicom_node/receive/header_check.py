"""The header check of one received Part 10 object: parse what precedes Pixel Data, never the pixels.

Why this is its own reader rather than ``dcmread``: the C-STORE answer must tell the truth about malformed
input, and ``dcmread`` hides it. It reads a defined-length value that runs past the end of the file without
complaint, only warns when an undefined-length value has no delimiter (and drops the element), inflates a
Deflated data set whole (a deflate bomb), and converts values lazily, so garbage surfaces later as any
exception. Here:

* only the elements before Pixel Data are parsed (``defer_size`` keeps larger values on disk); the Pixel Data
  element header is decoded by hand and its declared length checked against the object's size and, for native
  syntaxes, against rows x columns x samples x bits allocated x frames; encapsulated Pixel Data is walked item
  header by item header (seeks, no reads of fragments) up to its sequence delimiter;
* every short read while parsing means the object is cut short (a tracking reader notices it);
* a Deflated data set is inflated in bounded steps: the first :data:`MAX_HEADER_BYTES` are kept for parsing,
  the rest only counted, and inflation stops as soon as the output passes :func:`inflate_ceiling`;
* every value the node reads from the received data set goes through :func:`value`, which turns a conversion
  error into a refusal.

Refusals carry a status (``0xC001`` cannot understand) and a reason without patient data: element tags,
offsets, lengths and exception type names only, never an element's value or a parser message that may quote one.
"""

from __future__ import annotations

import io
import struct
import zlib
from dataclasses import dataclass
from typing import IO, Any

from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.filereader import read_dataset
from pydicom.tag import BaseTag
from pydicom.uid import (
    UID,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ImplicitVRLittleEndian,
)

STATUS_SUCCESS = 0x0000
STATUS_PROCESSING_FAILURE = 0x0110  # PS3.7 C.4: a fault of ours (a bug), not of the object or our resources
STATUS_OUT_OF_RESOURCES = 0xA700
STATUS_SOP_CLASS_MISMATCH = 0xA900
STATUS_UNREADABLE = 0xC001
STATUS_BAD_UIDS = 0xC002
STATUS_SOP_INSTANCE_MISMATCH = 0xC003

DEFER_BYTES = 64 * 1024  # values larger than this stay on disk while the header is parsed
MAX_HEADER_BYTES = 16 * 1024 * 1024  # inflated bytes of a Deflated data set kept for parsing its header
MAX_INFLATED_BYTES = 4 * 1024 * 1024 * 1024  # no Deflated data set inflates beyond this (Pixel Data < 4 GiB)
MAX_INFLATE_RATIO = 200  # beyond RATIO_FLOOR, inflated / deflated bytes above this is a bomb, not a CT
RATIO_FLOOR = 64 * 1024 * 1024
_MAX_ITEMS = 1_000_000  # encapsulated Pixel Data items walked at most
_CHUNK = 1 << 20  # deflated bytes read at a time
_INFLATE_STEP = 4 << 20  # inflated bytes per step (smaller steps cost more time per byte)

_PIXEL_TAGS = frozenset({0x7FE00010, 0x7FE00008, 0x7FE00009})  # Pixel Data, Float and Double Float Pixel Data
_LONG_VRS = frozenset({b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR", b"UT", b"UV"})
_ITEM, _SEQUENCE_END = 0xFFFEE000, 0xFFFEE0DD
_UNDEFINED = 0xFFFFFFFF


class RefusedObject(Exception):
    """An object that cannot be stored: carries the status and the (PHI-free) reason."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason


@dataclass(frozen=True)
class Header:
    """What the check found: the parsed header (no pixels), its transfer syntax, and the Pixel Data element."""

    dataset: Dataset
    transfer_syntax: str
    pixel_tag: int | None = None
    pixel_length: int | None = None  # declared; 0xFFFFFFFF = encapsulated (undefined length)


class _TrackingReader:
    """A file wrapper for pydicom's parser that remembers any read cut short by the end of the data: the
    parser treats several of those as a normal end, but for a received object they mean truncation. The one
    clean end is an 8-byte element-header read that finds nothing at all."""

    def __init__(self, raw: IO[bytes]) -> None:
        self._raw = raw
        self.short = False

    def read(self, size: int = -1) -> bytes:
        data = self._raw.read(size)
        if size is not None and size > 0 and len(data) < size and not (size == 8 and not data):
            self.short = True
        return data

    def seek(self, offset: int, whence: int = 0) -> int:
        return self._raw.seek(offset, whence)

    def tell(self) -> int:
        return self._raw.tell()


def kind(error: BaseException) -> str:
    """An exception's type as text: parser messages can quote an element's value, which may be PHI."""
    return f"{type(error).__module__}.{type(error).__name__}"


def value(dataset: Dataset, keyword: str, status: int = STATUS_UNREADABLE, default: Any = None) -> Any:
    """``dataset.get(keyword)``, with a conversion error (pydicom converts on first access) as a refusal."""
    try:
        return dataset.get(keyword, default)
    except Exception as error:  # noqa: BLE001 - garbage values raise many types (struct, Unicode, NotImplemented)
        raise RefusedObject(status, f"{keyword} unreadable ({kind(error)})") from None


def inflate_ceiling(deflated_size: int) -> int:
    """How many bytes a Deflated data set of ``deflated_size`` may inflate to before it counts as a bomb."""
    return min(MAX_INFLATED_BYTES, max(RATIO_FLOOR, MAX_INFLATE_RATIO * deflated_size))


def read_header(source: IO[bytes], total_size: int, *, require_pixels: bool = True) -> Header:
    """Check one Part 10 object (``source`` at its start, ``total_size`` bytes); :class:`RefusedObject` if it
    is not DICOM, is cut short, declares more than it holds, or its pixel description does not fit its data."""
    try:
        return _read(source, total_size, require_pixels)
    except RefusedObject:
        raise
    except Exception as error:  # noqa: BLE001 - pydicom raises many types on garbage; all mean "cannot understand"
        raise RefusedObject(STATUS_UNREADABLE, f"unparseable DICOM ({kind(error)})") from None


def _read(source: IO[bytes], total_size: int, require_pixels: bool) -> Header:
    reader = _TrackingReader(source)
    if len(reader.read(128)) < 128 or source.read(4) != b"DICM":
        raise RefusedObject(STATUS_UNREADABLE, "not a DICOM Part 10 object (no DICM prefix)")
    meta = read_dataset(reader, False, True, stop_when=lambda tag, _vr, _length: tag >> 16 != 0x0002)
    if reader.short:
        raise RefusedObject(STATUS_UNREADABLE, "truncated: the file meta information is cut short")
    file_meta = FileMetaDataset(meta)
    syntax_text = str(value(file_meta, "TransferSyntaxUID") or "").strip().rstrip("\x00")
    if not syntax_text:
        raise RefusedObject(STATUS_UNREADABLE, "no Transfer Syntax UID in the file meta")
    syntax = UID(syntax_text)
    implicit = syntax == ImplicitVRLittleEndian
    little = syntax != ExplicitVRBigEndian
    start = source.tell()
    if syntax == DeflatedExplicitVRLittleEndian:
        kept, end = _inflate(source, total_size - start)
        body: IO[bytes] = io.BytesIO(kept)
        start, header_complete = 0, len(kept) == end
    else:
        body, end, header_complete = source, total_size, True
    stream = _TrackingReader(body)
    dataset = read_dataset(stream, implicit, little, stop_when=lambda tag, _vr, _length: tag in _PIXEL_TAGS,
                           defer_size=DEFER_BYTES)
    dataset.file_meta = file_meta
    read_implicit, read_little = dataset.original_encoding  # pydicom corrects a syntax the bytes contradict
    if read_implicit is not None and read_little is not None:
        implicit, little = read_implicit, read_little
    stopped_at = body.tell()
    pixel = _pixel_element(body, little, implicit)
    if not header_complete and (stream.short or pixel is None):
        raise RefusedObject(STATUS_UNREADABLE, f"Deflated data set header over {MAX_HEADER_BYTES} bytes")
    if stream.short:
        raise RefusedObject(STATUS_UNREADABLE, "truncated: the data set ends inside an element")
    _check_element_ends(dataset, end)
    if pixel is None:
        if stopped_at + 8 <= end:  # the parser gave up before the end (it logs and swallows some errors)
            raise RefusedObject(STATUS_UNREADABLE, f"unparseable data set from offset {stopped_at - start}")
        if require_pixels:
            raise RefusedObject(STATUS_UNREADABLE, "no Pixel Data (truncated, or not an image)")
        return Header(dataset, str(syntax))
    tag, value_tell, length = pixel
    if syntax.is_compressed:
        if tag != 0x7FE00010 or length != _UNDEFINED:
            raise RefusedObject(STATUS_UNREADABLE, f"encapsulated Pixel Data {BaseTag(tag)} needs undefined length")
        fragments = _walk_fragments(body, value_tell, end)
        frames = _positive(dataset, "NumberOfFrames", 1)
        if fragments < frames:
            raise RefusedObject(STATUS_UNREADABLE, f"encapsulated Pixel Data has {fragments} fragments for "
                                f"{frames} frames")
    else:
        if length == _UNDEFINED:
            raise RefusedObject(STATUS_UNREADABLE, "native Pixel Data with undefined length")
        if value_tell + length > end:
            raise RefusedObject(STATUS_UNREADABLE, f"truncated: Pixel Data declares {length} bytes at offset "
                                f"{value_tell - start} of a {end - start}-byte data set")
        expected = _native_pixel_bytes(dataset)
        if length < expected:
            raise RefusedObject(STATUS_UNREADABLE, f"truncated: Pixel Data has {length} bytes, the image needs "
                                f"{expected}")
    return Header(dataset, str(syntax), tag, length)


def _inflate(source: IO[bytes], deflated_size: int) -> tuple[bytes, int]:
    """(the first MAX_HEADER_BYTES inflated bytes, the inflated size); refuses a bomb or a cut stream."""
    ceiling = inflate_ceiling(deflated_size)
    inflater = zlib.decompressobj(-zlib.MAX_WBITS)
    kept = bytearray()
    total = 0
    try:
        while not inflater.eof:
            pending = source.read(_CHUNK)
            if not pending:
                break
            while True:
                out = inflater.decompress(pending, _INFLATE_STEP)
                pending = inflater.unconsumed_tail
                total += len(out)
                if total > ceiling:
                    raise RefusedObject(STATUS_UNREADABLE, f"deflate bomb: {deflated_size} deflated bytes inflate "
                                        f"beyond {ceiling}")
                if len(kept) < MAX_HEADER_BYTES:
                    kept += out[:MAX_HEADER_BYTES - len(kept)]
                if inflater.eof or (not pending and len(out) < _INFLATE_STEP):
                    break
    except zlib.error as error:
        raise RefusedObject(STATUS_UNREADABLE, f"Deflated data set does not inflate ({kind(error)})") from None
    if not inflater.eof:
        raise RefusedObject(STATUS_UNREADABLE, "truncated: the deflate stream ends early")
    return bytes(kept), total


def _pixel_element(body: IO[bytes], little: bool, implicit: bool) -> tuple[int, int, int] | None:
    """(tag, value offset, declared length) of the Pixel Data element the parser stopped at, else None."""
    at = body.tell()
    head = body.read(8)
    if len(head) < 8:
        return None
    endian = "<" if little else ">"
    group, element = struct.unpack(endian + "HH", head[:4])
    tag = group << 16 | element
    if tag not in _PIXEL_TAGS:
        return None
    if implicit:
        return tag, at + 8, struct.unpack(endian + "I", head[4:])[0]
    if head[4:6] in _LONG_VRS:
        extra = body.read(4)
        if len(extra) < 4:
            raise RefusedObject(STATUS_UNREADABLE, "truncated: Pixel Data element header cut short")
        return tag, at + 12, struct.unpack(endian + "I", extra)[0]
    return tag, at + 8, struct.unpack(endian + "H", head[6:8])[0]


def _check_element_ends(dataset: Dataset, end: int) -> None:
    """Every deferred (not read) top-level value must end inside the data: the parser only skipped over it."""
    for tag in tuple(dataset.keys()):  # keys only: iterating a Dataset converts every value
        element = dataset.get_item(tag, keep_deferred=True)
        if not isinstance(element, RawDataElement) or element.length == _UNDEFINED:
            continue
        if element.value is None and element.length and element.value_tell + element.length > end:
            raise RefusedObject(STATUS_UNREADABLE, f"truncated: element {BaseTag(tag)} declares {element.length} "
                                f"bytes past the end of the data")


def _walk_fragments(body: IO[bytes], value_tell: int, end: int) -> int:
    """Item headers of encapsulated Pixel Data up to its delimiter (seeking over each fragment); returns how
    many fragments follow the Basic Offset Table item."""
    body.seek(value_tell)
    items = 0
    while items < _MAX_ITEMS:
        head = body.read(8)
        if len(head) < 8:
            raise RefusedObject(STATUS_UNREADABLE, "truncated: encapsulated Pixel Data ends before its delimiter")
        group, element, length = struct.unpack("<HHI", head)
        tag = group << 16 | element
        if tag == _SEQUENCE_END:
            return max(items - 1, 0)
        if tag != _ITEM or length == _UNDEFINED:
            raise RefusedObject(STATUS_UNREADABLE, f"encapsulated Pixel Data: bad item {BaseTag(tag)} at "
                                f"item {items}")
        position = body.tell()
        if position + length > end:
            raise RefusedObject(STATUS_UNREADABLE, f"truncated: Pixel Data item {items} declares {length} bytes "
                                "past the end of the data")
        body.seek(position + length)
        items += 1
    raise RefusedObject(STATUS_UNREADABLE, f"encapsulated Pixel Data with over {_MAX_ITEMS} items")


def _positive(dataset: Dataset, keyword: str, default: int | None = None) -> int:
    """A required positive integer of the pixel description (refused when missing, not a number or <= 0)."""
    raw = value(dataset, keyword)
    if raw is None or raw == "":
        if default is None:
            raise RefusedObject(STATUS_UNREADABLE, f"image pixel description: {keyword} missing")
        return default
    try:
        number = int(raw)
    except (TypeError, ValueError, OverflowError):
        raise RefusedObject(STATUS_UNREADABLE, f"image pixel description: {keyword} not a number") from None
    if number <= 0:
        raise RefusedObject(STATUS_UNREADABLE, f"image pixel description: {keyword} is {number}")
    return number


def _native_pixel_bytes(dataset: Dataset) -> int:
    """Bytes native Pixel Data needs: rows x columns x samples x bits allocated x frames, rounded up to bytes."""
    bits = (_positive(dataset, "Rows") * _positive(dataset, "Columns") * _positive(dataset, "SamplesPerPixel", 1)
            * _positive(dataset, "BitsAllocated") * _positive(dataset, "NumberOfFrames", 1))
    return (bits + 7) // 8
