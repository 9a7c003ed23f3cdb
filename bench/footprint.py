#!/usr/bin/env python3
"""Footprint of a Komari agent: CPU per report, memory, threads, bytes on the wire.

Starts a loopback sink that speaks the panel protocol (README.md, "What is sent": basic info and task result
POSTs, the report WebSocket, protocol v2's JSON-RPC over a permessage-deflate
WebSocket or gzip POST), runs an agent against it at --interval 1, and
measures the agent's whole process tree from /proc while it reports.

    python3 bench/footprint.py --seconds 60
    python3 bench/footprint.py --vs '/usr/local/bin/komari-agent --disable-auto-update' --rounds 3
    python3 bench/footprint.py --sockets 5000 --json
    python3 bench/footprint.py --wire --seconds 60

--wire runs the agent once per link (v1, v2 WebSocket, v2 POST, and the v2
WebSocket against a server that keeps the deflate context) through a TCP
proxy that counts every byte both ways, and prints bytes and CPU per report
side by side. The real server (gorilla) answers any deflate offer with "no
context takeover", so "v2-ws" is what a real panel gets.

Stdlib only; Linux (it reads /proc).
"""

import argparse
import base64
import gzip
import hashlib
import json
import math
import os
import resource
import secrets
import shlex
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
import zlib
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

REPO = Path(__file__).resolve().parent.parent
WS_GUID = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
CLK_TCK = os.sysconf("SC_CLK_TCK")


# ---------------------------------------------------------------------------
# The sink: a minimal Komari panel that counts what arrives
# ---------------------------------------------------------------------------

class Tally:
    """What one token's agent sent; one per run so runs never mix."""

    def __init__(self):
        self.lock = threading.Lock()
        self.reports = 0
        self.bad_frames = 0
        self.info_uploads = 0
        self.task_results = 0
        self.connections = 0
        self.last_report = None
        self.refuse_upgrade = False  # v2: answer WebSocket upgrades with 403 (a proxy that breaks them)
        self.takeover = False        # v2: keep the deflate context (gorilla never does)

    def count_report(self, report):
        with self.lock:
            self.reports += 1
            self.last_report = report


class Sink(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, port=0, handler=None, serves_v2=False):
        super().__init__(("127.0.0.1", port), handler or SinkHandler)
        self.tallies = {}
        self.serves_v2 = serves_v2  # else /v2/rpc is 404, as on a server older than v2
        self.pull_wait = 25.0       # the server's agent.pull long poll

    @property
    def endpoint(self):
        return "http://127.0.0.1:%d" % self.server_address[1]

    def new_token(self):
        token = secrets.token_hex(12)
        self.tallies[token] = Tally()
        return token


def read_exact(stream, n):
    data = stream.read(n)
    if len(data) < n:
        raise EOFError
    return data


