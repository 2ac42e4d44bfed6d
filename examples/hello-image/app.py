"""An image-style event function on the Python standard library.

It responds to POST /event-invoke on $FNGATE_INSTANCE_IP:$PORT (default 0.0.0.0:9000) with
{"hello": <event>, "request_id": "<X-Scf-Request-Id>"}. A JSON event is embedded as JSON,
any other body as a string. GET /healthz returns 200.
"""

import json
import os
import socket
import sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

MAX_EVENT_BYTES = 6 * 1024 * 1024


class Handler(BaseHTTPRequestHandler):
    # HTTP/1.1 keeps connections open for the platform's connection pool, so every
    # response must carry Content-Length.
    protocol_version = "HTTP/1.1"
    server_version = "hello-image"

    def do_POST(self):
        if self.path != "/event-invoke":
            self.reject(404, "no route for POST %s; events go to POST /event-invoke" % self.path)
            return
        length = parse_length(self.headers.get("Content-Length"))
        if length is None:
            self.reject(400, "invalid Content-Length; send a whole number of bytes")
            return
        if length > MAX_EVENT_BYTES:
            self.reject(413, "event of %d bytes is over the limit of %d" % (length, MAX_EVENT_BYTES))
            return
        raw = self.rfile.read(length)
        self.send_json(200, {
            "hello": decode_event(raw),
            "request_id": self.headers.get("X-Scf-Request-Id"),
        })

    def do_GET(self):
        if self.path == "/healthz":
            self.send_json(200, {"status": "ok"})
        else:
            self.send_json(404, {"error": "no route for GET %s; events go to POST /event-invoke" % self.path})

    def reject(self, status, message):
        # The body stays unread, so the connection cannot carry another request.
        self.close_connection = True
        self.send_json(status, {"error": message})

    def send_json(self, status, document):
        body = json.dumps(document).encode() + b"\n"
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
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
    except ValueError:
        return None
    return length if length >= 0 else None


def decode_event(raw):
    """Return the event as parsed JSON, as text if it is not JSON, or None if it is empty."""
    if not raw:
        return None
    text = raw.decode("utf-8", errors="replace")
    try:
        return json.loads(text)
    except ValueError:
        return text


class IPv6Server(ThreadingHTTPServer):
    address_family = socket.AF_INET6


def main():
    # fngate sets FNGATE_INSTANCE_IP for local instances, and SCF and pods need 0.0.0.0.
    host = os.environ.get("FNGATE_INSTANCE_IP", "0.0.0.0")
    port = int(os.environ.get("PORT", "9000"))
    server_class = IPv6Server if ":" in host else ThreadingHTTPServer
    server = server_class((host, port), Handler)
    print("hello-image: listening on %s port %d" % (host, port), file=sys.stderr, flush=True)
    server.serve_forever()


if __name__ == "__main__":
    main()
