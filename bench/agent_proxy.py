"""A recording HTTP proxy between a real agent and hearth.

Every request is forwarded unchanged to the upstream server and its
response streamed back chunk by chunk as it arrives. For each exchange the
proxy records what the agent sent (method, path, headers, JSON body) and
what it saw on the wire: status, time to the first byte, time to the first
content event, the largest silence between two reads, the byte count, and
whether the response ended cleanly. `bench/agents.py` reads these records
for its per-turn table; `--capture DIR` keeps them as request fixtures.

Run alone:  python bench/agent_proxy.py --listen 18081 --upstream http://127.0.0.1:18080 --log FILE
"""

from __future__ import annotations

import argparse
import http.client
import json
import threading
import time
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

HOP_HEADERS = {
    "connection",
    "keep-alive",
    "proxy-connection",
    "transfer-encoding",
    "te",
    "trailer",
    "upgrade",
    "content-length",
    "host",
}

# The first SSE event that carries model output, per protocol.
CONTENT_MARKERS = (
    b"content_block_delta",  # Anthropic
    b"response.output_text.delta",  # Responses
    b"response.reasoning",  # Responses reasoning
    b"response.function_call_arguments.delta",
    b'"delta":{"content"',  # chat completions
    b'"delta":{"role":"assistant","content"',
)


def last_usage(stream: bytes) -> dict | None:
    """The last `usage` object in an SSE stream's data lines (top level, or
    under `response` or `message`), merged over earlier ones so Anthropic's
    `message_start` input counts and `message_delta` output counts combine."""
    usage: dict = {}
    for line in stream.decode("utf-8", "replace").splitlines():
        if not line.startswith("data:"):
            continue
        try:
            ev = json.loads(line[5:])
        except ValueError:
            continue
        if not isinstance(ev, dict):
            continue
        for holder in (ev, ev.get("response"), ev.get("message")):
            if isinstance(holder, dict) and isinstance(holder.get("usage"), dict):
                usage.update({k: v for k, v in holder["usage"].items() if v is not None})
    return usage or None


def event_names(stream: bytes) -> dict:
    """How many of each SSE event (and keepalive comment) the stream held."""
    names: dict = {}
    for line in stream.decode("utf-8", "replace").splitlines():
        if line.startswith("event:"):
            n = line[6:].strip()
        elif line.startswith(":"):
            n = "(comment)"
        else:
            continue
        names[n] = names.get(n, 0) + 1
    return names


class Recorder:
    """Appends one JSON line per exchange to a file; keeps them in memory."""

    def __init__(self, path: str | None):
        self.path = path
        self.lock = threading.Lock()
        self.records: list[dict] = []

    def add(self, rec: dict) -> None:
        with self.lock:
            self.records.append(rec)
            if self.path:
                with open(self.path, "a", encoding="utf-8") as f:
                    f.write(json.dumps(rec) + "\n")

    def since(self, n: int) -> list[dict]:
        with self.lock:
            return list(self.records[n:])

    def count(self) -> int:
        with self.lock:
            return len(self.records)


def kv_held(up, headers: dict) -> int | None:
    """The most tokens an idle sequence of the server holds (its `/slots`),
    read just before a request goes on: what the request could reuse."""
    auth = {k: v for k, v in headers.items() if k.lower() in ("authorization", "x-api-key")}
    conn = http.client.HTTPConnection(up.hostname, up.port, timeout=10)
    try:
        conn.request("GET", "/slots", headers=auth)
        slots = json.loads(conn.getresponse().read()).get("slots", [])
        return max((s.get("kv_tokens") or 0 for s in slots if s.get("state") == "idle"), default=0)
    except (OSError, ValueError, AttributeError):
        return None
    finally:
        conn.close()


def make_handler(upstream: str, recorder: Recorder):
    up = urllib.parse.urlsplit(upstream)

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args):  # quiet
            pass

        def _forward(self):
            started = time.monotonic()
            length = int(self.headers.get("content-length") or 0)
            body = self.rfile.read(length) if length else b""
            headers = {k: v for k, v in self.headers.items() if k.lower() not in HOP_HEADERS}
            rec: dict = {
                "t": time.time(),
                "method": self.command,
                "path": self.path,
                "headers": dict(self.headers.items()),
            }
            try:
                rec["body"] = json.loads(body) if body else None
            except ValueError:
                rec["body_text"] = body.decode("utf-8", "replace")[:2000]
            if self.command == "POST":
                rec["kv_held"] = kv_held(up, headers)
            conn = http.client.HTTPConnection(up.hostname, up.port, timeout=3600)
            try:
                conn.request(self.command, self.path, body=body or None, headers=headers)
                resp = conn.getresponse()
            except OSError as e:
                rec.update(status=None, error=str(e), complete=False)
                recorder.add(rec)
                self.send_error(502, str(e))
                return
            rec["status"] = resp.status
            self.send_response(resp.status)
            for k, v in resp.getheaders():
                if k.lower() not in HOP_HEADERS:
                    self.send_header(k, v)
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            first_byte = first_content = None
            last = time.monotonic()
            gap = 0.0
            total = 0
            tail = b""
            complete = True
            head = bytearray()
            try:
                while True:
                    chunk = resp.read1(65536)
                    now = time.monotonic()
                    if not chunk:
                        break
                    gap = max(gap, now - last)
                    last = now
                    if first_byte is None:
                        first_byte = now - started
                    if first_content is None and any(m in chunk for m in CONTENT_MARKERS):
                        first_content = now - started
                    total += len(chunk)
                    if len(head) < 1 << 20:
                        head.extend(chunk)
                    tail = (tail + chunk)[-4096:]
                    self.wfile.write(b"%x\r\n%s\r\n" % (len(chunk), chunk))
                    self.wfile.flush()
                self.wfile.write(b"0\r\n\r\n")
                self.wfile.flush()
            except OSError as e:
                complete = False
                rec["error"] = str(e)
            finally:
                conn.close()
            rec.update(
                ttfb=first_byte,
                ttfc=first_content,
                max_gap=gap,
                bytes=total,
                secs=time.monotonic() - started,
                complete=complete,
                tail=tail.decode("utf-8", "replace")[-600:],
            )
            ctype = resp.getheader("content-type") or ""
            if "json" in ctype and total < 1 << 20:
                try:
                    rec["response"] = json.loads(bytes(head))
                    rec["usage"] = rec["response"].get("usage")
                except (ValueError, AttributeError):
                    pass
            elif "event-stream" in ctype:
                rec["usage"] = last_usage(bytes(head))
                rec["events"] = event_names(bytes(head))
            recorder.add(rec)

        do_GET = do_POST = do_DELETE = do_PUT = do_HEAD = _forward

    return Handler


def start(listen_port: int, upstream: str, log: str | None) -> tuple[ThreadingHTTPServer, Recorder]:
    recorder = Recorder(log)
    server = ThreadingHTTPServer(("127.0.0.1", listen_port), make_handler(upstream, recorder))
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, recorder


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--listen", type=int, default=18081)
    ap.add_argument("--upstream", default="http://127.0.0.1:18080")
    ap.add_argument("--log", default=None)
    args = ap.parse_args()
    server, _ = start(args.listen, args.upstream, args.log)
    print(f"proxy on http://127.0.0.1:{server.server_address[1]} -> {args.upstream}", flush=True)
    try:
        threading.Event().wait()
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
