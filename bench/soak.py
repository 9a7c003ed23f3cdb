#!/usr/bin/env python3
"""Soak: does a Komari agent lose task results while its panel keeps dying?

Runs a loopback panel (the protocol of README.md, "What is sent": basic info and task result POSTs, the
report WebSocket, and protocol v2's JSON-RPC socket unless --protocol 1) on a
fixed port, starts the agent against it, sends an exec event every few seconds
on its report socket (an `agent.exec` notification on a v2 socket, compressed
when deflate was agreed) and restarts the panel on a schedule: listener and
every open connection closed, down a while, then up again on the same port.
At the end it waits for the results still owed, stops the agent with SIGTERM
and prints what was lost, what came back wrong, and how the agent's memory
moved.

    python3 bench/soak.py                     # 10 minutes, restart every 30 s, down 5 s
    python3 bench/soak.py --minutes 1 --restart-every 10 --down 2 --exec-every 1 --json
    python3 bench/soak.py --protocol 1        # a panel older than v2: the agent falls back to v1

Exit status 0 when no result was lost or wrong and the agent ran throughout.
Stdlib only; Linux (it reads /proc). Shares the sink and the /proc sampling
with bench/footprint.py.
"""

import argparse
import json
import secrets
import shlex
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from urllib.parse import urlsplit

sys.path.insert(0, str(Path(__file__).resolve().parent))
import footprint  # noqa: E402  (beside this file, not installed)

RESULT_PATH = "/api/clients/task/result"
# No exec goes out this close to a planned panel stop: an event the panel
# wrote into a socket it then tears down may never reach the agent, and that
# loss would be the panel's, not the agent's.
QUIET_BEFORE_STOP = 1.0


# ---------------------------------------------------------------------------
# The panel: footprint's sink, plus exec results by task id and events out
# ---------------------------------------------------------------------------

class Ledger(footprint.Tally):
    """Everything the panel saw over all its lives, for one agent."""

    def __init__(self):
        super().__init__()
        self.life = 0        # which life of the panel this is (0, 1, ... one per restart)
        self.sent = {}       # task_id -> (expected output, life it was sent in)
        self.results = {}    # task_id -> [(result, exit_code), ...] in arrival order
        self.carried = 0     # results that arrived in a later life than their exec was sent in
        self.v2_sockets = 0  # report sockets that spoke protocol v2

    def take_result(self, body):
        task = str(body.get("task_id"))
        with self.lock:
            self.task_results += 1
            if task in self.sent and task not in self.results and self.sent[task][1] != self.life:
                self.carried += 1
            self.results.setdefault(task, []).append((body.get("result"), body.get("exit_code")))

    def owed(self):
        with self.lock:
            return [task for task in self.sent if task not in self.results]


class LockedWriter:
    """A socket writer that the handler (pongs, replies) and the event sender share."""

    def __init__(self, raw):
        self.raw, self.lock = raw, threading.RLock()

    def write(self, data):
        with self.lock:
            return self.raw.write(data)

    def __getattr__(self, name):
        return getattr(self.raw, name)


class PanelHandler(footprint.SinkHandler):
    def setup(self):
        super().setup()
        self.server.track(self.connection)

    def finish(self):
        try:
            super().finish()
        finally:
            self.server.untrack(self.connection)

    def do_POST(self):
        if urlsplit(self.path).path != RESULT_PATH:
            return super().do_POST()
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        ledger = self.tally()
        if ledger is None:
            return self.reply(401, {"status": "error", "message": "Unauthorized."})
        try:
            obj = json.loads(body.decode("utf-8"))
        except ValueError:
            obj = None
        if not isinstance(obj, dict):
            return self.reply(400, {"status": "error", "message": "Invalid JSON"})
        ledger.take_result(obj)
        self.reply(200, {"status": "success"})

    def serve_websocket(self, tally):
        self.serve_link(None, False, super().serve_websocket, tally)

    def serve_rpc_socket(self, tally, deflate):
        with tally.lock:
            tally.v2_sockets += 1
        self.serve_link(deflate, True, super().serve_rpc_socket, tally, deflate)

    def serve_link(self, deflate, v2, serve, *args):
        """Serve one report socket while the soak may write events into it."""
        self.wfile = LockedWriter(self.wfile)
        link = (self, deflate, v2)
        self.server.links.append(link)
        try:
            serve(*args)
        finally:
            self.server.links.remove(link)

    def send_text(self, data, deflate):
        # compressing and writing are one step: events and replies share the
        # socket and its deflate state
        with self.wfile.lock:
            super().send_text(data, deflate)


