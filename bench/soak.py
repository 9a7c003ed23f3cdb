#!/usr/bin/env python3
"""Soak: does a Komari agent lose task results while its panel keeps dying?

Runs the loopback panel of bench/loopback.py (the protocol of README.md, "What
is sent": basic info and task result POSTs, the report WebSocket, and protocol
v2's JSON-RPC socket unless --protocol 1), starts the agent against it, sends
an exec every few seconds the way the server routes one (on the report socket:
an `agent.exec` notification on a v2 socket, compressed when deflate was
agreed, or the legacy frame where the server's flag still says v1) and
restarts the panel on a schedule: listener and every open connection closed,
down a while, then up again on the same port. At the end it waits for the
results still owed, stops the agent with SIGTERM and prints what was lost,
what came back wrong, and how the agent's memory moved.

    python3 bench/soak.py                     # 10 minutes, restart every 30 s, down 5 s
    python3 bench/soak.py --minutes 1 --restart-every 10 --down 2 --exec-every 1 --json
    python3 bench/soak.py --protocol 1        # a panel older than v2: the agent falls back to v1

Exit status 0 when no result was lost or wrong and the agent ran throughout.
Stdlib only; Linux (it reads /proc). Shares the /proc sampling with
bench/footprint.py.
"""

import argparse
import bisect
import json
import shlex
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import footprint  # noqa: E402  (beside this file, not installed)
import loopback  # noqa: E402

# No exec goes out this close to a planned panel stop: an event the panel
# wrote into a socket it then tears down may never reach the agent, and that
# loss would be the panel's, not the agent's.
QUIET_BEFORE_STOP = 1.0

# The goals beside the verdict: back on the report socket this soon after the
# panel returns, and RSS at the end no more than this above its level at
# RSS_SETTLED_S into the soak (start-up and first links are over by then).
SOCKET_BACK_GOAL_S = 1.0
RSS_GROWTH_GOAL_MB = 1.0
RSS_SETTLED_S = 600.0


# ---------------------------------------------------------------------------
# The soak: panel restarts and execs on one clock, memory sampled throughout
# ---------------------------------------------------------------------------

