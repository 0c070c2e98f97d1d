"""Which files may be attached: decided by content, never by name.

Text (valid UTF-8 without NUL bytes), PDF (with its end-of-file marker, so a
truncated one is refused) and common images, as the `filetype` sniffer knows
them. A declared type that contradicts the content is refused.
"""

from __future__ import annotations

import filetype

from ..errors import invalid

IMAGES = {
    "image/png",
    "image/jpeg",
    "image/gif",
    "image/webp",
    "image/bmp",
    "image/tiff",
    "image/heic",
    "image/heif",
    "image/avif",
}
PDF = "application/pdf"
TEXT = {
    "text/plain",
    "text/csv",
    "text/markdown",
    "text/tab-separated-values",
    "application/json",
    "application/x-ndjson",
    "text/x-log",
}
ALLOWED = IMAGES | TEXT | {PDF}
_ALIASES = {"image/jpg": "image/jpeg", "image/x-ms-bmp": "image/bmp", "image/heif": "image/heic"}


def normalise(content_type: str) -> str:
    base = content_type.split(";", 1)[0].strip().lower()
    return _ALIASES.get(base, base)


def check_declared(content_type: str) -> str:
    declared = normalise(content_type)
    if declared and declared not in {normalise(t) for t in ALLOWED}:
        raise invalid(
            "TYPE_NOT_ALLOWED",
            f"{content_type!r} files cannot be attached: text, PDF and images only.",
            content_type=content_type,
        )
    return declared


def classify(declared: str, head: bytes, tail: bytes, utf8: bool) -> str:
    """The content type the bytes really have, if allowed and consistent with what was declared."""
    kind = filetype.guess(head)
    if kind is not None:
        found = normalise(kind.mime)
        if found == PDF and b"%%EOF" not in tail:
            raise invalid("PDF_TRUNCATED", "The PDF is incomplete (no end-of-file marker).")
        if found != PDF and found not in {normalise(t) for t in IMAGES}:
            raise invalid(
                "TYPE_NOT_ALLOWED", f"The content is {kind.mime}: text, PDF and images only.", content_type=kind.mime
            )
        if declared and declared != found:
            raise invalid(
                "TYPE_MISMATCH",
                f"The file was declared {declared} but its content is {found}.",
                declared=declared,
                found=found,
            )
        return found
    if utf8:
        if declared and declared not in TEXT:
            raise invalid(
                "TYPE_MISMATCH",
                f"The file was declared {declared} but its content is text.",
                declared=declared,
                found="text",
            )
        return declared or "text/plain"
    raise invalid("TYPE_NOT_ALLOWED", "The content is not text, PDF or a known image format.")