class Panel(footprint.Sink):
    """One life of the panel on a fixed port; stop() ends it the hard way."""

    allow_reuse_address = True

    def __init__(self, port, token, ledger, serves_v2):
        super().__init__(port, PanelHandler, serves_v2)
        self.tallies[token] = ledger
        self.links = []
        self.conns_lock = threading.Lock()
        self.conns = set()
        threading.Thread(target=self.serve_forever, daemon=True).start()

    def track(self, conn):
        with self.conns_lock:
            self.conns.add(conn)

    def untrack(self, conn):
        with self.conns_lock:
            self.conns.discard(conn)

    def send_exec(self, task, command):
        """Write one exec event to the newest report socket in its protocol;
        False if there is none."""
        for handler, deflate, v2 in reversed(list(self.links)):
            event = {"jsonrpc": "2.0", "method": "agent.exec", "params": {"task_id": task, "command": command}} \
                if v2 else {"message": "exec", "task_id": task, "command": command}
            try:
                handler.send_text(json.dumps(event).encode(), deflate)
                return True
            except OSError:
                continue
        return False

    def stop(self):
        self.shutdown()
        self.server_close()
        with self.conns_lock:
            conns = list(self.conns)
        for conn in conns:
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            conn.close()


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ---------------------------------------------------------------------------
# The soak: panel restarts and execs on one clock, memory sampled throughout
# ---------------------------------------------------------------------------

