"""Upload checks done in the API before anything is stored: cheap, header-level, never a full decode.

* size: empty files and files over `max_upload_bytes` are refused (the whole request is capped earlier from its
  Content-Length by Flask's MAX_CONTENT_LENGTH);
* type: sniffed from the content (shared.core.imageio.sniff_format), never from the file name or Content-Type;
* pixel count: width x height from the header only (shared.core.imageio.image_dimensions), so a decompression bomb
  (a tiny PNG declaring 100000 x 100000) is refused before any pixel is inflated;
* integrity: the container structure is walked (PNG chunks with CRCs up to IEND, JPEG up to EOI, TIFF strip
  extents, DICOM pixel-data length) so a truncated or corrupt upload is a 400 now, not a failed job later;
* names: the client's file name is only sanitised metadata; storage keys are generated.
"""
from __future__ import annotations

import io
import logging
import re
import struct
import unicodedata
import zlib
from dataclasses import dataclass

from api.errors import ApiError

log = logging.getLogger("covidseg.api")

CONTENT_TYPES = {"png": "image/png", "jpeg": "image/jpeg", "tiff": "image/tiff", "dicom": "application/dicom"}


@dataclass
class CheckedUpload:
    data: bytes
    fmt: str
    width: int
    height: int
    name: str | None

    @property
    def content_type(self) -> str:
        return CONTENT_TYPES[self.fmt]


def sanitize_filename(name: str | None, limit: int = 128) -> str | None:
    """Display-only name: the last path component, printable ASCII letters/digits/._- only, bounded length."""
    if not name:
        return None
    name = unicodedata.normalize("NFKD", str(name)).encode("ascii", "ignore").decode("ascii")
    name = re.split(r"[\\/]", name)[-1]
    name = re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("._")
    return name[:limit] or None


# --- multipart fast path -------------------------------------------------------------------------------------
#: Bodies up to this size are parsed by `parse_multipart` (in memory); larger ones by werkzeug's streaming parser.
FAST_MULTIPART_MAX_BYTES = 8 * 1024 * 1024
_PART_HEADERS = {"content-disposition", "content-type"}


def parse_multipart(body: bytes, boundary: str | None, max_parts: int, file_fields: tuple[str, ...] = ()):
    """Parse a well-formed multipart/form-data body in one pass of `bytes.find`.

    Returns ([(field name, client file name, bytes)] for the parts that carry a file name, or whose field name is
    in `file_fields` (RFC 7578 makes the file name optional; its file name is then None), [names of the other
    fields]), or None for anything unusual (preamble, folded or extra part headers, non-UTF-8 headers, padding
    after a boundary, no closing boundary, too many parts). The caller then hands the same bytes to werkzeug's
    general parser, so this is only a faster route to the same result. It exists because werkzeug compiles two
    regular expressions per request from the (random) boundary and scans the body in Python-level chunks:
    about a third of the API's CPU time per single-slice submission.
    """
    from werkzeug.http import parse_options_header

    if not boundary or len(boundary) > 200:
        return None
    delim = b"--" + boundary.encode("latin-1", "replace")
    if not body.startswith(delim + b"\r\n"):
        return None
    files, fields = [], []
    pos = len(delim) + 2
    sep = b"\r\n" + delim
    while True:
        if len(files) + len(fields) >= max_parts:
            return None
        head_end = body.find(b"\r\n\r\n", pos, pos + 8192)
        if head_end < 0:
            return None
        headers = {}
        for line in body[pos:head_end].split(b"\r\n"):
            try:
                name, colon, value = line.decode("utf-8").partition(":")
            except UnicodeDecodeError:
                return None
            name = name.strip().lower()
            if not colon or name not in _PART_HEADERS or name in headers or line[:1] in (b" ", b"\t"):
                return None
            headers[name] = value.strip(" \t")
        disposition, opts = parse_options_header(headers.get("content-disposition", ""))
        if disposition != "form-data" or "name" not in opts:  # an empty name is a (useless) field, as for werkzeug
            return None
        data_start = head_end + 4
        data_end = body.find(sep, data_start)
        if data_end < 0:
            return None
        if "filename" in opts or opts["name"] in file_fields:
            files.append((opts["name"], opts.get("filename"), body[data_start:data_end]))
        else:
            fields.append(opts["name"])
        after = data_end + len(sep)
        if body[after:after + 2] == b"--":          # closing boundary; an epilogue may follow
            return files, fields
        if body[after:after + 2] != b"\r\n":
            return None
        pos = after + 2


