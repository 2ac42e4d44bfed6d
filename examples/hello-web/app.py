"""A web function on the Python standard library, listening on $FNGATE_INSTANCE_IP:$PORT
(default 0.0.0.0:9000).

Routes:
  GET /sleep?ms=N  waits N milliseconds (0 to 60000), then responds; useful to show concurrency
  POST /echo       returns the request body with its content type
  GET <any other>  returns a JSON greeting with the path and the X-Scf-Request-Id header
"""

import json
import os
import socket
import sys
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit

MAX_SLEEP_MS = 60_000
MAX_ECHO_BYTES = 6 * 1024 * 1024


class Handler(BaseHTTPRequestHandler):
    # HTTP/1.1 keeps connections open for the platform's connection pool, so every
    # response must carry Content-Length.
    protocol_version = "HTTP/1.1"
    server_version = "hello-web"

    def do_GET(self):
        url = urlsplit(self.path)
        if url.path == "/sleep":
            self.sleep(parse_qs(url.query))
            return
        self.send_json(200, {
            "message": "hello from fngate",
            "path": url.path,
            "request_id": self.headers.get("X-Scf-Request-Id"),
        })

    def do_POST(self):
        if urlsplit(self.path).path != "/echo":
            self.reject(404, "no route for POST %s; use POST /echo" % self.path)
            return
        length = parse_length(self.headers.get("Content-Length"))
        if length is None:
            self.reject(400, "invalid Content-Length; send a whole number of bytes")
            return
        if length > MAX_ECHO_BYTES:
            self.reject(413, "body of %d bytes is over the limit of %d" % (length, MAX_ECHO_BYTES))
            return
        body = self.rfile.read(length)
        content_type = self.headers.get("Content-Type", "application/octet-stream")
        self.send_bytes(200, content_type, body)

    def sleep(self, query):
        value = query.get("ms", ["0"])[0]
        try:
            ms = int(value)
        except ValueError:
            ms = -1
        if not 0 <= ms <= MAX_SLEEP_MS:
            self.send_json(400, {"error": "invalid ms %r: expected a whole number from 0 to %d" % (value, MAX_SLEEP_MS)})
            return
        time.sleep(ms / 1000)
        self.send_json(200, {"slept_ms": ms, "request_id": self.headers.get("X-Scf-Request-Id")})

    def reject(self, status, message):
        # The body stays unread, so the connection cannot carry another request.
        self.close_connection = True
        self.send_json(status, {"error": message})

    def send_json(self, status, document):
        self.send_bytes(status, "application/json", json.dumps(document).encode() + b"\n")

    def send_bytes(self, status, content_type, body):
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_request(self, code="-", size="-"):
        # No access log line per request; errors still go to stderr through log_message.
        pass


def parse_length(value):
    """Return the Content-Length as an int: 0 when it is missing, None when it is invalid."""
    if value is None:
        return 0
    try:
        length = int(value)
    except (TypeError, ValueError):
        return None
    return length if length >= 0 else None


class IPv6Server(ThreadingHTTPServer):
    address_family = socket.AF_INET6


def main():
    # fngate sets FNGATE_INSTANCE_IP for local instances, and SCF and pods need 0.0.0.0.
    host = os.environ.get("FNGATE_INSTANCE_IP", "0.0.0.0")
    port = int(os.environ.get("PORT", "9000"))
    server_class = IPv6Server if ":" in host else ThreadingHTTPServer
    server = server_class((host, port), Handler)
    print("hello-web: listening on %s port %d" % (host, port), file=sys.stderr, flush=True)
    server.serve_forever()


if __name__ == "__main__":
    main()