def unmask(payload, key):
    # XOR as one big integer: far cheaper than a byte loop in Python.
    n = len(payload)
    mask = (key * (n // 4 + 1))[:n]
    return (int.from_bytes(payload, "big") ^ int.from_bytes(mask, "big")).to_bytes(n, "big")


def read_frame_head(stream):
    """(first header byte, unmasked payload) of one client frame."""
    b0, b1 = read_exact(stream, 2)
    length = b1 & 0x7F
    if length == 126:
        length = struct.unpack("!H", read_exact(stream, 2))[0]
    elif length == 127:
        length = struct.unpack("!Q", read_exact(stream, 8))[0]
    if not b1 & 0x80:
        raise ValueError("client frame not masked")
    key = read_exact(stream, 4)
    return b0, unmask(read_exact(stream, length), key)


def frame_bytes(opcode, payload=b"", rsv1=False):
    """One unmasked server frame with FIN set."""
    n = len(payload)
    first = 0x80 | (0x40 if rsv1 else 0) | opcode
    if n < 126:
        head = struct.pack("!BB", first, n)
    elif n < 65536:
        head = struct.pack("!BBH", first, 126, n)
    else:
        head = struct.pack("!BBQ", first, 127, n)
    return head + payload


V2_PATH = "/api/clients/v2/rpc"
INFLATE_LIMIT = 16 << 20


class Deflate:
    """permessage-deflate (RFC 7692) on the server end of one socket."""

    def __init__(self, takeover):
        self.takeover = takeover
        self.compressor = self.decompressor = None
        self.answer = "permessage-deflate" if takeover else \
            "permessage-deflate; server_no_context_takeover; client_no_context_takeover"  # gorilla's answer

    def compress(self, data):
        if self.compressor is None or not self.takeover:
            self.compressor = zlib.compressobj(zlib.Z_DEFAULT_COMPRESSION, zlib.DEFLATED, -15)
        out = self.compressor.compress(data) + self.compressor.flush(zlib.Z_SYNC_FLUSH)
        return out[:-4]

    def decompress(self, data):
        if self.decompressor is None or not self.takeover:
            self.decompressor = zlib.decompressobj(-15)
        return self.decompressor.decompress(data + b"\x00\x00\xff\xff", INFLATE_LIMIT)


def offers_deflate(header):
    return any(offer.split(";")[0].strip().lower() == "permessage-deflate" for offer in header.split(","))


class CountingProxy:
    """A TCP proxy on loopback that counts the bytes going each way: what the
    agent costs on the wire, headers, handshakes and pings included.
    `opening(client)`, when given, reads what it needs of each new connection
    first and returns the bytes to pass on, or None when it has answered the
    client itself (the tests' proxies refuse upgrades or play CONNECT)."""

    def __init__(self, target_port, opening=None):
        self.target_port = target_port
        self.opening = opening
        self.lock = threading.Lock()
        self.up = self.down = 0  # agent -> panel, panel -> agent
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.socks = []
        threading.Thread(target=self._accept_loop, daemon=True).start()

    @property
    def endpoint(self):
        return "http://127.0.0.1:%d" % self.listener.getsockname()[1]

    def counts(self):
        with self.lock:
            return self.up, self.down

    def _accept_loop(self):
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            self.socks.append(client)
            threading.Thread(target=self._serve, args=(client,), daemon=True).start()

    def _serve(self, client):
        try:
            head = b"" if self.opening is None else self.opening(client)
            if head is None:
                return client.close()
            upstream = socket.create_connection(("127.0.0.1", self.target_port))
            self.socks.append(upstream)
            upstream.sendall(head)
        except OSError:
            return client.close()
        with self.lock:
            self.up += len(head)
        threading.Thread(target=self._pump, args=(upstream, client, "down"), daemon=True).start()
        self._pump(client, upstream, "up")

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

    def close(self):
        self.listener.close()
        for sock in self.socks:
            try:
                sock.close()
            except OSError:
                pass


class SinkHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args):
        pass

    def tally(self):
        query = parse_qs(urlsplit(self.path).query)
        return self.server.tallies.get(query.get("token", [""])[0])

    def reply(self, code, obj):
        body = json.dumps(obj).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_POST(self):
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        tally, path = self.tally(), urlsplit(self.path).path
        if tally is None:
            return self.reply(401, {"status": "error", "message": "Unauthorized."})
        if path == V2_PATH and self.server.serves_v2:
            if self.headers.get("Content-Encoding", "").lower() == "gzip":
                body = gzip.decompress(body)
            return self.reply(200, self.answer_rpc(tally, body, post=True))
        if path not in ("/api/clients/uploadBasicInfo", "/api/clients/task/result"):
            return self.reply(404, {"status": "error", "message": "Not found"})
        try:
            json.loads(body.decode("utf-8"))
        except ValueError:
            return self.reply(400, {"status": "error", "message": "Invalid JSON"})
        with tally.lock:
            if path.endswith("uploadBasicInfo"):
                tally.info_uploads += 1
            else:
                tally.task_results += 1
        self.reply(200, {"status": "success"})

    def do_GET(self):
        tally = self.tally()
        path = urlsplit(self.path).path
        v2 = path == V2_PATH and self.server.serves_v2
        if path != "/api/clients/report" and not v2:
            return self.reply(404, {"status": "error", "message": "Not found"})
        if tally is None:
            return self.reply(401, {"status": "error", "message": "Unauthorized."})
        if v2 and tally.refuse_upgrade:
            return self.reply(403, {"status": "error", "message": "WebSockets are blocked here"})
        key = self.headers.get("Sec-WebSocket-Key", "")
        if "websocket" not in self.headers.get("Upgrade", "").lower() or not key:
            return self.reply(400, {"status": "error", "message": "WebSocket upgrade expected"})
        accept = base64.b64encode(hashlib.sha1((key + WS_GUID).encode()).digest()).decode()
        deflate = Deflate(tally.takeover) if v2 and offers_deflate(self.headers.get("Sec-WebSocket-Extensions", "")) \
            else None
        self.send_response(101, "Switching Protocols")
        self.send_header("Upgrade", "websocket")
        self.send_header("Connection", "Upgrade")
        self.send_header("Sec-WebSocket-Accept", accept)
        if deflate:
            self.send_header("Sec-WebSocket-Extensions", deflate.answer)
        self.end_headers()
        with tally.lock:
            tally.connections += 1
        self.close_connection = True
        try:
            if v2:
                self.serve_rpc_socket(tally, deflate)
            else:
                self.serve_websocket(tally)
        except (EOFError, OSError, ValueError, zlib.error):
            pass

    def serve_rpc_socket(self, tally, deflate):
        """Protocol v2 on a socket: every request gets its response, compressed
        when deflate was agreed, as gorilla writes them."""
        for _, message, compressed in self.messages():
            if compressed:
                message = deflate.decompress(message)
            reply = self.answer_rpc(tally, message, post=False)
            if reply is not None:
                self.send_text(json.dumps(reply).encode(), deflate)

    def messages(self):
        """(opcode, payload, compressed) of each whole data message from the
        agent, until it closes; pings are answered on the way."""
        message, message_op, compressed = b"", None, False
        while True:
            b0, payload = read_frame_head(self.rfile)
            opcode = b0 & 0x0F
            if opcode == 0x9:
                self.wfile.write(frame_bytes(0xA, payload))
            elif opcode == 0x8:
                self.wfile.write(frame_bytes(0x8, payload[:2]))
                return
            elif opcode in (0x1, 0x2, 0x0):
                if opcode:
                    message, message_op, compressed = payload, opcode, bool(b0 & 0x40)
                else:
                    message += payload
                if b0 & 0x80:
                    yield message_op, message, compressed
            # pongs and reserved opcodes are ignored

    def send_text(self, data, deflate):
        """One text message to the agent, compressed when deflate was agreed."""
        self.wfile.write(frame_bytes(0x1, deflate.compress(data), True) if deflate else frame_bytes(0x1, data))

    def answer_rpc(self, tally, raw, post):
        """The JSON-RPC response to one message (None for a notification on a
        socket); reports and basic info are counted as on v1."""
        try:
            request = json.loads(raw.decode("utf-8"))
            method, params = request["method"], request.get("params") or {}
        except (ValueError, KeyError, TypeError, AttributeError):
            with tally.lock:
                tally.bad_frames += 1
            return {"jsonrpc": "2.0", "error": {"code": -32700, "message": "parse error"}}
        result = {"status": "success"}
        if method == "agent.report" and isinstance(params.get("report"), dict):
            tally.count_report(params["report"])
            result["events"] = []
        elif method == "agent.basicInfo":
            with tally.lock:
                tally.info_uploads += 1
        elif method == "agent.pull":
            time.sleep(self.server.pull_wait if post else 0)  # no events ever come: the whole long poll
            result = {"events": []}
        elif method != "agent.pingResult":
            with tally.lock:
                tally.bad_frames += 1
            return {"jsonrpc": "2.0", "id": request.get("id"),
                    "error": {"code": -32601, "message": "method not found", "data": method}}
        if request.get("id") is None and not post:
            return None
        return {"jsonrpc": "2.0", "id": request.get("id"), "result": result}

    def serve_websocket(self, tally):
        for opcode, message, _ in self.messages():
            self.take_message(tally, opcode, message)

    @staticmethod
    def take_message(tally, opcode, message):
        try:
            obj = json.loads(message.decode("utf-8")) if opcode == 0x1 else None
        except ValueError:
            obj = None
        if isinstance(obj, dict) and "cpu" in obj:
            tally.count_report(obj)
        elif not (isinstance(obj, dict) and obj.get("type") == "ping_result"):
            with tally.lock:
                tally.bad_frames += 1


# ---------------------------------------------------------------------------
# /proc sampling of a process tree
# ---------------------------------------------------------------------------

def stat_fields(pid):
    """Fields of /proc/PID/stat after the command name (field 3 onwards)."""
    with open("/proc/%d/stat" % pid, "rb") as f:
        data = f.read()
    return data[data.rindex(b")") + 2:].split()


def process_tree(root):
    """root and all its live descendants, by walking ppid links once."""
    children = {}
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                ppid = int(stat_fields(int(name))[1])
            except (OSError, ValueError, IndexError):
                continue
            children.setdefault(ppid, []).append(int(name))
    tree, todo = [], [root]
    while todo:
        pid = todo.pop()
        tree.append(pid)
        todo.extend(children.get(pid, ()))
    return tree


def status_kb(pid):
    """VmRSS, VmHWM (kB) and Threads from /proc/PID/status."""
    out = {"VmRSS": 0, "VmHWM": 0, "Threads": 0}
    with open("/proc/%d/status" % pid) as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in out:
                out[key] = int(value.split()[0])
    return out


def thread_ns(pid):
    """{tid: ns on CPU} from /proc/PID/task/*/schedstat (live threads only)."""
    out = {}
    for tid in os.listdir("/proc/%d/task" % pid):
        try:
            with open("/proc/%d/task/%s/schedstat" % (pid, tid)) as f:
                out[(pid, tid)] = int(f.read().split()[0])
        except (OSError, ValueError, IndexError):
            pass
    return out


def sample_tree(root, with_threads_ns=False):
    """CPU ticks (self + reaped children), RSS, threads summed over the tree."""
    sample = {"ticks": 0, "rss_kb": 0, "hwm_kb": 0, "threads": 0, "procs": 0, "ns": {}}
    for pid in process_tree(root):
        try:
            fields = stat_fields(pid)
            st = status_kb(pid)
            if with_threads_ns:
                sample["ns"].update(thread_ns(pid))
        except (OSError, ValueError, IndexError):
            continue  # exited between listing and reading
        # utime, stime, cutime, cstime are fields 14-17; fields[0] is field 3.
        sample["ticks"] += sum(int(x) for x in fields[11:15])
        sample["rss_kb"] += st["VmRSS"]
        sample["hwm_kb"] = max(sample["hwm_kb"], st["VmHWM"])
        sample["threads"] += st["Threads"]
        sample["procs"] += 1
    return sample


def ns_delta(before, after):
    """CPU ns of threads alive at the end, minus what they had at the start."""
    return sum(ns - before.get(key, 0) for key, ns in after.items())


# ---------------------------------------------------------------------------
# One run: start the agent, wait for it to report, measure a window
# ---------------------------------------------------------------------------

class RunFailed(Exception):
    pass


def log_tail(log, limit=1500):
    log.flush()
    log.seek(0)
    text = log.read().decode("utf-8", "replace")
    return text[-limit:].strip() or "(no output)"


def wait_until(predicate, deadline, proc):
    while not predicate():
        if proc.poll() is not None:
            return False
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def signal_group(proc, sig):
    try:
        os.killpg(proc.pid, sig)
    except ProcessLookupError:
        pass


def stop(proc):
    """SIGTERM the agent's process group; after 5 s SIGKILL whatever of it is left."""
    signal_group(proc, signal.SIGTERM)
    try:
        proc.wait(5)
    except subprocess.TimeoutExpired:
        pass
    signal_group(proc, signal.SIGKILL)  # the group may outlive its leader
    proc.wait()


def run_once(sink, command, args, link=None):
    """One run; with `link` (a WIRE_LINKS entry) through a byte-counting proxy."""
    token = sink.new_token()
    tally = sink.tallies[token]
    proxy = None
    endpoint = sink.endpoint
    extra = []
    if link:
        extra, tally.refuse_upgrade, tally.takeover = list(link[1]), link[2], link[3]
        proxy = CountingProxy(sink.server_address[1])
        endpoint = proxy.endpoint
    argv = shlex.split(command) + ["-e", endpoint, "-t", token, "--interval", "%g" % args.interval] + extra
    # its state in a directory of its own, never the checkout's state/; named in the environment,
    # because an official agent given to --vs refuses a flag it does not know
    with tempfile.TemporaryFile() as out, tempfile.TemporaryDirectory(prefix="komari-footprint-") as state:
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True, env=dict(os.environ, AGENT_STATE_DIR=state))
        try:
            return measure(proc, tally, args, out, proxy)
        finally:
            stop(proc)
            if proxy:
                proxy.close()


