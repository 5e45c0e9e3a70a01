"""Which transfer syntaxes this install can decode, with licence-clean decoders only.

The node keeps objects exactly as received and decodes them later (workers), so the SCP accepts every syntax
below whether or not a decoder is present; a missing decoder only shows when a study is embedded. That is why
the start-up check logs, loudly, what could not be decoded here.

Decoders are pydicom 3's pixel-data plugins: pydicom itself (native, deflate, RLE), pylibjpeg-openjpeg (JPEG
2000, MIT), pylibjpeg-rle (RLE, MIT), pyjpegls (JPEG-LS, BSD/MIT) and python-gdcm (JPEG lossless and more,
BSD). pylibjpeg-libjpeg is GPLv3 and must never be installed: :func:`gpl_decoders_installed` says if it is.
"""

from __future__ import annotations

import importlib.util
import logging

from pydicom import uid as dicom_uid
from pydicom.pixels.decoders.base import get_decoder

logger = logging.getLogger(__name__)

# What the SCP accepts for CT (transfer syntax UID -> short name); kept as received, decoded later.
UNCOMPRESSED = {
    dicom_uid.ImplicitVRLittleEndian: "Implicit VR Little Endian",
    dicom_uid.ExplicitVRLittleEndian: "Explicit VR Little Endian",
    dicom_uid.ExplicitVRBigEndian: "Explicit VR Big Endian (retired)",
    dicom_uid.DeflatedExplicitVRLittleEndian: "Deflated Explicit VR Little Endian",
}
COMPRESSED = {
    dicom_uid.JPEG2000Lossless: "JPEG 2000 lossless",
    dicom_uid.JPEG2000: "JPEG 2000 (lossy)",
    dicom_uid.JPEGLSLossless: "JPEG-LS lossless",
    dicom_uid.JPEGLSNearLossless: "JPEG-LS near-lossless",
    dicom_uid.JPEGLosslessSV1: "JPEG lossless SV1 (process 14, selection value 1)",
    dicom_uid.JPEGLossless: "JPEG lossless (process 14)",
    dicom_uid.RLELossless: "RLE lossless",
}
ACCEPTED_TRANSFER_SYNTAXES: dict[str, str] = {**UNCOMPRESSED, **COMPRESSED}

# Decoder packages that must stay out of the environment (licence), by import name.
GPL_DECODERS = {"libjpeg": "pylibjpeg-libjpeg (GPLv3)"}


def gpl_decoders_installed() -> list[str]:
    """Names of GPL-licensed decoder packages importable here (should always be empty)."""
    return [label for module, label in GPL_DECODERS.items() if importlib.util.find_spec(module) is not None]


def decodable_transfer_syntaxes() -> dict[str, bool]:
    """For each accepted transfer syntax UID: can pydicom decode its pixel data with what is installed?"""
    result: dict[str, bool] = {}
    for syntax in ACCEPTED_TRANSFER_SYNTAXES:
        try:
            result[syntax] = bool(get_decoder(syntax).is_available)
        except NotImplementedError:
            result[syntax] = False
    return result


def check_decoders() -> dict[str, bool]:
    """Log which accepted syntaxes cannot be decoded (and any GPL decoder present); returns the table."""
    table = decodable_transfer_syntaxes()
    missing = [uid for uid, ok in table.items() if not ok]
    for syntax in missing:
        try:
            hints = "; ".join(get_decoder(syntax).missing_dependencies) or "no plugin"
        except NotImplementedError:
            hints = "no decoder in pydicom"
        logger.warning("event=codec_missing transfer_syntax=%s name=%r consequence='received and kept, but not "
                       "embedded' needs=%r", syntax, ACCEPTED_TRANSFER_SYNTAXES[syntax], hints)
    for label in gpl_decoders_installed():
        logger.warning("event=gpl_decoder_installed package=%r action='pip uninstall it; licence-clean decoders "
                       "cover the same syntaxes'", label)
    logger.info("event=codecs_checked decodable=%d of=%d", len(table) - len(missing), len(table))
    return table
