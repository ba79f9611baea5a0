"""Fixed-size-chunk streaming pieces of the sandbox: request bodies, chunked responses, zip
output and multipart parsing. Nothing here holds a whole body in memory, so a 2 GiB upload or
download keeps the server's memory flat.
"""

from __future__ import annotations

import io
import time
import zipfile
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO

CHUNK = 64 * 1024


class BodyError(Exception):
    """A request body that is malformed or was cut off."""


class BodyReader:
    """Reads a request body framed by Content-Length or chunked transfer encoding."""

    def __init__(
        self,
        rfile: IO[bytes],
        *,
        length: int | None,
        chunked: bool,
        counter: Callable[[int], None],
        cut_after: int | None = None,
    ) -> None:
        self._rfile = rfile
        self._remaining = 0 if chunked else (length or 0)
        self._chunked = chunked
        self._eof = not chunked and not length
        self._count = counter
        self._cut_after = cut_after
        self.consumed = 0

    @property
    def eof(self) -> bool:
        return self._eof

    def read(self, n: int = CHUNK) -> bytes:
        if self._eof:
            return b""
        if self._chunked and self._remaining == 0:
            self._next_chunk_header()
            if self._eof:
                return b""
        want = min(n, self._remaining)
        if self._cut_after is not None:
            left = self._cut_after - self.consumed
            if left <= 0:
                raise ConnectionAbortedError("sandbox fault: connection dropped during upload")
            want = min(want, left)
        data = self._rfile.read(want)
        if not data:
            raise BodyError("request body ended early")
        self._remaining -= len(data)
        self.consumed += len(data)
        self._count(len(data))
        if not self._chunked and self._remaining == 0:
            self._eof = True
        elif self._chunked and self._remaining == 0:
            self._rfile.readline()  # CRLF after the chunk data
        return data

    def _next_chunk_header(self) -> None:
        line = self._rfile.readline(1024)
        try:
            size = int(line.split(b";")[0].strip(), 16)
        except ValueError:
            raise BodyError("bad chunk header in request body") from None
        if size == 0:
            while self._rfile.readline(1024) not in (b"\r\n", b"\n", b""):
                pass  # trailers
            self._eof = True
        self._remaining = size

    def drain(self, limit: int = 1 << 20) -> bool:
        """Discard what is left (up to ``limit``); True when the body was fully read."""
        try:
            while not self._eof and limit > 0:
                limit -= len(self.read(min(CHUNK, limit)))
        except (BodyError, OSError):
            return False
        return self._eof

    def chunks(self) -> Iterator[bytes]:
        while True:
            data = self.read(CHUNK)
            if not data:
                return
            yield data


class ChunkedWriter(io.RawIOBase):
    """Buffers writes and sends them as HTTP/1.1 chunks of about ``CHUNK`` bytes."""

    def __init__(
        self,
        wfile: IO[bytes],
        counter: Callable[[int], None],
        cut_after: int | None = None,
        latency: float = 0.0,
    ) -> None:
        super().__init__()
        self._wfile = wfile
        self._buf = bytearray()
        self._count = counter
        self._cut_after = cut_after
        self._latency = latency
        self.sent = 0

    def writable(self) -> bool:
        return True

    def write(self, data: bytes) -> int:  # type: ignore[override]
        self._buf += data
        if len(self._buf) >= CHUNK:
            self._send(bytes(self._buf))
            self._buf.clear()
        return len(data)

    def _send(self, data: bytes) -> None:
        if not data:
            return
        if self._cut_after is not None and self.sent + len(data) > self._cut_after:
            part = data[: max(0, self._cut_after - self.sent)]
            if part:
                self._wfile.write(b"%x\r\n%s\r\n" % (len(part), part))
            self._wfile.flush()
            raise ConnectionAbortedError("sandbox fault: connection dropped during download")
        if self._latency:
            time.sleep(self._latency)
        self._wfile.write(b"%x\r\n" % len(data))
        self._wfile.write(data)
        self._wfile.write(b"\r\n")
        self.sent += len(data)
        self._count(len(data))

    def finish(self) -> None:
        self._send(bytes(self._buf))
        self._buf.clear()
        self._wfile.write(b"0\r\n\r\n")
        self._wfile.flush()


