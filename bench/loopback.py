"""A loopback Komari panel, and the TCP plumbing around it, for the tests and the benchmarks.

PanelServer is an HTTP + WebSocket server on a loopback address that speaks the
panel protocol (docs/WIRE.md) and decodes what it gets the way the
Go server does: a float where it wants an integer, or a cpu usage outside
0-100, rejects the report; a report socket that sends no data for 11 s is
closed; a wrong token gets 401. It speaks protocol v2 as well: JSON-RPC 2.0
over a permessage-deflate WebSocket or gzip POST, the event queue with acks,
the server's v1/v2 flag quirk. Everything it receives is kept in lists under
one Condition, so a caller can wait for what it expects and count what came.
test_komari_agent.py runs the agent against it; bench/footprint.py and
bench/soak.py measure the agent against it.

LoopbackServer is the one accept loop: the panel, CountingProxy (a TCP relay
that counts the bytes each way) and the tests' other servers and proxies are
built on it.

Stdlib only.
"""

import base64
import gzip
import hashlib
import json
import os
import re
import secrets
import select
import socket
import struct
import threading
import time
import traceback
import zlib
from datetime import datetime, timedelta, timezone
from http.server import BaseHTTPRequestHandler
from urllib.parse import parse_qs, urlsplit

V2_PATH = "/api/clients/v2/rpc"
WS_GUID = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
GO_RFC3339 = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?(Z|[+-]\d\d:\d\d)$")
INFLATE_LIMIT = 16 << 20


# ---------------------------------------------------------------------------
# Decoding like the Go server
# ---------------------------------------------------------------------------

class GoFloat(float):
    """A JSON number written with a fraction or exponent."""


BASIC_INFO_KEYS = {"cpu_name": str, "cpu_cores": int, "cpu_physical_cores": int, "arch": str, "os": str,
                   "kernel_version": str, "gpu_name": str, "virtualization": str, "ipv4": str, "ipv6": str,
                   "mem_total": int, "swap_total": int, "disk_total": int, "version": str}
REPORT_INTS = {"ram": ("total", "used"), "swap": ("total", "used"), "disk": ("total", "used"),
               "network": ("up", "down", "totalUp", "totalDown"), "connections": ("tcp", "udp")}


def go_json(text):
    return json.loads(text, parse_float=GoFloat)


def is_go_int(value):
    return isinstance(value, int) and not isinstance(value, bool)


def report_problem(report):
    """What the Go server would say about a report, or None if it accepts it."""
    if not isinstance(report, dict):
        return "Invalid JSON"
    for group, keys in REPORT_INTS.items():
        for key in keys:
            value = report.get(group, {}).get(key, 0)
            if not is_go_int(value):
                return "Invalid report format"
            if value < 0:
                return "%s.%s must be non-negative" % (group, key)
    for key in ("uptime", "process"):
        if not is_go_int(report.get(key, 0)) or report.get(key, 0) < 0:
            return "Invalid report format"
    usage = report.get("cpu", {}).get("usage", 0)
    if isinstance(usage, bool) or not isinstance(usage, (int, float)):
        return "Invalid report format"
    if not 0 <= usage <= 100:
        return "CPU.Usage must be between 0 and 100"
    for key in ("load1", "load5", "load15"):
        if not isinstance(report.get("load", {}).get(key, 0), (int, float)):
            return "Invalid report format"
    if not 0 <= report.get("load", {}).get("load1", 0) <= 1000:
        return "Load.Load1 must be non-negative"
    if not isinstance(report.get("message", ""), str):
        return "Invalid report format"
    return None


def basic_info_problem(info, columns=BASIC_INFO_KEYS):
    """What the Go server says about basic info (None: taken); `columns` are
    the ones its database has (an older server has fewer)."""
    if not isinstance(info, dict):
        return "Invalid or missing data"
    unknown = set(info) - set(columns)
    if unknown:
        return "no such column: %s" % sorted(unknown)
    for key, value in info.items():
        if BASIC_INFO_KEYS[key] is int and (not is_go_int(value) or value < 0):
            return "%s must be a valid number" % key
    return None


# ---------------------------------------------------------------------------
# The accept loop, and a relay that counts bytes
# ---------------------------------------------------------------------------