class Soak:
    def __init__(self, args):
        self.args = args
        self.port = free_port()
        self.token = secrets.token_hex(12)
        self.ledger = Ledger()
        self.panel = None
        self.restarts = 0
        self.not_sent = 0         # exec ticks that found no report socket open
        self.reconnect_lags = []  # seconds from panel up to the agent's next report socket
        self.rss_kb = []

    def panel_up(self):
        self.panel = Panel(self.port, self.token, self.ledger, serves_v2=self.args.protocol == 2)
        with self.ledger.lock:
            self.ledger.life = self.restarts
        return time.monotonic()

    def agent_argv(self, state_dir):
        return shlex.split(self.args.agent) + [
            "-e", "http://127.0.0.1:%d" % self.port, "-t", self.token, "--interval", "1",
            "--reconnect-interval", "1", "--state-dir", state_dir]

    def send_exec(self):
        """An exec that takes 0 to --exec-length s, so that some finish while
        the panel is down and have to wait in the agent's spool."""
        n = len(self.ledger.sent) + 1
        task = "soak-%d" % n
        command = "sleep %.1f; echo soak-%d" % ((n * 0.7) % self.args.exec_length, n)
        with self.ledger.lock:
            self.ledger.sent[task] = ("soak-%d\n" % n, self.ledger.life)
        if not self.panel.send_exec(task, command):
            with self.ledger.lock:
                del self.ledger.sent[task]
            self.not_sent += 1

    def sample(self, proc):
        # The agent alone: its exec children come and go and are not its memory.
        self.rss_kb.append(footprint.status_kb(proc.pid)["VmRSS"])

    def run(self, proc, out):
        args = self.args
        up_at = self.panel_up()
        if not footprint.wait_until(lambda: self.ledger.reports > 0, up_at + args.start_timeout, proc):
            raise footprint.RunFailed("agent sent no report within %g s; its output:\n%s"
                                      % (args.start_timeout, footprint.log_tail(out)))
        self.sample(proc)
        start = time.monotonic()
        end = start + args.minutes * 60
        next_exec, next_stop, next_sample = start, start + args.restart_every, start + 10
        lag_from = None
        while time.monotonic() < end:
            if proc.poll() is not None:
                raise footprint.RunFailed("agent exited with code %s; its output:\n%s"
                                          % (proc.returncode, footprint.log_tail(out)))
            now = time.monotonic()
            if lag_from is not None and self.panel.links:
                self.reconnect_lags.append(now - lag_from)
                lag_from = None
            if now >= next_stop:
                self.panel.stop()
                self.restarts += 1
                time.sleep(args.down)
                lag_from = self.panel_up()
                next_stop = lag_from + args.restart_every
                next_exec = max(next_exec, lag_from)
            elif now >= next_exec:
                if next_stop - now > QUIET_BEFORE_STOP:
                    self.send_exec()
                next_exec += args.exec_every
            if now >= next_sample:
                self.sample(proc)
                next_sample += 10
            time.sleep(0.05)
        grace_end = time.monotonic() + args.grace
        footprint.wait_until(lambda: not self.ledger.owed(), grace_end, proc)
        self.sample(proc)
        return self.stop_agent(proc)

    def stop_agent(self, proc):
        """SIGTERM; the agent promises to be gone within 2 s with status 0."""
        t0 = time.monotonic()
        footprint.signal_group(proc, signal.SIGTERM)
        try:
            code = proc.wait(10)
        except subprocess.TimeoutExpired:
            code = None
        return code, time.monotonic() - t0

    def summary(self, exit_code, exit_s):
        ledger = self.ledger
        with ledger.lock:
            wrong = sorted(task for task, got in ledger.results.items()
                           if task in ledger.sent and any(got_one != (ledger.sent[task][0], 0) for got_one in got))
            unasked = sorted(task for task in ledger.results if task not in ledger.sent)
            duplicates = sum(len(got) - 1 for got in ledger.results.values())
            received = sum(1 for task in ledger.sent if task in ledger.results)
            sent = len(ledger.sent)
        rss = self.rss_kb
        lags = self.reconnect_lags
        return {
            "settings": {"protocol": self.args.protocol, "minutes": self.args.minutes, "restart_every": self.args.restart_every,
                         "down": self.args.down, "exec_every": self.args.exec_every,
                         "exec_length": self.args.exec_length, "grace": self.args.grace},
            "agent": self.args.agent,
            "restarts": self.restarts,
            "execs_sent": sent,
            "execs_not_sent": self.not_sent,
            "results_received": received,
            "results_lost": sent - received,
            "results_wrong": len(wrong) + len(unasked),
            "results_duplicated": duplicates,
            "results_carried_over_outage": ledger.carried,
            "lost": [task for task in ledger.sent if task not in ledger.results][:20],
            "wrong": (wrong + unasked)[:20],
            "reports": ledger.reports,
            "report_sockets": ledger.connections,
            "v2_sockets": ledger.v2_sockets,
            "info_uploads": ledger.info_uploads,
            "bad_frames": ledger.bad_frames,
            "reconnect_s_max": round(max(lags), 2) if lags else None,
            "reconnect_s_avg": round(sum(lags) / len(lags), 2) if lags else None,
            "rss_first_mb": round(rss[0] / 1024.0, 2),
            "rss_last_mb": round(rss[-1] / 1024.0, 2),
            "rss_peak_mb": round(max(rss) / 1024.0, 2),
            "rss_growth_mb": round((rss[-1] - rss[0]) / 1024.0, 2),
            "sigterm_exit_code": exit_code,
            "sigterm_exit_s": round(exit_s, 2),
        }


def passed(result):
    return (result["results_lost"] == 0 and result["results_wrong"] == 0
            and result["sigterm_exit_code"] == 0)