def _decode_parts(body: bytes, boundary: str, field: str, max_parts: int) -> tuple[list, list[str]] | None:
    """werkzeug's own multipart decoder over a body the fast parser declined: the `field` parts keep their raw
    bytes whether or not they carry a file name. None when the body is not multipart werkzeug can read."""
    from werkzeug.sansio.multipart import Data, Epilogue, Field, File, MultipartDecoder, NeedData

    decoder = MultipartDecoder(boundary.encode("latin-1", "replace"), max_parts=max_parts)
    try:
        decoder.receive_data(body)
        decoder.receive_data(None)
        parts, others, current = [], [], None
        while True:
            event = decoder.next_event()
            if isinstance(event, (Field, File)):
                current = None
                if event.name == field:
                    current = [getattr(event, "filename", None), bytearray()]
                    parts.append(current)
                else:
                    others.append(event.name)
            elif isinstance(event, Data) and current is not None:
                current[1] += event.data
            elif isinstance(event, (Epilogue, NeedData)):
                break
    except ValueError:  # malformed: the caller answers as for any unreadable body
        return None
    return [(name, bytes(data)) for name, data in parts], list(dict.fromkeys(others))


def file_parts(field: str, max_request_bytes: int) -> tuple[list, list[str]]:
    """The request's `field` parts as [(client file name or None, bytes or a stream)], and the other field names.

    A client may leave out a part's file name (RFC 7578): such a part is still a file. Bodies up to
    FAST_MULTIPART_MAX_BYTES are read in memory, by `parse_multipart` or, for what it declines, by werkzeug's
    decoder; larger ones stream through werkzeug's form parser, where a part without a file name would arrive as
    text, so it is refused with a message saying how to send it.
    """
    from flask import current_app, request

    length = request.content_length
    boundary = request.mimetype_params.get("boundary")
    max_parts = current_app.config["MAX_FORM_PARTS"]
    if length is not None and length <= min(FAST_MULTIPART_MAX_BYTES, max_request_bytes) and boundary:
        body = request.get_data(cache=True)  # cached: werkzeug can still parse it for request.form
        parsed = parse_multipart(body, boundary, max_parts, file_fields=(field,))
        if parsed is not None:
            return ([(filename, data) for name, filename, data in parsed[0] if name == field],
                    list(dict.fromkeys([n for n, _, _ in parsed[0] if n != field] + parsed[1])))
        decoded = _decode_parts(body, boundary, field, max_parts)
        if decoded is not None:
            return decoded
    files = [(f.filename, f.stream) for f in request.files.getlist(field)]
    if not files and field in request.form:
        raise ApiError(400, "file_without_filename", f"the `{field}` part has no filename; send it as a file "
                       f"(Content-Disposition: form-data; name=\"{field}\"; filename=\"...\")")
    return files, [k for k in list(request.files.keys()) + list(request.form.keys()) if k != field]


def discard_unless_committed(model, row_id: str, discard, what: str) -> None:
    """After a failed submission: `discard()` what it stored, unless the `model` row `row_id` exists after all
    (a COMMIT can fail after the server applied it). When the database cannot say, keep it and log `what`."""
    from flask import current_app
    from sqlalchemy import select

    try:
        with current_app.extensions["covidseg"].Session() as session:
            if session.execute(select(model.id).where(model.id == row_id)).first() is not None:
                return
    except Exception:  # noqa: BLE001 - the database is still away: we cannot know, so keep the objects
        log.warning("a submission failed and the database cannot say whether it committed; kept: %s", what)
        return
    try:
        discard()
    except Exception:  # noqa: BLE001 - best effort; the error the client gets is the original one
        pass


def check_upload(data: bytes, filename: str | None, settings, index: int = 0) -> CheckedUpload:
    from shared.core.imageio import image_dimensions, sniff_format

    where = f"file #{index + 1}" + (f" ({sanitize_filename(filename)})" if sanitize_filename(filename) else "")
    if len(data) == 0:
        raise ApiError(400, "empty_file", f"{where} is empty")
    if len(data) > settings.max_upload_bytes:
        raise ApiError(413, "file_too_large", f"{where} is larger than {settings.max_upload_bytes} bytes")
    fmt = sniff_format(data)
    if fmt not in CONTENT_TYPES:
        raise ApiError(415, "unsupported_media_type",
                       f"{where} is not a PNG, JPEG, TIFF or DICOM image (type is read from the content)")
    try:
        width, height = image_dimensions(data)
    except Exception:  # noqa: BLE001 - any header problem is the client's
        raise ApiError(400, "invalid_image", f"{where}: unreadable {fmt.upper()} header") from None
    width, height = int(width), int(height)
    if width < settings.min_side or height < settings.min_side:
        raise ApiError(422, "image_too_small", f"{where} is {width}x{height}; the minimum side is "
                                               f"{settings.min_side} pixels")
    if width * height > settings.max_pixels:
        raise ApiError(413, "too_many_pixels", f"{where} declares {width}x{height} pixels; the limit is "
                                               f"{settings.max_pixels} pixels")
    problem = structural_problem(data, fmt)
    if problem:
        raise ApiError(400, "corrupt_image", f"{where}: {problem}")
    return CheckedUpload(data, fmt, width, height, sanitize_filename(filename))


