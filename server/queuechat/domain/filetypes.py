"""Which files may be attached: decided by content, never by name.

Text (valid UTF-8 without NUL bytes), PDF (with its end-of-file marker, so a
truncated one is refused, and without active content: store/blobs.py scans
for it) and common images, as the `filetype` sniffer knows them. A declared
type that contradicts the content is refused.

The name a file is saved under decides what opening it does, so a completed
file's name ends in an extension of the type found (`safe_name`): text sent
as page.html is kept as page.txt.
"""

from __future__ import annotations

import re

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
# The extensions each type may keep; the first is the one given to a name that has none of them.
EXTENSIONS: dict[str, tuple[str, ...]] = {
    "image/png": (".png",),
    "image/jpeg": (".jpg", ".jpeg", ".jpe", ".jfif"),
    "image/gif": (".gif",),
    "image/webp": (".webp",),
    "image/bmp": (".bmp", ".dib"),
    "image/tiff": (".tif", ".tiff"),
    "image/heic": (".heic", ".heif"),
    "image/heif": (".heif", ".heic"),
    "image/avif": (".avif",),
    PDF: (".pdf",),
    "text/plain": (".txt",),
    "text/csv": (".csv",),
    "text/markdown": (".md",),
    "text/tab-separated-values": (".tsv",),
    "application/json": (".json",),
    "application/x-ndjson": (".ndjson",),
    "text/x-log": (".log",),
}
# Whether text is "text/csv" or "text/plain" is only what the uploader declared, so any text may keep
# any of these: each opens in an editor or a viewer, none runs (.html, .svg, .hta, .bat, .js would).
_TEXT_EXTENSIONS = (".txt", ".text", ".log", ".csv", ".tsv", ".md", ".markdown", ".json", ".ndjson", ".jsonl")
EXTENSIONS.update({t: EXTENSIONS[t] + tuple(e for e in _TEXT_EXTENSIONS if e not in EXTENSIONS[t]) for t in TEXT})
MAX_NAME = 200
# Characters Windows refuses in a file name: a client saving under the name would fail or, with ':',
# write an alternate data stream.
_RESERVED = re.compile(r'[<>:"/\\|?*]')
_EXTENSION = re.compile(r"\.([^.\s]{1,16})$")
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


def safe_name(name: str, content_type: str) -> str:
    """`name` (already sanitised) with an extension of `content_type`: a mismatching extension is
    replaced (page.html -> page.txt, photo.jpg holding a PNG -> photo.png), a missing one appended.
    Trailing dots and spaces go first, as Windows drops them. At most MAX_NAME characters."""
    allowed = EXTENSIONS.get(content_type, (".bin",))
    name = _RESERVED.sub("_", name).rstrip(". ")
    match = _EXTENSION.search(name)
    if match is not None and "." + match[1].lower() in allowed and match.start() > 0:
        stem, ext = name[: match.start()], name[match.start() :]
    elif match is not None and match.start() > 0 and any(ch.isalpha() for ch in match[1]):
        stem, ext = name[: match.start()].rstrip(". "), allowed[0]  # replaced: "version 1.2" keeps its ".2"
    else:
        stem, ext = name, allowed[0]
    return (stem or "file")[: MAX_NAME - len(ext)] + ext


def classify(declared: str, head: bytes, tail: bytes, utf8: bool, pdf_problem: tuple[str, str] | None = None) -> str:
    """The content type the bytes really have, if allowed and consistent with what was declared.
    `pdf_problem` is what the scan found in a PDF (store.blobs.PdfCheck): (reason, what)."""
    kind = filetype.guess(head)
    if kind is not None:
        found = normalise(kind.mime)
        if found == PDF and b"%%EOF" not in tail:
            raise invalid("PDF_TRUNCATED", "The PDF is incomplete (no end-of-file marker).")
        if found == PDF and pdf_problem is not None:
            reason, what = pdf_problem
            if reason == "PDF_ACTIVE_CONTENT":
                raise invalid(
                    reason,
                    f"PDFs with active content cannot be attached: this one has {what}. "
                    "Print it to a new PDF and attach that.",
                    feature=what,
                )
            raise invalid(
                reason,
                f"This PDF cannot be checked for active content ({what}). Print it to a new PDF and attach that.",
                feature=what,
            )
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