def measure(proc, tally, args, out, proxy=None):
    started = time.monotonic()
    if not wait_until(lambda: tally.reports > 0, started + args.start_timeout, proc):
        why = "exited with code %s" % proc.returncode if proc.poll() is not None else \
            "sent no report within %g s" % args.start_timeout
        raise RunFailed("agent %s; its output:\n%s" % (why, log_tail(out)))
    first_report_s = time.monotonic() - started
    time.sleep(args.warmup)

    t0 = time.monotonic()
    before = sample_tree(proc.pid, with_threads_ns=True)
    reports0 = tally.reports
    wire0 = proxy.counts() if proxy else (0, 0)
    rss, threads, hwm = [], [], before["hwm_kb"]
    ticks_total = int(math.ceil(args.seconds))
    for tick in range(1, ticks_total + 1):
        time.sleep(max(0.0, t0 + min(tick, args.seconds) - time.monotonic()))
        if proc.poll() is not None:
            raise RunFailed("agent exited with code %s during the run; its output:\n%s"
                            % (proc.returncode, log_tail(out)))
        s = sample_tree(proc.pid, with_threads_ns=tick == ticks_total)
        rss.append(s["rss_kb"])
        threads.append(s["threads"])
        hwm = max(hwm, s["hwm_kb"], s["rss_kb"])
    elapsed = time.monotonic() - t0
    reports = tally.reports - reports0
    wire = proxy.counts() if proxy else (0, 0)
    ticks = s["ticks"] - before["ticks"]
    ns = ns_delta(before["ns"], s["ns"])
    per = max(reports, 1)
    last_report = tally.last_report or {}
    result = {
        "reports": reports,
        "seconds": round(elapsed, 3),
        "reports_per_s": round(reports / elapsed, 3),
        "cpu_ms": ticks * 1000.0 / CLK_TCK,
        "cpu_ms_per_report": round(ticks * 1000.0 / CLK_TCK / per, 3),
        "cpu_ms_per_report_sched": round(ns / 1e6 / per, 3),
        "cpu_resolution_ms": 1000.0 / CLK_TCK,
        "rss_avg_mb": round(sum(rss) / len(rss) / 1024.0, 2),
        "rss_peak_mb": round(hwm / 1024.0, 2),
        # the window's last RSS sample minus its first: a leak shows here
        "rss_growth_mb": round((rss[-1] - rss[0]) / 1024.0, 2),
        "threads": max(threads),
        "processes": s["procs"],
        "first_report_s": round(first_report_s, 3),
        "info_uploads": tally.info_uploads,
        "connections": tally.connections,
        "bad_frames": tally.bad_frames,
        "reported_tcp": (last_report.get("connections") or {}).get("tcp"),
    }
    if proxy:
        up, down = wire[0] - wire0[0], wire[1] - wire0[1]
        result.update(bytes_up=up, bytes_down=down, bytes_up_per_report=round(up / per, 1),
                      bytes_down_per_report=round(down / per, 1), bytes_per_report=round((up + down) / per, 1),
                      # a whole 30-day month at one report a second, both ways
                      mb_per_month_at_1s=round((up + down) / per * 86400 * 30 / 1e6, 1))
    if reports == 0:
        raise RunFailed("agent sent no report during the %g s window; its output:\n%s"
                        % (args.seconds, log_tail(out)))
    return result


