#!/usr/bin/env python3
"""An ordinary HTTP upload sink: POST a body, get back its sha256 and this node's name.

Usage: upload_sink.py PORT NODE_NAME. Knows nothing of ringlb.
"""
import hashlib
import sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class Sink(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_POST(self):
        remaining = int(self.headers.get("Content-Length", "0"))
        digest = hashlib.sha256()
        while remaining > 0:
            chunk = self.rfile.read(min(remaining, 1 << 20))
            if not chunk:
                break
            digest.update(chunk)
            remaining -= len(chunk)
        body = f"{digest.hexdigest()} {NODE}\n".encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("X-Node", NODE)
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


if __name__ == "__main__":
    NODE = sys.argv[2]
    ThreadingHTTPServer.allow_reuse_address = True
    # A listen backlog like nginx's, not socketserver's 5: a burst of connections must not
    # overflow it into SYN cookies (seen in the survival tests' first 75 connections at once).
    ThreadingHTTPServer.request_queue_size = 511
    ThreadingHTTPServer(("0.0.0.0", int(sys.argv[1])), Sink).serve_forever()