class LoopbackServer:
    """A TCP listener on a loopback address; each connection is served by
    serve(conn) on a thread of its own and closed when serve returns.
    close() ends the listener and every connection still open, the hard
    way (a server that dies); start() listens again on the same port."""

    def __init__(self, host="127.0.0.1", port=0):
        self.host, self.port = host, port
        self.listener = self.accepter = None
        self.conns = set()
        self.conns_lock = threading.Lock()
        self.start()

    @property
    def endpoint(self):
        return "http://%s:%d" % ("[%s]" % self.host if ":" in self.host else self.host, self.port)

    def start(self):
        listener = socket.socket(socket.AF_INET6 if ":" in self.host else socket.AF_INET)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            listener.bind((self.host, self.port))
        except OSError:
            listener.close()
            raise
        listener.listen(128)
        self.port = listener.getsockname()[1]
        self.listener = listener
        self.accepter = threading.Thread(target=self._accept_loop, args=(listener,), daemon=True)
        self.accepter.start()

    def serve(self, conn):
        raise NotImplementedError

    def close(self):
        listener, self.listener = self.listener, None
        if listener is not None:
            try:
                listener.shutdown(socket.SHUT_RDWR)  # wakes accept(); a plain close would not
            except OSError:
                pass
            listener.close()
            self.accepter.join(2)
        with self.conns_lock:
            conns = list(self.conns)
        for conn in conns:
            shut(conn)

    def _accept_loop(self, listener):
        while True:
            try:
                conn, _ = listener.accept()
            except OSError:
                return
            with self.conns_lock:
                self.conns.add(conn)
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn):
        try:
            self.serve(conn)
        except (OSError, EOFError):
            pass  # the peer went away, or close() cut it off
        except Exception:
            traceback.print_exc()  # a bug in the server itself: let it show
        finally:
            with self.conns_lock:
                self.conns.discard(conn)
            shut(conn)


def shut(sock):
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    sock.close()


class CountingProxy(LoopbackServer):
    """A TCP relay on 127.0.0.1 to `target_port` that counts the bytes going
    each way: what an agent costs on the wire, headers, handshakes and pings
    included. `opening(client)`, when given, reads what it needs of each new
    connection first and returns the bytes to pass on, or None when it has
    answered the client itself (a CONNECT proxy answers the CONNECT)."""

    def __init__(self, target_port, opening=None):
        self.target_port = target_port
        self.opening = opening
        self.lock = threading.Lock()
        self.up = self.down = 0  # agent -> panel, panel -> agent
        super().__init__()

    def counts(self):
        with self.lock:
            return self.up, self.down

    def serve(self, client):
        head = b"" if self.opening is None else self.opening(client)
        if head is None:
            return
        upstream = socket.create_connection(("127.0.0.1", self.target_port))
        with self.conns_lock:
            self.conns.add(upstream)
        try:
            upstream.sendall(head)
            with self.lock:
                self.up += len(head)
            down = threading.Thread(target=self._pump, args=(upstream, client, "down"), daemon=True)
            down.start()
            self._pump(client, upstream, "up")
            down.join()  # the panel's last bytes still go to a client that only half-closed
        finally:
            with self.conns_lock:
                self.conns.discard(upstream)
            shut(upstream)

    def _pump(self, source, sink, direction):
        try:
            while True:
                data = source.recv(65536)
                if not data:
                    break
                sink.sendall(data)
                with self.lock:
                    setattr(self, direction, getattr(self, direction) + len(data))
        except OSError:
            pass
        try:
            sink.shutdown(socket.SHUT_WR)
        except OSError:
            pass


def request_head(client):
    """What a client sent up to the end of its request's headers (and any
    bytes after them), or None when it closed first."""
    head = b""
    while b"\r\n\r\n" not in head:
        chunk = client.recv(65536)
        if not chunk:
            return None
        head += chunk
    return head


# ---------------------------------------------------------------------------
# WebSocket (RFC 6455) and permessage-deflate (RFC 7692), server end
# ---------------------------------------------------------------------------

