"""Generated malformed DICOM objects for the fuzz tests: seeded, so a failure names an object that can be made again.

Each object is a Part 10 file whose file meta is sound (an SCU reads it to fill the C-STORE command, and the
receiving node rebuilds it anyway) with a unique SOP Instance UID in it, and whose data set is broken in one of the
ways listed in :data:`KINDS`. A few sound objects of every transfer syntax go along as controls.
"""

from __future__ import annotations

import io
import random
import struct
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from pydicom import dcmread
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import dcmwrite, write_dataset
from pydicom.uid import (
    CTImageStorage,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
)

UID_ROOT = "1.2.826.0.1.3680043.10.1015."  # test objects only
STUDY_UID = UID_ROOT + "1"
SERIES_UID = UID_ROOT + "1.1"
_LONG_VRS = {b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR", b"UT", b"UV"}

# kind -> how many objects of it (>= 500 malformed in all, plus the controls)
KINDS = {
    "byte_flip": 110,
    "truncated": 80,
    "wrong_length": 60,
    "huge_length": 40,
    "garbage_vr": 50,
    "missing_uids": 40,
    "dicm_garbage": 40,
    "deflate_bomb": 20,
    "deflate_cut": 20,
    "pixel_length": 30,
    "encapsulated_damage": 20,
}
CONTROLS = 12  # sound objects, spread over the syntaxes: stored with 0x0000


@dataclass(frozen=True)
class FuzzObject:
    kind: str
    path: Path
    sop_uid: str
    syntax: str


def ct_dataset(sop_uid: str, rows: int = 32, columns: int = 32) -> Dataset:
    """A small sound CT image (no patient data of anyone real)."""
    ds = Dataset()
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    ds.SOPClassUID = CTImageStorage
    ds.SOPInstanceUID = sop_uid
    ds.StudyDate = "20240102"
    ds.Modality = "CT"
    ds.StudyDescription = "FUZZ"
    ds.PatientName = "Fuzz^Test"
    ds.PatientID = "FUZZ0001"
    ds.StudyInstanceUID = STUDY_UID
    ds.SeriesInstanceUID = SERIES_UID
    ds.InstanceNumber = 1
    ds.ImagePositionPatient = [0, 0, 0]
    ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows, ds.Columns = rows, columns
    ds.PixelSpacing = [0.7, 0.7]
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.RescaleIntercept, ds.RescaleSlope = -1024, 1
    ds.PixelData = bytes(range(256)) * (rows * columns * 2 // 256)
    return ds


def _meta(sop_uid: str, syntax: str) -> FileMetaDataset:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CTImageStorage
    meta.MediaStorageSOPInstanceUID = sop_uid
    meta.TransferSyntaxUID = syntax
    return meta


def part10(meta: FileMetaDataset, body: bytes) -> bytes:
    """Preamble, DICM, the file meta group (encoded by pydicom) and ``body`` as the data set bytes."""
    shell = Dataset()
    shell.file_meta = meta
    buffer = io.BytesIO()
    dcmwrite(buffer, shell, enforce_file_format=True)
    data = buffer.getvalue()
    (group_length,) = struct.unpack("<I", data[140:144])
    return data[:144 + group_length] + body  # an empty Deflated data set is not empty bytes


def encode(ds: Dataset, syntax: str, sop_uid: str = UID_ROOT + "0") -> bytes:
    """The data set bytes of ``ds`` in ``syntax`` (native syntaxes; Deflated is deflated here)."""
    buffer = io.BytesIO()
    ds = ds.copy()
    ds.file_meta = _meta(sop_uid, syntax)
    dcmwrite(buffer, ds, enforce_file_format=True)
    data = buffer.getvalue()
    (group_length,) = struct.unpack("<I", data[140:144])
    return data[144 + group_length:]


def elements(body: bytes, implicit: bool, little: bool = True) -> list[tuple[int, int, int, int, int]]:
    """Top-level elements of a data set with defined lengths: (tag, header offset, VR offset or -1,
    length offset, length size)."""
    endian = "<" if little else ">"
    found, at = [], 0
    while at + 8 <= len(body):
        group, element = struct.unpack(endian + "HH", body[at:at + 4])
        if implicit:
            (length,) = struct.unpack(endian + "I", body[at + 4:at + 8])
            found.append((group << 16 | element, at, -1, at + 4, 4))
            at += 8 + length
        elif body[at + 4:at + 6] in _LONG_VRS:
            (length,) = struct.unpack(endian + "I", body[at + 8:at + 12])
            found.append((group << 16 | element, at, at + 4, at + 8, 4))
            at += 12 + length
        else:
            (length,) = struct.unpack(endian + "H", body[at + 6:at + 8])
            found.append((group << 16 | element, at, at + 4, at + 6, 2))
            at += 8 + length
    return found


def _set_length(body: bytearray, offset: int, size: int, value: int) -> None:
    body[offset:offset + size] = struct.pack("<I" if size == 4 else "<H", value & (0xFFFFFFFF if size == 4 else 0xFFFF))


class Generator:
    """Makes the objects into ``folder``; ``j2k_source`` is a real JPEG 2000 CT file for encapsulated cases."""

    def __init__(self, folder: Path, j2k_source: Path | None, seed: int = 15) -> None:
        self.folder = folder
        self.rng = random.Random(seed)
        self.j2k = dcmread(j2k_source) if j2k_source is not None else None
        self._zeros: dict[int, bytes] = {}
        self._bases: dict[str, bytes] = {}
        self.count = 0
        folder.mkdir(parents=True, exist_ok=True)

    def _uid(self) -> str:
        self.count += 1
        return f"{UID_ROOT}2.{1_000_000 + self.count}"  # one length: a base encoding takes any of them by replace

    def _write(self, kind: str, sop_uid: str, syntax: str, body: bytes) -> FuzzObject:
        path = self.folder / f"{self.count:04d}-{kind}.dcm"
        path.write_bytes(part10(_meta(sop_uid, syntax), body))
        return FuzzObject(kind, path, sop_uid, syntax)

    def _sound(self, uid: str, syntax: str) -> bytes:
        """A sound object's data set bytes (encoded once per syntax, the SOP Instance UID swapped in)."""
        placeholder = f"{UID_ROOT}2.{1_000_000}"
        if syntax not in self._bases:
            self._bases[syntax] = encode(ct_dataset(placeholder), syntax)
        return self._bases[syntax].replace(placeholder.encode(), uid.encode())

    def _native(self) -> tuple[str, str, bytearray, bool]:
        syntax = self.rng.choice([ExplicitVRLittleEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian])
        uid = self._uid()
        return uid, syntax, bytearray(self._sound(uid, syntax)), syntax == ImplicitVRLittleEndian

    def objects(self) -> Iterator[FuzzObject]:
        for kind, count in KINDS.items():
            make = getattr(self, f"_{kind}")
            for _ in range(count):
                yield make()
        syntaxes = [ExplicitVRLittleEndian, ImplicitVRLittleEndian, ExplicitVRBigEndian, DeflatedExplicitVRLittleEndian]
        for index in range(CONTROLS):
            uid = self._uid()
            syntax = syntaxes[index % len(syntaxes)]
            if index % 6 == 5 and self.j2k is not None:
                yield self._j2k_object("control", uid, lambda body: body)
                continue
            yield self._write("control", uid, syntax, encode(ct_dataset(uid), syntax))  # Deflated: not by replace

    # --- kinds -------------------------------------------------------------------------------------------

    def _byte_flip(self) -> FuzzObject:
        uid, syntax, body, _ = self._native()
        header_end = len(body) - 32 * 32 * 2
        for _ in range(self.rng.randint(1, 8)):
            at = self.rng.randrange(header_end) if self.rng.random() < 0.85 else self.rng.randrange(len(body))
            body[at] ^= 1 << self.rng.randrange(8)
        return self._write("byte_flip", uid, syntax, bytes(body))

    def _truncated(self) -> FuzzObject:
        if self.j2k is not None and self.rng.random() < 0.2:
            return self._j2k_object("truncated", self._uid(), lambda body: body[:self.rng.randrange(1, len(body))])
        uid, syntax, body, _ = self._native()
        return self._write("truncated", uid, syntax, bytes(body[:self.rng.randrange(1, len(body) - 1)]))

    def _pick(self, body: bytearray, implicit: bool, wanted: tuple[int, ...] = ()) -> tuple[int, int, int, int, int]:
        found = elements(bytes(body), implicit)
        choices = [e for e in found if e[0] in wanted] if wanted else found
        return self.rng.choice(choices or found)

    def _wrong_length(self) -> FuzzObject:
        uid, syntax, body, implicit = self._native()
        _tag, _at, _vr, length_at, size = self._pick(body, implicit)
        (length,) = struct.unpack("<I" if size == 4 else "<H", body[length_at:length_at + size])
        _set_length(body, length_at, size, max(0, length + self.rng.choice([-3, -1, 1, 2, 7, 100, 1000, -100])))
        return self._write("wrong_length", uid, syntax, bytes(body))

    def _huge_length(self) -> FuzzObject:
        uid, syntax, body, implicit = self._native()
        pixel = self.rng.random() < 0.4
        _tag, _at, _vr, length_at, size = self._pick(body, implicit, (0x7FE00010,) if pixel else ())
        huge = self.rng.choice([0xFFFFFFF0, 0x7FFFFFFF, 0xFFFFFFFE, 0x10000000, 0xFFFF, 0xFFFE])
        _set_length(body, length_at, size, huge)
        return self._write("huge_length", uid, syntax, bytes(body))

    def _garbage_vr(self) -> FuzzObject:
        uid = self._uid()
        body = bytearray(self._sound(uid, ExplicitVRLittleEndian))
        for _ in range(self.rng.randint(1, 3)):
            _tag, _at, vr_at, _length_at, _size = self._pick(body, False)
            body[vr_at:vr_at + 2] = self.rng.choice([b"ZZ", b"\x00\x01", b"ab", b"QQ", b"\xff\xff", b"O\x00",
                                                     bytes(self.rng.randrange(256) for _ in range(2))])
        return self._write("garbage_vr", uid, ExplicitVRLittleEndian, bytes(body))

    def _missing_uids(self) -> FuzzObject:
        uid, syntax = self._uid(), self.rng.choice([ExplicitVRLittleEndian, ImplicitVRLittleEndian])
        ds = ct_dataset(uid)
        for keyword in self.rng.sample(["StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "SOPClassUID"],
                                       self.rng.randint(1, 3)):
            action = self.rng.choice(["delete", "empty", "invalid"])
            if action == "delete":
                delattr(ds, keyword)
            elif action == "empty":
                setattr(ds, keyword, "")
            else:
                setattr(ds, keyword, self.rng.choice(["1.2.abc", "..", "1." + "9" * 70, "01.2.3"]))
        return self._write("missing_uids", uid, syntax, encode(ds, syntax))

    def _dicm_garbage(self) -> FuzzObject:
        uid = self._uid()
        garbage = self.rng.randbytes(self.rng.randint(0, 3000))
        if self.rng.random() < 0.5:  # a whole Part 10 prefix sent as if it were the data set
            garbage = bytes(128) + b"DICM" + garbage
        syntax = self.rng.choice([ExplicitVRLittleEndian, ImplicitVRLittleEndian, DeflatedExplicitVRLittleEndian])
        return self._write("dicm_garbage", uid, syntax, garbage)

    def _zero_stream(self, size: int) -> bytes:
        """``size`` zero bytes (whole MiB) as raw deflate blocks, the final one included: one fully flushed MiB
        block repeated (a full flush leaves no back-reference across it), so no bomb is ever inflated here."""
        if not self._zeros:
            packer = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
            self._zeros[0] = packer.compress(bytes(1 << 20)) + packer.flush(zlib.Z_FULL_FLUSH)
        return self._zeros[0] * (size >> 20) + zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS).flush()

    def _deflate_bomb(self) -> FuzzObject:
        """A tiny Deflated data set whose Pixel Data inflates to hundreds of MB; the header may even agree."""
        uid = self._uid()
        size = self.rng.choice([256, 384, 512]) << 20
        consistent = self.rng.random() < 0.5
        side = int((size // 2) ** 0.5) if consistent else 32
        ds = ct_dataset(uid, side, side)
        del ds.PixelData
        head = DicomBytesIO()
        head.is_implicit_VR, head.is_little_endian = False, True
        write_dataset(head, ds)
        pixel_header = struct.pack("<HH2sHI", 0x7FE0, 0x0010, b"OW", 0, size)
        packer = zlib.compressobj(1, zlib.DEFLATED, -zlib.MAX_WBITS)
        start = packer.compress(head.getvalue() + pixel_header) + packer.flush(zlib.Z_FULL_FLUSH)
        return self._write("deflate_bomb", uid, DeflatedExplicitVRLittleEndian, start + self._zero_stream(size))

    def _deflate_cut(self) -> FuzzObject:
        uid = self._uid()
        body = encode(ct_dataset(uid), DeflatedExplicitVRLittleEndian)  # Deflated: not by replace
        action = self.rng.choice(["cut", "flip", "raw"])
        if action == "cut":
            body = body[:self.rng.randrange(1, len(body) - 1)]
        elif action == "flip":
            mutable = bytearray(body)
            mutable[self.rng.randrange(len(mutable))] ^= 0xFF
            body = bytes(mutable)
        else:  # not deflated at all, though the syntax says so
            body = self._sound(uid, ExplicitVRLittleEndian)
        return self._write("deflate_cut", uid, DeflatedExplicitVRLittleEndian, body)

    def _pixel_length(self) -> FuzzObject:
        uid, syntax = self._uid(), self.rng.choice([ExplicitVRLittleEndian, ImplicitVRLittleEndian])
        ds = ct_dataset(uid)
        action = self.rng.choice(["short", "rows", "frames", "bits", "garbage_rows"])
        if action == "short":
            ds.PixelData = ds.PixelData[:self.rng.randrange(0, len(ds.PixelData) - 2) & ~1]
        elif action == "rows":
            ds.Rows = self.rng.choice([33, 64, 512, 65535])
        elif action == "frames":
            ds.NumberOfFrames = self.rng.choice([2, 10, 0, -1])
        elif action == "bits":
            ds.BitsAllocated = self.rng.choice([32, 64, 0])
        else:
            del ds.Rows
        return self._write("pixel_length", uid, syntax, encode(ds, syntax))

    def _j2k_object(self, kind: str, uid: str, damage: Callable[[bytes], bytes]) -> FuzzObject:
        assert self.j2k is not None
        ds = self.j2k.copy()
        ds.SOPInstanceUID = uid
        ds.StudyInstanceUID, ds.SeriesInstanceUID = STUDY_UID, SERIES_UID
        syntax = str(self.j2k.file_meta.TransferSyntaxUID)
        buffer = io.BytesIO()
        ds.file_meta = _meta(uid, syntax)
        dcmwrite(buffer, ds, enforce_file_format=True)
        data = buffer.getvalue()
        (group_length,) = struct.unpack("<I", data[140:144])
        return self._write(kind, uid, syntax, damage(data[144 + group_length:]))

    def _encapsulated_damage(self) -> FuzzObject:
        if self.j2k is None:
            return self._truncated()

        def damage(body: bytes) -> bytes:
            pixel = body.find(b"\xe0\x7f\x10\x00OB")
            (offsets,) = struct.unpack("<I", body[pixel + 16:pixel + 20])
            first = pixel + 20 + offsets  # the first fragment's item header, after the Basic Offset Table
            mutable = bytearray(body)
            action = self.rng.choice(["item_tag", "item_length", "no_delimiter", "defined_length"])
            if action == "item_tag":  # the first fragment's item tag
                mutable[first:first + 4] = b"\x01\x02\x03\x04"
            elif action == "item_length":
                mutable[first + 4:first + 8] = struct.pack("<I", 0x7FFFFFF0)
            elif action == "no_delimiter":
                return bytes(mutable[:-8])
            else:
                mutable[pixel + 8:pixel + 12] = struct.pack("<I", len(body) - pixel - 12)
            return bytes(mutable)

        return self._j2k_object("encapsulated_damage", self._uid(), damage)