@dataclass(frozen=True)
class ZipEntry:
    arcname: str
    path: Path
    size: int
    mtime: float


def write_zip(entries: Iterable[ZipEntry], sink: IO[bytes], *, compression: int = 0) -> None:
    """Stream a zip to a non-seekable sink (sizes go into data descriptors).

    XNAT's default is STORED (site setting ``zipCompressionMethod`` = 0); ``compression`` > 0
    asks for DEFLATE at that level, as ``?compression=N`` does on XNAT.
    """
    method = zipfile.ZIP_DEFLATED if compression > 0 else zipfile.ZIP_STORED
    with zipfile.ZipFile(sink, "w", compression=method, allowZip64=True) as zf:
        for entry in entries:
            stamp = time.localtime(max(entry.mtime, 315532800))[:6]  # zip dates start in 1980
            info = zipfile.ZipInfo(entry.arcname, date_time=stamp)
            info.compress_type = method
            if method == zipfile.ZIP_DEFLATED:
                info._compresslevel = min(compression, 9)  # type: ignore[attr-defined]
            # Declaring the size up front lets zipfile decide on ZIP64 before the data flows.
            info.file_size = entry.size
            with open(entry.path, "rb") as src, zf.open(info, "w") as dst:
                while chunk := src.read(CHUNK):
                    dst.write(chunk)


@dataclass
class Part:
    headers: dict[str, str]
    name: str | None
    filename: str | None


def _disposition(value: str) -> tuple[str | None, str | None]:
    name = filename = None
    for item in value.split(";")[1:]:
        key, _, val = item.strip().partition("=")
        val = val.strip().strip('"')
        if key.lower() == "name":
            name = val
        elif key.lower() == "filename":
            filename = val
    return name, filename


def iter_multipart(
    read: Callable[[int], bytes], boundary: bytes
) -> Iterator[tuple[Part, Iterator[bytes]]]:
    """Yield (part, chunk iterator) for each part; exhaust each iterator before the next part."""
    buf = bytearray()
    eof = False

    def fill() -> bool:
        nonlocal eof
        data = read(CHUNK)
        if not data:
            eof = True
        buf.extend(data)
        return bool(data)

    first = b"--" + boundary
    while (idx := buf.find(first)) < 0:
        if not fill():
            raise BodyError("multipart body has no boundary")
    del buf[: idx + len(first)]
    sep = b"\r\n--" + boundary
    while True:
        while len(buf) < 2 and fill():
            pass
        if buf[:2] == b"--":
            return
        while (end := buf.find(b"\r\n\r\n")) < 0:
            if not fill() or len(buf) > 64 * 1024:
                raise BodyError("multipart part headers are malformed")
        headers = {}
        for line in bytes(buf[:end]).decode("utf-8", "replace").split("\r\n"):
            key, _, val = line.partition(":")
            if key.strip():
                headers[key.strip().lower()] = val.strip()
        del buf[: end + 4]
        name, filename = _disposition(headers.get("content-disposition", ""))

        def body() -> Iterator[bytes]:
            while True:
                idx = buf.find(sep)
                if idx >= 0:
                    if idx:
                        yield bytes(buf[:idx])
                    del buf[: idx + len(sep)]
                    return
                keep = len(sep) - 1
                if len(buf) > keep:
                    yield bytes(buf[:-keep])
                    del buf[:-keep]
                if not fill():
                    raise BodyError("multipart body ended inside a part")

        chunks = body()
        yield Part(headers, name, filename), chunks
        for _ in chunks:  # skip what the consumer left unread
            pass