def combine(runs):
    """Totals over rounds: CPU over all reports, RSS averaged, peaks maxed."""
    reports = sum(r["reports"] for r in runs)
    cpu_ms = sum(r["cpu_ms"] for r in runs)
    sched_ms = sum(r["cpu_ms_per_report_sched"] * r["reports"] for r in runs)
    out = dict(runs[-1])
    out.update({
        "runs": len(runs),
        "reports": reports,
        "seconds": round(sum(r["seconds"] for r in runs), 3),
        "cpu_ms": round(cpu_ms, 3),
        "cpu_ms_per_report": round(cpu_ms / reports, 3),
        "cpu_ms_per_report_sched": round(sched_ms / reports, 3),
        "rss_avg_mb": round(sum(r["rss_avg_mb"] for r in runs) / len(runs), 2),
        "rss_peak_mb": max(r["rss_peak_mb"] for r in runs),
        "rss_growth_mb": max(r["rss_growth_mb"] for r in runs),
        "threads": max(r["threads"] for r in runs),
        "processes": max(r["processes"] for r in runs),
        "rounds": runs,
    })
    for key in ("info_uploads", "connections", "bad_frames"):
        out[key] = sum(r[key] for r in runs)
    return out


RATIO_KEYS = ("cpu_ms_per_report", "cpu_ms_per_report_sched", "rss_avg_mb", "rss_peak_mb", "rss_growth_mb",
              "threads", "reports")


