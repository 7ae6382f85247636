"""A loopback HTTP receiver for the end-to-end tests and the demo.

Records every request and answers from a per-path script: each path can be
given a list of responses that are used in order (the last one repeats).
A response is a dict: status, body, headers, delay (seconds before answering).
"""

import http.server
import json
import sys
import socket
import threading
import time
import urllib.parse


class Receiver:
    def __init__(self, host="127.0.0.1", port=0):
        self.requests = []
        self.scripts = {}
        self.active = {}
        self.max_active = {}
        self.lock = threading.Lock()
        receiver = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def handle_any(self):
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length).decode("utf-8", "replace") if length else ""
                parsed = urllib.parse.urlsplit(self.path)
                record = {
                    "time": time.time(),
                    "method": self.command,
                    "path": parsed.path,
                    "raw_query": parsed.query,
                    "query": dict(urllib.parse.parse_qsl(parsed.query, keep_blank_values=True)),
                    "headers": {k.lower(): v for k, v in self.headers.items()},
                    "body": body,
                }
                with receiver.lock:
                    receiver.requests.append(record)
                    script = receiver.scripts.get(parsed.path) or [{}]
                    response = script.pop(0) if len(script) > 1 else script[0]
                    record["status"] = 0 if response.get("reset") else response.get("status", 200)
                    active = receiver.active.get(parsed.path, 0) + 1
                    receiver.active[parsed.path] = active
                    receiver.max_active[parsed.path] = max(receiver.max_active.get(parsed.path, 0), active)
                try:
                    self.respond(response)
                finally:
                    with receiver.lock:
                        receiver.active[parsed.path] -= 1

            def respond(self, response):
                if response.get("delay"):
                    time.sleep(response["delay"])
                if response.get("reset"):
                    # drop the connection with a RST, mid-response
                    self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
                    self.wfile.write(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\npartial")
                    self.wfile.flush()
                    self.connection.close()
                    self.close_connection = True
                    return
                if response.get("endless"):
                    # a body that never ends (until the client gives up)
                    self.send_response(200)
                    self.end_headers()
                    try:
                        while True:
                            self.wfile.write(b"x" * 65536)
                    except OSError:
                        self.close_connection = True
                        return
                if response.get("close"):
                    self.close_connection = True
                # "echo": the body repeats the request line's target, as some partners do
                payload = (self.path if response.get("echo") else response.get("body", "ok")).encode()
                self.send_response(response.get("status", 200))
                for name, value in response.get("headers", {}).items():
                    self.send_header(name, value)
                self.send_header("Content-Length", str(len(payload)))
                if response.get("close"):
                    self.send_header("Connection", "close")
                self.end_headers()
                try:
                    self.wfile.write(payload)
                except OSError:
                    self.close_connection = True

            do_GET = do_POST = do_PUT = do_PATCH = handle_any

        class Server(http.server.ThreadingHTTPServer):
            daemon_threads = True
            request_queue_size = 256

        self.server = Server((host, port), Handler)
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def start(self):
        self.thread.start()
        return self

    def stop(self):
        self.server.shutdown()
        self.server.server_close()

    def url(self, path):
        return f"http://127.0.0.1:{self.port}{path}"

    def script(self, path, *responses):
        with self.lock:
            self.scripts[path] = list(responses)

    def seen(self, path=None):
        with self.lock:
            return [r for r in self.requests if path is None or r["path"] == path]


class Hanging:
    """Accepts connections and never answers (a tracker that hangs)."""

    def __init__(self):
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(512)
        self.port = self.sock.getsockname()[1]
        self.conns = []
        self.stopped = False
        self.thread = threading.Thread(target=self._accept, daemon=True)

    def _accept(self):
        while not self.stopped:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.conns.append(conn)

    def start(self):
        self.thread.start()
        return self

    def url(self, path):
        return f"http://127.0.0.1:{self.port}{path}"

    def stop(self):
        self.stopped = True
        for c in self.conns:
            c.close()
        self.sock.close()


class SlowLoris:
    """Reads the request, then trickles a valid response one byte a second
    (a partner whose headers never finish within any sane timeout)."""

    def __init__(self):
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(512)
        self.port = self.sock.getsockname()[1]
        self.stopped = False
        self.requests = 0
        self.thread = threading.Thread(target=self._accept, daemon=True)

    def _accept(self):
        while not self.stopped:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._trickle, args=(conn,), daemon=True).start()

    def _trickle(self, conn):
        try:
            conn.recv(65536)
            self.requests += 1
            for byte in b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok":
                if self.stopped:
                    break
                conn.sendall(bytes([byte]))
                time.sleep(1)
        except OSError:
            pass
        finally:
            conn.close()

    def start(self):
        self.thread.start()
        return self

    def url(self, path):
        return f"http://127.0.0.1:{self.port}{path}"

    def stop(self):
        self.stopped = True
        self.sock.close()


def main(argv):
    """Demo mode: serve on a port and print each request as a JSON line.
    /flaky answers 503 once, then 200."""
    port = int(argv[0]) if argv else 8099
    r = Receiver(port=port)
    r.script("/flaky", {"status": 503, "body": "try later"}, {"status": 200})
    r.start()
    printed = 0
    try:
        while True:
            time.sleep(0.2)
            for req in r.seen()[printed:]:
                print(json.dumps({k: req[k] for k in ("method", "path", "query")}), flush=True)
                printed += 1
    except KeyboardInterrupt:
        r.stop()


if __name__ == "__main__":
    main(sys.argv[1:])
