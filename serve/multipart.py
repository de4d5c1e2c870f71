"""The artifact inside a multipart/form-data upload, found in one forward pass over the body.

Only what an upload needs is read: the boundary from the Content-Type, then each part's headers (at
most `MAX_PART_HEAD` bytes, CRLF-separated `name: value` lines) and the Content-Disposition's
parameters. Every search moves forward from where the last one ended and every header byte is read a
bounded number of times, so the cost is linear in the body and a hostile header is refused, not
parsed for minutes (`email.parser`, used before, spent minutes on a long `name="a"a"a…` header and
raised RecursionError on nested parentheses: docs/security.md, issue #40.5). Works on `bytes` and on
an `mmap` of a spooled body alike (both have `find` and slicing).
"""

from __future__ import annotations

import mmap

MAX_PARTS = 8  # the artifact and a few form fields at most
MAX_PART_HEAD = 2048  # bytes of one part's header lines together (a long file name fits 8 times)
MAX_BOUNDARY = 70  # RFC 2046


class MalformedMultipart(ValueError):
    """The body is not a multipart/form-data upload this server reads; the message says why."""


def header_params(value: str) -> tuple[str, dict[str, str]]:
    """`kind; key=token; key="quoted \\" string"` -> (kind, {key: value}), keys lower-cased, in one
    pass: each character is looked at once."""
    i, n = 0, len(value)

    def until(stops: str) -> str:
        nonlocal i
        start = i
        while i < n and value[i] not in stops:
            i += 1
        return value[start:i].strip()

    kind, params = until(";").lower(), {}
    while i < n:  # at a ';'
        i += 1
        key = until("=;").lower()
        if i == n or value[i] == ";":
            if key:
                raise MalformedMultipart(f"parameter {key[:40]!r} has no value")
            continue
        i += 1  # past '='
        while i < n and value[i] in " \t":
            i += 1
        if i < n and value[i] == '"':
            chars, i = [], i + 1
            while i < n and value[i] != '"':
                if value[i] == "\\" and i + 1 < n:
                    i += 1
                chars.append(value[i])
                i += 1
            if i == n:
                raise MalformedMultipart(f"parameter {key[:40]!r} has an unterminated quoted value")
            i += 1
            if until(";"):
                raise MalformedMultipart(f"parameter {key[:40]!r} has text after its quoted value")
            params[key] = "".join(chars)
        else:
            params[key] = until(";")
    return kind, params


def boundary(content_type: str) -> bytes:
    """The boundary of a `multipart/form-data; boundary=…` Content-Type."""
    _, params = header_params(content_type)
    b = params.get("boundary", "")
    if not 0 < len(b) <= MAX_BOUNDARY or not b.isascii():
        raise MalformedMultipart(f"multipart/form-data needs a boundary parameter of 1-{MAX_BOUNDARY} ASCII characters")
    return b.encode("ascii")


def _is_file(head: bytes) -> bool:
    """Whether a part's header lines describe the artifact: a file, or the field named 'artifact'."""
    for line in head.split(b"\r\n"):
        name, colon, value = line.partition(b":")
        if not colon:
            raise MalformedMultipart(f"part header line {line[:40]!r} is not 'Name: value'")
        if name.strip().lower() == b"content-disposition":
            _, params = header_params(value.decode("latin-1"))
            return "filename" in params or "filename*" in params or params.get("name") == "artifact"
    return False


def file_part(body: bytes | mmap.mmap, content_type: str) -> tuple[int, int]:
    """(start, end) of the artifact's bytes in a multipart `body`: the first part that is a file or
    is named 'artifact'. At most MAX_PARTS parts, each part's headers at most MAX_PART_HEAD bytes."""
    delimiter = b"--" + boundary(content_type)
    pos, found, parts = body.find(delimiter), None, 0
    if pos < 0:
        raise MalformedMultipart("multipart body does not contain its boundary")
    while True:
        pos += len(delimiter)
        if body[pos:pos + 2] == b"--":  # the closing delimiter
            break
        line_end = body.find(b"\r\n", pos, pos + 80)  # transport padding may follow a delimiter
        if line_end < 0:
            raise MalformedMultipart("a multipart delimiter is not followed by a line break")
        parts += 1
        if parts > MAX_PARTS:
            raise MalformedMultipart(f"multipart body has more than {MAX_PARTS} parts; an upload may have at most "
                                     f"{MAX_PARTS} (send the artifact as field 'artifact', or as the raw body)")
        head_start = line_end + 2
        if body[head_start:head_start + 2] == b"\r\n":  # a part without headers
            head_end = head_start - 2
        else:
            head_end = body.find(b"\r\n\r\n", head_start, head_start + MAX_PART_HEAD + 4)
        if head_end < 0:
            raise MalformedMultipart(f"a part's headers are longer than {MAX_PART_HEAD:,} bytes or do not end "
                                     "in an empty line")
        data_start = head_end + 4
        data_end = body.find(b"\r\n" + delimiter, data_start)
        if data_end < 0:
            raise MalformedMultipart("multipart body ends inside a part (no closing boundary)")
        if found is None and head_end > head_start and _is_file(body[head_start:head_end]):
            found = (data_start, data_end)
        pos = data_end + 2
    if found is None:
        raise MalformedMultipart("multipart body has no file part; send the artifact as field 'artifact' "
                                 "(curl -F artifact=@concept.safetensors) or as the raw request body")
    return found
