"""Tests for komari_agent.py.

The panel side is real: PanelServer below is an HTTP + WebSocket server on
127.0.0.1 that speaks PROTOCOL.md, decodes reports the way the Go server does
(a float where it wants an integer, or a cpu usage outside 0-100, rejects the
report), closes a report socket that sends no data for 11 s, and answers 401
to a wrong token. End-to-end tests run komari_agent.py as a subprocess.
Sections mirror the agent: configuration, collectors, transport, tasks, the
agent loop, main().
"""

import base64
import hashlib
import json
import os
import select
import signal
import socket
import socketserver
import struct
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import psutil
import pytest

import komari_agent as ka

ROOT = Path(__file__).parent
AGENT = ROOT / "komari_agent.py"
TOKEN = "tok-Secret-1234567890ab"


# ---------------------------------------------------------------------------
# The panel: a loopback Komari server that records what it gets
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


def basic_info_problem(info):
    if not isinstance(info, dict):
        return "Invalid or missing data"
    unknown = set(info) - set(BASIC_INFO_KEYS)
    if unknown:
        return "no such column: %s" % sorted(unknown)
    for key, value in info.items():
        if BASIC_INFO_KEYS[key] is int and (not is_go_int(value) or value < 0):
            return "%s must be a valid number" % key
    return None


class WsConn:
    """The server end of one WebSocket (RFC 6455, unmasked server frames)."""

    def __init__(self, sock, path, query):
        self.sock, self.path, self.query = sock, path, query
        self.lock = threading.Lock()
        self.closed = False

    def send(self, payload, opcode=None):
        if isinstance(payload, str):
            payload, opcode = payload.encode(), opcode or 1
        opcode = opcode or 2
        n = len(payload)
        header = bytes([0x80 | opcode])
        if n < 126:
            header += bytes([n])
        elif n < 65536:
            header += bytes([126]) + struct.pack("!H", n)
        else:
            header += bytes([127]) + struct.pack("!Q", n)
        with self.lock:
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
        n = b1 & 0x7F
        if n == 126:
            n = struct.unpack("!H", self._read_exact(2, deadline))[0]
        elif n == 127:
            n = struct.unpack("!Q", self._read_exact(8, deadline))[0]
        mask = self._read_exact(4, deadline) if b1 & 0x80 else b"\0\0\0\0"
        data = bytearray(self._read_exact(n, deadline))
        for i in range(n):
            data[i] ^= mask[i % 4]
        return b0 & 0x0F, bytes(data)

    def close(self):
        self.closed = True
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.sock.close()


class PanelServer:
    """HTTP + WebSocket panel on 127.0.0.1. Everything it receives is kept in
    lists; wait_for() blocks until a condition on them holds."""

    READ_WAIT = 11.0  # the real server's read deadline on the report socket

    def __init__(self, token=TOKEN):
        self.token = token
        self.port = None
        self.cond = threading.Condition()
        self.basic_infos, self.reports, self.rejected = [], [], []
        self.task_results, self.ping_results, self.other_frames = [], [], []
        self.report_conns, self.ws_attempts, self.http_requests = [], [], []
        self.terminal_conns = []
        self.frozen = threading.Event()
        self.fail_http = {}       # path -> status to answer instead
        self.on_terminal = None   # callback(WsConn) run for terminal sockets
        self.server = None
        self.start()

    # lifecycle
    def start(self):
        panel = self

        class Handler(PanelHandler):
            pass
        Handler.panel = panel

        class Server(socketserver.ThreadingMixIn, socketserver.TCPServer):
            allow_reuse_address = True
            daemon_threads = True
        self.server = Server(("127.0.0.1", self.port or 0), Handler)
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, args=(0.05,), daemon=True).start()

    def stop(self):
        self.server.shutdown()
        self.server.server_close()
        for conn in list(self.report_conns) + list(self.terminal_conns):
            conn.close()

    @property
    def endpoint(self):
        return "http://127.0.0.1:%d" % self.port

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

    def wait_for(self, predicate, timeout=10.0, what="condition"):
        deadline = time.monotonic() + timeout
        with self.cond:
            while True:
                result = predicate()
                if result:
                    return result
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    pytest.fail("timed out after %gs waiting for %s" % (timeout, what))
                self.cond.wait(min(remaining, 0.1))

    def live_report_conn(self):
        return next((c for c in reversed(self.report_conns) if not c.closed), None)

    def send_event(self, event):
        conn = self.wait_for(self.live_report_conn, 10, "a live report socket")
        conn.send(event if isinstance(event, (str, bytes)) else json.dumps(event))
        return conn


class PanelHandler(BaseHTTPRequestHandler):
    panel = None
    protocol_version = "HTTP/1.1"

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
            while panel.frozen.is_set():
                time.sleep(0.05)
        if not self.authorised(query):
            return
        if parts.path in panel.fail_http:
            status = panel.fail_http[parts.path]
            return self.reply(status, b"<html><title>502 Bad Gateway</title></html>" if status >= 500
                              else {"status": "error", "error": {}})
        try:
            data = go_json(body.decode())
        except ValueError:
            return self.reply(400, {"status": "error", "error": "Invalid or missing data"})
        if parts.path == "/api/clients/uploadBasicInfo":
            problem = basic_info_problem(data)
            if problem:
                panel.record(panel.rejected, ("basic_info", problem, data))
                return self.reply(500, {"status": "error", "error": {}})
            panel.record(panel.basic_infos, data)
            return self.reply(200, {"status": "success"})
        if parts.path == "/api/clients/task/result":
            if not isinstance(data, dict) or not isinstance(data.get("task_id"), str) \
                    or not is_go_int(data.get("exit_code", 0)) or not isinstance(data.get("result", ""), str):
                return self.reply(400, {"status": "error", "message": "Invalid request"})
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
        panel.record(panel.ws_attempts, (parts.path, dict(self.headers)))
        if not self.authorised(query):
            return
        if parts.path not in ("/api/clients/report", "/api/clients/terminal") \
                or self.headers.get("Upgrade", "").lower() != "websocket":
            return self.reply(200, b"<!doctype html><html><title>Komari</title></html>")
        if "Origin" in self.headers:
            return self.reply(403, {"status": "error", "error": "origin not allowed"})
        key = self.headers["Sec-WebSocket-Key"]
        accept = base64.b64encode(hashlib.sha1((key + "258EAFA5-E914-47DA-95CA-C5AB0DC85B11").encode()).digest())
        self.wfile.write(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                         b"Sec-WebSocket-Accept: " + accept + b"\r\n\r\n")
        self.wfile.flush()
        conn = WsConn(self.connection, parts.path, query)
        if parts.path == "/api/clients/terminal":
            panel.record(panel.terminal_conns, conn)
            if panel.on_terminal:
                panel.on_terminal(conn)
            return
        panel.record(panel.report_conns, conn)
        self.serve_report_socket(conn)
        self.close_connection = True

    def serve_report_socket(self, conn):
        panel = self.panel
        first = True
        deadline = None  # the first message has no deadline
        try:
            while not conn.closed:
                if panel.frozen.is_set():
                    time.sleep(0.05)
                    deadline = None
                    continue
                try:
                    opcode, payload = conn.read_frame(deadline if deadline else time.monotonic() + 0.2)
                except socket.timeout:
                    if deadline and time.monotonic() >= deadline:
                        break  # silent for 11 s: the real server drops the socket
                    continue
                if panel.frozen.is_set():
                    continue
                if opcode == 9:
                    conn.send(payload, 10)
                    continue
                if opcode == 8:
                    conn.send(payload[:2], 8)
                    break
                if opcode not in (1, 2):
                    continue
                deadline = time.monotonic() + panel.READ_WAIT
                try:
                    message = go_json(payload.decode())
                except ValueError:
                    message = None
                if not isinstance(message, dict):
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
        except (EOFError, OSError):
            pass
        finally:
            conn.close()
            with panel.cond:
                panel.cond.notify_all()


