#!/usr/bin/env python3
"""Footprint of a Komari agent: CPU per report, memory, threads, bytes on the wire.

Starts the loopback panel of bench/loopback.py (the one the tests run against:
basic info and task result POSTs, the report WebSocket, protocol v2's JSON-RPC
over a permessage-deflate WebSocket or gzip POST), runs an agent against it at
--interval 1, and measures the agent's whole process tree from /proc while it
reports.

    python3 bench/footprint.py --seconds 60
    python3 bench/footprint.py --vs '/usr/local/bin/komari-agent --disable-auto-update' --rounds 3
    python3 bench/footprint.py --sockets 5000 --json
    python3 bench/footprint.py --installed --rounds 2    # as a script vs as install.sh starts it
    python3 bench/footprint.py --wire --seconds 60

--wire runs the agent once per link (v1, v2 WebSocket, v2 POST, and the v2
WebSocket against a server that keeps the deflate context) through a TCP
proxy that counts every byte both ways, and prints bytes and CPU per report
side by side. The real server (gorilla) answers any deflate offer with "no
context takeover", so "v2-ws" is what a real panel gets.

Stdlib only; Linux (it reads /proc).
"""

import argparse
import json
import math
import os
import resource
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import loopback  # noqa: E402  (beside this file, not installed)

REPO = Path(__file__).resolve().parent.parent
CLK_TCK = os.sysconf("SC_CLK_TCK")


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


def run_once(command, args, link=None):
    """One run against a panel of its own; with `link` (a WIRE_LINKS entry)
    through a byte-counting proxy."""
    panel = loopback.PanelServer()
    proxy = None
    endpoint = panel.endpoint
    extra = []
    if link:
        extra, panel.refuse_upgrades = list(link[1]), link[2]
        panel.compression = "context" if link[3] else "no_context"
        proxy = loopback.CountingProxy(panel.port)
        endpoint = proxy.endpoint
    argv = shlex.split(command) + ["-e", endpoint, "-t", panel.token, "--interval", "%g" % args.interval] + extra
    try:
        # its state in a directory of its own, never the checkout's state/; named in the environment,
        # because an official agent given to --vs refuses a flag it does not know
        with tempfile.TemporaryFile() as out, tempfile.TemporaryDirectory(prefix="komari-footprint-") as state:
            proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                    start_new_session=True, env=dict(os.environ, AGENT_STATE_DIR=state))
            try:
                return measure(proc, panel, args, out, proxy)
            finally:
                stop(proc)
    finally:
        if proxy:
            proxy.close()
        panel.stop()


def measure(proc, panel, args, out, proxy=None):
    started = time.monotonic()
    if not wait_until(lambda: panel.reports, started + args.start_timeout, proc):
        why = "exited with code %s" % proc.returncode if proc.poll() is not None else \
            "sent no report within %g s" % args.start_timeout
        raise RunFailed("agent %s; its output:\n%s" % (why, log_tail(out)))
    first_report_s = time.monotonic() - started
    time.sleep(args.warmup)

    t0 = time.monotonic()
    before = sample_tree(proc.pid, with_threads_ns=True)
    reports0 = len(panel.reports)
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
    reports = len(panel.reports) - reports0
    wire = proxy.counts() if proxy else (0, 0)
    ticks = s["ticks"] - before["ticks"]
    ns = ns_delta(before["ns"], s["ns"])
    per = max(reports, 1)
    last_report = panel.reports[-1]
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
        "info_uploads": len(panel.basic_infos),
        "connections": len(panel.report_conns),
        "bad_frames": len(panel.rejected),  # whatever the panel refused, as the Go server would
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


# (name, agent flags, the panel refuses WebSocket upgrades as a CDN might, the panel keeps the deflate context)
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


def wire_main(args, progress):
    chosen = [link for link in WIRE_LINKS if link[0] in args.links]
    runs = {link[0]: [] for link in chosen}
    for rnd in range(args.rounds):
        for link in chosen:
            progress("round %d/%d: %s ..." % (rnd + 1, args.rounds, link[0]))
            runs[link[0]].append(run_once(args.agent, args, link))
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
    p.add_argument("--installed", action="store_true",
                   help="compare with this checkout's agent started as install.sh's services start it: "
                        "python -m komari_agent from a directory holding its compiled bytecode")
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
    if args.installed and args.vs:
        p.error("--installed is the agent to compare with; give it or --vs, not both")
    if args.seconds < 1 or args.warmup < 0 or args.rounds < 1 or args.sockets < 0 or args.interval <= 0:
        p.error("need --seconds >= 1, --warmup >= 0, --rounds >= 1, --sockets >= 0, --interval > 0")
    return args


def installed_command(directory):
    """This checkout's agent as install.sh's run-agent.sh starts it: a copy
    compiled into `directory`'s __pycache__, imported from there as a module
    (the directory is the working directory too, so no other copy of the
    file can be the one found)."""
    import py_compile
    target = os.path.join(directory, "komari_agent.py")
    shutil.copy2(str(REPO / "komari_agent.py"), target)
    py_compile.compile(target, doraise=True)
    script = 'cd "$0" && PYTHONPATH="$0" exec %s -m komari_agent "$@"' % shlex.quote(sys.executable)
    return "sh -c %s %s" % (shlex.quote(script), shlex.quote(directory))


def main(argv=None):
    args = parse_args(argv)
    if not args.installed:
        return measure_agents(args)
    with tempfile.TemporaryDirectory(prefix="komari-installed-") as directory:
        args.vs = installed_command(directory)
        return measure_agents(args)


def measure_agents(args):
    agents = [("ours", args.agent)] + ([("theirs", args.vs)] if args.vs else [])
    held = hold_sockets(args.sockets)
    progress = (lambda *a: None) if args.json else (lambda msg: print(msg, file=sys.stderr, flush=True))
    if args.wire:
        try:
            result = wire_main(args, progress)
        except RunFailed as e:
            print("footprint: %s" % e, file=sys.stderr)
            return 1
        finally:
            for s in held:
                s.close()
        print(json.dumps(result, indent=2) if args.json else wire_table(result))
        return 0
    runs = {name: [] for name, _ in agents}
    try:
        for rnd in range(args.rounds):
            for name, command in agents:
                progress("round %d/%d: %s ..." % (rnd + 1, args.rounds, name))
                runs[name].append(run_once(command, args))
    except RunFailed as e:
        print("footprint: %s: %s" % (name, e), file=sys.stderr)
        return 1
    finally:
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