def unmask(payload, key):
    # XOR as one big integer: far cheaper than a byte loop in Python
    n = len(payload)
    mask = (key * (n // 4 + 1))[:n]
    return (int.from_bytes(payload, "big") ^ int.from_bytes(mask, "big")).to_bytes(n, "big")


class WsConn:
    """The server end of one WebSocket (unmasked server frames)."""

    def __init__(self, sock, path, query):
        self.sock, self.path, self.query = sock, path, query
        self.opened_at = time.monotonic()
        self.lock = threading.Lock()
        self.closed = False
        self.protocol = 1
        self.deflate = None    # a PerMessageDeflate once negotiated (v2 only)
        self.last_flags = 0    # the first header byte of the last frame read
        self.wire_sizes = []   # (compressed?, payload bytes on the wire) per data message read

    def send(self, payload, opcode=None):
        if isinstance(payload, str):
            payload, opcode = payload.encode(), opcode or 1
        opcode = opcode or 2
        with self.lock:  # compressed with context takeover: compress in the order sent
            rsv1 = 0
            if self.deflate and opcode in (1, 2):
                payload, rsv1 = self.deflate.compress(payload), 0x40
            n = len(payload)
            header = bytes([0x80 | rsv1 | opcode])
            if n < 126:
                header += bytes([n])
            elif n < 65536:
                header += bytes([126]) + struct.pack("!H", n)
            else:
                header += bytes([127]) + struct.pack("!Q", n)
            self.sock.sendall(header + payload)

    def _read_exact(self, n, deadline):
        data = b""
        while len(data) < n:
            remaining = deadline - time.monotonic() if deadline else None
            if remaining is not None and remaining <= 0:
                raise socket.timeout("read deadline")
            self.sock.settimeout(remaining)
            chunk = self.sock.recv(n - len(data))
            if not chunk:
                raise EOFError
            data += chunk
        return data

    def read_frame(self, deadline=None):
        """(opcode, payload) of the next frame."""
        b0, b1 = self._read_exact(2, deadline)
        self.last_flags = b0
        n = b1 & 0x7F
        if n == 126:
            n = struct.unpack("!H", self._read_exact(2, deadline))[0]
        elif n == 127:
            n = struct.unpack("!Q", self._read_exact(8, deadline))[0]
        mask = self._read_exact(4, deadline) if b1 & 0x80 else None
        data = self._read_exact(n, deadline)
        return b0 & 0x0F, unmask(data, mask) if mask and n else data

    def read_message(self, deadline=None):
        """(opcode, payload) of the next control frame or whole data message:
        fragments joined, permessage-deflate undone. A compressed frame on a
        socket that did not negotiate it is a protocol error, as in gorilla."""
        opcode, payload = self.read_frame(deadline)
        compressed = bool(self.last_flags & 0x40)
        if opcode >= 8:
            return opcode, payload
        parts, wire = [payload], len(payload)
        while not self.last_flags & 0x80:  # FIN not set: continuation frames follow
            _, more = self.read_frame(time.monotonic() + 10)
            parts.append(more)
            wire += len(more)
        payload = b"".join(parts)
        if compressed and not self.deflate:
            raise EOFError("RSV1 set on a socket without permessage-deflate")
        self.wire_sizes.append((compressed, wire))
        if compressed:
            payload = self.deflate.decompress(payload)
        return opcode, payload

    def close(self):
        self.closed = True
        shut(self.sock)


class PerMessageDeflate:
    """RFC 7692 on the server end: raw deflate, 00 00 ff ff stripped and put
    back, the LZ77 window kept across messages unless "no context takeover"."""

    def __init__(self, answer, server_context, client_context, server_bits=15):
        self.answer, self.server_context, self.client_context = answer, server_context, client_context
        self.server_bits = server_bits
        self.compressor = self.decompressor = None

    def compress(self, data):
        if self.compressor is None or not self.server_context:
            self.compressor = zlib.compressobj(zlib.Z_DEFAULT_COMPRESSION, zlib.DEFLATED, -self.server_bits)
        out = self.compressor.compress(data) + self.compressor.flush(zlib.Z_SYNC_FLUSH)
        return out[:-4] if out.endswith(b"\x00\x00\xff\xff") else out

    def decompress(self, data):
        if self.decompressor is None or not self.client_context:
            self.decompressor = zlib.decompressobj(-15)
        try:
            out = self.decompressor.decompress(data + b"\x00\x00\xff\xff", INFLATE_LIMIT)
        except zlib.error as e:
            # e.g. the agent kept its context after agreeing not to
            raise EOFError("bad deflate data: %s" % e)
        if self.decompressor.unconsumed_tail:
            raise EOFError("inflated message over %d bytes" % INFLATE_LIMIT)
        return out


def negotiate_deflate(offer_header, mode):
    """The PerMessageDeflate to use for a client's Sec-WebSocket-Extensions
    offer, or None (offer absent or compression "off")."""
    if mode == "off":
        return None
    for offer in offer_header.split(","):
        name, *params = [p.strip() for p in offer.split(";")]
        if name.lower() != "permessage-deflate":
            continue
        params = dict((p.split("=", 1) + [""])[:2] for p in params if p)
        params = {k.strip().lower(): v.strip().strip('"') for k, v in params.items()}
        server_context = mode == "context" and "server_no_context_takeover" not in params
        client_context = mode == "context"
        answer = ["permessage-deflate"]
        if not server_context:
            answer.append("server_no_context_takeover")
        if not client_context:
            answer.append("client_no_context_takeover")
        bits = 15
        if params.get("server_max_window_bits"):
            bits = max(9, int(params["server_max_window_bits"]))
            answer.append("server_max_window_bits=%d" % bits)
        return PerMessageDeflate("; ".join(answer), server_context, client_context, bits)
    return None


# ---------------------------------------------------------------------------
# Protocol v2: JSON-RPC 2.0 as the server's report_v2.go answers it
# ---------------------------------------------------------------------------

def rpc_error(rid, code, message, data=None):
    error = {"code": code, "message": message}
    if data is not None:
        error["data"] = data
    response = {"jsonrpc": "2.0", "error": error}
    if rid is not None:
        response["id"] = rid
    return response


def rpc_answer(panel, raw, transport):
    """(HTTP status, response) for one JSON-RPC message, as the server's
    report_v2.go answers it; everything valid is recorded on the panel."""
    try:
        message = go_json(raw.decode().strip())
    except (ValueError, UnicodeDecodeError):
        message = None
    if not isinstance(message, dict) or not isinstance(message.get("method"), str):
        panel.record(panel.rejected, ("rpc", "parse error", raw[:200]))
        return 400, rpc_error(None, -32700, "parse error")
    rid = message.get("id")
    if message.get("jsonrpc") != "2.0":
        return 400, rpc_error(rid, -32600, "invalid jsonrpc version")
    method, params = message["method"], message.get("params")
    panel.record(panel.rpc_calls, {"via": transport, "method": method, "params": params, "id": rid,
                                   "_at": time.monotonic()})
    hooked = panel.rpc_hook and panel.rpc_hook(method, params, rid)
    if hooked is not None:
        return (400 if "error" in hooked else 200), hooked
    result = rpc_result(panel, method, params if isinstance(params, dict) else {}, transport)
    if isinstance(result, tuple):
        panel.record(panel.rejected, ("rpc " + method, result[1], params))
        return 400, rpc_error(rid, *result)
    return 200, {"jsonrpc": "2.0", "id": rid, "result": result}


def string_list(value):
    return value is None or isinstance(value, list) and all(isinstance(v, str) for v in value)


def rpc_result(panel, method, params, transport):
    """The result of one method, or (code, message[, data]) for an error."""
    if method == "agent.report":
        report = params.get("report")
        if not isinstance(report, dict) or not string_list(params.get("ack_event_ids")):
            return (-32602, "invalid report params")
        problem = report_problem(report)
        if problem:
            return (-32000, "failed to save report", problem)
        panel.acknowledge(params.get("ack_event_ids") or [])
        with panel.cond:
            # the quirk of §11: a report sets the flag to v2, but opening a new
            # presence session (none alive) sets it back to v1 right after
            panel.v2_flag = time.monotonic() < panel.presence_until
            panel.presence_until = time.monotonic() + 35
        report["_at"], report["_via"] = time.monotonic(), "v2-" + transport
        panel.record(panel.reports, report)
        with panel.cond:
            return {"status": "success", "events": panel.live_events()[:8]}
    if method == "agent.basicInfo":
        info = params.get("info")
        problem = basic_info_problem(info, panel.columns) if isinstance(info, dict) else "invalid basic info params"
        if problem:
            return (-32000, "failed to save basic info", problem)
        panel.record(panel.basic_infos, info)
        return {"status": "success"}
    if method == "agent.pingResult":
        ok = is_go_int(params.get("task_id")) and params["task_id"] >= 0 and is_go_int(params.get("value", 0)) \
            and isinstance(params.get("ping_type", ""), str) and GO_RFC3339.match(str(params.get("finished_at")))
        if not ok:
            return (-32602, "invalid ping result params")
        panel.record(panel.ping_results, dict(params, _via="v2-" + transport))
        return {"status": "success"}
    if method == "agent.pull":
        if not string_list(params.get("ack_event_ids")):
            return (-32602, "invalid pull params")
        panel.acknowledge(params.get("ack_event_ids") or [])
        with panel.cond:
            panel.v2_flag, panel.presence_until = True, time.monotonic() + 35
        if transport == "post":
            wait_ends = time.monotonic() + panel.PULL_WAIT
            with panel.cond:
                while not panel.live_events() and time.monotonic() < wait_ends:
                    panel.cond.wait(min(0.1, max(0.0, wait_ends - time.monotonic())))
        with panel.cond:
            return {"events": panel.live_events()}
    return (-32601, "method not found", method)


# ---------------------------------------------------------------------------
# The panel
# ---------------------------------------------------------------------------

class PanelServer(LoopbackServer):
    """HTTP + WebSocket panel on a loopback address (127.0.0.1 unless `host`
    says otherwise). Everything it receives is kept in lists, appended under
    `cond`, which is notified at every append; stop() ends it the hard way
    (listener and every connection closed) and start() brings it back on the
    same port with its lists intact."""

    READ_WAIT = 11.0  # the real server's read deadline on the report socket

    def __init__(self, token=None, protocol=1, serves_v2=True, host="127.0.0.1", port=0):
        self.token = token or secrets.token_hex(12)
        self.protocol = protocol      # what the agents started against it are asked to speak
        self.serves_v2 = serves_v2    # False: an old server, /v2/rpc is the frontend's 200 HTML
        # v2 socket compression: "no_context" is what the real server (gorilla) answers to any offer,
        # "context" keeps the LZ77 window both ways (RFC 7692's default), "off" answers no extension
        self.compression = "no_context"
        self.refuse_upgrades = False  # True: every WebSocket upgrade gets a 403 page, as from a CDN that breaks them
        self.columns = set(BASIC_INFO_KEYS)  # basic info keys its database has
        self.discovery_key = None     # the auto-discovery key registrations must carry
        self.register_answers = []    # raw bodies to answer the next registrations with, instead of a token
        self.rpc_calls, self.events = [], []  # JSON-RPC calls received; the v2 event queue
        self.acked, self.v2_flag, self.presence_until = [], False, 0.0
        self.PULL_WAIT = 25.0
        self.cond = threading.Condition()
        self.basic_infos, self.reports, self.rejected = [], [], []
        self.task_results, self.ping_results, self.other_frames = [], [], []
        self.report_conns, self.ws_attempts, self.http_requests = [], [], []
        self.terminal_conns, self.registrations, self.pings = [], [], []
        self.refused_upgrades = []  # (path, when) of each upgrade refused with refuse_upgrades
        self.post_sizes = []        # (Content-Encoding, body bytes) of each v2 POST
        self.unanswered = []        # when a frozen panel first held (or dropped) a message it will not answer
        self.frozen = threading.Event()
        self.fail_http = {}         # path -> status to answer instead
        self.on_terminal = None     # callback(WsConn) run for terminal sockets
        # hostile moves, each off until set (PanelHandler.answer_busy, hold_silently, hold_terminal_upgrade)
        self.busy = None            # (until, status, Retry-After or None): /v2/rpc answered with an HTML page
        self.busy_answers = []      # (when, "GET" or "POST") of each busy answer
        self.silent_v2 = False      # v2 upgrades accepted, then nothing answered, pings neither
        self.silent_conns = []      # the sockets held so
        self.rpc_hook = None        # rpc_hook(method, params, id): a response to send instead, or None
        self.keep_acked = False     # acks recorded, yet the events stay queued: the ack got lost
        self.close_codes = []       # (code, reason) of every close frame an agent sent
        self.terminal_delay = 0.0   # seconds a terminal upgrade is held before its answer (a slow panel)
        self.terminal_dials = {"now": 0, "most": 0}  # terminal upgrades under way, and the most at once
        super().__init__(host, port)

    def serve(self, conn):
        PanelHandler(conn, conn.getpeername()[:2], self)

    def stop(self):
        """Down the hard way; like a restarted server it then knows no v2
        client's flag or POST presence (its lists and event queue stay)."""
        for conn in list(self.report_conns) + list(self.terminal_conns):
            conn.close()
        self.close()
        with self.cond:
            self.v2_flag, self.presence_until = False, 0.0

    def freeze(self):
        """Stop answering anything (pings included) without closing: a blackhole."""
        self.frozen.set()

    def thaw(self):
        self.frozen.clear()

    # recording
    def record(self, bucket, item):
        with self.cond:
            bucket.append(item)
            self.cond.notify_all()

    def live_report_conn(self):
        return next((c for c in reversed(self.report_conns) if not c.closed), None)

    def calls(self, method):
        return [c for c in self.rpc_calls if c["method"] == method]

    # protocol v2: the client's v1/v2 flag, its POST presence, its event queue (server.md §10-11)
    def socket_opened(self, conn):
        """A new v2 socket: the flag says v2 and every queued event is pushed
        as a notification without its id, and counts as acknowledged."""
        with self.cond:
            self.v2_flag = True
            queued, self.events[:] = self.live_events(), []
        for event in queued:
            conn.send(json.dumps({"jsonrpc": "2.0", "method": event["method"], "params": event["params"]}))

    def live_events(self):
        now = time.monotonic()
        self.events[:] = [e for e in self.events if e["_expires"] > now]
        return [{k: v for k, v in e.items() if not k.startswith("_")} for e in self.events]

    def queue_event(self, method, params, ttl=300.0, event_id=None):
        """Queue an event as the server does for a v2 client without a socket:
        at most 128, a newer ping for the same task replaces the queued one."""
        with self.cond:
            if method == "agent.ping":
                self.events[:] = [e for e in self.events if not (
                    e["method"] == "agent.ping" and e["params"]["ping_task_id"] == params["ping_task_id"])]
            now = datetime.now(timezone.utc)
            event = {"id": event_id or os.urandom(8).hex(), "method": method, "params": params,
                     "created_at": now.isoformat(), "expires_at": (now + timedelta(seconds=ttl)).isoformat(),
                     "_expires": time.monotonic() + ttl}
            self.events.append(event)
            del self.events[:-128]
            self.cond.notify_all()
            return event["id"]

    def acknowledge(self, ids):
        with self.cond:
            self.acked.extend(ids)
            if not self.keep_acked:
                self.events[:] = [e for e in self.events if e["id"] not in ids]

    def issue(self, method, params, legacy):
        """An admin's exec or ping as the server routes it: on the live socket
        (JSON-RPC if the flag says v2, else the legacy frame), queued for a v2
        client in POST mode, else refused ("No clients connected"): None."""
        with self.cond:
            conn = self.live_report_conn()
            if conn:
                conn.send(json.dumps({"jsonrpc": "2.0", "method": method, "params": params})
                          if conn.protocol == 2 and self.v2_flag else json.dumps(legacy) + "\n")
                return "socket"
            if self.v2_flag and time.monotonic() < self.presence_until:
                return self.queue_event(method, params, 300.0 if method == "agent.exec" else 3.0)
            return None

    def exec_task(self, task_id, command):
        return self.issue("agent.exec", {"task_id": task_id, "command": command},
                          {"message": "exec", "task_id": task_id, "command": command})

    def ping_task(self, task_id, kind, target):
        return self.issue("agent.ping", {"ping_task_id": task_id, "ping_type": kind, "ping_target": target},
                          {"message": "ping", "ping_task_id": task_id, "ping_type": kind, "ping_target": target})


class PanelHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    @property
    def panel(self):
        return self.server

    def log_message(self, *args):
        pass

    def reply(self, status, obj):
        body = obj if isinstance(obj, bytes) else json.dumps(obj).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json" if not isinstance(obj, bytes) else "text/html")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def authorised(self, query):
        if query.get("token", [""])[0] != self.panel.token:
            self.reply(401, {"status": "error", "message": "Unauthorized."})
            return False
        return True

    def do_POST(self):
        panel = self.panel
        parts = urlsplit(self.path)
        query = parse_qs(parts.query)
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        panel.record(panel.http_requests, (parts.path, dict(self.headers)))
        if panel.frozen.is_set():
            panel.record(panel.unanswered, time.monotonic())
            while panel.frozen.is_set():
                time.sleep(0.05)
        if parts.path == "/api/clients/register":
            if not panel.discovery_key or self.headers.get("Authorization") != "Bearer " + panel.discovery_key:
                return self.reply(403, {"status": "error", "message": "Invalid AutoDiscovery Key"})
            panel.record(panel.registrations, query.get("name", [""])[0])
            if panel.register_answers:
                return self.reply(200, panel.register_answers.pop(0))
            return self.reply(200, {"status": "success", "message": "",
                                    "data": {"uuid": "uuid-%d" % len(panel.registrations), "token": panel.token}})
        if not self.authorised(query):
            return
        if self.answer_busy(parts.path, "POST"):
            return
        if parts.path == V2_PATH and panel.serves_v2:
            return self.serve_rpc_post(body)
        if parts.path in panel.fail_http:
            status = panel.fail_http[parts.path]
            return self.reply(status, b"<html><title>502 Bad Gateway</title></html>" if status >= 500
                              else {"status": "error", "error": {}})
        try:
            data = go_json(body.decode())
        except ValueError:
            return self.reply(400, {"status": "error", "error": "Invalid or missing data"})
        if parts.path == "/api/clients/uploadBasicInfo":
            problem = basic_info_problem(data, panel.columns)
            if problem:
                panel.record(panel.rejected, ("basic_info", problem, data))
                return self.reply(500, {"status": "error", "error": {}})
            panel.record(panel.basic_infos, data)
            return self.reply(200, {"status": "success"})
        if parts.path == "/api/clients/task/result":
            if not isinstance(data, dict) or not isinstance(data.get("task_id"), str) \
                    or not is_go_int(data.get("exit_code", 0)) or not isinstance(data.get("result", ""), str):
                return self.reply(400, {"status": "error", "message": "Invalid request"})
            data["_at"] = time.monotonic()
            panel.record(panel.task_results, data)
            return self.reply(200, {"status": "success", "message": "Task result updated successfully"})
        self.send_response(404)
        self.send_header("Content-Length", "18")
        self.end_headers()
        self.wfile.write(b"404 page not found")

    def do_GET(self):
        panel = self.panel
        parts = urlsplit(self.path)
        query = parse_qs(parts.query)
        upgrade = self.headers.get("Upgrade", "").lower() == "websocket"
        if upgrade and panel.refuse_upgrades:
            return self.refuse_upgrade(parts.path)
        panel.record(panel.ws_attempts, (parts.path, dict(self.headers)))
        if not self.authorised(query):
            return
        if upgrade and self.answer_busy(parts.path, "GET"):
            return
        if parts.path == V2_PATH and panel.serves_v2 and not upgrade:
            return self.reply(400, {"error": "Require WebSocket upgrade", "status": "error"})
        served = ("/api/clients/report", "/api/clients/terminal") + ((V2_PATH,) if panel.serves_v2 else ())
        if parts.path not in served or not upgrade:
            return self.reply(200, b"<!doctype html><html><title>Komari</title></html>")
        if "Origin" in self.headers:
            return self.reply(403, {"status": "error", "error": "origin not allowed"})
        if parts.path == "/api/clients/terminal":
            self.hold_terminal_upgrade()
        key = self.headers["Sec-WebSocket-Key"]
        accept = base64.b64encode(hashlib.sha1((key + WS_GUID).encode()).digest())
        deflate = negotiate_deflate(self.headers.get("Sec-WebSocket-Extensions", ""), panel.compression) \
            if parts.path == V2_PATH else None
        extension = b"Sec-WebSocket-Extensions: " + deflate.answer.encode() + b"\r\n" if deflate else b""
        self.wfile.write(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                         b"Sec-WebSocket-Accept: " + accept + b"\r\n" + extension + b"\r\n")
        self.wfile.flush()
        self.close_connection = True
        conn = WsConn(self.connection, parts.path, query)
        if parts.path == V2_PATH:
            conn.protocol, conn.deflate = 2, deflate
            conn.offered = self.headers.get("Sec-WebSocket-Extensions", "")
        if parts.path == "/api/clients/terminal":
            panel.record(panel.terminal_conns, conn)
            if panel.on_terminal:
                panel.on_terminal(conn)
            return
        if conn.protocol == 2 and panel.silent_v2:
            return self.hold_silently(conn)
        panel.record(panel.report_conns, conn)
        if conn.protocol == 2:
            panel.socket_opened(conn)
        self.serve_report_socket(conn)

    def answer_busy(self, path, method):
        """While panel.busy holds, what a proxy in front of a busy panel
        answers to /v2/rpc: 429 or 503, an HTML page, maybe a Retry-After."""
        busy = self.panel.busy
        if path != V2_PATH or busy is None or time.monotonic() >= busy[0]:
            return False
        self.panel.record(self.panel.busy_answers, (time.monotonic(), method))
        page = b"<html><head><title>%d Service Unavailable</title></head><body>try later</body></html>" % busy[1]
        self.send_response(busy[1])
        if busy[2] is not None:
            self.send_header("Retry-After", busy[2])
        self.send_header("Content-Type", "text/html")
        self.send_header("Content-Length", str(len(page)))
        self.end_headers()
        self.wfile.write(page)
        return True

    def hold_silently(self, conn):
        """A v2 socket that was upgraded and then answers nothing, pings
        included, until the agent leaves it."""
        self.panel.record(self.panel.silent_conns, conn)
        try:
            while conn.read_message(time.monotonic() + 60)[0] != 8:
                pass
        except (EOFError, OSError):
            pass
        conn.close()

    def hold_terminal_upgrade(self):
        """Answer a terminal dial only after panel.terminal_delay, counting
        how many dials are under way at once."""
        panel = self.panel
        with panel.cond:
            panel.terminal_dials["now"] += 1
            panel.terminal_dials["most"] = max(panel.terminal_dials["most"], panel.terminal_dials["now"])
        time.sleep(panel.terminal_delay)   # the fault itself: a slow answer
        with panel.cond:
            panel.terminal_dials["now"] -= 1

    def refuse_upgrade(self, path):
        """A CDN's answer to a WebSocket upgrade: a 403 page, and the connection closed."""
        self.panel.record(self.panel.refused_upgrades, (path, time.monotonic()))
        page = b"<html><body><h1>403 Forbidden</h1>WebSockets are not allowed</body></html>"
        self.send_response(403)
        self.send_header("Content-Type", "text/html")
        self.send_header("Content-Length", str(len(page)))
        self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.write(page)
        self.close_connection = True

    def serve_report_socket(self, conn):
        panel = self.panel
        first = True
        deadline = None  # the first message has no deadline
        held = False     # frozen with a message waiting unread
        try:
            while not conn.closed:
                if panel.frozen.is_set():
                    if not held and select.select([conn.sock], [], [], 0.05)[0]:
                        held = True
                        panel.record(panel.unanswered, time.monotonic())
                    else:
                        time.sleep(0.05)
                    deadline = None
                    continue
                held = False
                try:
                    opcode, payload = conn.read_message(deadline if deadline else time.monotonic() + 0.2)
                except socket.timeout:
                    if deadline and time.monotonic() >= deadline:
                        break  # silent for 11 s: the real server drops the socket
                    continue
                if panel.frozen.is_set():  # read just as it froze: dropped, never answered
                    held = True
                    panel.record(panel.unanswered, time.monotonic())
                    continue
                if opcode == 9:
                    conn.send(payload, 10)
                    panel.record(panel.pings, time.monotonic())
                    continue
                if opcode == 8:
                    panel.record(panel.close_codes, (struct.unpack("!H", payload[:2])[0] if len(payload) >= 2 else None,
                                                     payload[2:].decode("utf-8", "replace")))
                    conn.send(payload[:2], 8)
                    break
                if opcode not in (1, 2):
                    continue
                deadline = time.monotonic() + panel.READ_WAIT
                if conn.protocol == 2:
                    self.serve_rpc_frame(conn, payload)
                    continue
                try:
                    message = go_json(payload.decode())
                except ValueError:
                    message = None
                if not isinstance(message, dict):
                    panel.record(panel.rejected, ("report", "Invalid JSON", payload[:200]))
                    conn.send(json.dumps({"error": "Invalid JSON", "status": "error"}) + "\n")
                    if first:
                        break
                    continue
                first = False
                kind = message.get("type", "")
                if kind in ("", "report"):
                    problem = report_problem(message)
                    if problem:
                        panel.record(panel.rejected, ("report", problem, message))
                        conn.send(json.dumps({"error": problem, "status": "error"}) + "\n")
                    else:
                        message["_at"] = time.monotonic()
                        panel.record(panel.reports, message)
                elif kind == "ping_result":
                    ok = is_go_int(message.get("task_id")) and message["task_id"] >= 0 \
                        and is_go_int(message.get("value", 0))
                    if ok:
                        panel.record(panel.ping_results, message)
                    else:
                        panel.record(panel.rejected, ("ping_result", "Invalid ping result format", message))
                        conn.send(json.dumps({"error": "Invalid ping result format", "status": "error"}) + "\n")
                else:
                    panel.record(panel.other_frames, message)
                    conn.send(json.dumps({"error": "Unknown message type", "status": "error"}) + "\n")
        except (EOFError, OSError) as e:
            if str(e) and not conn.closed:
                panel.record(panel.rejected, ("frame", str(e), None))
        finally:
            conn.close()
            with panel.cond:
                panel.cond.notify_all()

    def serve_rpc_frame(self, conn, payload):
        status, response = rpc_answer(self.panel, payload, "ws")
        # the server answers requests (non-null id) and parse errors only
        if response is not None and (response.get("id") is not None or status == 400 and
                                     response["error"]["code"] == -32700):
            conn.send(json.dumps(response))

    def serve_rpc_post(self, body):
        panel = self.panel
        panel.record(panel.post_sizes, (self.headers.get("Content-Encoding", ""), len(body)))
        if self.headers.get("Content-Encoding", "").lower() == "gzip":
            try:
                body = gzip.decompress(body)
            except (OSError, EOFError, zlib.error):
                return self.reply(400, rpc_error(None, -32700, "invalid compressed body"))
        status, response = rpc_answer(panel, body, "post")
        return self.reply(status, response)
