"""The HTTP/1.1 side of the sandbox: reads requests off the socket (with the fault injection
that cuts bodies), hands them to ``SandboxApp`` and writes its replies, streamed or chunked.
"""

from __future__ import annotations

import logging
import re
import socket
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import IO, Any, cast

from .app import SandboxApp
from .http import HttpError, Reply, Request, cookie, restlet_page, tomcat_page
from .streams import CHUNK, BodyReader, ChunkedWriter

log = logging.getLogger(__name__)

_TOKEN_PATH = re.compile(r"(/services/tokens/\w+/[^/\s?]+/)[^\s?]+")


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    # Headers and body leave in two writes; with Nagle on, the body waits for the client's
    # delayed ACK of the headers (about 40 ms on Linux) on every keep-alive request, which made
    # a client holding one session slower than curl opening a connection per request. Tomcat
    # (tcpNoDelay) sends at once too.
    disable_nagle_algorithm = True
    server: _Server

    def version_string(self) -> str:
        return "XNAT-sandbox"

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - stdlib signature
        # Token secrets travel in some XNAT URLs (tokens/validate/{alias}/{secret}): keep them
        # out of the access log.
        line = _TOKEN_PATH.sub(r"\1***", format % args)
        log.debug("%s %s", self.address_string(), line)

    def do_GET(self) -> None:
        self._dispatch()

    do_HEAD = do_PUT = do_POST = do_DELETE = do_GET

    def _dispatch(self) -> None:
        app = self.server.app
        app.stats.request(self.command)
        faults = app.faults
        chunked = "chunked" in self.headers.get("Transfer-Encoding", "").lower()
        try:
            length = int(self.headers.get("Content-Length") or 0)
        except ValueError:
            length = 0
        cut = faults.cut_point() if (length or chunked) else None
        body = BodyReader(
            cast("IO[bytes]", self.rfile),
            length=length,
            chunked=chunked,
            counter=app.stats.add_in,
            cut_after=cut,
        )
        req = Request.parse(self.command, self.path, self.headers, body)
        if faults.latency:
            time.sleep(faults.latency)
        extra_cookies: dict[str, str] = {}
        try:
            if faults.fail_every and app.stats.total % faults.fail_every == 0:
                raise HttpError(
                    503,
                    "Service Unavailable (sandbox fault injection)",
                    page="tomcat",
                    headers=faults.failure_headers(),
                )
            extra_cookies = app.authenticate(req)
            reply = app.route(req)
        except HttpError as err:
            render = tomcat_page if err.page == "tomcat" else restlet_page
            # The pages are UTF-8 (Tomcat's has an en dash); say so, as Tomcat does.
            reply = Reply(
                err.status, render(err.status, err.reason), "text/html;charset=utf-8", err.headers
            )
        except ConnectionAbortedError:  # only the fault injection cuts a request body
            app.stats.cut()
            self._abort()
            return
        except Exception:  # a bug in the sandbox must not kill the connection silently
            log.exception("sandbox error on %s %s", self.command, self.path)
            reply = Reply(500, restlet_page(500, "Internal Server Error"), "text/html")
        if not body.eof and not body.drain():
            self.close_connection = True
        self._send(req, reply, extra_cookies)

    def _send(self, req: Request, reply: Reply, cookies: dict[str, str]) -> None:
        app = self.server.app
        app.stats.status(reply.status)
        app.request_log.append(
            (req.method, _TOKEN_PATH.sub(r"\1***", req.path), req.user, reply.status)
        )
        self.send_response(reply.status)
        self.send_header("Content-Type", reply.content_type)
        for key, value in reply.headers.items():
            if key != "Set-Cookie":
                self.send_header(key, value)
        if "Set-Cookie" in reply.headers:
            self.send_header("Set-Cookie", reply.headers["Set-Cookie"])
        for name, value in cookies.items():
            self.send_header("Set-Cookie", cookie(name, value))
        if req.user:
            timeout_ms = int(app.auth.settings.session_timeout * 1000)
            self.send_header(
                "Set-Cookie",
                f'SESSION_EXPIRATION_TIME="{int(time.time() * 1000)},{timeout_ms}"; Path=/',
            )
        if self.close_connection:
            self.send_header("Connection", "close")
        head = self.command == "HEAD"
        try:
            if reply.stream is not None:
                self.send_header("Transfer-Encoding", "chunked")
                self.end_headers()
                if not head:
                    writer = ChunkedWriter(
                        cast("IO[bytes]", self.wfile), app.stats.add_out, app.faults.cut_point()
                    )
                    reply.stream(cast("IO[bytes]", writer))
                    writer.finish()
            elif reply.file is not None:
                self._send_file(reply.file, head)
            else:
                self.send_header("Content-Length", str(len(reply.body)))
                self.end_headers()
                if not head and reply.body:
                    self.wfile.write(reply.body)
                    app.stats.add_out(len(reply.body))
        except ConnectionAbortedError:  # the fault injection cut the answer's body
            app.stats.cut()
            self._abort()
        except (BrokenPipeError, ConnectionResetError):  # the client went away
            self._abort()

    def _send_file(self, path: Path, head: bool) -> None:
        app = self.server.app
        self.send_header("Content-Length", str(path.stat().st_size))
        self.end_headers()
        if head:
            return
        cut = app.faults.cut_point()
        sent = 0
        with open(path, "rb") as fh:
            while chunk := fh.read(CHUNK):
                if cut is not None and sent + len(chunk) > cut:
                    self.wfile.write(chunk[: max(0, cut - sent)])
                    raise ConnectionAbortedError("sandbox fault: download cut")
                self.wfile.write(chunk)
                sent += len(chunk)
                app.stats.add_out(len(chunk))

    def _abort(self) -> None:
        """Drop the connection at once, as a crashed proxy or a network fault would."""
        self.close_connection = True
        try:
            self.wfile.flush()
            self.connection.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 128
    app: SandboxApp
