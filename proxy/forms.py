"""The small text fields of a multipart/form-data request body (audio transcriptions, image edits).

Only what the proxy needs to meter and police a call: the `model`, `stream` and similar short fields.
File parts are skipped, never copied. Pure: bytes in, strings out; never raises.
"""

from __future__ import annotations

import re

__all__ = ["form_fields"]

MAX_FIELD_BYTES = 4096  # a longer part is a file or a prompt, not a field the proxy reads
_NAME = re.compile(rb'(?i)content-disposition:[^\r\n]*?;\s*name="([^"\r\n]*)"')
_FILENAME = re.compile(rb'(?i)content-disposition:[^\r\n]*?;\s*filename\*?=')


def _boundary(body: bytes) -> bytes | None:
    # The body names its own boundary on its first line; the Content-Type header says the same thing.
    first = body[:200].split(b"\r\n", 1)[0]
    if not first.startswith(b"--") or len(first) < 3:
        return None
    return first[2:]


def form_fields(body: bytes) -> tuple[dict[str, str], str | None]:
    """(short text fields by name, the first name sent twice or None). Empty when not multipart."""
    boundary = _boundary(body)
    if boundary is None:
        return {}, None
    fields: dict[str, str] = {}
    names: set[str] = set()
    repeated: str | None = None
    for part in body.split(b"--" + boundary)[1:]:
        head, sep, value = part.partition(b"\r\n\r\n")
        if not sep:
            continue
        found = _NAME.search(head)
        if found is None:
            continue
        name = found.group(1).decode("utf-8", "replace")
        if name in names and repeated is None and not name.endswith("[]"):
            repeated = name
        names.add(name)
        if _FILENAME.search(head) or len(value) > MAX_FIELD_BYTES:
            continue
        fields.setdefault(name, value.removesuffix(b"\r\n").decode("utf-8", "replace"))
    return fields, repeated