def table(result):
    s = result["settings"]
    rows = [
        ("agent", result["agent"]),
        ("soak", "%g min, panel (protocol %s) restarted every %g s (down %g s), an exec every %g s taking up to %g s"
         % (s["minutes"], "v2 and v1" if s["protocol"] == 2 else "v1 only", s["restart_every"], s["down"], s["exec_every"], s["exec_length"])),
        ("panel restarts", result["restarts"]),
        ("execs sent", "%d (%d ticks found no socket open)" % (result["execs_sent"], result["execs_not_sent"])),
        ("results received", "%d (%d finished or were sent while the panel was down; %d duplicates, "
                              "harmless: the panel overwrites)"
         % (result["results_received"], result["results_carried_over_outage"], result["results_duplicated"])),
        ("results lost", "%d %s" % (result["results_lost"], " ".join(result["lost"]))),
        ("results wrong", "%d %s" % (result["results_wrong"], " ".join(result["wrong"]))),
        ("reports", "%d over %d report sockets (%d of them v2), %d basic info uploads"
         % (result["reports"], result["report_sockets"], result["v2_sockets"], result["info_uploads"])),
        ("back online after", "avg %s s, max %s s after the panel came up"
         % (result["reconnect_s_avg"], result["reconnect_s_max"])),
        ("RSS", "%.1f MB first, %.1f MB last, %.1f MB peak: growth %+.2f MB"
         % (result["rss_first_mb"], result["rss_last_mb"], result["rss_peak_mb"], result["rss_growth_mb"])),
        ("SIGTERM", "exit code %s after %.2f s" % (result["sigterm_exit_code"], result["sigterm_exit_s"])),
        ("verdict", "PASS" if passed(result) else "FAIL"),
    ]
    width = max(len(k) for k, _ in rows)
    return "\n".join("%s  %s" % (k.ljust(width), v) for k, v in rows)


def parse_args(argv):
    p = argparse.ArgumentParser(description="Lost task results and memory growth of a Komari agent "
                                            "whose panel keeps restarting.")
    p.add_argument("--agent", default="%s %s" % (shlex.quote(sys.executable),
                                                 shlex.quote(str(footprint.REPO / "komari_agent.py"))),
                   help="agent command; -e URL -t TOKEN --interval 1 --reconnect-interval 1 --state-dir DIR "
                        "are appended (default: this repo's agent)")
    p.add_argument("--protocol", type=int, choices=(1, 2), default=2,
                   help="2: the panel serves protocol v2 beside v1, as the real server (default); 1: v1 only, "
                        "as a server older than v2, so that the agent falls back")
    p.add_argument("--minutes", type=float, default=10.0, help="length of the soak (default 10)")
    p.add_argument("--restart-every", type=float, default=30.0, help="seconds between panel restarts (default 30)")
    p.add_argument("--down", type=float, default=5.0, help="seconds the panel stays down each time (default 5)")
    p.add_argument("--exec-every", type=float, default=2.0, help="seconds between exec events (default 2)")
    p.add_argument("--exec-length", type=float, default=4.0,
                   help="execs sleep from 0 up to this many seconds before they answer (default 4)")
    p.add_argument("--grace", type=float, default=90.0,
                   help="seconds to wait at the end for results still owed (default 90)")
    p.add_argument("--start-timeout", type=float, default=60.0, help="seconds to wait for the first report (default 60)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    args = p.parse_args(argv)
    if args.minutes <= 0 or args.restart_every <= args.down or args.down < 0 or args.exec_every <= 0 \
            or args.exec_length <= 0:
        p.error("need --minutes > 0, --restart-every > --down >= 0, --exec-every > 0, --exec-length > 0")
    return args


def main(argv=None):
    args = parse_args(argv)
    soak = Soak(args)
    with tempfile.TemporaryDirectory(prefix="komari-soak-") as state_dir, tempfile.TemporaryFile() as out:
        proc = subprocess.Popen(soak.agent_argv(state_dir), stdin=subprocess.DEVNULL, stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True)
        try:
            exit_code, exit_s = soak.run(proc, out)
        except footprint.RunFailed as e:
            print("soak: %s" % e, file=sys.stderr)
            return 1
        finally:
            footprint.stop(proc)
            if soak.panel is not None:
                soak.panel.stop()
    result = soak.summary(exit_code, exit_s)
    print(json.dumps(result, indent=2) if args.json else table(result))
    return 0 if passed(result) else 1


if __name__ == "__main__":
    sys.exit(main())