def ratios(ours, theirs):
    return {k: (round(ours[k] / theirs[k], 3) if theirs[k] else None) for k in RATIO_KEYS}


# ---------------------------------------------------------------------------
# Idle sockets: grow the kernel's TCP table
# ---------------------------------------------------------------------------

def hold_sockets(n):
    """A listener and n connected pairs on loopback: about 2n+1 TCP sockets."""
    if n <= 0:
        return []
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    need = 2 * n + 64
    if need > soft:
        if hard != resource.RLIM_INFINITY and need > hard:
            raise SystemExit("footprint: --sockets %d needs %d file descriptors; the hard limit is %d"
                             % (n, need, hard))
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(min(n, 4096))
    held = [listener]
    for _ in range(n):
        client = socket.create_connection(listener.getsockname())
        server, _ = listener.accept()
        held += [client, server]
    return held


# ---------------------------------------------------------------------------
# Output and main()
# ---------------------------------------------------------------------------

COLUMNS = (("agent", "name", "%s"), ("runs", "runs", "%d"), ("reports", "reports", "%d"),
           ("cpu ms/report", "cpu_ms_per_report", "%.3f"), ("sched ms/report", "cpu_ms_per_report_sched", "%.3f"),
           ("rss avg MB", "rss_avg_mb", "%.1f"), ("rss peak MB", "rss_peak_mb", "%.1f"),
           ("rss growth MB", "rss_growth_mb", "%.2f"), ("threads", "threads", "%d"))