class Soak:
    def __init__(self, args):
        self.args = args
        self.panel = loopback.PanelServer(serves_v2=args.protocol == 2)  # its lists outlive its restarts
        self.lives = [time.monotonic()]  # when each life of the panel began (one per restart after the first)
        self.sent = {}            # task_id -> (expected output, life of the panel it was sent in)
        self.not_sent = 0         # exec ticks that found no report socket open
        self.reconnect_lags = []  # seconds from panel up to the agent's next report socket
        self.rss_kb = []          # (seconds into the soak, VmRSS kB)
        self.started = None
        self.runs_log = None      # every exec appends its task id here when it runs: a run twice shows

    def agent_argv(self, state_dir):
        return shlex.split(self.args.agent) + [
            "-e", self.panel.endpoint, "-t", self.panel.token, "--interval", "1",
            "--reconnect-interval", "1", "--state-dir", state_dir]

    def send_exec(self):
        """An exec that takes 0 to --exec-length s, so that some finish while
        the panel is down and have to wait in the agent's spool."""
        n = len(self.sent) + 1
        task = "soak-%d" % n
        command = "echo %s >> %s; sleep %.1f; echo soak-%d" % (
            task, shlex.quote(self.runs_log), (n * 0.7) % self.args.exec_length, n)
        if self.panel.exec_task(task, command) is None:
            self.not_sent += 1
        else:
            self.sent[task] = ("soak-%d\n" % n, len(self.lives) - 1)

    def results(self):
        """task_id -> [(result, exit_code, life of the panel it arrived in), ...] in arrival order."""
        out = {}
        for result in list(self.panel.task_results):
            life = bisect.bisect_right(self.lives, result["_at"]) - 1
            out.setdefault(str(result.get("task_id")), []).append((result.get("result"), result.get("exit_code"), life))
        return out

    def owed(self):
        results = self.results()
        return [task for task in self.sent if task not in results]

    def sample(self, proc):
        # The agent alone: its exec children come and go and are not its memory.
        at = time.monotonic() - self.started if self.started else 0.0
        self.rss_kb.append((at, footprint.status_kb(proc.pid)["VmRSS"]))

    def runs(self):
        """task_id -> how many times its command ran."""
        counts = {}
        try:
            for line in Path(self.runs_log).read_text().split():
                counts[line] = counts.get(line, 0) + 1
        except OSError:
            pass
        return counts

    def links(self):
        """(links, lives of the panel with POST reports): per life, each
        report socket is a link, and POST mode is one only when no socket
        followed it in that life (a socket taking over from POST mode is the
        same link: the agent sends basic info once for both). Basic info is
        also sent every --info-report-interval (5 min) on a link that lives
        that long: restart the panel more often than that to count links."""
        sockets = [0] * len(self.lives)
        posted = [False] * len(self.lives)
        for conn in list(self.panel.report_conns):
            sockets[bisect.bisect_right(self.lives, conn.opened_at) - 1] += 1
        for report in list(self.panel.reports):
            if report.get("_via") == "v2-post":
                posted[bisect.bisect_right(self.lives, report["_at"]) - 1] = True
        return (sum(n or int(post) for n, post in zip(sockets, posted)), sum(posted))

    def rss_goal(self):
        """(RSS at RSS_SETTLED_S into the soak, growth since) in kB, or None for a shorter soak."""
        settled = next((kb for at, kb in self.rss_kb if at >= RSS_SETTLED_S), None)
        if settled is None or self.rss_kb[-1][0] < RSS_SETTLED_S * 1.5:
            return None
        return settled, self.rss_kb[-1][1] - settled

    def run(self, proc, out):
        args = self.args
        if not footprint.wait_until(lambda: self.panel.reports, time.monotonic() + args.start_timeout, proc):
            raise footprint.RunFailed("agent sent no report within %g s; its output:\n%s"
                                      % (args.start_timeout, footprint.log_tail(out)))
        start = self.started = time.monotonic()
        self.sample(proc)
        end = start + args.minutes * 60
        next_exec, next_stop, next_sample = start, start + args.restart_every, start + 10
        lag_from = None
        while time.monotonic() < end:
            if proc.poll() is not None:
                raise footprint.RunFailed("agent exited with code %s; its output:\n%s"
                                          % (proc.returncode, footprint.log_tail(out)))
            now = time.monotonic()
            if lag_from is not None and self.panel.live_report_conn():
                self.reconnect_lags.append(now - lag_from)
                lag_from = None
            if now >= next_stop:
                self.panel.stop()
                time.sleep(args.down)
                self.panel.start()
                lag_from = time.monotonic()
                self.lives.append(lag_from)
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
        footprint.wait_until(lambda: not self.owed(), grace_end, proc)
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
        sent, results, panel = self.sent, self.results(), self.panel
        wrong = sorted(task for task, got in results.items()
                       if task in sent and any((text, code) != (sent[task][0], 0) for text, code, _ in got))
        unasked = sorted(task for task in results if task not in sent)
        received = sum(1 for task in sent if task in results)
        rss = [kb for _, kb in self.rss_kb]
        lags = self.reconnect_lags
        runs = self.runs()
        links, post_lives = self.links()
        settled = self.rss_goal()
        return {
            "settings": {"protocol": self.args.protocol, "minutes": self.args.minutes, "restart_every": self.args.restart_every,
                         "down": self.args.down, "exec_every": self.args.exec_every,
                         "exec_length": self.args.exec_length, "grace": self.args.grace},
            "agent": self.args.agent,
            "restarts": len(self.lives) - 1,
            "execs_sent": len(sent),
            "execs_not_sent": self.not_sent,
            "results_received": received,
            "results_lost": len(sent) - received,
            "results_wrong": len(wrong) + len(unasked),
            "results_duplicated": sum(len(got) - 1 for got in results.values()),
            "runs_twice": sorted(task for task, count in runs.items() if count > 1)[:20],
            "runs_missing": sum(1 for task in sent if task not in runs),
            # results whose first copy arrived in a later life of the panel than their exec went out in
            "results_carried_over_outage": sum(1 for task, got in results.items()
                                               if task in sent and got[0][2] != sent[task][1]),
            "lost": [task for task in sent if task not in results][:20],
            "wrong": (wrong + unasked)[:20],
            "reports": len(panel.reports),
            "report_sockets": len(panel.report_conns),
            "v2_sockets": sum(1 for conn in list(panel.report_conns) if conn.protocol == 2),
            "info_uploads": len(panel.basic_infos),
            "links": links,
            "lives_with_post_reports": post_lives,
            "bad_frames": len(panel.rejected),  # whatever the panel refused, as the Go server would
            "reconnect_s_max": round(max(lags), 2) if lags else None,
            "reconnect_s_avg": round(sum(lags) / len(lags), 2) if lags else None,
            "reconnects": len(lags),  # outages the soak saw end (the last may not have)
            "reconnects_slow": sum(1 for lag in lags if lag > SOCKET_BACK_GOAL_S),
            "rss_first_mb": round(rss[0] / 1024.0, 2),
            "rss_last_mb": round(rss[-1] / 1024.0, 2),
            "rss_peak_mb": round(max(rss) / 1024.0, 2),
            "rss_growth_mb": round((rss[-1] - rss[0]) / 1024.0, 2),
            "rss_settled_mb": round(settled[0] / 1024.0, 2) if settled else None,
            "rss_growth_since_settled_mb": round(settled[1] / 1024.0, 2) if settled else None,
            "sigterm_exit_code": exit_code,
            "sigterm_exit_s": round(exit_s, 2),
        }