# --- structure walks (no pixel decoding) -------------------------------------------------------------------------
def structural_problem(data: bytes, fmt: str) -> str | None:
    try:
        return {"png": _png, "jpeg": _jpeg, "tiff": _tiff, "dicom": _dicom}[fmt](data)
    except (struct.error, IndexError, ValueError) as exc:
        return f"malformed {fmt.upper()} ({exc})"


def _png(data: bytes) -> str | None:
    pos, n = 8, len(data)
    seen_idat = False
    while pos + 8 <= n:
        length, ctype = struct.unpack(">I4s", data[pos:pos + 8])
        end = pos + 12 + length
        if end > n:
            return "truncated PNG (chunk runs past the end of the file)"
        if zlib.crc32(data[pos + 4:pos + 8 + length]) & 0xFFFFFFFF != struct.unpack(">I", data[end - 4:end])[0]:
            return f"corrupt PNG (bad CRC in {ctype.decode('latin-1')!r} chunk)"
        if ctype == b"IDAT":
            seen_idat = True
        if ctype == b"IEND":
            return None if seen_idat else "PNG without image data"
        pos = end
    return "truncated PNG (no IEND chunk)"


def _jpeg(data: bytes) -> str | None:
    n = len(data)
    pos = 2
    while pos + 4 <= n:
        if data[pos] != 0xFF:
            return "corrupt JPEG (bad marker)"
        marker = data[pos + 1]
        if marker == 0xFF:          # fill byte
            pos += 1
            continue
        if marker in (0xD8, 0x01) or 0xD0 <= marker <= 0xD7:
            pos += 2
            continue
        length = struct.unpack(">H", data[pos + 2:pos + 4])[0]
        if pos + 2 + length > n:
            return "truncated JPEG (segment runs past the end of the file)"
        if marker == 0xDA:          # start of scan: entropy-coded data follows, then EOI
            tail = data[pos + 2 + length:]
            return None if b"\xff\xd9" in tail[-4096:] or tail.rstrip(b"\x00").endswith(b"\xff\xd9") \
                else "truncated JPEG (no end-of-image marker)"
        pos += 2 + length
    return "truncated JPEG (no image data)"


def _tiff(data: bytes) -> str | None:
    bo = "<" if data[:2] == b"II" else ">"
    n = len(data)
    if struct.unpack(bo + "H", data[2:4])[0] == 43:
        return None  # BigTIFF: header checks only
    ifd = struct.unpack(bo + "I", data[4:8])[0]
    if ifd + 2 > n:
        return "truncated TIFF (first directory past the end of the file)"
    count = struct.unpack(bo + "H", data[ifd:ifd + 2])[0]
    if ifd + 2 + 12 * count > n:
        return "truncated TIFF (directory runs past the end of the file)"
    sizes = {1: 1, 2: 1, 3: 2, 4: 4, 5: 8, 6: 1, 7: 1, 8: 2, 9: 4, 10: 8, 11: 4, 12: 8, 16: 8}
    tags = {}
    for i in range(count):
        e = ifd + 2 + 12 * i
        tag, typ, cnt = struct.unpack(bo + "HHI", data[e:e + 8])
        size = sizes.get(typ, 1) * cnt
        if typ not in (3, 4, 16):
            continue
        fmtc = {3: "H", 4: "I", 16: "Q"}[typ]
        if size <= 4:
            vals = struct.unpack(bo + fmtc * cnt, data[e + 8:e + 8 + size])
        else:
            off = struct.unpack(bo + "I", data[e + 8:e + 12])[0]
            if off + size > n:
                return "truncated TIFF (tag values past the end of the file)"
            vals = struct.unpack(bo + fmtc * cnt, data[off:off + size])
        tags[tag] = vals
    offsets = tags.get(273) or tags.get(324)   # StripOffsets / TileOffsets
    counts = tags.get(279) or tags.get(325)    # StripByteCounts / TileByteCounts
    if offsets and counts:
        for off, cnt in zip(offsets, counts):
            if off + cnt > n:
                return "truncated TIFF (image data past the end of the file)"
    return None


def _dicom(data: bytes) -> str | None:
    import pydicom

    try:
        ds = pydicom.dcmread(io.BytesIO(data), force=True)
    except Exception as exc:  # noqa: BLE001
        return f"unreadable DICOM ({type(exc).__name__})"
    if "PixelData" not in ds:
        return "DICOM without pixel data"
    try:
        rows, cols = int(ds.Rows), int(ds.Columns)
        bits = int(ds.BitsAllocated)
        spp = int(getattr(ds, "SamplesPerPixel", 1) or 1)
        frames = int(getattr(ds, "NumberOfFrames", 1) or 1)
    except (AttributeError, TypeError, ValueError):
        return "DICOM without image geometry"
    ts = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
    if ts is not None and getattr(ts, "is_compressed", False):
        return None   # encapsulated pixel data: length depends on the codec
    expected = rows * cols * spp * frames * bits // 8
    if len(ds.PixelData) < expected:
        return "truncated DICOM (pixel data shorter than its geometry)"
    return None