def table(result):
    rows = [[fmt % result[name][key] for _, key, fmt in COLUMNS]
            for name in ("ours", "theirs") if name in result]
    if "ratio" in result:
        ratio = result["ratio"]
        rows.append(["ours/theirs", ""] + ["-" if ratio[key] is None else "%.2f" % ratio[key]
                                           for _, key, _ in COLUMNS[2:]])
    head = [title for title, _, _ in COLUMNS]
    widths = [max(len(r[i]) for r in rows + [head]) for i in range(len(head))]
    line = lambda cells: "  ".join(c.ljust(w) if i == 0 else c.rjust(w)  # noqa: E731
                                   for i, (c, w) in enumerate(zip(cells, widths)))
    s = result["settings"]
    lines = ["interval %g s, warm-up %g s, window %g s, rounds %d, idle sockets %d, cpu tick %g ms"
             % (s["interval"], s["warmup"], s["seconds"], s["rounds"], s["sockets"], 1000.0 / CLK_TCK)]
    for name in ("ours", "theirs"):
        if name in result:
            lines.append("%-7s %s  (tcp in its last report: %s)"
                         % (name + ":", result[name]["command"], result[name]["reported_tcp"]))
    lines += ["", line(head)] + [line(r) for r in rows]
    return "\n".join(lines)


