"""The submit path's multipart fast parser (api.uploads.parse_multipart) gives exactly what werkzeug's general
parser gives for well-formed bodies, and declines (None -> werkzeug parses) everything unusual. No services."""
from __future__ import annotations

import io
import os

import pytest
from urllib3 import encode_multipart_formdata
from werkzeug.formparser import parse_form_data

from api.uploads import parse_multipart

PNG = (b"\x89PNG\r\n\x1a\n" + os.urandom(3000))
TRICKY = b"--\r\n--x\r\n\r\n" + PNG + b"\r\n-"     # boundary-like bytes and CRLFs inside the data


def werkzeug_parts(body: bytes, boundary: str):
    environ = {"REQUEST_METHOD": "POST", "CONTENT_TYPE": f"multipart/form-data; boundary={boundary}",
               "CONTENT_LENGTH": str(len(body)), "wsgi.input": io.BytesIO(body)}
    _, form, files = parse_form_data(environ)
    return (sorted((k, f.filename, f.read()) for k, f in files.items(multi=True)),
            sorted(form.keys()))


def fast_parts(body: bytes, boundary: str, max_parts: int = 1000):
    parsed = parse_multipart(body, boundary, max_parts)
    assert parsed is not None, "the fast parser declined a well-formed body"
    files, fields = parsed
    return sorted(files), sorted(fields)


WELL_FORMED = {
    "one file (what requests/urllib3 send)": [("file", ("slice.png", PNG, "image/png"))],
    "several files, one batch": [("file", (f"{i}.png", PNG[: 100 * (i + 1)], "image/png")) for i in range(5)],
    "empty file": [("file", ("empty.png", b"", "image/png"))],
    "empty file name (browser, nothing chosen)": [("file", ("", b"", "application/octet-stream"))],
    "hostile and non-ASCII names": [("file", ("../../etc/pässwd", PNG, "image/png"))],
    "data with boundary-like bytes": [("file", ("t.png", TRICKY, "image/png"))],
    "other fields too": [("note", "hello"), ("file", ("a.png", PNG, "image/png")),
                         ("other", ("b.png", PNG, "image/png"))],
    "no file field": [("other", ("b.png", PNG, "image/png"))],
}


@pytest.mark.parametrize("name", list(WELL_FORMED))
def test_same_result_as_werkzeug(name):
    body, content_type = encode_multipart_formdata(WELL_FORMED[name])
    boundary = content_type.split("boundary=", 1)[1]
    assert fast_parts(body, boundary) == werkzeug_parts(body, boundary)


def test_browser_style_body_with_quoted_boundary_parameter():
    boundary = "----WebKitFormBoundary7MA4YWxkTrZu0gW"
    body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"a b.png\"\r\n"
            f"Content-Type: image/png\r\n\r\n").encode() + PNG + f"\r\n--{boundary}--\r\n".encode()
    files, fields = fast_parts(body, boundary)
    assert files == [("file", "a b.png", PNG)] and fields == []
    assert (files, fields) == werkzeug_parts(body, boundary)


def _body(boundary="xyz", data=PNG):
    return (f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"a.png\"\r\n"
            f"Content-Type: image/png\r\n\r\n").encode() + data + f"\r\n--{boundary}--\r\n".encode()


DECLINED = {
    "no boundary parameter": (lambda: _body(), None),
    "preamble before the first boundary": (lambda: b"preamble\r\n" + _body(), "xyz"),
    "no closing boundary (truncated)": (lambda: _body()[:-12], "xyz"),
    "truncated inside the data": (lambda: _body()[:200], "xyz"),
    "folded part header": (lambda: _body().replace(b"; filename", b";\r\n filename"), "xyz"),
    "unexpected part header": (lambda: _body().replace(b"Content-Type", b"Content-Transfer-Encoding"), "xyz"),
    "repeated part header": (lambda: _body().replace(b"Content-Type: image/png",
                                                      b"Content-Type: image/png\r\nContent-Type: x/y"), "xyz"),
    "non-UTF-8 part header": (lambda: _body().replace(b"a.png", b"\xff.png"), "xyz"),
    "not form-data": (lambda: _body().replace(b"form-data;", b"attachment;"), "xyz"),
    "part without a name": (lambda: _body().replace(b'name="file"; ', b""), "xyz"),
    "padding after a boundary": (lambda: _body().replace(b"--xyz\r\n", b"--xyz  \r\n", 1), "xyz"),
    "wrong boundary": (lambda: _body(), "abc"),
}


@pytest.mark.parametrize("name", list(DECLINED))
def test_declines_unusual_bodies(name):
    build, boundary = DECLINED[name]
    assert parse_multipart(build(), boundary, 1000) is None


def test_too_many_parts_is_left_to_werkzeug():
    body, content_type = encode_multipart_formdata([("file", (f"{i}.png", PNG, "image/png")) for i in range(6)])
    boundary = content_type.split("boundary=", 1)[1]
    assert parse_multipart(body, boundary, 5) is None
    assert parse_multipart(body, boundary, 6) is not None