@pytest.fixture
def panel():
    server = PanelServer()
    yield server
    server.stop()


class AgentProcess:
    """komari_agent.py as a subprocess; stderr is collected line by line."""

    def __init__(self, args, env=None):
        full_env = {k: v for k, v in os.environ.items() if not k.startswith("AGENT_")}
        full_env.update(env or {})
        full_env["PYTHONUNBUFFERED"] = "1"
        self.proc = subprocess.Popen([sys.executable, str(AGENT)] + list(args), stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, env=full_env, start_new_session=True)
        self.lines = []
        self.cond = threading.Condition()
        threading.Thread(target=self._collect, daemon=True).start()

    def _collect(self):
        for raw in self.proc.stderr:
            with self.cond:
                self.lines.append(raw.decode("utf-8", "replace").rstrip("\n"))
                self.cond.notify_all()

    @property
    def log(self):
        with self.cond:
            return "\n".join(self.lines)

    def wait_log(self, needle, timeout=10.0):
        deadline = time.monotonic() + timeout
        with self.cond:
            while not any(needle in line for line in self.lines):
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    pytest.fail("no log line containing %r within %gs; log:\n%s" % (needle, timeout, "\n".join(self.lines)))
                self.cond.wait(min(remaining, 0.2))

    def stop(self):
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except OSError:
                pass
        self.proc.wait(5)


@pytest.fixture
def start_agent(panel):
    """start_agent(*flags, env=None): the agent pointed at `panel`."""
    started = []

    def start(*args, env=None, endpoint=None, token=None):
        base = ["-e", endpoint or panel.endpoint, "-t", token or panel.token, "--reconnect-interval", "0.2",
                "--custom-ipv4", "192.0.2.7", "--state-dir", str(panel_state_dir(panel))]
        agent = AgentProcess(base + list(args), env=env)
        started.append(agent)
        return agent
    yield start
    for agent in started:
        agent.stop()


def panel_state_dir(panel):
    path = Path("/tmp") / ("komari-test-state-%d-%d" % (os.getpid(), panel.port))
    path.mkdir(exist_ok=True)
    return path


def run_agent(*args, env=None, timeout=30):
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("AGENT_")}
    full_env.update(env or {})
    return subprocess.run([sys.executable, str(AGENT)] + list(args), stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, env=full_env, timeout=timeout)


# ---------------------------------------------------------------------------
# Configuration
# ---------------------------------------------------------------------------

def test_defaults_match_the_official_agent():
    cfg, warnings = ka.load_config(["-e", "https://panel.example/", "-t", "T"], {})
    assert cfg.endpoint == "https://panel.example"
    assert cfg.interval == 1.0 and cfg.max_retries == 3 and cfg.reconnect_interval == 5
    assert cfg.info_report_interval == 5 and cfg.month_rotate == 0
    assert cfg.disable_web_ssh is False and warnings == []


def test_precedence_file_then_env_then_command_line(tmp_path):
    config = tmp_path / "agent.json"
    config.write_text(json.dumps({"endpoint": "http://file", "token": "from-file", "interval": 4,
                                  "max_retries": 9, "disable_web_ssh": True, "include_mountpoints": "/a;/b"}))
    env = {"AGENT_CONFIG_FILE": str(config), "AGENT_INTERVAL": "3", "AGENT_MAX_RETRIES": "7"}
    cfg, _ = ka.load_config(["-i", "2"], env)
    assert cfg.endpoint == "http://file" and cfg.token == "from-file"   # file over default
    assert cfg.max_retries == 7                                          # env over file
    assert cfg.interval == 2.0                                           # command line over env
    assert cfg.disable_web_ssh is True and cfg.mountpoints == ["/a", "/b"]


def test_short_flags_and_equals_forms():
    cfg, _ = ka.load_config(["-e", "http://h:25774", "-t", "T", "-i", "0.5", "-c", "2", "-r", "1", "-u",
                             "--disable-web-ssh=false", "--gpu=true", "--include-nics=eth*,wg0"], {})
    assert (cfg.interval, cfg.reconnect_interval, cfg.max_retries) == (0.5, 2, 1)
    assert cfg.ignore_unsafe_cert is True and cfg.disable_web_ssh is False and cfg.gpu is True
    assert cfg.nics_include == ["eth*", "wg0"]


def test_environment_booleans_turn_off_as_well_as_on():
    cfg, _ = ka.load_config(["-e", "http://h", "-t", "T"], {"AGENT_DISABLE_WEB_SSH": "true",
                                                            "AGENT_IGNORE_UNSAFE_CERT": "0"})
    assert cfg.disable_web_ssh is True and cfg.ignore_unsafe_cert is False
    with pytest.raises(ka.ConfigError):
        ka.load_config(["-e", "http://h", "-t", "T"], {"AGENT_GPU": "maybe"})


def test_unknown_and_deprecated_flags_warn_but_run():
    cfg, warnings = ka.load_config(["-e", "http://h", "-t", "T", "--cf-access-client-id", "x",
                                    "--memory-mode-available", "--autoUpdate"], {})
    assert cfg.token == "T"
    text = " ".join(warnings)
    assert "--cf-access-client-id" in text and "--memory-mode-available" in text and "--autoUpdate" in text


def test_idn_endpoint_is_punycoded():
    cfg, _ = ka.load_config(["-e", "https://bücher.example:8443/komari/", "-t", "T"], {})
    assert cfg.endpoint == "https://xn--bcher-kva.example:8443/komari"