# (name, agent flags, the sink refuses v2 upgrades, the sink keeps the deflate context)
WIRE_LINKS = (("v1", ("--protocol-version", "1"), False, False),
              ("v2-ws", ("--protocol-version", "2"), False, False),
              ("v2-post", ("--protocol-version", "2"), True, False),  # default retries: the upgrade is retried every 5 s
              ("v2-ws-takeover", ("--protocol-version", "2"), False, True))

WIRE_COLUMNS = (("link", "name", "%s"), ("reports", "reports", "%d"), ("up B/report", "bytes_up_per_report", "%.1f"),
                ("down B/report", "bytes_down_per_report", "%.1f"), ("total B/report", "bytes_per_report", "%.1f"),
                ("vs v1", "vs_v1", "%.3f"), ("MB/month at 1 s", "mb_per_month_at_1s", "%.1f"),
                ("cpu ms/report", "cpu_ms_per_report", "%.3f"), ("sched ms/report", "cpu_ms_per_report_sched", "%.3f"))


def wire_table(result):
    head = [title for title, _, _ in WIRE_COLUMNS]
    rows = [[fmt % result["links"][name][key] for _, key, fmt in WIRE_COLUMNS] for name in result["links"]]
    widths = [max(len(r[i]) for r in rows + [head]) for i in range(len(head))]
    line = lambda cells: "  ".join(c.ljust(w) if i == 0 else c.rjust(w)  # noqa: E731
                                   for i, (c, w) in enumerate(zip(cells, widths)))
    s = result["settings"]
    return "\n".join(["bytes through the socket, both directions, per report (TCP payload: HTTP, WebSocket "
                      "headers, pings and replies included); interval %g s, window %g s, rounds %d; agent: %s"
                      % (s["interval"], s["seconds"], s["rounds"], result["command"]), "", line(head)]
                     + [line(r) for r in rows])


def wire_main(args, sink, progress):
    chosen = [link for link in WIRE_LINKS if link[0] in args.links]
    runs = {link[0]: [] for link in chosen}
    for rnd in range(args.rounds):
        for link in chosen:
            progress("round %d/%d: %s ..." % (rnd + 1, args.rounds, link[0]))
            runs[link[0]].append(run_once(sink, args.agent, args, link))
    links = {}
    for name, rounds in runs.items():
        reports = sum(r["reports"] for r in rounds)
        up, down = sum(r["bytes_up"] for r in rounds), sum(r["bytes_down"] for r in rounds)
        combined = combine(rounds)
        combined.update(name=name, bytes_up_per_report=round(up / reports, 1),
                        bytes_down_per_report=round(down / reports, 1),
                        bytes_per_report=round((up + down) / reports, 1),
                        mb_per_month_at_1s=round((up + down) / reports * 86400 * 30 / 1e6, 1))
        links[name] = combined
    for link in links.values():
        link["vs_v1"] = round(link["bytes_per_report"] / links["v1"]["bytes_per_report"], 3) if "v1" in links else 0.0
    return {"settings": {"interval": args.interval, "warmup": args.warmup, "seconds": args.seconds,
                         "rounds": args.rounds, "clk_tck": CLK_TCK}, "command": args.agent, "links": links}


