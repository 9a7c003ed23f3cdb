# ---------------------------------------------------------------------------
# Benchmarks: bench/footprint.py runs and its sink speaks the protocol
# ---------------------------------------------------------------------------

import importlib.util
import json
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import websocket

ROOT = Path(__file__).parent
FOOTPRINT = ROOT / "bench" / "footprint.py"

# A tiny agent: one basic info POST, then a report per --interval whose tcp
# count is the kernel's own, so the test can see the idle sockets held.
STAND_IN_AGENT = r'''
import argparse, json, time, urllib.request, websocket
p = argparse.ArgumentParser()
p.add_argument("-e"); p.add_argument("-t"); p.add_argument("--interval", type=float)
a = p.parse_args()
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


def load_footprint():
    spec = importlib.util.spec_from_file_location("footprint", str(FOOTPRINT))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_footprint_json_compares_two_agents_with_idle_sockets(tmp_path):
    stand_in = tmp_path / "stand_in_agent.py"
    stand_in.write_text(STAND_IN_AGENT)
    agent = "%s %s" % (shlex.quote(sys.executable), shlex.quote(str(stand_in)))
    done = subprocess.run([sys.executable, str(FOOTPRINT), "--seconds", "3", "--warmup", "1", "--json",
                           "--agent", agent, "--vs", agent, "--sockets", "50"],
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=30)
    assert done.returncode == 0, done.stderr.decode()
    result = json.loads(done.stdout.decode())
    assert set(result) == {"settings", "ours", "theirs", "ratio"}
    for name in ("ours", "theirs"):
        run = result[name]
        for key in ("reports", "cpu_ms_per_report", "cpu_ms_per_report_sched", "rss_avg_mb",
                    "rss_peak_mb", "threads", "runs", "command", "info_uploads"):
            assert key in run, (name, key)
        assert run["reports"] > 0 and run["runs"] == 1 and run["info_uploads"] == 1
        assert run["bad_frames"] == 0 and run["command"] == agent
        # 50 held pairs plus their listener are in the kernel's count the agent reported.
        assert run["reported_tcp"] >= 101
    assert set(result["ratio"]) >= {"cpu_ms_per_report", "rss_avg_mb", "rss_peak_mb", "threads"}


def test_footprint_explains_an_agent_that_dies():
    agent = "%s -c %s" % (shlex.quote(sys.executable), shlex.quote("print('no panel today'); raise SystemExit(3)"))
    done = subprocess.run([sys.executable, str(FOOTPRINT), "--seconds", "3", "--agent", agent],
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=30)
    err = done.stderr.decode()
    assert done.returncode == 1
    assert "exited with code 3" in err and "no panel today" in err


def test_footprint_sink_speaks_rfc6455():
    footprint = load_footprint()
    sink = footprint.Sink()
    thread = footprint.threading.Thread(target=sink.serve_forever, daemon=True)
    thread.start()
    try:
        token = sink.new_token()
        url = sink.endpoint.replace("http", "ws", 1) + "/api/clients/report?token="
        with pytest.raises(websocket.WebSocketBadStatusException) as refused:
            websocket.create_connection(url + "wrong", suppress_origin=True, timeout=5)
        assert refused.value.status_code == 401
        ws = websocket.create_connection(url + token, suppress_origin=True, timeout=5)
        small = {"cpu": {"usage": 1.0}}
        medium = {"cpu": {"usage": 2.0}, "message": "m" * 300}        # 16-bit length
        large = {"cpu": {"usage": 3.0}, "message": "l" * 70000}       # 64-bit length
        for report in (small, medium, large):
            ws.send(json.dumps(report))
        text = json.dumps({"cpu": {"usage": 4.0}}).encode()
        ws.send_frame(websocket.ABNF.create_frame(text[:5], websocket.ABNF.OPCODE_TEXT, fin=0))
        ws.send_frame(websocket.ABNF.create_frame(text[5:], websocket.ABNF.OPCODE_CONT, fin=1))
        ws.send("not json")
        # Frames are handled in order, so the pong means everything before it was counted.
        ws.ping(b"are you there")
        opcode, frame = ws.recv_data_frame(control_frame=True)
        assert (opcode, frame.data) == (websocket.ABNF.OPCODE_PONG, b"are you there")
        tally = sink.tallies[token]
        assert (tally.reports, tally.bad_frames) == (4, 1)
        assert tally.last_report == {"cpu": {"usage": 4.0}}
        ws.send_close(status=1000)
        opcode, frame = ws.recv_data_frame(control_frame=True)
        assert opcode == websocket.ABNF.OPCODE_CLOSE and frame.data[:2] == b"\x03\xe8"
        ws.shutdown()
    finally:
        sink.shutdown()
        sink.server_close()