@pytest.mark.parametrize("args, env, needle", [
    (["-t", "T"], {}, "endpoint"),
    (["-e", "http://h"], {}, "token"),
    (["-e", "http://h", "-t", "T", "-i", "fast"], {}, "--interval"),
    (["-e", "http://h", "-t", "T"], {"AGENT_INTERVAL": "soon"}, "AGENT_INTERVAL"),
    (["-e", "http://h", "-t", "T", "-i", "0"], {}, "greater than 0"),
    (["-e", "ftp://h", "-t", "T"], {}, "endpoint"),
    (["-e", "http://h", "-t", "T", "--month-rotate", "32"], {}, "month"),
    (["-e", "http://h", "-t", "T", "--config", "/nonexistent/agent.json"], {}, "cannot read config"),
])
def test_bad_settings_exit_2_with_one_line(args, env, needle):
    done = run_agent(*args, env=env)
    lines = done.stderr.decode().strip().splitlines()
    assert done.returncode == 2, done.stderr
    assert len(lines) == 1 and needle in lines[0], lines


def test_invalid_config_json_exits_2(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text('{"endpoint": "http://h", "token": ')
    done = run_agent("--config", str(bad))
    assert done.returncode == 2 and b"not valid JSON" in done.stderr
    wrong_type = tmp_path / "type.json"
    wrong_type.write_text('{"endpoint": "http://h", "token": "T", "interval": "often"}')
    done = run_agent("--config", str(wrong_type))
    assert done.returncode == 2 and b"interval" in done.stderr


def test_help_lists_the_official_flags():
    text = run_agent("--help").stdout.decode()
    for flag in ("--endpoint", "--token", "--interval", "--info-report-interval", "--reconnect-interval",
                 "--max-retries", "--ignore-unsafe-cert", "--disable-web-ssh", "--disable-auto-update",
                 "--memory-include-cache", "--memory-exclude-bcf", "--include-nics", "--exclude-nics",
                 "--include-mountpoint", "--month-rotate", "--gpu", "--custom-dns", "--custom-ipv4",
                 "--custom-ipv6", "--get-ip-addr-from-nic", "--config", "--prefer-ip-version", "--dry-run"):
        assert flag in text


# ---------------------------------------------------------------------------
# Collectors: arithmetic on fixed /proc inputs
# ---------------------------------------------------------------------------

MEMINFO = """MemTotal:        8000000 kB
MemFree:         1000000 kB
MemAvailable:    5000000 kB
Buffers:          200000 kB
Cached:          3000000 kB
SwapCached:        10000 kB
SwapTotal:       2000000 kB
SwapFree:        1500000 kB
Shmem:            100000 kB
SReclaimable:     300000 kB
HugePages_Total:       0
"""


def test_ram_used_is_htop_style_plus_shmem():
    info = ka.parse_meminfo(MEMINFO)
    assert info["MemTotal"] == 8000000 * 1024 and info["HugePages_Total"] == 0
    total, used = ka.ram_usage(info)
    assert total == 8000000 * 1024
    assert used == (8000000 - (1000000 + 200000 + 3000000 + 300000) + 100000) * 1024


def test_ram_used_include_cache_and_absurd_meminfo():
    info = ka.parse_meminfo(MEMINFO)
    assert ka.ram_usage(info, include_cache=True)[1] == (8000000 - 1000000) * 1024
    bogus = ka.parse_meminfo("MemTotal: 1000 kB\nMemFree: 100 kB\nCached: 5000 kB\nShmem: 9000 kB\n")
    total, used = ka.ram_usage(bogus)
    assert 0 <= used <= total == 1000 * 1024


def test_swap_used_subtracts_swap_cached():
    total, used = ka.swap_usage(ka.parse_meminfo(MEMINFO))
    assert (total, used) == (2000000 * 1024, (2000000 - 1500000 - 10000) * 1024)
    assert ka.swap_usage({}) == (0, 0)


def test_cpu_percent_from_proc_stat_lines():
    a = ka.cpu_busy_total("cpu  100 0 100 700 100 0 0 0 50 0")
    b = ka.cpu_busy_total("cpu  200 0 200 1300 300 0 0 0 90 0")
    assert a == (200, 1000)  # guest is already inside user
    assert ka.cpu_percent(a, b) == pytest.approx(200 * 100.0 / 1000)
    assert ka.cpu_percent(a, a) == 0.001        # idle is never reported as 0
    assert ka.cpu_percent(b, a) == 0.001        # a counter going backwards is not negative


NET_DEV = """Inter-|   Receive                                                |  Transmit
 face |bytes    packets errs drop fifo frame compressed multicast|bytes    packets errs drop fifo colls carrier compressed
    lo:  900000    100    0    0    0     0          0         0   900000     100    0    0    0     0       0          0
  eth0: 1000000   1000    0    0    0     0          0         0   500000     900    0    0    0     0       0          0
docker0:  70000    10    0    0    0     0          0         0    80000      10    0    0    0     0       0          0
veth12ab: 60000     10    0    0    0     0          0         0    60000      10    0    0    0     0       0          0
 vmbr0: 4000000    100    0    0    0     0          0         0  3000000     100    0    0    0     0       0          0
  wg0:    20000     10    0    0    0     0          0         0    10000      10    0    0    0     0       0          0
"""


def test_net_dev_parsing_and_default_deny_list():
    counters = ka.parse_net_dev(NET_DEV)
    assert counters["eth0"] == (1000000, 500000) and counters["vmbr0"] == (4000000, 3000000)
    counted = [n for n in counters if ka.nic_counted(n)]
    assert counted == ["eth0", "wg0"]


def test_nic_include_wins_over_deny_list_and_wildcards():
    assert ka.nic_counted("vmbr0", include=["vmbr*"]) is True
    assert ka.nic_counted("eth0", include=["vmbr*"]) is False
    assert ka.nic_counted("eth0", exclude=["eth*"]) is False
    assert ka.nic_counted("wg0", exclude=["eth*"]) is True
    assert ka.nic_counted("lo", include=["lo"]) is True


def test_net_meter_speeds_per_nic_with_a_reset():
    meter = ka.NetMeter()
    assert meter.sample({"eth0": (1000, 500), "eth1": (0, 0)}, 10.0) == (0, 0)
    # eth1 was reset (counter went down): it adds nothing, eth0 still counts
    assert meter.sample({"eth0": (3000, 1500), "eth1": (0, 0)}, 12.0) == (500, 1000)
    assert meter.sample({"eth0": (3000, 1500), "eth1": (10, 0)}, 14.0) == (0, 5)


MOUNTINFO = r"""22 1 0:21 / / rw,relatime - overlay overlay rw,lowerdir=/l,upperdir=/u,workdir=/w
23 22 0:22 / /proc rw - proc proc rw
24 22 0:5 / /dev rw - devtmpfs udev rw
25 22 8:1 / /boot rw,relatime - ext4 /dev/sda1 rw
26 22 8:2 / /data rw,relatime - ext4 /dev/sda2 rw
27 22 8:2 /sub /srv/bind rw,relatime - ext4 /dev/sda2 rw
28 22 0:40 / /tank rw - zfs tank rw
29 22 0:41 / /tank/vm rw - zfs tank/vm rw
30 22 0:42 / /backup rw - zfs backup rw
31 22 0:23 / /run rw - tmpfs tmpfs rw
32 22 8:3 / /var/lib/docker rw - ext4 /dev/sda3 rw
33 22 8:4 / /devdata rw - xfs /dev/sdb1 rw
34 22 7:0 / /snap/core/1 ro - squashfs /dev/loop0 ro
35 22 253:0 / /home rw - ext4 /dev/mapper/vg-home rw
36 22 253:0 / /home2 rw - ext4 /dev/dm-0 rw
37 22 0:50 / /mnt/nas rw - nfs4 nas:/share rw
38 22 0:51 / /mnt/my\040disk rw - ext4 /dev/sdc1 rw
39 22 0:52 / /media/sshfs rw - fuse.sshfs me@host: rw
40 22 8:5 / /win rw - fuseblk /dev/sdd1 rw
"""


def test_mount_table_dedupes_devices_and_pools():
    mounts = ka.parse_mountinfo(MOUNTINFO)
    assert mounts[16].mountpoint == "/mnt/my disk"
    chosen = {m.mountpoint: key for key, m in ka.countable_mounts(mounts)}
    # overlay root counted; bind mount of sda2 and the dm alias counted once
    assert set(chosen) == {"/", "/boot", "/data", "/tank", "/tank/vm", "/backup", "/devdata", "/home",
                           "/mnt/my disk", "/win"}
    assert chosen["/tank"] == chosen["/tank/vm"] == "zfs:tank"
    assert chosen["/home"] == "dev:253:0"


def test_disk_sum_counts_each_device_and_each_pool_once():
    usages = [("dev:8:2", 100, 40, 60), ("dev:8:2", 100, 40, 60),
              ("zfs:tank", 500, 100, 400), ("zfs:tank", 450, 50, 400),   # datasets share the free 400
              ("dev:0:21", 30, 10, 20)]
    assert ka.sum_disk_usage(usages) == (100 + (100 + 50 + 400) + 30, 40 + 150 + 10)


SOCKSTAT = """sockets: used 290
TCP: inuse 5 orphan 0 tw 3 alloc 8 mem 1
UDP: inuse 2 mem 1
UDPLITE: inuse 0
RAW: inuse 0
FRAG: inuse 0 memory 0
"""
SOCKSTAT6 = "TCP6: inuse 4\nUDP6: inuse 1\nUDPLITE6: inuse 0\nRAW6: inuse 0\nFRAG6: inuse 0 memory 0\n"


def test_connections_from_sockstat_counters():
    assert ka.connections_from_sockstat(SOCKSTAT, SOCKSTAT6) == (5 + 3 + 4, 2 + 1)
    assert ka.connections_from_sockstat(SOCKSTAT, "") == (8, 2)


def test_static_facts_parsing():
    assert ka.cpu_name_from_cpuinfo("processor\t: 0\nmodel name\t: AMD EPYC 7B13\n") == "AMD EPYC 7B13"
    arm = "processor\t: 0\nCPU implementer\t: 0x41\nCPU part\t: 0xd0c\n"
    assert ka.cpu_name_from_cpuinfo(arm) == "ARM Neoverse-N1"
    assert ka.cpu_name_from_cpuinfo("") == "Unknown"
    assert ka.go_arch("x86_64") == "amd64" and ka.go_arch("aarch64") == "arm64" and ka.go_arch("armv7l") == "arm"
    assert ka.os_name_from_release('NAME="Debian"\nPRETTY_NAME="Debian GNU/Linux 12 (bookworm)"\n') \
        == "Debian GNU/Linux 12 (bookworm)"
    assert ka.group_names(["RTX 4090", "RTX 4090", "RX 7900"]) == "RTX 4090 \u00d7 2, RX 7900"
    assert ka.virtualization_from_cgroup("0::/system.slice/docker-" + "a" * 64 + ".scope") == "docker"
    assert ka.virtualization_from_cgroup("0::/init.scope") == ""


def test_report_figures_agree_with_psutil():
    cfg, _ = ka.load_config(["--dry-run"], {})
    collector = ka.Collector(cfg)
    report = collector.report()
    assert report_problem(report) is None and report["message"] == ""
    vm = psutil.virtual_memory()
    assert report["ram"]["total"] == vm.total
    assert 0 < report["ram"]["used"] <= vm.total
    assert report["swap"]["total"] == psutil.swap_memory().total
    assert abs(report["process"] - len(psutil.pids())) <= 10
    assert abs(report["uptime"] - (time.time() - psutil.boot_time())) <= 5
    root = psutil.disk_usage("/")
    assert report["disk"]["total"] >= root.total
    nics = {n: c for n, c in psutil.net_io_counters(pernic=True).items() if ka.nic_counted(n)}
    assert report["network"]["totalDown"] >= sum(c.bytes_recv for c in nics.values())
    assert report["load"]["load1"] == pytest.approx(os.getloadavg()[0], abs=0.5)


def test_connection_counts_follow_sockets_we_hold():
    cfg, _ = ka.load_config(["--dry-run"], {})
    collector = ka.Collector(cfg)
    before_tcp, before_udp = collector.connections()
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(20)
    clients = [socket.create_connection(listener.getsockname()) for _ in range(10)]
    servers = [listener.accept()[0] for _ in clients]
    udps = [socket.socket(socket.AF_INET, socket.SOCK_DGRAM) for _ in range(5)]
    for u in udps:
        u.bind(("127.0.0.1", 0))
    try:
        tcp, udp = collector.connections()
        rows_tcp = ka.count_table_rows(["/proc/net/tcp", "/proc/net/tcp6"])
        rows_udp = ka.count_table_rows(["/proc/net/udp", "/proc/net/udp6"])
        assert tcp >= before_tcp + 21 - 5 and udp >= before_udp + 5
        assert tcp == rows_tcp and udp == rows_udp
    finally:
        for s in clients + servers + udps + [listener]:
            s.close()


def test_failing_collector_becomes_a_message_line(tmp_path):
    cfg, _ = ka.load_config(["--dry-run"], {"HOST_PROC": str(tmp_path)})
    (tmp_path / "stat").write_text("cpu  1 0 1 10 0 0 0 0 0 0\n")
    collector = ka.Collector(cfg)
    report = collector.report()
    assert report_problem(report) is None
    assert "failed to get memory" in report["message"] and "failed to get network" in report["message"]
    assert "cpu" not in report["message"]
    assert str(tmp_path) not in report["message"]


def test_report_numbers_are_clean_for_go():
    assert ka.count(12.9) == 12 and ka.count(-5) == 0 and ka.count(float("nan")) == 0
    assert ka.finite(float("nan"), 0.0, 100.0) == 0.0 and ka.finite(250, 0.001, 100.0) == 100.0
    with pytest.raises(ValueError):
        ka.encode({"x": float("nan")})


# ---------------------------------------------------------------------------
# Traffic: --month-rotate totals (fake clock, synthetic counters, real files)
# ---------------------------------------------------------------------------

GiB, TiB = 1024 ** 3, 1024 ** 4
LONG_AGO = ("boot-old", 946684800.0)  # booted in 2000: every counter predates the period


def local(*fields):
    """Epoch seconds of a local wall-clock time (year, month, day[, hour, minute, second])."""
    fields = tuple(fields) + (0,) * (6 - len(fields))
    return time.mktime(fields + (0, 0, -1))


def saved_state(directory):
    return json.loads((Path(directory) / ka.TRAFFIC_FILE).read_text())


@pytest.mark.parametrize("day, now, start, end", [
    (31, (2024, 4, 30, 10), (2024, 4, 30), (2024, 5, 31)),        # April has no 31st: its last day
    (31, (2024, 4, 29, 23, 59, 59), (2024, 3, 31), (2024, 4, 30)),
    (31, (2024, 5, 1), (2024, 4, 30), (2024, 5, 31)),
    (30, (2024, 2, 29, 12), (2024, 2, 29), (2024, 3, 30)),         # leap year: Feb 29 is the last day
    (31, (2024, 2, 28, 23), (2024, 1, 31), (2024, 2, 29)),
    (30, (2024, 3, 1), (2024, 2, 29), (2024, 3, 30)),
    (30, (2023, 2, 28), (2023, 2, 28), (2023, 3, 30)),             # not a leap year
    (31, (2023, 2, 27), (2023, 1, 31), (2023, 2, 28)),
    (1, (2024, 1, 1), (2024, 1, 1), (2024, 2, 1)),
    (1, (2023, 12, 31, 23, 59, 59), (2023, 12, 1), (2024, 1, 1)),
    (15, (2024, 1, 10), (2023, 12, 15), (2024, 1, 15)),
])
def test_period_starts_at_midnight_on_the_reset_day_or_the_months_last_day(day, now, start, end):
    assert ka.period_bounds(day, local(*now)) == (local(*start), local(*end))


def test_ledger_counts_deltas_and_rotates_on_day_31_in_a_30_day_month(tmp_path):
    ledger = ka.TrafficLedger(str(tmp_path), 31, boot=LONG_AGO, now=local(2024, 4, 29, 23))
    assert (ledger.start, ledger.end) == (local(2024, 3, 31), local(2024, 4, 30))
    # booted long before the period: what the counters held at start is not this period's
    assert ledger.update({"eth0": (5000, 2000)}, local(2024, 4, 29, 23)) == (0, 0)
    assert ledger.update({"eth0": (8000, 2500)}, local(2024, 4, 29, 23, 59, 59)) == (500, 3000)
    assert ledger.update({"eth0": (8100, 2600)}, local(2024, 4, 30, 0, 0, 1)) == (0, 0)
    assert ledger.update({"eth0": (9100, 2700)}, local(2024, 4, 30, 0, 0, 2)) == (100, 1000)
    assert (ledger.start, ledger.end) == (local(2024, 4, 30), local(2024, 5, 31))
    assert ledger.previous["up"] == 500 and ledger.previous["down"] == 3000
    # and in a leap year, reset day 30 rolls over on Feb 29
    leap = ka.TrafficLedger(str(tmp_path / "leap"), 30, boot=LONG_AGO, now=local(2024, 2, 28, 23))
    leap.update({"eth0": (0, 0)}, local(2024, 2, 28, 23))
    assert leap.update({"eth0": (70, 7)}, local(2024, 2, 28, 23, 59, 59)) == (7, 70)
    leap.update({"eth0": (80, 8)}, local(2024, 2, 29, 0, 0, 1))
    assert leap.update({"eth0": (90, 9)}, local(2024, 2, 29, 0, 0, 2)) == (1, 10)
    assert leap.start == local(2024, 2, 29)


def test_fresh_state_counts_everything_since_a_boot_inside_the_period(tmp_path):
    ledger = ka.TrafficLedger(str(tmp_path), 1, boot=("b", local(2024, 6, 3)), now=local(2024, 6, 10))
    assert ledger.update({"eth0": (7000, 3000)}, local(2024, 6, 10)) == (3000, 7000)


def test_restart_and_reboot_mid_period_keep_the_totals(tmp_path):
    boot1 = ("boot-1", local(2024, 5, 20))
    first = ka.TrafficLedger(str(tmp_path), 1, boot=boot1, now=local(2024, 6, 10))
    first.update({"eth0": (1000, 100)}, local(2024, 6, 10))
    assert first.update({"eth0": (1500, 300)}, local(2024, 6, 10, 0, 0, 1)) == (200, 500)
    # killed: on disk is the state of the first update; the counters kept running meanwhile
    restarted = ka.TrafficLedger(str(tmp_path), 1, boot=boot1, now=local(2024, 6, 10, 0, 5))
    assert restarted.update({"eth0": (2000, 400)}, local(2024, 6, 10, 0, 5)) == (300, 1000)
    # a reboot: new boot id, counters start from zero, their values are all new traffic
    rebooted = ka.TrafficLedger(str(tmp_path), 1, boot=("boot-2", local(2024, 6, 12)), now=local(2024, 6, 12, 1))
    assert rebooted.update({"eth0": (50, 20)}, local(2024, 6, 12, 1)) == (320, 1050)
    assert rebooted.update({"eth0": (60, 25)}, local(2024, 6, 12, 1, 0, 1)) == (325, 1060)
    # a power cut before the next save loses that last second; a NIC reset behind the same boot id
    # still shows as counters going backwards
    again = ka.TrafficLedger(str(tmp_path), 1, boot=("boot-2", local(2024, 6, 12)), now=local(2024, 6, 13))
    assert again.update({"eth0": (5, 2)}, local(2024, 6, 13)) == (322, 1055)


def test_counter_that_goes_backwards_adds_its_new_value_never_a_negative_delta(tmp_path):
    ledger = ka.TrafficLedger(str(tmp_path), 1, boot=LONG_AGO, now=local(2024, 6, 5))
    t = local(2024, 6, 5)
    ledger.update({"eth0": (2 ** 32 - 100, 1000), "eth1": (500, 500)}, t)
    # eth0's 32-bit rx counter wraps; eth1 is reset (ip link down/up)
    assert ledger.update({"eth0": (50, 1100), "eth1": (20, 30)}, t + 1) == (100 + 30, 50 + 20)
    # a NIC that vanishes keeps its totals; when it comes back its counter is new traffic
    assert ledger.update({"eth0": (60, 1110)}, t + 2) == (140, 80)
    assert ledger.update({"eth0": (60, 1110), "eth1": (7, 3)}, t + 3) == (143, 87)


def test_changing_nic_filters_keeps_the_period_and_per_nic_totals(tmp_path):
    t = local(2024, 6, 5)

    def ledger(*nics):
        return ka.TrafficLedger(str(tmp_path), 1, counted=lambda nic: nic in nics, boot=LONG_AGO, now=t)
    eth0 = ledger("eth0")
    eth0.update({"eth0": (0, 0)}, t)
    assert eth0.update({"eth0": (1000, 100)}, t + 1) == (100, 1000)
    eth0.flush(t + 1)
    both = ledger("eth0", "eth1")
    assert both.update({"eth0": (1500, 150), "eth1": (9999, 9999)}, t + 10) == (150, 1500)
    assert both.update({"eth0": (1500, 150), "eth1": (10999, 10099)}, t + 11) == (250, 2500)
    both.flush(t + 11)
    eth1 = ledger("eth1")
    assert eth1.update({"eth1": (11999, 10199)}, t + 20) == (200, 2000)
    eth1.flush(t + 20)
    assert saved_state(tmp_path)["nics"]["eth0"]["up"] == 150
    assert ledger("eth0").update({"eth0": (1600, 160)}, t + 30) == (150, 1500)


def test_state_is_saved_on_the_first_update_then_at_most_once_a_minute_and_on_flush(tmp_path):
    t = local(2024, 6, 5)
    ledger = ka.TrafficLedger(str(tmp_path), 1, boot=LONG_AGO, now=t)
    assert not (tmp_path / ka.TRAFFIC_FILE).exists()
    ledger.update({"eth0": (0, 0)}, t)
    assert saved_state(tmp_path)["sampled_at"] == t
    for second in range(1, 60):
        ledger.update({"eth0": (second * 10, second)}, t + second)
    assert saved_state(tmp_path)["sampled_at"] == t
    ledger.update({"eth0": (600, 60)}, t + 60)
    assert saved_state(tmp_path)["sampled_at"] == t + 60 and saved_state(tmp_path)["total"] == {"up": 60, "down": 600}
    ledger.update({"eth0": (700, 70)}, t + 61)
    ledger.flush(t + 62)
    assert saved_state(tmp_path)["total"] == {"up": 70, "down": 700}
    assert list(tmp_path.iterdir()) == [tmp_path / ka.TRAFFIC_FILE]  # no temp files left


def test_unwritable_state_dir_is_reported_once_and_counting_goes_on(tmp_path, caplog):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    t = local(2024, 6, 5)
    ledger = ka.TrafficLedger(str(blocker / "state"), 1, boot=LONG_AGO, now=t)
    with caplog.at_level("WARNING", logger="komari"):
        ledger.update({"eth0": (100, 10)}, t)
        ledger.update({"eth0": (300, 20)}, t + 61)
        assert ledger.update({"eth0": (600, 40)}, t + 122) == (30, 500)
        ledger.flush(t + 123)
    assert sum("cannot save traffic" in r.getMessage() for r in caplog.records) == 1
    assert ledger.problem.startswith("traffic totals kept in memory only") and str(tmp_path) not in ledger.problem
    cfg, _ = ka.load_config(["--dry-run"], {})
    collector = ka.Collector(cfg)
    collector.traffic = ledger
    report = collector.report()
    assert report_problem(report) is None and ledger.problem in report["message"].splitlines()


def test_official_net_static_json_is_imported_once_for_this_period(tmp_path):
    t = local(2024, 6, 20, 12)
    official = tmp_path / "opt-komari"
    official.mkdir()
    # the official agent's store: one record per NIC per 10-minute flush, kept 31 days
    store = {"interfaces": {
        "eth0": [{"timestamp": int(local(2024, 5, 31, 23, 50)), "tx": 999, "rx": 999},
                 {"timestamp": int(local(2024, 6, 1, 0, 10)), "tx": 100, "rx": 1000},
                 {"timestamp": int(local(2024, 6, 20, 11, 50)), "tx": 200, "rx": 2000}],
        "wg0": [{"timestamp": int(local(2024, 6, 2)), "tx": 5, "rx": 7}],
        "docker0": [{"timestamp": int(local(2024, 6, 2)), "tx": 10 ** 9, "rx": 10 ** 9}]},
        "config": {"data_preserve_day": 31, "detect_interval": 2, "save_interval": 600, "nics": ["eth0", "wg0"]}}
    (official / ka.NET_STATIC).write_text(json.dumps(store, separators=(",", ":")))
    assert str(official / ka.NET_STATIC) in ka.net_static_candidates(cwd=str(official))
    candidates = [str(tmp_path / "nowhere" / ka.NET_STATIC), str(official / ka.NET_STATIC)]
    boot = ("b", local(2024, 6, 5))  # inside the period: the import already holds this boot's traffic
    ledger = ka.TrafficLedger(str(tmp_path / "state"), 1, counted=ka.nic_counted, import_candidates=candidates,
                              boot=boot, now=t)
    assert ledger.update({"eth0": (50000, 40000), "wg0": (10, 10)}, t) == (305, 3007)
    assert ledger.update({"eth0": (50010, 40001), "wg0": (10, 10)}, t + 1) == (306, 3017)
    again = ka.TrafficLedger(str(tmp_path / "state"), 1, counted=ka.nic_counted, boot=boot, now=t + 2,
                             import_path=str(official / ka.NET_STATIC), import_candidates=candidates)
    assert again.update({"eth0": (50010, 40001), "wg0": (10, 10)}, t + 2) == (306, 3017)


def test_sizes_are_1024_based_with_decimals():
    assert ka.parse_size("120G") == 120 * GiB and ka.parse_size("1.5T") == int(1.5 * TiB)
    assert ka.parse_size("512MiB") == 512 * 1024 ** 2 and ka.parse_size("2k") == 2048
    assert ka.parse_size("0.5 P") == 1024 ** 5 // 2 and ka.parse_size("1GB") == GiB and ka.parse_size("100") == 100
    for bad in ("", "-1G", "12X", "G", "1.2.3G", "1e3"):
        with pytest.raises(ValueError):
            ka.parse_size(bad)


def test_traffic_command_calibrates_and_shows_the_totals(tmp_path):
    now = time.time()
    ledger = ka.TrafficLedger(str(tmp_path), 1, boot=LONG_AGO, now=now)
    ledger.update({"eth0": (1000, 1000)}, now)
    ledger.update({"eth0": (2000, 1500)}, now + 1)
    done = run_agent("traffic", "--state-dir", str(tmp_path), "--set-up", "120G", "--set-down", "1.5T")
    assert done.returncode == 0, done.stderr
    assert ledger.update({"eth0": (2000, 1500)}, now + 5) == (120 * GiB, int(1.5 * TiB))
    assert ledger.update({"eth0": (2100, 1600)}, now + 6) == (120 * GiB + 100, int(1.5 * TiB) + 100)
    assert not (tmp_path / ka.CALIBRATION_FILE).exists()
    shown = run_agent("traffic", env={"AGENT_STATE_DIR": str(tmp_path)})  # --show is the default
    assert shown.returncode == 0, shown.stderr
    text = shown.stdout.decode()
    assert "(%d bytes)" % (120 * GiB) in text and "1.50 TiB" in text and "period start: " in text
    bad = run_agent("traffic", "--state-dir", str(tmp_path), "--set-up", "12X")
    assert bad.returncode == 2 and len(bad.stderr.decode().strip().splitlines()) == 1


def push_over_loopback(nbytes):
    """Send nbytes through a TCP connection on 127.0.0.1 (lo counts them as tx and rx)."""
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(1)
        with socket.create_connection(server.getsockname()) as client:
            conn, _ = server.accept()
            received = []

            def drain():
                total = 0
                while total < nbytes:
                    chunk = conn.recv(1 << 16)
                    if not chunk:
                        break
                    total += len(chunk)
                received.append(total)
            reader = threading.Thread(target=drain)
            reader.start()
            client.sendall(b"\0" * nbytes)
            reader.join(10)
            conn.close()
    assert received == [nbytes]


MONTHLY_LO = ("-i", "0.3", "--month-rotate", "1", "--include-nics", "lo")


def fresh_traffic_state(panel):
    """The panel's state directory without traffic files (a reused port must not inherit them)."""
    state = panel_state_dir(panel)
    for name in (ka.TRAFFIC_FILE, ka.CALIBRATION_FILE):
        if (state / name).exists():
            (state / name).unlink()
    return state


def test_running_agent_applies_a_calibration_and_saves_on_sigterm(panel, start_agent):
    state = fresh_traffic_state(panel)
    agent = start_agent(*MONTHLY_LO)
    panel.wait_for(lambda: panel.reports, 15, "first report")
    done = run_agent("traffic", "--state-dir", str(state), "--set-up", "120G", "--set-down", "1.5T")
    assert done.returncode == 0, done.stderr
    up, down = 120 * GiB, int(1.5 * TiB)
    report = panel.wait_for(lambda: next((r for r in panel.reports if r["network"]["totalUp"] >= up), None),
                            15, "a report with the calibrated totals")
    assert up <= report["network"]["totalUp"] < up + GiB and down <= report["network"]["totalDown"] < down + GiB
    assert panel.rejected == []
    shown = run_agent("traffic", "--show", "--state-dir", str(state)).stdout.decode()
    assert "120.00 GiB" in shown and "1.50 TiB" in shown
    saved_at = saved_state(state)["saved_at"]
    count = len(panel.reports)
    panel.wait_for(lambda: len(panel.reports) >= count + 2, 10, "two more reports")
    agent.proc.send_signal(signal.SIGTERM)
    assert agent.proc.wait(5) == 0
    assert saved_state(state)["saved_at"] > saved_at   # saved on the clean exit


def test_totals_continue_after_sigkill_and_restart_mid_period(panel, start_agent):
    state = fresh_traffic_state(panel)
    # far above what lo has carried since boot, so totals restarting from the raw counters would show
    done = run_agent("traffic", "--state-dir", str(state), "--set-up", "3T", "--set-down", "2T")
    assert done.returncode == 0, done.stderr
    first = start_agent(*MONTHLY_LO)
    panel.wait_for(lambda: len(panel.reports) >= 3, 15, "three reports")
    assert panel.reports[0]["network"]["totalUp"] >= 3 * TiB   # the waiting calibration applied at start
    os.killpg(first.proc.pid, signal.SIGKILL)
    first.proc.wait(5)
    before = panel.reports[-1]["network"]
    count = len(panel.reports)
    push_over_loopback(8 << 20)   # traffic while no agent runs still counts: the counters kept it
    second = start_agent(*MONTHLY_LO)
    after = panel.wait_for(lambda: len(panel.reports) > count and panel.reports[count], 15,
                           "a report from the restarted agent")["network"]
    assert before["totalUp"] + (8 << 20) <= after["totalUp"] < 3 * TiB + GiB
    assert before["totalDown"] + (8 << 20) <= after["totalDown"] < 2 * TiB + GiB
    assert "unreadable" not in second.log


# ---------------------------------------------------------------------------
# Transport
# ---------------------------------------------------------------------------

def test_backoff_grows_to_the_cap_with_jitter():
    assert ka.backoff_delay(5, 0, rng=lambda: 0.5) == 5
    assert ka.backoff_delay(5, 2, rng=lambda: 0.5) == 20
    assert ka.backoff_delay(5, 10, rng=lambda: 0.5) == 60
    assert ka.backoff_delay(5, 10, rng=lambda: 0.0) == 48 and ka.backoff_delay(5, 10, rng=lambda: 1.0) == 60
    assert ka.backoff_delay(5, 1, rng=lambda: 0.0) == 8


def test_basic_info_upload_retries_without_newer_keys(panel):
    cfg, _ = ka.load_config(["-e", panel.endpoint, "-t", panel.token], {})
    original = PanelHandler.do_POST

    def old_server(handler):
        # a panel from before kernel_version existed answers 500 to it
        length = int(handler.headers.get("Content-Length") or 0)
        body = handler.rfile.read(length)
        handler.rfile = __import__("io").BytesIO(body)
        if b"kernel_version" in body:
            return handler.reply(500, {"status": "error", "error": {}})
        return original(handler)
    PanelHandler.do_POST = old_server
    try:
        ka.upload_basic_info(ka.Panel(cfg), {"os": "x", "kernel_version": "6", "cpu_physical_cores": 2,
                                             "cpu_cores": 4})
    finally:
        PanelHandler.do_POST = original
    assert panel.basic_infos == [{"os": "x", "cpu_cores": 4}]


def test_http_refusals_are_explained(panel):
    cfg, _ = ka.load_config(["-e", panel.endpoint, "-t", "wrong"], {})
    with pytest.raises(ka.PanelRefused) as refused:
        ka.Panel(cfg).post_json("/api/clients/uploadBasicInfo", {})
    assert refused.value.status == 401 and "token" in ka.explain_refusal(refused.value, "x")
    panel.fail_http["/api/clients/task/result"] = 502
    cfg, _ = ka.load_config(["-e", panel.endpoint, "-t", panel.token], {})
    with pytest.raises(ka.PanelRefused) as refused:
        ka.Panel(cfg).post_json("/api/clients/task/result", {"task_id": "a"})
    assert refused.value.status == 502 and "502 Bad Gateway" in str(refused.value)


def test_websocket_dial_sends_no_origin_and_reads_frames(panel):
    cfg, _ = ka.load_config(["-e", panel.endpoint, "-t", panel.token], {})
    received = []
    link = ka.ReportLink(ka.open_websocket(cfg, ka.Panel(cfg).ws_url("/api/clients/report")),
                         lambda link, data: received.append(data))
    link.start()
    try:
        link.send_text(ka.encode({"cpu": {"usage": 1.5}}))
        panel.wait_for(lambda: panel.reports, 5, "the report")
        assert "Origin" not in panel.ws_attempts[-1][1]
        panel.send_event({"message": "hello"})
        deadline = time.monotonic() + 5
        while not received and time.monotonic() < deadline:
            link.dead.wait(0.05)
        assert json.loads(received[0]) == {"message": "hello"}
        link.send_ping()
        while link.last_heard < link.ping_sent and time.monotonic() < deadline:
            link.dead.wait(0.05)
        assert link.last_heard >= link.ping_sent  # the pong came back
    finally:
        link.close()


def test_wrong_path_dial_is_reported_as_a_wrong_endpoint(panel):
    cfg, _ = ka.load_config(["-e", panel.endpoint + "/komari", "-t", panel.token], {})
    with pytest.raises(Exception) as failed:
        ka.open_websocket(cfg, ka.Panel(cfg).ws_url("/api/clients/report"))
    assert "check --endpoint" in ka.handshake_problem(failed.value)


def test_malformed_frames_are_skipped_by_the_parser(caplog):
    assert ka.parse_event(b"\xff\xfe") is None
    assert ka.parse_event(b"[1,2]") is None
    assert ka.parse_event(b"[" * 100000) is None
    assert ka.parse_event(b'{"message":"exec"}') == {"message": "exec"}


# ---------------------------------------------------------------------------
# The agent loop, end to end
# ---------------------------------------------------------------------------

def test_agent_uploads_basic_info_and_reports_at_pace(panel, start_agent):
    agent = start_agent("-i", "0.5")
    info = panel.wait_for(lambda: panel.basic_infos and panel.basic_infos[0], 15, "basic info")
    assert basic_info_problem(info) is None
    assert set(info) == set(BASIC_INFO_KEYS)
    assert info["ipv4"] == "192.0.2.7" and info["mem_total"] == psutil.virtual_memory().total
    assert info["cpu_cores"] == psutil.cpu_count() and info["version"] == ka.__version__
    panel.wait_for(lambda: len(panel.reports) >= 7, 15, "seven reports")
    gaps = sorted(b["_at"] - a["_at"] for a, b in zip(panel.reports[1:], panel.reports[2:7]))
    assert 0.3 <= gaps[len(gaps) // 2] <= 0.8, gaps
    assert panel.rejected == []
    report = panel.reports[-1]
    assert report["ram"]["total"] == psutil.virtual_memory().total
    assert 0.001 <= report["cpu"]["usage"] <= 100
    assert TOKEN not in agent.log


def test_agent_reconnects_after_a_panel_restart_and_resends_info(panel, start_agent):
    start_agent("-i", "0.5")
    panel.wait_for(lambda: panel.reports and panel.basic_infos, 15, "first report and info")
    infos_before = len(panel.basic_infos)
    panel.stop()
    reports_before = len(panel.reports)
    panel.start()
    panel.wait_for(lambda: len(panel.report_conns) >= 2 and len(panel.reports) > reports_before + 1, 20,
                   "reports on a second connection")
    panel.wait_for(lambda: len(panel.basic_infos) > infos_before, 10, "basic info after the reconnect")


def test_agent_notices_a_dead_link_and_reconnects(panel, start_agent):
    start_agent("-i", "1")
    panel.wait_for(lambda: panel.reports, 15, "first report")
    attempts = len(panel.ws_attempts)
    # the frozen socket stays open and silent: only the agent's pong deadline can notice
    panel.freeze()
    panel.wait_for(lambda: len(panel.ws_attempts) > attempts, 45, "a new connection within 45 s")
    panel.thaw()
    reports = len(panel.reports)
    panel.wait_for(lambda: len(panel.reports) > reports, 15, "reports on the new socket")


def test_wrong_token_is_logged_clearly_without_a_busy_loop(panel, start_agent):
    agent = start_agent("-i", "0.5", token="not-the-token")
    agent.wait_log("refused the token", 15)
    attempts = len(panel.ws_attempts)
    time.sleep(3)
    assert len(panel.ws_attempts) - attempts <= 3
    assert "not-the-token" not in agent.log
    assert agent.proc.poll() is None


def test_bad_frames_are_logged_and_reports_continue(panel, start_agent):
    agent = start_agent("-i", "0.3")
    panel.wait_for(lambda: panel.reports, 15, "first report")
    for frame in (b"\x00\xffnot json", "[1,2,3]", "null", '{"message": 12}', '{"message":"exec","task_id":5}',
                  '{"status":"error","error":"Invalid report format"}',
                  '{"status":"error","error":"Invalid report format"}', "{" * 5000):
        panel.send_event(frame)
    count = len(panel.reports)
    panel.wait_for(lambda: len(panel.reports) >= count + 5, 10, "reports after the bad frames")
    assert agent.log.count("Invalid report format") == 1
    assert "not JSON" in agent.log
    assert len(panel.report_conns) == 1


def test_sigterm_exits_cleanly_within_two_seconds(panel, start_agent):
    agent = start_agent("-i", "0.5")
    panel.wait_for(lambda: panel.reports, 15, "first report")
    started = time.monotonic()
    agent.proc.send_signal(signal.SIGTERM)
    assert agent.proc.wait(5) == 0
    assert time.monotonic() - started < 2.0


# ---------------------------------------------------------------------------
# main()
# ---------------------------------------------------------------------------

def test_dry_run_prints_exactly_what_would_be_sent():
    done = run_agent("--dry-run", "--custom-ipv4", "198.51.100.1", "--custom-ipv6", "2001:db8::1")
    assert done.returncode == 0, done.stderr
    lines = done.stdout.decode().splitlines()
    assert len(lines) == 2
    info, report = go_json(lines[0]), go_json(lines[1])
    assert basic_info_problem(info) is None and set(info) == set(BASIC_INFO_KEYS)
    assert info["ipv4"] == "198.51.100.1"
    assert report_problem(report) is None
    for group, keys in REPORT_INTS.items():
        assert all(is_go_int(report[group][k]) for k in keys)