def parse_args(argv):
    p = argparse.ArgumentParser(description="CPU per report, RSS and threads of a Komari agent.")
    p.add_argument("--agent", default="%s %s" % (shlex.quote(sys.executable), shlex.quote(str(REPO / "komari_agent.py"))),
                   help="agent command; -e URL -t TOKEN --interval 1 are appended (default: this repo's agent)")
    p.add_argument("--vs", metavar="CMD", help="another agent command to compare with, run alternately")
    p.add_argument("--seconds", type=float, default=60.0, help="measured window per run (default 60)")
    p.add_argument("--warmup", type=float, default=5.0, help="seconds after the first report before measuring (default 5)")
    p.add_argument("--rounds", type=int, default=1, help="runs of each agent, alternating (default 1)")
    p.add_argument("--sockets", type=int, default=0, help="idle loopback TCP connections held open during the runs")
    p.add_argument("--interval", type=float, default=1.0, help="--interval passed to the agent (default 1)")
    p.add_argument("--start-timeout", type=float, default=60.0, help="seconds to wait for the first report (default 60)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    p.add_argument("--wire", action="store_true",
                   help="bytes on the wire and CPU per report for v1, v2 WebSocket and v2 POST, side by side")
    p.add_argument("--links", default=",".join(link[0] for link in WIRE_LINKS),
                   help="with --wire: which links to run (default: %(default)s)")
    args = p.parse_args(argv)
    args.links = [name.strip() for name in args.links.split(",") if name.strip()]
    unknown = set(args.links) - {link[0] for link in WIRE_LINKS}
    if unknown or not args.links:
        p.error("--links: choose from %s" % ", ".join(link[0] for link in WIRE_LINKS))
    if args.seconds < 1 or args.warmup < 0 or args.rounds < 1 or args.sockets < 0 or args.interval <= 0:
        p.error("need --seconds >= 1, --warmup >= 0, --rounds >= 1, --sockets >= 0, --interval > 0")
    return args


def main(argv=None):
    args = parse_args(argv)
    agents = [("ours", args.agent)] + ([("theirs", args.vs)] if args.vs else [])
    held = hold_sockets(args.sockets)
    sink = Sink(serves_v2=True)
    threading.Thread(target=sink.serve_forever, daemon=True).start()
    progress = (lambda *a: None) if args.json else (lambda msg: print(msg, file=sys.stderr, flush=True))
    if args.wire:
        try:
            result = wire_main(args, sink, progress)
        except RunFailed as e:
            print("footprint: %s" % e, file=sys.stderr)
            return 1
        finally:
            sink.shutdown()
            for s in held:
                s.close()
        print(json.dumps(result, indent=2) if args.json else wire_table(result))
        return 0
    runs = {name: [] for name, _ in agents}
    try:
        for rnd in range(args.rounds):
            for name, command in agents:
                progress("round %d/%d: %s ..." % (rnd + 1, args.rounds, name))
                runs[name].append(run_once(sink, command, args))
    except RunFailed as e:
        print("footprint: %s: %s" % (name, e), file=sys.stderr)
        return 1
    finally:
        sink.shutdown()
        for s in held:
            s.close()
    result = {"settings": {"interval": args.interval, "warmup": args.warmup, "seconds": args.seconds,
                           "rounds": args.rounds, "sockets": args.sockets, "clk_tck": CLK_TCK}}
    for name, command in agents:
        result[name] = combine(runs[name])
        result[name].update(name=name, command=command)
    if args.vs:
        result["ratio"] = ratios(result["ours"], result["theirs"])
    print(json.dumps(result, indent=2) if args.json else table(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
