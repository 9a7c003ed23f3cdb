#!/usr/bin/env python3
"""Footprint of a Komari agent: CPU per report, memory, threads.

Starts a loopback sink that speaks the panel protocol (README.md, "What is sent": basic info and task result
POSTs, the report WebSocket), runs an agent against it at --interval 1, and
measures the agent's whole process tree from /proc while it reports.

    python3 bench/footprint.py --seconds 60
    python3 bench/footprint.py --vs '/usr/local/bin/komari-agent --disable-auto-update' --rounds 3
    python3 bench/footprint.py --sockets 5000 --json

Stdlib only; Linux (it reads /proc).
"""

import argparse
import base64
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

    def count_report(self, report):
        with self.lock:
            self.reports += 1
            self.last_report = report


class Sink(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, port=0, handler=None):
        super().__init__(("127.0.0.1", port), handler or SinkHandler)
        self.tallies = {}

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


def read_frame(stream):
    """(fin, opcode, payload) of one client frame, unmasked (RFC 6455 5.2)."""
    b0, b1 = read_exact(stream, 2)
    length = b1 & 0x7F
    if length == 126:
        length = struct.unpack("!H", read_exact(stream, 2))[0]
    elif length == 127:
        length = struct.unpack("!Q", read_exact(stream, 8))[0]
    if not b1 & 0x80:
        raise ValueError("client frame not masked")
    key = read_exact(stream, 4)
    return bool(b0 & 0x80), b0 & 0x0F, unmask(read_exact(stream, length), key)


def frame_bytes(opcode, payload=b""):
    """One unmasked server frame with FIN set."""
    n = len(payload)
    if n < 126:
        head = struct.pack("!BB", 0x80 | opcode, n)
    elif n < 65536:
        head = struct.pack("!BBH", 0x80 | opcode, 126, n)
    else:
        head = struct.pack("!BBQ", 0x80 | opcode, 127, n)
    return head + payload


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
        if urlsplit(self.path).path != "/api/clients/report":
            return self.reply(404, {"status": "error", "message": "Not found"})
        if tally is None:
            return self.reply(401, {"status": "error", "message": "Unauthorized."})
        key = self.headers.get("Sec-WebSocket-Key", "")
        if "websocket" not in self.headers.get("Upgrade", "").lower() or not key:
            return self.reply(400, {"status": "error", "message": "WebSocket upgrade expected"})
        accept = base64.b64encode(hashlib.sha1((key + WS_GUID).encode()).digest()).decode()
        self.send_response(101, "Switching Protocols")
        self.send_header("Upgrade", "websocket")
        self.send_header("Connection", "Upgrade")
        self.send_header("Sec-WebSocket-Accept", accept)
        self.end_headers()
        with tally.lock:
            tally.connections += 1
        self.close_connection = True
        try:
            self.serve_websocket(tally)
        except (EOFError, OSError, ValueError):
            pass

    def serve_websocket(self, tally):
        message, message_op = b"", None
        while True:
            fin, opcode, payload = read_frame(self.rfile)
            if opcode == 0x9:
                self.wfile.write(frame_bytes(0xA, payload))
            elif opcode == 0x8:
                self.wfile.write(frame_bytes(0x8, payload[:2]))
                return
            elif opcode in (0x1, 0x2, 0x0):
                if opcode:
                    message, message_op = payload, opcode
                else:
                    message += payload
                if fin:
                    self.take_message(tally, message_op, message)
            # pongs and reserved opcodes are ignored

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


def run_once(sink, command, args):
    token = sink.new_token()
    tally = sink.tallies[token]
    argv = shlex.split(command) + ["-e", sink.endpoint, "-t", token, "--interval", "%g" % args.interval]
    with tempfile.TemporaryFile() as out:
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)
        try:
            return measure(proc, tally, args, out)
        finally:
            stop(proc)


def measure(proc, tally, args, out):
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
    args = p.parse_args(argv)
    if args.seconds < 1 or args.warmup < 0 or args.rounds < 1 or args.sockets < 0 or args.interval <= 0:
        p.error("need --seconds >= 1, --warmup >= 0, --rounds >= 1, --sockets >= 0, --interval > 0")
    return args


def main(argv=None):
    args = parse_args(argv)
    agents = [("ours", args.agent)] + ([("theirs", args.vs)] if args.vs else [])
    held = hold_sockets(args.sockets)
    sink = Sink()
    threading.Thread(target=sink.serve_forever, daemon=True).start()
    progress = (lambda *a: None) if args.json else (lambda msg: print(msg, file=sys.stderr, flush=True))
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