def passed(result):
    return (result["results_lost"] == 0 and result["results_wrong"] == 0 and not result["runs_twice"]
            and result["sigterm_exit_code"] == 0)


def goals(result):
    """The reliability goals, each (text, met): a soak can pass and still miss one."""
    out = [("back on the report socket within %g s of the panel's return: %d of %d outages"
            % (SOCKET_BACK_GOAL_S, result["reconnects"] - result["reconnects_slow"], result["reconnects"]),
            result["reconnects_slow"] == 0 and result["reconnects"] > 0),
           ("one basic info upload per link: %d uploads for %d links (%d report sockets; POST mode "
            "reported in %d lives of the panel)" % (result["info_uploads"], result["links"],
                                                    result["report_sockets"], result["lives_with_post_reports"]),
            result["info_uploads"] == result["links"])]
    if result["rss_settled_mb"] is not None:
        out.append(("RSS within %g MB of its level at %d min: %.2f MB then, %+.2f MB at the end"
                    % (RSS_GROWTH_GOAL_MB, RSS_SETTLED_S / 60, result["rss_settled_mb"],
                       result["rss_growth_since_settled_mb"]),
                    result["rss_growth_since_settled_mb"] <= RSS_GROWTH_GOAL_MB))
    return out


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
        ("run twice", "%d %s (%d never ran)" % (len(result["runs_twice"]), " ".join(result["runs_twice"]),
                                                result["runs_missing"])),
        ("reports", "%d over %d report sockets (%d of them v2), %d basic info uploads"
         % (result["reports"], result["report_sockets"], result["v2_sockets"], result["info_uploads"])),
        ("back online after", "avg %s s, max %s s after the panel came up"
         % (result["reconnect_s_avg"], result["reconnect_s_max"])),
        ("RSS", "%.1f MB first, %.1f MB last, %.1f MB peak: growth %+.2f MB"
         % (result["rss_first_mb"], result["rss_last_mb"], result["rss_peak_mb"], result["rss_growth_mb"])),
        ("SIGTERM", "exit code %s after %.2f s" % (result["sigterm_exit_code"], result["sigterm_exit_s"])),
        ("verdict", "PASS" if passed(result) else "FAIL"),
    ] + [("goal", "%s %s" % ("met   " if met else "MISSED", text)) for text, met in goals(result)]
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
        soak.runs_log = str(Path(state_dir) / "soak-runs.log")
        proc = subprocess.Popen(soak.agent_argv(state_dir), stdin=subprocess.DEVNULL, stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True)
        try:
            exit_code, exit_s = soak.run(proc, out)
        except footprint.RunFailed as e:
            print("soak: %s" % e, file=sys.stderr)
            return 1
        finally:
            footprint.stop(proc)
            soak.panel.stop()
        result = soak.summary(exit_code, exit_s)  # before the runs log goes with the directory
    result["goals"] = [{"goal": text, "met": met} for text, met in goals(result)]
    print(json.dumps(result, indent=2) if args.json else table(result))
    return 0 if passed(result) else 1


if __name__ == "__main__":
    sys.exit(main())
