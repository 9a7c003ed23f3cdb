#!/usr/bin/env python3
"""komari_agent.py - a single-file Komari monitoring agent.

Speaks the Komari agent protocol v2 (JSON-RPC 2.0 over a compressed WebSocket,
or over HTTP POST where WebSockets are blocked) and falls back to v1 for
older panels (docs/WIRE.md): basic info, a realtime report every interval,
and the server's events (exec, ping, terminal).  Needs Python 3.8+, psutil and
websocket-client.

    python3 komari_agent.py --endpoint https://panel.example --token TOKEN
    python3 komari_agent.py --dry-run        # print what would be sent

The file reads top to bottom; nothing refers to a definition further down:
    Logging           the token never reaches a log line
    Used everywhere   errors, files, JSON, helper programs
    Network plumbing  addresses, DNS, proxies, TLS, dialling, one HTTP exchange
    Configuration     OPTIONS: flags, AGENT_* variables, --config keys
    Linux             /proc and /sys, read and parsed
    macOS and FreeBSD sw_vers, system_profiler, pciconf, sysctl, netstat: parsed
    Windows           the registry; kernel32, psapi, iphlpapi, advapi32 through ctypes
    Windows processes job objects, ConPTY or a pipe terminal, the ICMP API, the boot task
    Platform          every difference between systems, behind one host (make_host)
    Report figures    what each realtime report measures (the Collector)
    Basic info        the static facts together, public addresses
    Monthly traffic   the ledger behind --month-rotate
    Wire protocol     every message's shape, both ways, v1 beside v2
    Transport         HTTP uploads, undelivered results, auto-discovery
    Links             the three report links (Link) and LinkChooser
    Tasks             exec, ping probes, the web terminal
    Self-update       a release is checked and tried before it replaces this file
    The agent loop    Agent: its threads, reconnecting, basic info, results
    Subcommands       --check, --dry-run, list-disk, check-mem, traffic, update, service
    main()

Imports: the standard library at the top. psutil and websocket-client, and
stdlib modules that only some runs need, are imported inside the function
that uses them: a report on Linux needs neither package, and every module
loaded costs memory for the whole run.
"""

import argparse
import errno
import itertools
import json
import logging
import math
import os
import platform
import random
import re
import signal
import socket
import ssl
import struct
import sys
import threading
import time
from collections import OrderedDict, namedtuple
import zlib
from fnmatch import fnmatchcase
from stat import S_ISDIR, S_ISREG

__version__ = "0.1.0"
PROG = "komari_agent.py"
# Kept now: Python deletes __main__.__file__ when the script's top level
# returns, and the agent runs on after that (see the end of this file).
SCRIPT_PATH = os.path.abspath(__file__)

log = logging.getLogger("komari")

# The server closes a report socket that sends no data message for 11 s.
MAX_REPORT_GAP = 10.0
# A WebSocket ping every PING_EVERY s; no frame back within PONG_DEADLINE s
# after a ping means the link is dead (the Go agent waits for TCP: ~15 min).
PING_EVERY = 5.0
PONG_DEADLINE = 10.0
BACKOFF_CAP = 60.0
HTTP_TIMEOUT = 15.0
WS_CONNECT_TIMEOUT = 10.0
IP_LOOKUP_WAIT = 3.0
# DNS query ids and ICMP idents must not be guessable by a spoofer, and jitter
# should not depend on whoever else seeds the global generator.
UNGUESSABLE = random.SystemRandom()


# ---------------------------------------------------------------------------
# Logging: the token never reaches a log line
# ---------------------------------------------------------------------------

class RedactingFormatter(logging.Formatter):
    """Formats like the Go agent (YYYY/MM/DD HH:MM:SS) and blanks out secrets,
    including any that sneak in through exception texts."""

    patterns = []   # from hide_secret(); group 1 (a "token=" before a short secret) is kept

    def format(self, record):
        return redacted(super().format(record))


def redacted(text):
    """`text` with every secret given to hide_secret() blanked out, and the
    start of one (SECRET_PIECE characters or more) that ends a line."""
    for pattern in RedactingFormatter.patterns:
        text = pattern.sub(r"\1***", text)
    return text


def clipped(text, limit):
    """At most `limit` characters of `text` for a log line, redacted before
    it is cut: cut first, a secret across the cut would no longer be one."""
    text = redacted(str(text))
    return text if len(text) <= limit else text[:limit]


# A secret cut short (a panel that echoes the token back in a long line) is
# still hidden when at least this much of its start is left.
SECRET_PIECE = 6


# A secret shorter than this is hidden only where it stands as a value
# (token=..., "key": "...", Bearer ...): as a substring it would blank out
# letters of ordinary words and, by doing so, spell the secret out.
SHORT_SECRET = 12


def any_case_hex(text):
    return "".join("[%s%s]" % (c.lower(), c.upper()) if c.isalpha() else c for c in text)


def encoded_char(c):
    """A regex for the character `c` as it may appear in a log line: itself,
    %-encoded in either case, '+' for a space, or a JSON/repr escape."""
    forms = [re.escape(c), "".join(any_case_hex("%%%02X" % b) for b in c.encode("utf-8"))]
    if c == " ":
        forms.append(r"\+")
    if c in "\"\\/'":
        forms.append(re.escape("\\" + c))
    if ord(c) < 0x10000:
        forms.append(r"\\u" + any_case_hex("%04X" % ord(c)))
    if ord(c) < 0x100:
        forms.append(r"\\x" + any_case_hex("%02X" % ord(c)))
    if ord(c) > 0x7f:  # a repr of the UTF-8 bytes
        forms.append("".join(r"\\x" + any_case_hex("%02X" % b) for b in c.encode("utf-8")))
    return "(?:%s)" % "|".join(forms)


def secret_pattern(secret):
    """What hides `secret` in every encoding: anywhere when it is long enough
    not to occur by chance, otherwise only as the value of a token or key."""
    body = "".join(encoded_char(c) for c in secret)
    if len(secret) >= SHORT_SECRET:
        # the whole secret anywhere; else its longest start at a line's end,
        # where a text cut short by whoever sent it ends
        pieces = "|".join(re.escape(secret[:n]) for n in range(len(secret) - 1, SECRET_PIECE - 1, -1))
        return re.compile(r"""()(?:%s|(?:%s)(?=["')\]}>.]*(?:\n|$)))""" % (body, pieces))
    value_of = r"""((?i:\b(?:token|key|secret|password)["']?\s*[=:]\s*["']?|\bbearer\s+))"""
    return re.compile(value_of + body + r"""(?![^\s&#;,"')\]}>])""")


def setup_logging(level=logging.INFO):
    handler = FloodLimitedHandler(sys.stderr)
    handler.setFormatter(RedactingFormatter("%(asctime)s %(levelname)s %(message)s", "%Y/%m/%d %H:%M:%S"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)


def hide_secret(secret):
    if secret:
        pattern = secret_pattern(secret)
        if all(p.pattern != pattern.pattern for p in RedactingFormatter.patterns):
            RedactingFormatter.patterns.append(pattern)


class OncePer:
    """Remembers when each key was last logged, so a repeating condition is
    logged once (or once per `period` seconds), never in a tight loop."""

    def __init__(self, period=None):
        self.period = period
        self.seen = {}
        self.lock = threading.Lock()

    def __call__(self, key):
        now = time.monotonic()
        with self.lock:
            last = self.seen.get(key)
            if last is not None and (self.period is None or now - last < self.period):
                return False
            if len(self.seen) > 1000:
                self.seen.clear()
            self.seen[key] = now
            return True


# Log lines of one kind (one call site and message) per LOG_FLOOD_PERIOD
# seconds before the rest are only counted: one line for a problem, a few
# for routine events.
LOG_FLOOD_PERIOD = 60.0
LOG_BURST = {logging.DEBUG: 20, logging.INFO: 10}


class FloodLimitedHandler(logging.StreamHandler):
    """A stderr handler that a flood of one kind of line (10 000 bad frames
    from a hostile panel, say) cannot fill: each kind gets its burst per
    period, the rest are counted, and the count is logged once the period is
    over, with the last of them: by the next line logged, or by the
    "log-flood" thread (started at the first flood) when the log stays quiet."""

    def __init__(self, stream=None, period=LOG_FLOOD_PERIOD):
        super().__init__(stream)
        self.period = period
        self.window = OncePer(period)   # a new window for a kind when its period is over
        self.shown = {}                  # kind -> lines shown in its current window
        self.held = {}                   # kind -> [lines counted, the last of them, window start]
        self.gate = threading.Condition(threading.Lock())
        self.flusher = None

    def due_summaries(self, now):
        """Summaries of the kinds whose period is over (the gate held)."""
        due = [k for k, (_, _, start) in self.held.items() if now - start >= self.period]
        return [self.summary(*self.held.pop(k), now=now) for k in due]

    def flush_quiet_floods(self):
        while True:
            with self.gate:
                while not self.held:
                    self.gate.wait()
                first_end = min(start for _, _, start in self.held.values()) + self.period
                self.gate.wait(max(0.0, first_end - time.monotonic()))
                summaries = self.due_summaries(time.monotonic())
            for summary in summaries:
                super().handle(summary)

    def handle(self, record):
        kind = (record.name, record.pathname, record.lineno, str(record.msg)[:200])
        now = time.monotonic()
        with self.gate:
            summaries = self.due_summaries(now)
            if self.window(kind):
                self.shown[kind] = 0
                self.held.pop(kind, None)
            if len(self.shown) > 1000:
                self.shown = {kind: self.shown.get(kind, 0)}
            shown = self.shown.get(kind, 0)
            passed = shown < LOG_BURST.get(record.levelno, 1)
            if passed:
                self.shown[kind] = shown + 1
            else:
                held = self.held.setdefault(kind, [0, None, self.window.seen.get(kind, now)])
                held[0] += 1
                held[1] = record
                if self.flusher is None:
                    self.flusher = threading.Thread(target=self.flush_quiet_floods, name="log-flood", daemon=True)
                    self.flusher.start()
                self.gate.notify()
        for summary in summaries:
            super().handle(summary)
        return super().handle(record) if passed else False

    @staticmethod
    def summary(count, record, start, now):
        """The last held line of a kind, saying how many like it were not logged."""
        line = logging.makeLogRecord(dict(record.__dict__, exc_info=None, exc_text=None, stack_info=None, args=None))
        line.msg = "%s [%d more like this in the last %d s]" % (record.getMessage(), count, round(now - start))
        return line


# ---------------------------------------------------------------------------
# Used everywhere: errors, files, JSON
# ---------------------------------------------------------------------------

class AgentError(Exception):
    """The root of the agent's own errors."""


class ConfigError(AgentError):
    """A bad setting: reported as one line on stderr, exit code 2."""


def describe_error(error):
    """A short, public-safe text for a failed collector (no paths, no secrets)."""
    if isinstance(error, OSError) and error.strerror:
        return error.strerror
    return type(error).__name__


def run_output(argv, timeout=3.0):
    """(exit status, stdout) of a helper program; (None, "") when it cannot run."""
    import subprocess
    try:
        done = subprocess.run(argv, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                              stdin=subprocess.DEVNULL, timeout=timeout)
    except (OSError, subprocess.SubprocessError):
        return None, ""
    return done.returncode, done.stdout.decode("utf-8", "replace")


def run_quiet(argv, timeout=3.0):
    """stdout of a helper program, or "" when it is missing, fails or hangs."""
    status, out = run_output(argv, timeout)
    return out if status == 0 else ""


def child_env(extra=None):
    """The agent's environment for a command or shell, without the agent's own
    settings (AGENT_TOKEN among them)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("AGENT_")}
    env.update(extra or {})
    return env


def read_text(path):
    """A whole (proc) file as text. Plain os.read is about twice as fast as
    open().read() here, and this runs several times per report."""
    fd = os.open(path, os.O_RDONLY)
    try:
        chunks = []
        while True:
            chunk = os.read(fd, 65536)
            chunks.append(chunk)
            # proc files hand over everything that fits: a short read is the end
            if len(chunk) < 65536:
                break
    finally:
        os.close(fd)
    # surrogateescape keeps odd bytes in mount paths usable for statvfs
    return b"".join(chunks).decode("utf-8", "surrogateescape")


def read_or_empty(path):
    try:
        return read_text(path)
    except OSError:
        return ""


def read_regular_file(path, limit, follow=True):
    """The bytes of the regular file `path`, at most `limit` of them; OSError
    for anything else (a FIFO or a device would block or never end), and,
    unless `follow`, for a symbolic link."""
    no_follow = 0 if follow else getattr(os, "O_NOFOLLOW", 0)
    # Windows has neither FIFOs to block on nor O_NONBLOCK, and reads in text mode without O_BINARY
    flags = getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_BINARY", 0)
    fd = os.open(path, os.O_RDONLY | flags | no_follow)
    try:
        st = os.fstat(fd)
        if not S_ISREG(st.st_mode):
            raise OSError(errno.EINVAL, "not a regular file")
        if st.st_size > limit:
            raise OSError(errno.EFBIG, "larger than %d bytes" % limit)
        chunks, left = [], limit + 1
        while left > 0:
            chunk = os.read(fd, min(left, 1 << 20))
            if not chunk:
                break
            chunks.append(chunk)
            left -= len(chunk)
        if left <= 0:
            raise OSError(errno.EFBIG, "larger than %d bytes" % limit)
        return b"".join(chunks)
    finally:
        os.close(fd)


def read_json_object(path, limit=64 << 20):
    """A JSON object from the regular file `path`; OSError or ValueError otherwise."""
    data = json.loads(read_regular_file(path, limit).decode("utf-8"))
    if not isinstance(data, dict):
        raise ValueError("not a JSON object")
    return data


def make_private_dirs(path):
    """os.makedirs(path, exist_ok=True), where every directory made, the
    missing parents too, is private (0700): makedirs gives the parents the
    umask's mode (0755), and a state directory made that way lets anyone list
    it and read what in it is not private itself."""
    path = os.path.abspath(path)
    if os.path.isdir(path):
        return
    parent = os.path.dirname(path)
    if parent != path:
        make_private_dirs(parent)
    try:
        os.mkdir(path, 0o700)
    except FileExistsError:
        pass  # made meanwhile, or a file: the caller's next step says so


def write_atomic(path, data, mode=0o600):
    """Replace `path` with `data` so that a crash leaves the old or the new
    file, never a torn one: temp file, fsync, rename, fsync the directory."""
    directory = os.path.dirname(path) or "."
    make_private_dirs(directory)
    temp = "%s.tmp-%d-%d" % (path, os.getpid(), threading.get_ident())
    # never through a link or into a file someone else put there
    exclusive = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_BINARY", 0)
    try:
        fd = os.open(temp, exclusive, mode)
    except FileExistsError:  # left by a crash of a process with this pid
        os.unlink(temp)
        fd = os.open(temp, exclusive, mode)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(temp, path)
    except BaseException:
        try:
            os.unlink(temp)
        except OSError:
            pass
        raise
    try:
        dir_fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except OSError:
        pass


# One encoder for the run: json.dumps with options builds a new one per call.
WIRE_JSON = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False, allow_nan=False)


def encode(obj):
    """Compact JSON exactly as it goes on the wire; NaN is an error, not a token."""
    return WIRE_JSON.encode(obj)


def rfc3339_now():
    """Local time with its offset, e.g. 2026-11-24T16:00:00.123+08:00."""
    from datetime import datetime
    return datetime.now().astimezone().isoformat(timespec="milliseconds")


# ---------------------------------------------------------------------------
# Network plumbing: addresses, DNS, proxies, TLS, dialling, one HTTP exchange
# ---------------------------------------------------------------------------

# -- addresses and DNS -------------------------------------------------------------

def ip_family(text):
    """socket.AF_INET/AF_INET6 for an IP literal, else None."""
    for family in (socket.AF_INET, socket.AF_INET6):
        try:
            socket.inet_pton(family, text)
            return family
        except (OSError, ValueError):
            pass
    return None


def split_host_port(target, default_port=80):
    """(host, port) from `host:port`, `[v6]:port`, a bare host or IPv6 (port
    80); None when the port is not a port."""
    text = target.strip()
    if text.startswith("["):
        end = text.find("]")
        if end < 0:
            return None
        host, rest = text[1:end], text[end + 1:]
        if not rest:
            port = str(default_port)
        elif rest.startswith(":"):
            port = rest[1:]
        else:
            return None
    elif text.count(":") == 1:
        host, port = text.split(":")
    else:
        host, port = text, str(default_port)
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        return None
    return host, int(port)


def dns_server_address(spec):
    """(host, port) of a --custom-dns value: 1.2.3.4, 1.2.3.4:5353, [v6]:53, bare v6."""
    spec = spec.strip()
    if ip_family(spec) == socket.AF_INET6:
        return spec, 53
    parsed = split_host_port(spec, 53)
    if parsed is None:
        raise ValueError("bad --custom-dns %r" % spec)
    return parsed


def dns_query(name, qtype, ident):
    labels = name.rstrip(".").encode("idna").split(b".")
    if not all(0 < len(label) < 64 for label in labels):
        raise ValueError("bad host name")
    qname = b"".join(bytes([len(label)]) + label for label in labels) + b"\0"
    return struct.pack("!HHHHHH", ident, 0x0100, 1, 0, 0, 0) + qname + struct.pack("!HH", qtype, 1)


def skip_dns_name(reply, offset):
    while True:
        length = reply[offset]
        if length & 0xC0 == 0xC0:
            return offset + 2
        if length == 0:
            return offset + 1
        offset += 1 + length


def dns_answers(reply, ident, qtype):
    """The addresses of type `qtype` (1 = A, 28 = AAAA) in a DNS reply to
    query `ident`; CNAMEs in the chain are skipped. ValueError for a reply
    that is not one (wrong id, an error code, truncated data)."""
    try:
        rid, flags, qdcount, ancount = struct.unpack("!HHHH", reply[:8])
        if rid != ident or not flags & 0x8000:
            raise ValueError("not our reply")
        if flags & 0x000F not in (0, 3):  # 3 = no such name: an empty answer
            raise ValueError("DNS error code %d" % (flags & 0x000F))
        offset = 12
        for _ in range(qdcount):
            offset = skip_dns_name(reply, offset) + 4
        family, size = (socket.AF_INET, 4) if qtype == 1 else (socket.AF_INET6, 16)
        addresses = []
        for _ in range(ancount):
            offset = skip_dns_name(reply, offset)
            rtype, _, _, rdlength = struct.unpack("!HHIH", reply[offset:offset + 10])
            offset += 10
            rdata = reply[offset:offset + rdlength]
            if len(rdata) != rdlength:
                raise ValueError("truncated reply")
            offset += rdlength
            if rtype == qtype and rdlength == size:
                addresses.append(socket.inet_ntop(family, rdata))
        return addresses
    except (struct.error, IndexError) as e:
        raise ValueError("malformed DNS reply") from e


def dns_lookup(server, name, qtype, timeout=2.0):
    """Addresses for `name` from one UDP query to `server` (host, port)."""
    host, port = server
    family = ip_family(host)
    if family is None:
        family, _, _, _, address = socket.getaddrinfo(host, port, 0, socket.SOCK_DGRAM)[0]
    else:
        address = (host, port)
    ident = UNGUESSABLE.getrandbits(16)
    query = dns_query(name, qtype, ident)
    deadline = time.monotonic() + timeout
    with socket.socket(family, socket.SOCK_DGRAM) as sock:
        sock.connect(address)
        sock.send(query)
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise socket.timeout("no DNS answer")
            sock.settimeout(remaining)
            reply = sock.recv(4096)
            try:
                return dns_answers(reply, ident, qtype)
            except ValueError as e:
                if str(e) != "not our reply":
                    raise


def resolve_host(cfg, host, port, family=0):
    """[(family, sockaddr)] to dial host:port: the --custom-dns server when one
    is set (the system resolver if it does not answer), else the system
    resolver; --prefer-ip-version's family first. The one place where the
    panel dials and the address lookups resolve names."""
    host = (host or "").strip("[]")
    literal = ip_family(host)
    if literal is not None:
        found = [(literal, (host, port))]
    else:
        found = []
        server = getattr(cfg, "custom_dns", "")
        if server:
            for qtype, kind in ((1, socket.AF_INET), (28, socket.AF_INET6)):
                if family not in (0, kind):
                    continue
                try:
                    found += [(kind, (address, port)) for address in dns_lookup(dns_server_address(server), host, qtype)]
                except (OSError, ValueError, UnicodeError) as e:
                    log.debug("custom DNS query for %s failed: %s", host, e)
        if not found:
            found = [(info[0], info[4][:2]) for info in socket.getaddrinfo(host, port, family, socket.SOCK_STREAM)
                     if info[0] in (socket.AF_INET, socket.AF_INET6)]
    found = [f for f in found if family in (0, f[0])]
    if getattr(cfg, "prefer_ip_version", ""):
        want = socket.AF_INET6 if cfg.prefer_ip_version == "6" else socket.AF_INET
        found.sort(key=lambda item: item[0] != want)
    if not found:
        raise OSError("no address for %s" % host)
    return found


def loopback_host(host):
    """Is `host` this machine's loopback: localhost, 127.0.0.0/8 or ::1?"""
    import ipaddress
    host = (host or "").strip("[]").rstrip(".").lower()
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def code_url_problem(url):
    """What makes `url` unfit to fetch code from, or "": it must be https://,
    or plain http:// to a loopback address (a local mirror, a test)."""
    from urllib.parse import urlsplit
    try:
        parts = urlsplit(url)
        parts.port  # ValueError when out of range
    except ValueError:
        return "is not a URL"
    if not parts.hostname or parts.scheme not in ("http", "https"):
        return "is not an http(s) URL"
    if parts.scheme == "http" and not loopback_host(parts.hostname):
        return "is plain http:// (https:// is required, except to a loopback address)"
    return ""


def environment_proxy(url):
    """The proxy that HTTP(S)_PROXY/NO_PROXY name for `url`, or ""."""
    import urllib.request
    from urllib.parse import urlsplit
    parts = urlsplit(url)
    proxy = urllib.request.getproxies().get(parts.scheme, "")
    if proxy and urllib.request.proxy_bypass(parts.hostname or ""):
        return ""
    return proxy


def tls_context(cfg):
    if cfg.ignore_unsafe_cert:
        context = ssl.create_default_context()
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
        return context
    return ssl.create_default_context()


def dial_tcp(cfg, host, port, timeout):
    """A connected TCP socket to host:port, through resolve_host (--custom-dns,
    --prefer-ip-version): each address in turn."""
    error = OSError("no address for %s" % host)
    for family, address in resolve_host(cfg, host, port):
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.settimeout(timeout if isinstance(timeout, (int, float)) else None)
        try:
            sock.connect(address)
            return sock
        except OSError as e:
            sock.close()
            error = e
    raise error


def preferred_socket(cfg, url, timeout):
    """A TCP (and TLS) socket to the URL's host, trying the preferred address
    family first."""
    from urllib.parse import urlsplit
    parts = urlsplit(url)
    secure = parts.scheme == "wss"
    port = parts.port or (443 if secure else 80)
    sock = dial_tcp(cfg, parts.hostname, port, timeout)
    if secure:
        sock = tls_context(cfg).wrap_socket(sock, server_hostname=parts.hostname)
    return sock


def drop_tcp(sock):
    """Drop a connection at once, from any thread: shutdown() wakes a thread
    blocked reading or writing on it."""
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except Exception:
        pass
    try:
        sock.close()
    except Exception:
        pass


class Deadlines:
    """Calls each function given to at() when its time comes, all on one
    daemon thread ("deadlines", started at the first): a deadline per HTTP
    exchange (a report a second in POST mode) then costs no thread of its
    own, and threads started and ended by the thousand leave native memory
    behind that never comes back."""

    def __init__(self):
        self.cond = threading.Condition()
        self.due = {}   # key -> (monotonic time, function)
        self.keys = itertools.count()
        self.thread = None

    def at(self, when, function):
        """A key for cancel()."""
        with self.cond:
            key = next(self.keys)
            self.due[key] = (when, function)
            if self.thread is None:
                self.thread = threading.Thread(target=self._run, name="deadlines", daemon=True)
                self.thread.start()
            self.cond.notify()
        return key

    def cancel(self, key):
        with self.cond:
            self.due.pop(key, None)

    def _run(self):
        while True:
            with self.cond:
                while True:
                    now = time.monotonic()
                    key = min(self.due, key=lambda k: self.due[k][0], default=None)
                    if key is not None and self.due[key][0] <= now:
                        function = self.due.pop(key)[1]
                        break
                    self.cond.wait(None if key is None else self.due[key][0] - now)
            try:
                function()
            except Exception:
                log.exception("a deadline's action failed")


DEADLINES = Deadlines()


class ConnectionCutter:
    """One overall deadline for an HTTP exchange: when it passes, the
    connections opened for the exchange are shut down, which ends any read
    however slowly the peer trickles (a socket timeout counts per read)."""

    def __init__(self, seconds):
        self.seconds = seconds
        self.lock = threading.Lock()
        self.sockets = []  # duplicates: shutting one down ends the connection, never a reused fd
        self.fired = self.done = False
        self.deadline = DEADLINES.at(time.monotonic() + seconds, self.fire)

    def watch(self, create_connection):
        def create(*args, **kwargs):
            sock = create_connection(*args, **kwargs)
            with self.lock:
                if not self.done:
                    self.sockets.append(sock.dup())
                fired = self.fired
            if fired:
                sock.shutdown(socket.SHUT_RDWR)
            return sock
        return create

    def follow(self, sock):
        """Cut `sock` too: a kept-alive connection (TLS or not) opened before."""
        copy = socket.fromfd(sock.fileno(), sock.family, sock.type)  # a plain socket even for TLS
        with self.lock:
            kept, fired = not self.done, self.fired
            if kept:
                self.sockets.append(copy)
        if fired:
            try:
                copy.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        if not kept:
            copy.close()

    def fire(self):
        with self.lock:
            self.fired = True
            for sock in self.sockets:
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def timeout(self):
        return socket.timeout(errno.ETIMEDOUT, "no complete answer within %gs" % self.seconds)

    def cancel(self):
        DEADLINES.cancel(self.deadline)
        with self.lock:
            self.done = True
            for sock in self.sockets:
                sock.close()
            self.sockets = []


def cuttable_handlers(cutter, context, dial=None):
    """urllib handlers for http (and https with `context`) whose connections
    `cutter` watches, dialled by `dial` (socket.create_connection's
    signature) when one is given. A proxy (CONNECT tunnel) is dialled the
    same way."""
    import http.client
    import urllib.request

    def watched(connection_class):
        def make(host, **kwargs):
            connection = connection_class(host, **kwargs)
            if dial is not None:
                connection._create_connection = dial
            if cutter is not None:
                connection._create_connection = cutter.watch(connection._create_connection)
            return connection
        return make

    class HTTPHandler(urllib.request.HTTPHandler):
        def http_open(self, req):
            return self.do_open(watched(http.client.HTTPConnection), req)

    class HTTPSHandler(urllib.request.HTTPSHandler):
        def https_open(self, req):
            return self.do_open(watched(http.client.HTTPSConnection), req, context=context)
    return [HTTPHandler(), HTTPSHandler(context=context)]


def http_exceptions():
    import http.client
    return http.client.HTTPException


def post_headers(headers=()):
    """`headers` and the two every POST to the panel carries."""
    return dict(headers, **{"Content-Type": "application/json", "User-Agent": "komari-agent-py/" + __version__})


def http_failure(error, cutter):
    """The OSError a failed HTTP exchange raises: a timeout when `cutter` (its
    ConnectionCutter) ended it, the network error itself, or one line for an
    answer that broke HTTP."""
    import urllib.error
    if cutter.fired:
        return cutter.timeout()
    if isinstance(error, urllib.error.URLError) and not isinstance(error, urllib.error.HTTPError):
        reason = error.reason
        return reason if isinstance(reason, OSError) else OSError(str(reason))
    if isinstance(error, OSError):
        return error
    return OSError("bad HTTP exchange: %s" % type(error).__name__)


def describe_body(body):
    """One line for a reply we did not expect (an HTML error page from a proxy,
    a JSON error from the panel)."""
    text = body[:2000].decode("utf-8", "replace")
    title = re.search(r"<title>(.*?)</title>", text, re.I | re.S)
    if title:
        return "an HTML page %r" % clipped(title.group(1).strip(), 80)
    if "<html" in text.lower():
        return "an HTML page"
    return repr(clipped(" ".join(text.split()), 160))


# ---------------------------------------------------------------------------
# Configuration: defaults < --config JSON < AGENT_* environment < command line
# ---------------------------------------------------------------------------

class Option:
    """One setting: its flags, its AGENT_* names, its JSON keys and its --help
    line. metavar says what the flag takes (URL, SECONDS...; booleans show
    [BOOL]); group is the key of its --help group in HELP_GROUPS."""

    def __init__(self, dest, flags, kind, default, help, json_keys=(), env=(), check=None, metavar=None,
                 group="everyday", secret=False):
        self.dest, self.flags, self.kind, self.default, self.help = dest, flags, kind, default, help
        self.json_keys = json_keys or (dest,)
        self.env = env or ("AGENT_" + dest.upper(),)
        self.check = check
        self.metavar = metavar
        self.group = group
        self.secret = secret  # never shown whole: not by --check, not in an error


def _positive(v):
    return None if v > 0 else "must be greater than 0"


def _not_negative(v):
    return None if v >= 0 else "must not be negative"


def _day_of_month(v):
    return None if 0 <= v <= 31 else "must be a day of the month, 1-31 (0 = off)"


def _minutes(v):
    # longer waits than a thread can be told to wait would stop the uploads
    return None if 0 < v <= 525600 else "must be greater than 0 and at most 525600 (a year)"


def _ip_version(v):
    return None if v in ("", "4", "6") else "must be 4 or 6"


def _update_url(v):
    return "must be an https:// URL (http:// only to a loopback address)" if v and code_url_problem(v) else None


# The official agent clamps the interval to >= 1 s; this one allows sub-second
# reports but refuses rates that only burn CPU (0.0001 s gave 90 reports a second).
MIN_INTERVAL = 0.25


def _interval(v):
    return None if v >= MIN_INTERVAL else "must be at least %g seconds" % MIN_INTERVAL


def _address(family, name):
    def check(v):
        if not v:
            return None
        try:
            socket.inet_pton(family, v)
            return None
        except (OSError, ValueError):
            return "must be an %s address" % name
    return check


# --help shows the options in these groups, in this order (Option.group names
# one); OPTIONS lists them group by group, in the order --help shows them.
HELP_GROUPS = [
    ("everyday", "Everyday options", None),
    ("monitoring", "Monitoring", "what the reports count"),
    ("network", "Network", "TLS, DNS and address families for the panel; the addresses reported"),
    ("remote", "Remote control", "limits on remote commands and terminals (--disable-web-ssh turns both off)"),
    ("official", "Official agent compatibility",
     "accepted so that the official agent's one-click install command works; little or no effect here"),
]

OPTIONS = [
    # everyday
    Option("endpoint", ("-e", "--endpoint"), "str", "", "panel URL, e.g. https://panel.example.com",
           metavar="URL"),
    Option("token", ("-t", "--token"), "str", "", "client token from the panel", metavar="TOKEN", secret=True),
    Option("auto_discovery", ("--auto-discovery",), "str", "",
           "auto-discovery key: register with the panel when no token is given",
           json_keys=("auto_discovery_key", "auto_discovery"), env=("AGENT_AUTO_DISCOVERY_KEY",), metavar="KEY",
           secret=True),
    Option("interval", ("-i", "--interval"), "float", 1.0,
           "seconds between reports (default 1.0, at least %g)" % MIN_INTERVAL, check=_interval, metavar="SECONDS"),
    Option("protocol_version", ("--protocol-version",), "int", 2,
           "2 (default): JSON-RPC over a compressed WebSocket, HTTP POST when WebSockets are blocked, "
           "v1 when the panel is too old; 1: only the v1 WebSocket",
           check=lambda v: None if v in (1, 2) else "must be 1 or 2", metavar="{1,2}"),
    Option("reconnect_interval", ("-c", "--reconnect-interval"), "float", 5.0,
           "seconds between reconnect attempts; after 10 minutes of outage grows to 60 (default 5)", check=_positive,
           metavar="SECONDS"),
    Option("max_retries", ("-r", "--max-retries"), "int", 3,
           "failed v2 WebSocket dials in a row before POST mode, and retries per upload (default 3)", check=_not_negative,
           metavar="N"),
    Option("state_dir", ("--state-dir",), "str", "", "where traffic totals and unsent results are kept",
           metavar="DIR"),
    Option("disable_web_ssh", ("--disable-web-ssh",), "bool", False,
           "turn off all remote control: exec, terminal"),
    Option("log_level", ("--log-level",), "str", "info", "debug, info, warning or error (default info)",
           check=lambda v: None if v.lower() in ("debug", "info", "warning", "error") else "must be debug, info, warning or error",
           metavar="LEVEL"),
    Option("config", ("--config",), "str", "", "JSON config file (snake_case keys)",
           json_keys=("config_file",), env=("AGENT_CONFIG_FILE", "AGENT_CONFIG"), metavar="FILE"),
    Option("dry_run", ("--dry-run",), "bool", False,
           "print the basic info and one report as JSON and exit; needs no panel"),
    Option("disable_auto_update", ("--disable-auto-update",), "bool", False,
           "no update checks of its own (at start and every 6 hours); `update` run by hand still works"),
    Option("update_url", ("--update-url",), "str", "",
           "where updates come from: a GitHub-style JSON of the latest release (default: this project's "
           "releases)", check=_update_url, metavar="URL"),
    # monitoring
    Option("info_report_interval", ("--info-report-interval",), "float", 5.0,
           "minutes between basic-info uploads (default 5)", check=_minutes, group="monitoring", metavar="MINUTES"),
    Option("memory_include_cache", ("--memory-include-cache",), "bool", False,
           "count buffers and cache as used memory (used = MemTotal - MemFree)", group="monitoring"),
    Option("include_nics", ("--include-nics",), "str", "", "comma list of NICs to count (* wildcards); wins over every exclusion",
           group="monitoring", metavar="NAMES"),
    Option("exclude_nics", ("--exclude-nics",), "str", "", "comma list of NICs not to count (* wildcards)",
           group="monitoring", metavar="NAMES"),
    Option("include_mountpoint", ("--include-mountpoint",), "str", "",
           "semicolon list of mount points to count as disk, replacing the automatic choice",
           json_keys=("include_mountpoints", "include_mountpoint"),
           env=("AGENT_INCLUDE_MOUNTPOINTS", "AGENT_INCLUDE_MOUNTPOINT"), group="monitoring", metavar="PATHS"),
    Option("month_rotate", ("--month-rotate",), "int", 0,
           "count totalUp/totalDown from this day of the month (1-31; 0 = since boot)", check=_day_of_month,
           group="monitoring", metavar="DAY"),
    Option("import_net_static", ("--import-net-static",), "str", "",
           "the official agent's net_static.json to carry this period's totals over from, once (with "
           "--month-rotate; looked for beside this script, in the working directory and in /opt/komari)",
           group="monitoring", metavar="PATH"),
    Option("gpu", ("--gpu",), "bool", False, "add detailed GPU usage (nvidia-smi) to reports",
           json_keys=("enable_gpu", "gpu"), env=("AGENT_ENABLE_GPU", "AGENT_GPU"), group="monitoring"),
    # network
    Option("ignore_unsafe_cert", ("-u", "--ignore-unsafe-cert"), "bool", False, "do not verify TLS certificates",
           group="network"),
    Option("custom_dns", ("--custom-dns",), "str", "", "DNS server (host or host:port) for the panel, the public-address lookups and probe targets",
           group="network", metavar="ADDRESS"),
    Option("prefer_ip_version", ("--prefer-ip-version",), "str", "",
           "address family tried first (4 or 6) for the WebSockets and probe targets", check=_ip_version,
           group="network", metavar="{4,6}"),
    Option("disable_compression", ("--disable-compression",), "bool", False,
           "protocol v2: no permessage-deflate on the WebSocket, no gzip on POST bodies", group="network"),
    Option("custom_ipv4", ("--custom-ipv4",), "str", "", "report this IPv4 address instead of looking it up",
           check=_address(socket.AF_INET, "IPv4"), group="network", metavar="ADDRESS"),
    Option("custom_ipv6", ("--custom-ipv6",), "str", "", "report this IPv6 address instead of looking it up",
           check=_address(socket.AF_INET6, "IPv6"), group="network", metavar="ADDRESS"),
    Option("get_ip_addr_from_nic", ("--get-ip-addr-from-nic",), "bool", False,
           "report the addresses of the local NICs instead of looking them up", group="network"),
    # remote control
    Option("exec_timeout", ("--exec-timeout",), "float", 3600.0,
           "seconds before a remote command is killed (default 3600; 0 = never). While its shell runs, a "
           "timeout or the agent stopping kills the shell's whole process group; background jobs still "
           "running after the shell has exited (daemons started with &) are left alone", check=_not_negative,
           group="remote", metavar="SECONDS"),
    Option("exec_max_output", ("--exec-max-output",), "int", 1048576,
           "bytes of command output kept (head and tail; default 1 MiB)", check=_positive,
           group="remote", metavar="BYTES"),
    Option("max_execs", ("--max-execs",), "int", 8, "remote commands running at once (default 8)", check=_positive,
           group="remote", metavar="N"),
    Option("max_terminals", ("--max-terminals",), "int", 4, "terminal sessions at once (default 4)", check=_positive,
           group="remote", metavar="N"),
    # official agent compatibility
    Option("memory_exclude_bcf", ("--memory-exclude-bcf",), "bool", False,
           "htop formula for used memory (the default on Linux)",
           json_keys=("memory_report_raw_used", "memory_exclude_bcf"),
           env=("AGENT_MEMORY_REPORT_RAW_USED", "AGENT_MEMORY_EXCLUDE_BCF"), group="official"),
    Option("memory_mode_available", ("--memory-mode-available",), "bool", False,
           "deprecated, no effect (use --memory-include-cache)", group="official"),
    Option("show_warning", ("--show-warning",), "bool", False,
           "the official agent's Windows warning helper: exits at once (status 0) elsewhere", group="official"),
]
OPTION_BY_DEST = {o.dest: o for o in OPTIONS}
# Flags the official agent dropped or renamed over the years: removed, with a warning.
DEPRECATED_FLAGS = {
    "-autoUpdate": "deprecated since 0.0.9, use --disable-auto-update",
    "--autoUpdate": "deprecated since 0.0.9, use --disable-auto-update",
    "-memory-mode-available": "deprecated, no effect; use --memory-include-cache",
}
# Flags some official agent version had that this one does not implement:
# accepted with a warning so that an old install command keeps working. The
# value says whether the flag takes a value. Any other unknown flag is an error.
OFFICIAL_ONLY_FLAGS = {
    "--cf-access-client-id": True,      # official 1.2.13 to 1.2.59
    "--cf-access-client-secret": True,  # official 1.2.13 to 1.2.59
}
# Their JSON keys and AGENT_* names: accepted with a warning too. Any other
# unknown key or AGENT_* name is an error, as an unknown flag is.
OFFICIAL_ONLY_KEYS = ("cf_access_client_id", "cf_access_client_secret")
OFFICIAL_ONLY_ENV = tuple("AGENT_" + key.upper() for key in OFFICIAL_ONLY_KEYS)
# Set in the file or as HOST_PROC, never by a flag (the official agent's names)
HOST_PROC_KEY = "host_proc"
TRUE_WORDS = ("1", "true", "yes", "on")
FALSE_WORDS = ("0", "false", "no", "off", "")


def masked(secret):
    """Enough of a secret to tell two apart, not enough to use it."""
    return "%s... (%d characters)" % (secret[:3], len(secret)) if len(secret) >= SHORT_SECRET else "*** (set)"


def shown(value, secret=False):
    """A bad value as an error or warning repeats it: whole when it is short,
    masked when it is a secret or as long as one (a token given to the wrong
    flag, say), so that no configuration message prints a token."""
    text = value if isinstance(value, str) else repr(value)
    return masked(text) if secret or len(text) >= SHORT_SECRET else repr(value)


def convert(option, value, origin):
    """The value of `option` from a string (flag, env) or a JSON value, or ConfigError."""
    name, got = origin, shown(value, option.secret)
    if option.kind == "bool":
        if isinstance(value, bool):
            return value
        word = str(value).strip().lower()
        if word in TRUE_WORDS:
            return True
        if word in FALSE_WORDS:
            return False
        raise ConfigError("%s: expected true or false, got %s" % (name, got))
    if option.kind in ("int", "float"):
        if isinstance(value, bool) or value is None:
            raise ConfigError("%s: expected a number, got %s" % (name, got))
        try:
            number = float(value) if option.kind == "float" else int(str(value).strip(), 10)
        except (TypeError, ValueError):
            if option.kind == "int" and isinstance(value, float) and value.is_integer():
                number = int(value)
            else:
                raise ConfigError("%s: expected %s, got %s" % (
                    name, "a number" if option.kind == "float" else "a whole number", got))
        if option.kind == "float" and number != number or number in (float("inf"), float("-inf")):
            raise ConfigError("%s: expected a finite number, got %s" % (name, got))
    else:
        if isinstance(value, (dict, list)) or value is None:
            raise ConfigError("%s: expected a string, got %s" % (name, got))
        number = str(value).strip() if not isinstance(value, bool) else str(value).lower()
    problem = option.check(number) if option.check else None
    if problem:
        raise ConfigError("%s %s (got %s)" % (name, problem, got))
    return number


HELP_WIDTH = 100


class HelpFormatter(argparse.HelpFormatter):
    """--help at HELP_WIDTH columns whatever the terminal, the help column far
    enough right for most flags to share its line, "-c, --reconnect-interval
    SECONDS" rather than argparse's "-c SECONDS, --reconnect-interval SECONDS",
    and descriptions and epilogs line by line as written, a line wrapped only
    when it is too long."""

    def __init__(self, prog):
        super().__init__(prog, max_help_position=36, width=HELP_WIDTH)

    def _fill_text(self, text, width, indent):
        import textwrap
        lines = []
        for line in text.splitlines():
            lead = indent + line[:len(line) - len(line.lstrip())]
            lines.extend([indent + line] if len(indent + line) <= width else
                         textwrap.wrap(line.strip(), width, initial_indent=lead, subsequent_indent=lead))
        return "\n".join(lines)

    def _format_action_invocation(self, action):
        if not action.option_strings or action.nargs == 0:
            return super()._format_action_invocation(action)
        args = self._format_args(action, self._get_default_metavar_for_optional(action))
        return "%s %s" % (", ".join(action.option_strings), args)


class ArgParser(argparse.ArgumentParser):
    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message):
        raise ConfigError(message)


def help_epilog():
    """The end of --help: where else settings come from, the names that do not
    follow the rule, and the subcommands."""
    differ = []
    for option in OPTIONS:
        flag = option.flags[-1]
        plain = flag[2:].replace("-", "_")
        if option.env[0] != "AGENT_" + plain.upper() or option.json_keys[0] != plain:
            differ.append("  %-24s %-30s %s" % (flag, option.env[0], option.json_keys[0]))
    return "\n".join([
        "Every option can also be set as AGENT_<NAME> in the environment or as a snake_case key in the",
        "--config JSON file; the command line wins over the environment, which wins over the file.",
        "These names differ from the flag's:",
        "  %-24s %-30s %s" % ("flag", "environment", "JSON key"),
    ] + differ + [
        "",
        "Subcommands (each also takes the agent flags, to use the same settings and state):",
        "  %s traffic [--set-up SIZE] [--set-down SIZE] [--show] [--export [PATH]]" % PROG,
        "      shows, corrects or exports this period's traffic totals (--month-rotate); see its --help",
        "  %s list-disk   the mounts counted as disk, as in the official agent" % PROG,
        "  %s check-mem   each used-memory formula, as in the official agent" % PROG,
        "  %s update [--check]   look for a newer release and install it now (--check: only say)" % PROG,
        "  %s service install [--name NAME] | remove [--restore-official]" % PROG,
        "      Windows: starts the agent at boot (a Scheduled Task); replaces an official agent's service",
    ])


def build_arg_parser():
    parser = ArgParser(prog=PROG, allow_abbrev=False, argument_default=argparse.SUPPRESS, add_help=False,
                       usage="%(prog)s -e URL (-t TOKEN | --auto-discovery KEY) [--check] [options]\n"
                             "       %(prog)s --dry-run [options]\n"
                             "       %(prog)s traffic | list-disk | check-mem | update | service [options]",
                       description="Komari monitoring agent (protocol v2, v1 for older panels), version %s.\n"
                                   "A [BOOL] flag alone turns its setting on; =false turns it off (--gpu=false)."
                                   % __version__,
                       epilog=help_epilog())
    groups = {key: parser.add_argument_group(title, description) for key, title, description in HELP_GROUPS}
    everyday = groups["everyday"]
    everyday.add_argument("-h", "--help", action="help", help="show this help and exit")
    for option in OPTIONS:
        kwargs = {"dest": option.dest, "help": option.help}
        if option.kind == "bool":
            kwargs.update(nargs="?", const="true", metavar="BOOL")
        else:
            kwargs["metavar"] = option.metavar or option.kind.upper().replace("STR", "VALUE")
        groups[option.group].add_argument(*option.flags, **kwargs)
    everyday.add_argument("--check", action="store_true",
                          help="check the flags, environment and config file, print the settings in effect "
                               "(secrets masked) and exit: 0 when they are good, 2 with one line when not; "
                               "no network")
    everyday.add_argument("--version", action="version", version="komari_agent.py " + __version__,
                          help="print the version and exit")
    return parser


def split_deprecated(argv):
    """argv without the official agent's retired flags, plus warnings about them."""
    kept, warnings = [], []
    for arg in argv:
        name = arg.split("=", 1)[0]
        if name in DEPRECATED_FLAGS or name == "--memory-mode-available":
            warnings.append("%s is %s" % (name, DEPRECATED_FLAGS.get(name, DEPRECATED_FLAGS["-memory-mode-available"])))
            continue
        kept.append(arg)
    return kept, warnings


def read_config_file(path):
    try:   # a FIFO would hang the start, /dev/zero fill the memory
        raw = read_regular_file(path, 1 << 20)
    except OSError as e:
        raise ConfigError("cannot read config file %s: %s" % (path, e.strerror or e))
    try:
        data = json.loads(raw.decode("utf-8-sig"))
    except ValueError as e:
        raise ConfigError("config file %s is not valid JSON: %s" % (path, e))
    if not isinstance(data, dict):
        raise ConfigError("config file %s must hold a JSON object" % path)
    return data


def load_config(argv, environ):
    """Merge defaults, the config file, the environment and argv into a
    namespace. Returns (config, warnings); raises ConfigError."""
    argv, warnings = split_deprecated(list(argv))
    argv, official_only = split_official_only(argv)
    warnings.extend(official_only)
    cli, unknown = build_arg_parser().parse_known_args(argv)
    for arg in unknown:
        if arg.startswith("-") and arg != "-":
            raise ConfigError(unknown_flag_message(arg.split("=", 1)[0]))
        warnings.append("ignoring stray argument %s" % shown(arg))
    warnings.extend(unknown_names([n for n in environ if n.startswith("AGENT_")],
                                  [name for o in OPTIONS for name in o.env], OFFICIAL_ONLY_ENV, "the environment"))
    cli = vars(cli)
    check = cli.pop("check", False)
    values = {o.dest: o.default for o in OPTIONS}
    origin = {}

    config_path = cli.get("config") or next((environ[n] for n in OPTION_BY_DEST["config"].env if environ.get(n)), "")
    data = read_config_file(config_path) if config_path else {}
    warnings.extend(unknown_names(data, [k for o in OPTIONS for k in o.json_keys] + [HOST_PROC_KEY],
                                  OFFICIAL_ONLY_KEYS, config_path))
    for option in OPTIONS:
        for key in option.json_keys:
            if key in data and option.dest != "config":
                values[option.dest] = convert(option, data[key], "%s in %s" % (key, config_path))
                origin[option.dest] = "file"
    if not isinstance(data.get(HOST_PROC_KEY, ""), str):
        raise ConfigError("%s in %s: expected a string" % (HOST_PROC_KEY, config_path))
    for option in OPTIONS:
        for name in option.env:
            if environ.get(name, "") != "":
                values[option.dest] = convert(option, environ[name], name)
                origin[option.dest] = "env"
                break
    for dest, raw in cli.items():
        option = OPTION_BY_DEST[dest]
        values[dest] = convert(option, raw, option.flags[-1])
        origin[dest] = "cli"
    values["host_proc"] = (environ.get("HOST_PROC") or data.get(HOST_PROC_KEY) or "/proc").rstrip("/") or "/proc"
    cfg = argparse.Namespace(**values)
    cfg.check, cfg.origins = check, origin
    return finish_config(cfg, warnings), warnings


def split_official_only(argv):
    """argv without the flags (and their values) that only some official agent
    version had, plus a warning for each."""
    kept, warnings, skip = [], [], False
    for arg in argv:
        if skip:
            skip = False
            continue
        name = arg.split("=", 1)[0]
        if name in OFFICIAL_ONLY_FLAGS:
            warnings.append("ignoring %s: an official agent flag this agent does not implement" % name)
            skip = OFFICIAL_ONLY_FLAGS[name] and "=" not in arg
            continue
        kept.append(arg)
    return kept, warnings


def suggestion(word, choices):
    """' (did you mean X?)' for the closest of choices, or ''."""
    import difflib
    close = difflib.get_close_matches(word, choices, n=1, cutoff=0.6)
    return " (did you mean %s?)" % close[0] if close else ""


def unknown_flag_message(flag):
    known = [f for o in OPTIONS for f in o.flags if f.startswith("--")] + ["--check", "--version", "--help"]
    # "-t" glued to its value is a known flag; anything else after one dash may be a value
    name = flag if flag.startswith("--") else shown(flag)
    return "unknown option %s%s; see --help" % (name, suggestion(flag, known))


def unknown_names(names, known, official_only, where):
    """Warnings for the settings named in `names` (JSON keys, AGENT_* names)
    that only some official agent version had; ConfigError, with the closest
    real name, for any other that sets nothing: a misspelt disable_web_ssh
    must not leave remote control on."""
    warnings = []
    for name in sorted(names):
        if name in official_only:
            warnings.append("ignoring %s in %s: an official agent setting this agent does not implement"
                            % (name, where))
        elif name not in known:
            raise ConfigError("unknown setting %s in %s%s; see --help" % (name, where, suggestion(name, known)))
    return warnings


def finish_config(cfg, warnings):
    """Cross-field checks and derived values."""
    if cfg.memory_mode_available:
        warnings.append("memory_mode_available is deprecated and has no effect; use --memory-include-cache")
    if not cfg.dry_run and not cfg.show_warning:
        if not cfg.endpoint:
            raise ConfigError("no panel endpoint: pass --endpoint https://your-panel (or AGENT_ENDPOINT)")
        if not cfg.token and not cfg.auto_discovery:
            raise ConfigError("no token: pass --token TOKEN from the panel (or AGENT_TOKEN, or --auto-discovery KEY)")
    if cfg.endpoint:
        cfg.endpoint = normalise_endpoint(cfg.endpoint)
    if cfg.interval > MAX_REPORT_GAP:
        warnings.append("--interval %g is above %g s; reports are still sent every %g s because the panel "
                        "drops a socket that is silent for 11 s" % (cfg.interval, MAX_REPORT_GAP, MAX_REPORT_GAP))
    cfg.nics_include = split_list(cfg.include_nics, ",")
    cfg.nics_exclude = split_list(cfg.exclude_nics, ",")
    cfg.mountpoints = split_list(cfg.include_mountpoint, ";")
    return cfg


def split_list(text, sep):
    return [part.strip() for part in text.split(sep) if part.strip()]


def normalise_endpoint(endpoint):
    """The endpoint without trailing slashes, with an IDNA host; ConfigError if
    it is not an http(s) URL."""
    from urllib.parse import urlsplit, urlunsplit
    url = endpoint.strip().rstrip("/")
    try:
        parts = urlsplit(url)
        parts.port  # ValueError when out of range
    except ValueError:  # "http://[::1", "http://h:99999"
        parts, problem = None, "its host or port is not valid"
    else:
        problem = "it does not start with http:// or https://" if parts.scheme.lower() not in ("http", "https") \
            else "" if parts.hostname else "it names no host"
    if problem:
        # what is wrong, not the value: a token given to -e by mistake must not be printed
        raise ConfigError("endpoint must look like https://panel.example.com: %s" % problem)
    host = parts.hostname
    try:
        host.encode("ascii")
    except UnicodeEncodeError:
        try:
            ascii_host = host.encode("idna").decode("ascii")
        except UnicodeError:
            raise ConfigError("endpoint host %r cannot be IDNA-encoded" % host)
        netloc = parts.netloc.replace(host, ascii_host) if host in parts.netloc else ascii_host
        parts = parts._replace(netloc=netloc)
    return urlunsplit((parts.scheme.lower(), parts.netloc, parts.path.rstrip("/"), "", ""))


# ---------------------------------------------------------------------------
# Linux: /proc and /sys, read and parsed
# ---------------------------------------------------------------------------

class OpenProcFiles:
    """The proc files a report reads, each opened once and re-read with pread
    at offset 0, which makes the kernel regenerate it: the same figures
    without the path walk, open and close every second (about half the cost
    of a small proc file)."""

    def __init__(self):
        self.fds = {}

    def read(self, path):
        data = self.head(path)
        if len(data) == 65536:  # a big file: read it whole the usual way
            return read_text(path)
        return data.decode("utf-8", "surrogateescape")

    def first_line(self, path):
        # /proc/stat of a big machine can pass 64 KiB; its first line cannot
        return self.head(path).split(b"\n", 1)[0].decode("ascii", "replace")

    def head(self, path):
        """Up to 64 KiB from the start of the file, freshly generated."""
        fd = self.fds.get(path)
        if fd is None:
            fd = os.open(path, os.O_RDONLY)
            kept = self.fds.setdefault(path, fd)
            if kept != fd:  # another thread opened it first
                os.close(fd)
                fd = kept
        try:
            return os.pread(fd, 65536, 0)
        except OSError:
            self.forget(path)
            raise

    def forget(self, path):
        fd = self.fds.pop(path, None)
        if fd is not None:
            os.close(fd)


# -- cpu ---------------------------------------------------------------------

def cpu_busy_total(stat_line):
    """(busy, total) jiffies from the aggregate `cpu` line of /proc/stat.
    guest time is already inside user/nice, so it is not added again;
    iowait counts as idle."""
    fields = stat_line.split()
    values = [int(v) for v in fields[1:11]] + [0] * (11 - len(fields))
    user, nice, system, idle, iowait, irq, softirq, steal = values[:8]
    total = user + nice + system + idle + iowait + irq + softirq + steal
    return total - idle - iowait, total


# -- memory ------------------------------------------------------------------

# only the fields the figures use: converting all fifty is a tenth of a report
MEMINFO_FIELD = re.compile(r"^(MemTotal|MemFree|MemAvailable|Buffers|Cached|SReclaimable|Shmem|"
                           r"SwapTotal|SwapFree|SwapCached):\s+(\d+)", re.M)


def parse_meminfo(text):
    """The fields of /proc/meminfo the figures need, as {field: bytes}."""
    return {name: int(value) * 1024 for name, value in MEMINFO_FIELD.findall(text)}


def ram_usage(info, include_cache=False):
    """(total, used) bytes. Default is htop's figure, which is what users
    compare with: total - (free + buffers + cached + sreclaimable) + shmem."""
    total = info.get("MemTotal", 0)
    free = info.get("MemFree", 0)
    if include_cache:
        used = total - free
    else:
        reclaimable = free + info.get("Buffers", 0) + info.get("Cached", 0) + info.get("SReclaimable", 0)
        used = (total - reclaimable if reclaimable <= total else total - free) + info.get("Shmem", 0)
    # LXC/OpenVZ can expose a meminfo whose fields do not add up.
    return total, min(max(used, 0), total)


def swap_usage(info):
    total = info.get("SwapTotal", 0)
    used = total - info.get("SwapFree", 0) - info.get("SwapCached", 0)
    if used < 0:
        used = total - info.get("SwapFree", 0)
    return total, min(max(used, 0), total)


# -- disk --------------------------------------------------------------------

class Mount:
    __slots__ = ("devno", "root", "mountpoint", "fstype", "source", "options")

    def __init__(self, devno, root, mountpoint, fstype, source, options):
        self.devno, self.root, self.mountpoint = devno, root, mountpoint
        self.fstype, self.source, self.options = fstype, source, options

    def __repr__(self):
        return "Mount(%s %s %s %s)" % (self.mountpoint, self.fstype, self.source, self.devno)


def unescape_mount_field(text):
    # the kernel writes space, tab, newline and backslash as \ooo
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), text)


def parse_mountinfo(text):
    """/proc/PID/mountinfo as a list of Mount."""
    mounts = []
    for line in text.splitlines():
        left, sep, right = line.partition(" - ")
        fields = left.split()
        tail = right.split()
        if not sep or len(fields) < 6 or len(tail) < 2:
            continue
        mounts.append(Mount(fields[2], unescape_mount_field(fields[3]), unescape_mount_field(fields[4]),
                            tail[0], unescape_mount_field(tail[1]), fields[5] + "," + (tail[2] if len(tail) > 2 else "")))
    return mounts


SKIP_MOUNT_PREFIXES = ("/proc", "/sys", "/dev", "/run", "/tmp", "/var/tmp", "/var/lib/docker",
                       "/var/lib/containers", "/var/lib/kubelet", "/snap", "/nix/store",
                       "/etc/resolv.conf", "/etc/hostname", "/etc/hosts", "/boot/efi")
SKIP_FSTYPES = {"tmpfs", "devtmpfs", "udev", "proc", "sysfs", "devpts", "mqueue", "hugetlbfs", "debugfs",
                "tracefs", "securityfs", "pstore", "bpf", "configfs", "efivarfs", "binfmt_misc", "fusectl",
                "autofs", "rpc_pipefs", "nsfs", "ramfs", "selinuxfs", "squashfs", "overlay", "aufs",
                "nfs", "nfs4", "cifs", "smb3", "smbfs", "vboxsf", "9p", "iso9660", "shm", "cgroup", "cgroup2",
                "zram", "erofs", "virtiofs"}


def under_prefix(path, prefixes):
    # a real path prefix: /run and /run/user, but not /runner
    return any(path == p or path.startswith(p + "/") for p in prefixes)


def disk_key(mount):
    """What identifies the storage behind a mount: ZFS datasets share their
    pool's space, everything else shares its device number (bind mounts, btrfs
    subvolumes and LVM aliases all show the same major:minor)."""
    if mount.fstype == "zfs":
        return "zfs:" + mount.source.split("/", 1)[0]
    return "dev:" + mount.devno


def countable_mounts(mounts):
    """The mounts whose space counts as disk, one per storage key (the shortest
    mount point wins), as a list of (key, Mount). `/` always counts."""
    chosen = {}
    for m in mounts:
        if m.mountpoint != "/":
            fstype = m.fstype
            if under_prefix(m.mountpoint, SKIP_MOUNT_PREFIXES):
                continue
            if fstype in SKIP_FSTYPES or fstype.startswith(("cgroup", "nfs", "fuse.", "smb")):
                continue
            if fstype == "fuse" or m.source.startswith("/dev/loop"):
                continue
        key = disk_key(m)
        if key not in chosen or len(m.mountpoint) < len(chosen[key].mountpoint):
            chosen[key] = m
    # a dataset of a pool keeps its own entry: ZFS space is summed per pool below
    zfs = [m for m in mounts if m.fstype == "zfs" and disk_key(m) in chosen]
    result = [(k, m) for k, m in chosen.items() if not k.startswith("zfs:")]
    seen = set()
    for m in zfs:
        if m.source not in seen:
            seen.add(m.source)
            result.append((disk_key(m), m))
    return result


# -- network -------------------------------------------------------------------

NET_DEV_LINE = re.compile(r"^\s*([^\s:]+):\s*(\d+)(?:\s+\d+){7}\s+(\d+)", re.M)


def parse_net_dev(text):
    """/proc/net/dev as {nic: (rx_bytes, tx_bytes)}."""
    return {name: (int(rx), int(tx)) for name, rx, tx in NET_DEV_LINE.findall(text)}


# -- connections -------------------------------------------------------------

SOCKSTAT_TCP = re.compile(r"^TCP: inuse (\d+).*? tw (\d+)", re.M)
SOCKSTAT_INUSE = {name: re.compile(r"^%s: inuse (\d+)" % name, re.M) for name in ("UDP", "TCP6", "UDP6")}


def sockstat_inuse(text, name):
    found = SOCKSTAT_INUSE[name].search(text)
    return int(found.group(1)) if found else 0


def connections_from_sockstat(v4_text, v6_text):
    """(tcp, udp) socket counts, every state, IPv4 + IPv6, from the kernel's
    counters in /proc/net/sockstat and sockstat6. TCP's tw counter covers
    both families; TCP6 inuse is kept apart from TCP inuse."""
    tcp = SOCKSTAT_TCP.search(v4_text)
    if not tcp:
        raise ValueError("no TCP line in sockstat")
    return (int(tcp.group(1)) + int(tcp.group(2)) + sockstat_inuse(v6_text, "TCP6"),
            sockstat_inuse(v4_text, "UDP") + sockstat_inuse(v6_text, "UDP6"))


def count_table_rows(paths):
    """Socket rows in /proc/net/{tcp,tcp6,...}: the slow fallback."""
    rows, found = 0, False
    for path in paths:
        try:
            with open(path, "rb") as f:
                rows += max(0, sum(1 for line in f if line.strip()) - 1)
            found = True
        except OSError:
            pass
    if not found:
        raise OSError(2, "no socket tables")
    return rows


# -- static facts: CPU, OS, GPU, virtualization --------------------------------

def under(root, path):
    """`path` (absolute) inside the tree at `root`."""
    return os.path.join(root, path.lstrip("/"))


# gopsutil's names for the CPU implementer codes of /proc/cpuinfo, and for the
# part numbers of ARM Ltd. (0x41) cores; an unlisted ARM part is "Undefined".
CPU_IMPLEMENTERS = {0x41: "ARM", 0x42: "Broadcom", 0x43: "Cavium", 0x44: "DEC", 0x46: "Fujitsu",
                    0x48: "HiSilicon", 0x49: "Infineon", 0x4d: "Motorola/Freescale", 0x4e: "NVIDIA",
                    0x50: "APM", 0x51: "Qualcomm", 0x56: "Marvell", 0x61: "Apple", 0x69: "Intel",
                    0xc0: "Ampere"}
ARM_PARTS = {
    0x810: "ARM810", 0x920: "ARM920", 0x922: "ARM922", 0x926: "ARM926", 0x940: "ARM940", 0x946: "ARM946",
    0x966: "ARM966", 0xa20: "ARM1020", 0xa22: "ARM1022", 0xa26: "ARM1026", 0xb02: "ARM11 MPCore",
    0xb36: "ARM1136", 0xb56: "ARM1156", 0xb76: "ARM1176", 0xc05: "Cortex-A5", 0xc07: "Cortex-A7",
    0xc08: "Cortex-A8", 0xc09: "Cortex-A9", 0xc0d: "Cortex-A17", 0xc0e: "Cortex-A17", 0xc0f: "Cortex-A15",
    0xc14: "Cortex-R4", 0xc15: "Cortex-R5", 0xc17: "Cortex-R7", 0xc18: "Cortex-R8", 0xc20: "Cortex-M0",
    0xc21: "Cortex-M1", 0xc23: "Cortex-M3", 0xc24: "Cortex-M4", 0xc27: "Cortex-M7", 0xc60: "Cortex-M0+",
    0xd01: "Cortex-A32", 0xd02: "Cortex-A34", 0xd03: "Cortex-A53", 0xd04: "Cortex-A35", 0xd05: "Cortex-A55",
    0xd06: "Cortex-A65", 0xd07: "Cortex-A57", 0xd08: "Cortex-A72", 0xd09: "Cortex-A73", 0xd0a: "Cortex-A75",
    0xd0b: "Cortex-A76", 0xd0c: "Neoverse-N1", 0xd0d: "Cortex-A77", 0xd0e: "Cortex-A76AE",
    0xd13: "Cortex-R52", 0xd20: "Cortex-M23", 0xd21: "Cortex-M33", 0xd40: "Neoverse-V1",
    0xd41: "Cortex-A78", 0xd42: "Cortex-A78AE", 0xd43: "Cortex-A65AE", 0xd44: "Cortex-X1",
    0xd46: "Cortex-A510", 0xd47: "Cortex-A710", 0xd48: "Cortex-X2", 0xd49: "Neoverse-N2",
    0xd4a: "Neoverse-E1", 0xd4b: "Cortex-A78C", 0xd4c: "Cortex-X1C", 0xd4d: "Cortex-A715", 0xd4e: "Cortex-X3"}


def first_cpu_fields(text):
    """The first processor block of /proc/cpuinfo read the way gopsutil reads
    it: {"name", "vendor", "family"}, or None when it finds no processor."""
    cpu, processor_name = None, ""
    for line in text.splitlines():
        fields = line.split(":")
        if len(fields) < 2:
            continue
        key, value = fields[0].strip(), fields[1].strip()
        if key == "Processor":      # old ARM kernels: one line for all CPUs
            processor_name = value
        elif key in ("processor", "cpu number"):
            if cpu is not None:
                return cpu
            if not re.match(r"^[+-]?\d+$", value):
                return None
            cpu = {"name": processor_name, "vendor": "", "family": ""}
        elif cpu is None:
            continue
        elif key in ("vendorId", "vendor_id"):
            cpu["vendor"] = value
        elif key == "CPU implementer":
            try:
                cpu["vendor"] = CPU_IMPLEMENTERS.get(int(value, 0), cpu["vendor"])
            except ValueError:
                pass
        elif key == "cpu family":
            cpu["family"] = value
        elif key in ("model", "CPU part") and cpu["vendor"] == "ARM":
            try:
                cpu["name"] = ARM_PARTS.get(int(value, 0), "Undefined")
            except ValueError:
                pass
        elif key in ("Model Name", "model name", "cpu"):
            cpu["name"] = value
    return cpu


def cpu_name_from_cpuinfo(text):
    """cpu_name as the official agent sends it: the model name of the first
    CPU, else "<vendor> <family>", else a Model/Hardware/Processor line, else
    "Unknown"."""
    cpu = first_cpu_fields(text)
    if cpu is not None:
        name = cpu["name"].strip()
        if not name and (cpu["vendor"] or cpu["family"]):
            name = (cpu["vendor"] + " " + cpu["family"]).strip()
        if name != "Unknown":
            return name
    for line in text.splitlines():
        if line.startswith(("Model\t", "Hardware\t", "Processor\t")) and ":" in line:
            name = line.split(":", 1)[1].strip()
            if name:
                return name
    return "Unknown"


def logical_cpus(cpuinfo_text, stat_text=""):
    """`processor : N` lines, else cpuN lines of /proc/stat."""
    count = sum(1 for line in cpuinfo_text.splitlines()
                if line.lower().startswith("processor") and re.match(r"^\s*[+-]?\d+\s*$", line.partition(":")[2]))
    count = count or sum(1 for line in stat_text.splitlines() if re.match(r"^cpu\d", line))
    return count or os.cpu_count() or 1


def physical_cores(sys_root="/sys", cpuinfo_text=""):
    """Distinct cores by /sys topology, else the sum of `cpu cores` per
    `physical id` in /proc/cpuinfo; 0 when unknown."""
    base = under(sys_root, "/devices/system/cpu")
    try:
        names = sorted(n for n in os.listdir(base) if re.match(r"^cpu\d", n))
    except OSError:
        names = []
    for leaf in ("core_cpus_list", "thread_siblings_list"):
        cores = set()
        for name in names:
            try:
                lines = read_text(os.path.join(base, name, "topology", leaf)).splitlines()
            except OSError:
                continue
            if len(lines) == 1:
                cores.add(lines[0])
        if cores:
            return len(cores)
    per_package, current = {}, {}
    for line in cpuinfo_text.splitlines() + [""]:
        line = line.strip().lower()
        if not line:
            if "physical id" in current and "cpu cores" in current:
                per_package[current["physical id"]] = current["cpu cores"]
            current = {}
            continue
        key, _, value = line.partition(":")
        if key.strip() in ("physical id", "cpu cores") and re.match(r"^\s*\d+\s*$", value):
            current[key.strip()] = int(value)
    return sum(per_package.values())


def os_name_from_release(text):
    for line in text.splitlines():
        if line.startswith("PRETTY_NAME="):
            return line[len("PRETTY_NAME="):].strip('"')
    return ""


def release_value(root, key):
    try:
        text = read_text(under(root, "/etc/os-release"))
    except OSError:
        return ""
    return next((line[len(key) + 1:].strip('"') for line in text.splitlines() if line.startswith(key + "=")), "")


def device_label(version, brand, model):
    label = "Android " + version
    if model:
        label += " (%s %s)" % (brand, model) if brand and brand != model else " (%s)" % model
    return label


def android_name(root):
    status, version = run_output(["getprop", "ro.build.version.release"])
    if status == 0 and version:
        props = [run_output(["getprop", key]) for key in ("ro.product.brand", "ro.product.model")]
        brand, model = [out.strip() if code == 0 else "" for code, out in props]
        return device_label(version.strip(), brand, model)
    if os.path.exists(under(root, "/system/build.prop")):
        props = {}
        try:
            for line in read_text(under(root, "/system/build.prop")).splitlines():
                key, sep, value = line.strip().partition("=")
                if sep and key in ("ro.build.version.release", "ro.product.model", "ro.product.brand"):
                    props.setdefault(key, value)
        except OSError:
            return "Android"
        if not props.get("ro.build.version.release"):
            return "Android"
        return device_label(props["ro.build.version.release"], props.get("ro.product.brand", ""),
                            props.get("ro.product.model", ""))
    dirs = ("/system/app", "/system/priv-app", "/data/app", "/sdcard")
    return "Android" if sum(os.path.isdir(under(root, d)) for d in dirs) >= 2 else ""


def proxmox_name(root):
    import shutil
    if not shutil.which("pveversion"):
        return ""
    status, out = run_output(["pveversion"])
    if status != 0:
        return ""
    version = ""
    for line in out.splitlines():
        line = line.strip()
        if line.startswith("pve-manager/"):
            version = line.split("/")[1].split("~")[0]
    if not version:
        return "Proxmox VE"
    codename = release_value(root, "VERSION_CODENAME")
    return "Proxmox VE %s (%s)" % (version, codename) if codename else "Proxmox VE " + version


def synology_name(root):
    for path in ("/etc/synoinfo.conf", "/etc.defaults/synoinfo.conf"):
        try:
            text = read_text(under(root, path))
        except OSError:
            continue
        values = {}
        for line in text.splitlines():
            key, sep, value = line.strip().partition("=")
            if sep and key in ("unique", "udc_check_state"):
                values[key] = value.strip('"')
        parts = values.get("unique", "").split("_")
        if "synology_" in values.get("unique", "") and len(parts) >= 3:
            return " ".join(filter(None, ("Synology", parts[-1].upper(), "DSM", values.get("udc_check_state"))))
    return "Synology DSM" if os.path.isdir(under(root, "/usr/syno")) else ""


def fnos_name(root):
    try:
        version = read_text(under(root, "/usr/trim/BUILD_VERSION")).strip()
    except OSError:
        version = ""
    if version:
        return "fnOS " + version
    return "fnOS" if os.path.isdir(under(root, "/usr/trim")) else ""


def os_name(root="/"):
    """The official agent's OS label: Android, Proxmox VE, Synology DSM and
    fnOS by their own markers, else PRETTY_NAME of /etc/os-release."""
    for detect in (android_name, proxmox_name, synology_name, fnos_name):
        name = detect(root)
        if name:
            return name
    try:
        text = read_text(under(root, "/etc/os-release"))
    except OSError:
        return "Linux"
    return os_name_from_release(text) or "Linux"


LSPCI_NOT_A_GPU = [re.compile(p) for p in (r"^1111", r"(?i)^cirrus logic (cl[-\s]?)?gd 5", r"(?i)virtio",
                                           r"(?i)vmware", r"(?i)qxl", r"(?i)hyper-v")]
GPU_VENDOR_WORDS = ("nvidia", "amd", "radeon", "intel", "arc", "snap", "qualcomm", "snapdragon")


def lspci_device_name(line):
    """The text after the last colon, without the trailing "(rev xx)"."""
    name = line.rpartition(":")[2].strip() if ":" in line else ""
    if "(" in name:
        name = name[:name.rindex("(")].strip()
    return name


def real_gpu_names(names):
    """The display adapters worth naming: virtual ones dropped, and those of
    a GPU vendor alone where there are any (a server's BMC chip is no GPU)."""
    names = [n for n in names if n and not any(p.search(n) for p in LSPCI_NOT_A_GPU)]
    return [n for n in names if any(v in n.lower() for v in GPU_VENDOR_WORDS)] or names


def gpu_names_from_lspci(text):
    """Display controllers of the lspci listing: those of a GPU vendor, else any."""
    shown = [line for line in text.splitlines()
             if any(word in line.lower() for word in ("vga", "3d", "display"))]
    return real_gpu_names([lspci_device_name(line) for line in shown])


VIRTUAL_DRM_DRIVERS = {"virtio-pci", "virtio_gpu", "bochs-drm", "qxl", "vmwgfx", "cirrus", "vboxvideo",
                       "hyperv_fb", "simpledrm", "simplefb", "cirrus-qemu"}
DRM_DRIVER_NAMES = {"vc4": "Broadcom VideoCore IV/VI (Raspberry Pi)", "vc4-drm": "Broadcom VideoCore IV/VI (Raspberry Pi)",
                    "v3d": "Broadcom V3D (Raspberry Pi 4/5)", "v3d-drm": "Broadcom V3D (Raspberry Pi 4/5)",
                    "msm": "Qualcomm Adreno (Unknown Model)", "msm_drm": "Qualcomm Adreno (Unknown Model)",
                    "panfrost": "ARM Mali (Panfrost)", "lima": "ARM Mali (Lima)",
                    "sun4i-drm": "Allwinner Display Engine", "sunxi-drm": "Allwinner Display Engine",
                    "tegra": "NVIDIA Tegra", "ast": "ASPEED Technology, Inc. ASPEED Graphics Family",
                    "i915": "Intel Integrated Graphics", "i915-drm": "Intel Integrated Graphics",
                    "mgag200": "Matrox G200 Series"}


def soc_gpu_model(driver, compatible):
    """A GPU model named by a devicetree `compatible` list, or ""."""
    text = compatible.replace(b"\0", b" ").decode("utf-8", "replace").lower()
    if driver == "msm" or "adreno" in text:
        found = re.search(r"adreno[-_](\d+)", text)
        return "Qualcomm Adreno " + found.group(1) if found else "Qualcomm Adreno"
    if driver in ("panfrost", "lima") or "mali" in text:
        found = re.search(r"mali[-_]([a-z]\d+)", text)
        return "ARM Mali " + found.group(1).upper() if found else "ARM Mali"
    if driver in ("vc4", "vc4-drm", "v3d"):
        for chip, name in (("bcm2712", "Broadcom VideoCore VII (Pi 5)"), ("bcm2711", "Broadcom VideoCore VI (Pi 4)"),
                           ("bcm2837", "Broadcom VideoCore IV"), ("bcm2835", "Broadcom VideoCore IV")):
            if chip in text:
                return name
    if "allwinner" in text or "sun50i" in text or "sun8i" in text:
        found = re.search(r"sun\d+i-([a-z0-9]+)", text)
        return "Allwinner " + found.group(1).upper() if found else "Allwinner Display Engine"
    if driver == "tegra":
        for chip, name in (("tegra194", "NVIDIA Tegra Xavier"), ("tegra234", "NVIDIA Orin"),
                           ("tegra210", "NVIDIA Tegra X1")):
            if chip in text:
                return name
    return ""


def gpu_names_from_drm(sys_root="/sys"):
    """GPUs of /sys/class/drm/cardN by their driver (ARM boards have no PCI)."""
    base = under(sys_root, "/class/drm")
    try:
        cards = sorted(n for n in os.listdir(base) if re.match(r"^card\d+$", n))
    except OSError:
        cards = []
    names = []
    for card in cards:
        device = os.path.join(base, card, "device")
        try:
            driver = os.path.basename(os.readlink(os.path.join(device, "driver")))
        except OSError:
            continue
        if driver in VIRTUAL_DRM_DRIVERS:
            continue
        try:
            with open(os.path.join(device, "of_node", "compatible"), "rb") as f:
                name = soc_gpu_model(driver, f.read())
        except OSError:
            name = ""
        name = (name or DRM_DRIVER_NAMES.get(driver) or "Direct Render Manager " + driver).strip()
        if not re.search(r"virtio|vmware|qxl|hyper-v|cirrus", name.lower()):
            names.append(name)
    return names


def group_names(names):
    """"A × 2, B" for [A, A, B]; "None" for no names."""
    counts = {}
    for name in names:
        name = name.strip()
        if name:
            counts[name] = counts.get(name, 0) + 1
    return ", ".join(n if c == 1 else "%s \u00d7 %d" % (n, c) for n, c in counts.items()) or "None"


def gpu_name(sys_root="/sys"):
    """gpu_name as the official agent sends it: lspci, else DRM devices, else
    the Raspberry Pi's own GPU, else "None"."""
    names = gpu_names_from_lspci(run_quiet(["lspci"])) or gpu_names_from_drm(sys_root)
    if names:
        return group_names(names)
    try:
        if "Raspberry Pi" in read_text(under(sys_root, "/firmware/devicetree/base/model")):
            return "Broadcom VideoCore (Integrated)"
    except OSError:
        pass
    return "None"


CGROUP_RUNTIMES = ((r"/(docker|cri-containerd)[/-][0-9a-f]{12,64}(\.scope)?$", "docker"),
                   (r"/docker-[0-9a-f]{12,64}\.scope$", "docker"),
                   (r"/(libpod|podman)[-_][0-9a-f]{12,64}(\.scope)?$", "podman"),
                   (r"/crio-[0-9a-f]{12,64}\.scope$", "container"),
                   (r"/kubepods[/.].*[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}", "kubernetes"),
                   (r"/lxc/[^/]+$", "lxc"))


def virtualization_from_cgroup(text):
    """The container runtime named by a cgroup path's last element, or ""."""
    low = text.lower()
    for pattern, name in CGROUP_RUNTIMES:
        if re.search(pattern, low, re.M):
            return name
    return ""


def container_marker(root="/", proc="/proc"):
    """The official container checks: marker files, then cgroup paths."""
    def cgroup():
        try:
            return virtualization_from_cgroup(read_text(proc + "/self/cgroup"))
        except OSError:
            return ""
    if os.path.isfile(under(root, "/.dockerenv")):
        return "docker"
    if os.path.isfile(under(root, "/run/.containerenv")):
        return cgroup() or "container"
    verdict = cgroup()
    if verdict:
        return verdict
    if os.path.isfile(under(root, "/dev/.lxc-boot-id")):
        return "lxc"
    if os.path.isfile(under(root, "/.komari-agent-container")):
        return "container"
    return ""


DMI_VENDORS = (("kvm", "kvm"), ("qemu", "qemu"), ("vmware", "vmware"), ("virtualbox", "oracle"),
               ("microsoft", "microsoft"), ("xen", "xen"), ("bochs", "bochs"), ("parallels", "parallels"),
               ("amazon ec2", "amazon"), ("google compute", "google"), ("openstack", "kvm"),
               ("bhyve", "bhyve"))


def hypervisor_verdict(proc="/proc", sys_root="/sys"):
    """What stands in for the official agent's CPUID probe, which Python
    cannot make: OpenVZ and WSL markers, the DMI vendor, the cpuinfo
    `hypervisor` flag (the CPUID bit itself)."""
    if os.path.exists(proc + "/vz") and not os.path.exists(proc + "/bc"):
        return "openvz"
    try:
        if "microsoft" in read_text(proc + "/sys/kernel/osrelease").lower():
            return "wsl"
    except OSError:
        pass
    dmi = ""
    for leaf in ("sys_vendor", "product_name", "bios_vendor"):
        try:
            dmi += " " + read_text(under(sys_root, "/class/dmi/id/" + leaf)).lower()
        except OSError:
            pass
    for needle, name in DMI_VENDORS:
        if needle in dmi:
            return name
    try:
        if re.search(r"^flags\s*:.*\bhypervisor\b", read_text(proc + "/cpuinfo"), re.M):
            return "virtualized"
    except OSError:
        pass
    return "none"


def virtualization(root="/", proc="/proc", sys_root="/sys"):
    """systemd-detect-virt when it exits 0, else container markers, else the
    hypervisor; "none" on bare metal."""
    answer = run_quiet(["systemd-detect-virt"]).strip()
    return answer or container_marker(root, proc) or hypervisor_verdict(proc, sys_root)


# -- boot ----------------------------------------------------------------------

def boot_identity(proc="/proc"):
    """(boot id, boot time) from /proc; None where it does not tell."""
    try:
        boot_id = read_text(proc + "/sys/kernel/random/boot_id").strip()
    except OSError:
        boot_id = ""
    boot_time = None
    try:
        for line in read_text(proc + "/stat").splitlines():
            if line.startswith("btime "):
                boot_time = float(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    if boot_time is None:
        return None
    return boot_id or "btime:%d" % round(boot_time, -1), boot_time


# ---------------------------------------------------------------------------
# macOS and FreeBSD: helper programs' answers, parsed
# ---------------------------------------------------------------------------

# Neither system has /proc: psutil gives the figures, and a few facts come
# from the programs the official agent runs there (sw_vers, system_profiler,
# pciconf) or from sysctl. The parsers below take those programs' output as
# text, so that captured outputs test them anywhere.

# -- OS, CPU and virtualization --------------------------------------------------

def macos_name(sw_vers_text):
    """"macOS 14.4.1" from `sw_vers`; "" when it names no product. 10.12 to
    10.15 still call themselves "Mac OS X" there; the panel's OS logo is
    found by the word "macOS"."""
    fields = {}
    for line in sw_vers_text.splitlines():
        key, sep, value = line.partition(":")
        if sep:
            fields[key.strip()] = value.strip()
    product = fields.get("ProductName", "")
    if not product:
        return ""
    if product.startswith("Mac OS X"):
        product = "macOS"
    # ProductVersionExtra is a Rapid Security Response's "(a)"
    return " ".join(filter(None, (product, fields.get("ProductVersion"), fields.get("ProductVersionExtra"))))


# hw.model of a Mac guest names its hypervisor; systemd-detect-virt's names
MAC_GUEST_MODELS = (("vmware", "vmware"), ("parallels", "parallels"), ("virtualbox", "oracle"),
                    ("virtualmac", "apple"))


def macos_virtualization(vmm_present, cpu_features, model):
    """virtualization from sysctl kern.hv_vmm_present (macOS 11 on), else
    machdep.cpu.features' VMM flag (Intel), and hw.model for the name."""
    if vmm_present.strip() != "1" and "VMM" not in cpu_features.split():
        return "none"
    low = model.lower()
    return next((name for needle, name in MAC_GUEST_MODELS if needle in low), "virtualized")


# kern.vm_guest's words where systemd-detect-virt (and so the panel) says another
FREEBSD_GUESTS = {"generic": "virtualized", "hv": "microsoft", "vbox": "oracle"}


def freebsd_virtualization(jailed, vm_guest):
    """virtualization from sysctl security.jail.jailed (a jail is FreeBSD's
    container) and kern.vm_guest (none, kvm, bhyve, xen, vmware, hv, …)."""
    if jailed.strip() == "1":
        return "jail"
    guest = vm_guest.strip().lower()
    if not guest or guest == "none":
        return "none"
    return FREEBSD_GUESTS.get(guest, guest)


# -- GPU names ---------------------------------------------------------------------

def gpu_names_from_system_profiler(text):
    """The `Chipset Model:` of each GPU in `system_profiler SPDisplaysDataType`."""
    names = [line.split(":", 1)[1].strip() for line in text.splitlines()
             if line.strip().startswith("Chipset Model:")]
    return real_gpu_names(names)


# PCI vendors of emulated display adapters: QEMU/Bochs, VMware, virtio, QXL,
# VirtualBox, Hyper-V, bhyve
VIRTUAL_PCI_VENDORS = {0x1234, 0x15ad, 0x1af4, 0x1b36, 0x80ee, 0x1414, 0xfb5d}


def pciconf_displays(text):
    """[(vendor id, device id, vendor name, device name)] of the display
    controllers (PCI class 0x03) in `pciconf -lv`. Its header line gives the
    ids as vendor= and device= (FreeBSD 13 on) or as chip=0xDDDDVVVV."""
    displays, current = [], None
    for line in text.splitlines():
        if not line[:1].isspace() and "@pci" in line:
            ids = {k: int(v, 16) for k, v in re.findall(r"\b(\w+)=0x([0-9a-fA-F]+)", line)}
            chip = ids.get("chip", 0)
            current = None
            if ids.get("class", 0) >> 16 == 0x03:
                current = [ids.get("vendor", chip & 0xFFFF), ids.get("device", chip >> 16), "", ""]
                displays.append(current)
        elif current is not None:
            key, sep, value = line.partition("=")
            if sep and key.strip() in ("vendor", "device"):
                current[2 if key.strip() == "vendor" else 3] = value.strip().strip("'")
    return [tuple(d) for d in displays]


def gpu_names_from_pciconf(text):
    """GPU names as lspci gives them on Linux ("NVIDIA Corporation GA102
    [GeForce RTX 3090]"); ids where the PCI database names neither."""
    names = [" ".join(filter(None, (vendor, device))) or "PCI %04x:%04x" % (vendor_id, device_id)
             for vendor_id, device_id, vendor, device in pciconf_displays(text)
             if vendor_id not in VIRTUAL_PCI_VENDORS]
    return real_gpu_names(names)


# -- connections and disks -----------------------------------------------------------

def sockets_from_netstat(text):
    """(tcp, udp) rows of `netstat -an`, every state (TIME_WAIT too) and
    both families (tcp4, tcp6, tcp46, …); None when it listed nothing at all."""
    if "Proto" not in text:
        return None
    tcp = udp = 0
    for line in text.splitlines():
        proto = line[:5].lower()
        if proto.startswith("tcp"):
            tcp += 1
        elif proto.startswith("udp"):
            udp += 1
    return tcp, udp


# Mounts that hold no space of their own, or someone else's: devfs, fdescfs,
# procfs, Linux emulation, nullfs and unionfs (another tree again), automount
# triggers, network and optical filesystems. tmpfs, nfs, smbfs and the like are
# in SKIP_FSTYPES already.
BSD_SKIP_FSTYPES = {"devfs", "fdescfs", "procfs", "linprocfs", "linsysfs", "nullfs", "unionfs", "mqueuefs",
                    "afpfs", "webdav", "cd9660", "udf", "mtmfs", "ptyfs"}
BSD_FUSE_FSTYPES = ("fusefs", "macfuse", "osxfuse")


def bsd_storage(device, fstype):
    """What holds a mount's space: an APFS volume's container (its volumes
    share one space: /dev/disk3s1s1 and /dev/disk3s5 are both disk3), else
    the device."""
    if fstype == "apfs":
        found = re.match(r"^(/dev/disk\d+)s\d", device)
        if found:
            return found.group(1)
    return device


def bsd_countable_mounts(partitions):
    """[(key, Mount)] whose space counts, from getfsstat(2)'s (device, mount
    point, fstype, options) as psutil lists them: the Linux rules, and on top
    the systems' own pseudo filesystems and macOS's hidden (dontbrowse)
    volumes: VM, Preboot, Update, snapshots; `/` always."""
    mounts = []
    for device, mountpoint, fstype, opts in partitions:
        if mountpoint != "/" and (fstype in BSD_SKIP_FSTYPES or fstype.startswith(BSD_FUSE_FSTYPES)
                                  or "dontbrowse" in opts.split(",")):
            continue
        mounts.append(Mount(bsd_storage(device, fstype), "/", mountpoint, fstype, device, opts))
    return countable_mounts(mounts)


# ---------------------------------------------------------------------------
# Windows: the registry and the system's figures, read through ctypes
# ---------------------------------------------------------------------------

# What the official agent asks Windows, asked without DXGI, SMBIOS, WMI or
# performance counters, which a box (or Wine) may lack: the registry for the
# edition, build, CPU and GPU names and the firmware's maker; kernel32, psapi
# and ntdll for CPU times, uptime, swap and volumes; advapi32 for who we run as
# and for the state directory's ACL; the console's control events for a clean
# stop. The readers work only on Windows and only the Platform section calls
# them; the parsers take plain values, so fixture data tests them anywhere.

# -- the registry ------------------------------------------------------------------

WINDOWS_VERSION_KEY = r"SOFTWARE\Microsoft\Windows NT\CurrentVersion"
CPU0_KEY = r"HARDWARE\DESCRIPTION\System\CentralProcessor\0"
FIRMWARE_KEYS = (r"HARDWARE\DESCRIPTION\System", r"HARDWARE\DESCRIPTION\System\BIOS")
DISPLAY_CLASS_KEY = r"SYSTEM\CurrentControlSet\Control\Class\{4d36e968-e325-11ce-bfc1-08002be10318}"


def registry_key(path):
    """The HKEY_LOCAL_MACHINE key `path`, opened for reading in the 64-bit
    view (a 32-bit Python would otherwise read WOW6432Node); OSError when missing."""
    import winreg
    return winreg.OpenKey(winreg.HKEY_LOCAL_MACHINE, path, 0, winreg.KEY_READ | winreg.KEY_WOW64_64KEY)


def registry_values(path):
    """{name: value} of the key `path`; {} when it is missing."""
    import winreg
    values = {}
    try:
        with registry_key(path) as key:
            for index in itertools.count():
                name, value, _ = winreg.EnumValue(key, index)
                values[name] = value
    except OSError:  # the key is missing, or the last value was read
        pass
    return values


def registry_subkeys(path):
    import winreg
    names = []
    try:
        with registry_key(path) as key:
            for index in itertools.count():
                names.append(winreg.EnumKey(key, index))
    except OSError:
        pass
    return names


# -- edition, build, CPU -----------------------------------------------------------

def windows_edition(product_name, build):
    """The edition as the official agent names it: ProductName, which still
    says "Windows 10" on Windows 11 (build 22000 on); Server names as they
    are; "Microsoft Windows" when the registry names none."""
    name = str(product_name or "").strip()
    if not name:
        return "Microsoft Windows"
    if "Server" in name or "Windows 11" in name:
        return name
    try:
        number = int(build)
    except (TypeError, ValueError):
        number = 0
    return name.replace("Windows 10", "Windows 11", 1) if number >= 22000 else name


def windows_kernel(build, ubr):
    """CurrentBuild.UBR ("22631.4460"): the build and its cumulative update,
    the build alone without an UBR."""
    build = str(build or "").strip()
    if not build:
        return "Unknown"
    return "%s.%d" % (build, ubr) if isinstance(ubr, int) and not isinstance(ubr, bool) else build


# -- GPU names ---------------------------------------------------------------------

# Display adapters that are no GPU: Windows' own driverless stand-ins, Remote
# Desktop's adapter, and virtual monitors (indirect display drivers); virtual
# machines' adapters (Hyper-V, VMware, QXL, virtio) go as on Linux.
WINDOWS_NOT_A_GPU = re.compile(r"(?i)\bbasic (display|render)\b|\bremote display\b|\bindirect display\b|"
                               r"\bvirtual (display|monitor)\b|\biddsampledriver\b")


def gpu_names_from_display_class(descriptions):
    """GPU names from the display-adapter class's driver keys, {"0000":
    DriverDesc, …}, in their order; no DXGI needed."""
    names = [str(desc).strip() for key, desc in sorted(descriptions.items())
             if re.match(r"^\d{4}$", key) and isinstance(desc, str) and not WINDOWS_NOT_A_GPU.search(desc)]
    return real_gpu_names(names)


def display_adapter_descriptions():
    """{driver key: DriverDesc} of every display adapter Windows has a driver for."""
    return {key: registry_values(DISPLAY_CLASS_KEY + "\\" + key).get("DriverDesc")
            for key in registry_subkeys(DISPLAY_CLASS_KEY) if re.match(r"^\d{4}$", key)}


# -- virtualization ----------------------------------------------------------------

# What a hypervisor writes into its guest's firmware tables, which Windows
# copies into HARDWARE\DESCRIPTION\System: the maker, the product, the BIOS
# and the ACPI tables' OEM ("BOCHS", "VBOX", "VRTUAL"). Named as the official
# agent's CPUID probe names them: QEMU's firmware (SeaBIOS, BOCHS tables) is
# nearly always KVM's.
WINDOWS_HYPERVISORS = (("amazon ec2", "amazon"), ("google compute", "google"), ("vmware", "vmware"),
                       ("virtualbox", "oracle"), ("innotek", "oracle"), ("vbox", "oracle"),
                       ("parallels", "parallels"), ("xen", "xen"), ("bhyve", "bhyve"), ("acrn", "acrn"),
                       ("kvm", "kvm"), ("qemu", "kvm"), ("bochs", "kvm"), ("seabios", "kvm"),
                       ("openstack", "kvm"), ("vrtual", "microsoft"), ("hyper-v", "microsoft"))


def windows_virtualization(firmware):
    """The hypervisor named by the firmware's registry values
    (SystemManufacturer, SystemProductName, BIOSVendor, BIOSVersion,
    SystemBiosVersion); "none" when none is named. A Microsoft machine is a
    Hyper-V guest only when it calls itself a Virtual Machine (a Surface is
    no guest)."""
    def text(name):
        value = firmware.get(name) or ""
        return " ".join(value) if isinstance(value, (list, tuple)) else str(value)
    maker, product = text("SystemManufacturer").lower(), text("SystemProductName").lower()
    if "microsoft" in maker and "virtual machine" in product:
        return "microsoft"
    found = " ".join([maker, product] + [text(name).lower() for name in
                                         ("BIOSVendor", "BIOSVersion", "SystemBiosVersion", "VideoBiosVersion")])
    return next((name for needle, name in WINDOWS_HYPERVISORS if needle in found), "none")


def firmware_values():
    values = {}
    for key in FIRMWARE_KEYS:
        values.update(registry_values(key))
    return values


# -- memory and swap -----------------------------------------------------------------

def swap_from_commit(commit_limit, physical_total, page_size, page_files=None):
    """(total, used) bytes of swap from GetPerformanceInfo's pages, as
    psutil and gopsutil reckon it: the page files' size is the commit limit
    beyond RAM; used is that times the page files' share in use
    ([(size, in use)] pages from SystemPageFileInformation), 0 without them."""
    total = max(0, commit_limit - physical_total) * page_size
    size = sum(s for s, _ in page_files or ())
    used = int(total * sum(u for _, u in page_files) / size) if size else 0
    return total, min(max(used, 0), total)


def parse_page_files(data):
    """[(size, in use)] pages of each page file, from the chained
    SYSTEM_PAGEFILE_INFORMATION records NtQuerySystemInformation fills in."""
    files, offset = [], 0
    while offset + 16 <= len(data):
        following, size, in_use, _peak = struct.unpack_from("<IIII", data, offset)
        files.append((size, in_use))
        if following == 0:
            break
        offset += following
    return files


def performance_pages():
    """(commit limit, physical total, page size) of GetPerformanceInfo,
    the first two in pages; it needs no performance counters."""
    import ctypes
    fields = ("CommitTotal", "CommitLimit", "CommitPeak", "PhysicalTotal", "PhysicalAvailable", "SystemCache",
              "KernelTotal", "KernelPaged", "KernelNonpaged", "PageSize")

    class Information(ctypes.Structure):
        _fields_ = [("cb", ctypes.c_uint32)] + [(name, ctypes.c_size_t) for name in fields] + \
                   [(name, ctypes.c_uint32) for name in ("HandleCount", "ProcessCount", "ThreadCount")]
    info = Information(cb=ctypes.sizeof(Information))
    psapi = ctypes.WinDLL("psapi", use_last_error=True)
    if not psapi.GetPerformanceInfo(ctypes.byref(info), info.cb):
        raise ctypes.WinError(ctypes.get_last_error())
    return info.CommitLimit, info.PhysicalTotal, info.PageSize


def page_file_pages():
    """[(size, in use)] pages of each page file; OSError where the system
    will not tell (Wine)."""
    import ctypes
    ntdll = ctypes.WinDLL("ntdll")
    size = 4096
    while size <= 1 << 20:
        buffer, needed = ctypes.create_string_buffer(size), ctypes.c_uint32()
        status = ntdll.NtQuerySystemInformation(18, buffer, size, ctypes.byref(needed)) & 0xFFFFFFFF
        if status == 0:
            return parse_page_files(buffer.raw[:needed.value or size])
        if status != 0xC0000004:  # STATUS_INFO_LENGTH_MISMATCH: a bigger buffer
            raise OSError("NtQuerySystemInformation(SystemPageFileInformation) failed: 0x%08X" % status)
        size *= 4
    raise OSError("too many page files")


# -- CPU time and uptime -----------------------------------------------------------

def system_times():
    """(idle, kernel, user) time of all CPUs since boot, in 100 ns units
    (GetSystemTimes; kernel time includes idle time)."""
    import ctypes
    idle, kernel, user = ctypes.c_uint64(), ctypes.c_uint64(), ctypes.c_uint64()
    kernel32 = ctypes.WinDLL("kernel32", use_last_error=True)
    if not kernel32.GetSystemTimes(ctypes.byref(idle), ctypes.byref(kernel), ctypes.byref(user)):
        raise ctypes.WinError(ctypes.get_last_error())
    return idle.value, kernel.value, user.value


def milliseconds_since_boot():
    import ctypes
    kernel32 = ctypes.WinDLL("kernel32")
    kernel32.GetTickCount64.restype = ctypes.c_uint64
    return kernel32.GetTickCount64()


# -- sockets -------------------------------------------------------------------------

def table_rows(table):
    """The row count that opens an IP Helper table (MIB_TCPTABLE and the like)."""
    return struct.unpack_from("<I", table)[0] if len(table) >= 4 else 0


def socket_counts():
    """(tcp, udp) sockets of both families in every state (TIME_WAIT too),
    from the IP Helper's tables: only their sizes are needed, and tables
    without owner pids spare the per-socket lookup that makes psutil's
    listing take a second under Wine."""
    import ctypes
    iphlpapi = ctypes.WinDLL("iphlpapi")

    def rows(function):
        size = ctypes.c_uint32(0)
        for _ in range(5):
            # room to spare: sockets come and go between asking the size and reading the table
            size.value = max(size.value + size.value // 4, 4)
            table = ctypes.create_string_buffer(size.value)
            status = function(table, ctypes.byref(size), False)
            if status == 0:
                return table_rows(table.raw)
            if status in (50, 232):  # ERROR_NOT_SUPPORTED (no IPv6), ERROR_NO_DATA
                return 0
            if status != 122:  # ERROR_INSUFFICIENT_BUFFER: again, with the size it asked for
                raise ctypes.WinError(status)
        raise OSError("the socket table kept growing")
    return (rows(iphlpapi.GetTcpTable) + rows(iphlpapi.GetTcp6Table),
            rows(iphlpapi.GetUdpTable) + rows(iphlpapi.GetUdp6Table))


# -- volumes -------------------------------------------------------------------------

def volume_identity(root):
    """What tells a volume apart under any of its drive letters or folders:
    its \\\\?\\Volume{GUID}\\ name, else its serial number, else `root` itself."""
    import ctypes
    kernel32 = ctypes.WinDLL("kernel32")
    root = root if root.endswith("\\") else root + "\\"
    name = ctypes.create_unicode_buffer(64)
    if kernel32.GetVolumeNameForVolumeMountPointW(ctypes.c_wchar_p(root), name, len(name)) and name.value:
        return "volume:" + name.value.lower()
    serial = ctypes.c_uint32()
    if kernel32.GetVolumeInformationW(ctypes.c_wchar_p(root), None, 0, ctypes.byref(serial), None, None, None, 0):
        return "serial:%08x" % serial.value
    return "root:" + root.lower()


def fixed_volume_mounts(partitions, identity):
    """[(key, Mount)] of the fixed drives among psutil's partitions
    (device, mount point, fstype, opts): removable, optical, network and RAM
    drives hold no space of this box. Each volume once, by `identity`, under
    its shortest mount point."""
    chosen = {}
    for device, mountpoint, fstype, opts in partitions:
        if "fixed" not in opts.split(","):
            continue
        key = identity(mountpoint)
        if key not in chosen or len(mountpoint) < len(chosen[key].mountpoint):
            chosen[key] = Mount(key, "\\", mountpoint, fstype, device, opts)
    return list(chosen.items())


# -- who we run as, and private folders ---------------------------------------------

LOCAL_SYSTEM_SID = "S-1-5-18"
# Full control for SYSTEM, the Administrators and the owner (the account the
# agent runs as, which made the folder), inherited by every file made inside,
# and nothing from the folder above (P): the token and the results are no one
# else's to read.
PRIVATE_DACL = "D:P(A;OICI;FA;;;SY)(A;OICI;FA;;;BA)(A;OICI;FA;;;OW)"


def process_user_sid():
    """The SID of the account this process runs as ("S-1-5-18" for
    SYSTEM), or "" when the token will not say."""
    import ctypes
    from ctypes import wintypes
    advapi32 = ctypes.WinDLL("advapi32", use_last_error=True)
    kernel32 = ctypes.WinDLL("kernel32", use_last_error=True)
    kernel32.GetCurrentProcess.restype = wintypes.HANDLE
    advapi32.OpenProcessToken.argtypes = [wintypes.HANDLE, wintypes.DWORD, ctypes.POINTER(wintypes.HANDLE)]
    advapi32.GetTokenInformation.argtypes = [wintypes.HANDLE, ctypes.c_int, ctypes.c_void_p, wintypes.DWORD,
                                             ctypes.POINTER(wintypes.DWORD)]
    advapi32.ConvertSidToStringSidW.argtypes = [ctypes.c_void_p, ctypes.POINTER(wintypes.LPWSTR)]
    kernel32.CloseHandle.argtypes = [wintypes.HANDLE]
    kernel32.LocalFree.argtypes = [ctypes.c_void_p]
    token = wintypes.HANDLE()
    if not advapi32.OpenProcessToken(kernel32.GetCurrentProcess(), 0x0008, ctypes.byref(token)):  # TOKEN_QUERY
        return ""
    try:
        buffer, needed = ctypes.create_string_buffer(512), wintypes.DWORD()
        if not advapi32.GetTokenInformation(token, 1, buffer, len(buffer), ctypes.byref(needed)):  # TokenUser
            return ""
        text = wintypes.LPWSTR()
        if not advapi32.ConvertSidToStringSidW(ctypes.c_void_p.from_buffer(buffer).value, ctypes.byref(text)):
            return ""
        try:
            return text.value or ""
        finally:
            kernel32.LocalFree(text)
    finally:
        kernel32.CloseHandle(token)


def folder_accepts_files(path):
    """Whether this process may create files in the folder `path`, asked of
    the ACL by opening the folder for adding files, which leaves no trace
    (os.access reads the read-only flag alone)."""
    import ctypes
    from ctypes import wintypes
    kernel32 = ctypes.WinDLL("kernel32", use_last_error=True)
    kernel32.CreateFileW.restype = wintypes.HANDLE
    kernel32.CreateFileW.argtypes = [wintypes.LPCWSTR, wintypes.DWORD, wintypes.DWORD, ctypes.c_void_p,
                                     wintypes.DWORD, wintypes.DWORD, wintypes.HANDLE]
    kernel32.CloseHandle.argtypes = [wintypes.HANDLE]
    # FILE_ADD_FILE; every share mode; OPEN_EXISTING; FILE_FLAG_BACKUP_SEMANTICS, which opens folders
    handle = kernel32.CreateFileW(path, 0x0002, 0x0007, None, 3, 0x02000000, None)
    if handle is None or handle == wintypes.HANDLE(-1).value:
        return False
    kernel32.CloseHandle(handle)
    return True


def set_folder_dacl(path, sddl=PRIVATE_DACL):
    """Give the folder `path` the DACL `sddl`; its files get the inheritable
    part (SetNamedSecurityInfoW carries it down). OSError on failure."""
    import ctypes
    from ctypes import wintypes
    advapi32 = ctypes.WinDLL("advapi32", use_last_error=True)
    kernel32 = ctypes.WinDLL("kernel32")
    advapi32.ConvertStringSecurityDescriptorToSecurityDescriptorW.argtypes = [
        wintypes.LPCWSTR, wintypes.DWORD, ctypes.POINTER(ctypes.c_void_p), ctypes.c_void_p]
    advapi32.GetSecurityDescriptorDacl.argtypes = [ctypes.c_void_p, ctypes.POINTER(wintypes.BOOL),
                                                   ctypes.POINTER(ctypes.c_void_p), ctypes.POINTER(wintypes.BOOL)]
    advapi32.SetNamedSecurityInfoW.argtypes = [wintypes.LPWSTR, ctypes.c_int, wintypes.DWORD, ctypes.c_void_p,
                                               ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p]
    kernel32.LocalFree.argtypes = [ctypes.c_void_p]
    descriptor = ctypes.c_void_p()
    if not advapi32.ConvertStringSecurityDescriptorToSecurityDescriptorW(sddl, 1, ctypes.byref(descriptor), None):
        raise ctypes.WinError(ctypes.get_last_error())
    try:
        present, defaulted, dacl = wintypes.BOOL(), wintypes.BOOL(), ctypes.c_void_p()
        if not advapi32.GetSecurityDescriptorDacl(descriptor, ctypes.byref(present), ctypes.byref(dacl),
                                                  ctypes.byref(defaulted)):
            raise ctypes.WinError(ctypes.get_last_error())
        # SE_FILE_OBJECT; DACL_SECURITY_INFORMATION | PROTECTED_DACL_SECURITY_INFORMATION
        status = advapi32.SetNamedSecurityInfoW(path, 1, 0x00000004 | 0x80000000, None, None, dacl, None)
        if status:
            raise ctypes.WinError(status)
    finally:
        kernel32.LocalFree(descriptor)


# -- console control events ----------------------------------------------------------

CTRL_C_EVENT, CTRL_BREAK_EVENT, CTRL_CLOSE_EVENT, CTRL_LOGOFF_EVENT, CTRL_SHUTDOWN_EVENT = 0, 1, 2, 5, 6


def console_event_stops(event):
    """Whether a console control event ends the agent: Ctrl+C, Ctrl+Break,
    the console closing and the system shutting down do; a user logging
    off does not (only a process outside every user's session, a service or
    a boot task, hears it, and it is not that process's end)."""
    return event in (CTRL_C_EVENT, CTRL_BREAK_EVENT, CTRL_CLOSE_EVENT, CTRL_SHUTDOWN_EVENT)


def on_console_events(handler):
    """Have `handler(event)` run on every console control event, on a thread
    the system starts for it (so it runs whatever the main thread waits on);
    its True answer means handled. The callback is returned: it must be kept."""
    import ctypes
    from ctypes import wintypes
    callback = ctypes.WINFUNCTYPE(wintypes.BOOL, wintypes.DWORD)(lambda event: bool(handler(event)))
    kernel32 = ctypes.WinDLL("kernel32", use_last_error=True)
    if not kernel32.SetConsoleCtrlHandler(callback, True):
        raise ctypes.WinError(ctypes.get_last_error())
    return callback


# ---------------------------------------------------------------------------
# Windows: processes, consoles and ICMP through ctypes
# ---------------------------------------------------------------------------
# Windows has no process groups to signal: a command or a terminal's shell
# runs in a job object of its own, and ending the job ends everything it
# started (KILL_ON_JOB_CLOSE: the agent's own death too). The web terminal
# runs on a pseudo console (ConPTY) from Windows 10 1809 on, on pipes before
# it; icmp probes go through the ICMP helper API, which needs no
# administrator rights. Only the Platform section calls into this one.

CONPTY_BUILD = 17763   # Windows 10 1809 and Server 2019: the first with ConPTY
CREATE_SUSPENDED = 0x4
CREATE_UNICODE_ENVIRONMENT = 0x400
EXTENDED_STARTUPINFO_PRESENT = 0x80000
CREATE_NO_WINDOW = 0x8000000
STARTF_USESTDHANDLES = 0x100
PROC_THREAD_ATTRIBUTE_PSEUDOCONSOLE = 0x20016
JOB_OBJECT_LIMIT_KILL_ON_JOB_CLOSE = 0x2000
JOB_ACCOUNTING, JOB_EXTENDED_LIMITS = 1, 9   # JOBOBJECTINFOCLASS
# PROCESS_TERMINATE | PROCESS_SET_QUOTA | PROCESS_SUSPEND_RESUME | SYNCHRONIZE
PROCESS_JOB_RIGHTS = 0x0001 | 0x0100 | 0x0800 | 0x100000
WAIT_TIMEOUT = 0x102
INFINITE = 0xFFFFFFFF
# IcmpSendEcho's IP_STATUS codes (IP_BUF_TOO_SMALL .. IP_GENERAL_FAILURE):
# the echo got no answer, the API itself worked
IP_STATUS_BASE, IP_STATUS_LAST = 11000, 11050
ICMP_PAYLOAD = b"komari-agent-py!"
WIN32 = []      # the loaded calls, once (win32())
WINDOWS_SAID = OncePer()


def win32():
    """The Win32 calls and structures this section uses, each call with its C
    signature (a HANDLE must not be cut to an int), loaded once. A call this
    Windows lacks (ConPTY before 1809) is None."""
    if WIN32:
        return WIN32[0]
    import ctypes
    from ctypes import wintypes as w
    from types import SimpleNamespace
    c = SimpleNamespace(ctypes=ctypes)
    handle, dword, ok, pointer, size = w.HANDLE, w.DWORD, w.BOOL, ctypes.c_void_p, ctypes.c_size_t

    class COORD(ctypes.Structure):
        _fields_ = [("X", w.SHORT), ("Y", w.SHORT)]

    class STARTUPINFOEXW(ctypes.Structure):
        _fields_ = [("cb", dword), ("lpReserved", w.LPWSTR), ("lpDesktop", w.LPWSTR), ("lpTitle", w.LPWSTR)] + \
            [(name, dword) for name in ("dwX", "dwY", "dwXSize", "dwYSize", "dwXCountChars", "dwYCountChars",
                                        "dwFillAttribute", "dwFlags")] + \
            [("wShowWindow", w.WORD), ("cbReserved2", w.WORD), ("lpReserved2", pointer), ("hStdInput", handle),
             ("hStdOutput", handle), ("hStdError", handle), ("lpAttributeList", pointer)]

    class PROCESS_INFORMATION(ctypes.Structure):
        _fields_ = [("hProcess", handle), ("hThread", handle), ("dwProcessId", dword), ("dwThreadId", dword)]

    class JOB_LIMITS(ctypes.Structure):
        """JOBOBJECT_EXTENDED_LIMIT_INFORMATION, its basic part and I/O counters inlined."""
        _fields_ = [("PerProcessUserTimeLimit", ctypes.c_int64), ("PerJobUserTimeLimit", ctypes.c_int64),
                    ("LimitFlags", dword), ("MinimumWorkingSetSize", size), ("MaximumWorkingSetSize", size),
                    ("ActiveProcessLimit", dword), ("Affinity", size), ("PriorityClass", dword),
                    ("SchedulingClass", dword), ("IoCounters", ctypes.c_uint64 * 6), ("ProcessMemoryLimit", size),
                    ("JobMemoryLimit", size), ("PeakProcessMemoryUsed", size), ("PeakJobMemoryUsed", size)]

    class JOB_ACCOUNTING_INFO(ctypes.Structure):
        """JOBOBJECT_BASIC_ACCOUNTING_INFORMATION."""
        _fields_ = [("Times", ctypes.c_int64 * 4), ("TotalPageFaultCount", dword), ("TotalProcesses", dword),
                    ("ActiveProcesses", dword), ("TotalTerminatedProcesses", dword)]

    c.COORD, c.STARTUPINFOEXW, c.PROCESS_INFORMATION = COORD, STARTUPINFOEXW, PROCESS_INFORMATION
    c.JOB_LIMITS, c.JOB_ACCOUNTING_INFO = JOB_LIMITS, JOB_ACCOUNTING_INFO
    calls = {
        "kernel32": {
            "CloseHandle": (ok, handle),
            "CreateJobObjectW": (handle, pointer, w.LPCWSTR),
            "SetInformationJobObject": (ok, handle, ctypes.c_int, pointer, dword),
            "QueryInformationJobObject": (ok, handle, ctypes.c_int, pointer, dword, pointer),
            "AssignProcessToJobObject": (ok, handle, handle),
            "TerminateJobObject": (ok, handle, ctypes.c_uint),
            "OpenProcess": (handle, dword, ok, dword),
            "TerminateProcess": (ok, handle, ctypes.c_uint),
            "GetExitCodeProcess": (ok, handle, ctypes.POINTER(dword)),
            "WaitForSingleObject": (dword, handle, dword),
            "ResumeThread": (dword, handle),
            "PeekNamedPipe": (ok, handle, pointer, dword, pointer, ctypes.POINTER(dword), pointer),
            "CreatePipe": (ok, ctypes.POINTER(handle), ctypes.POINTER(handle), pointer, dword),
            "CreateProcessW": (ok, w.LPCWSTR, w.LPWSTR, pointer, pointer, ok, dword, pointer, w.LPCWSTR, pointer,
                               pointer),
            "InitializeProcThreadAttributeList": (ok, pointer, dword, dword, ctypes.POINTER(size)),
            "UpdateProcThreadAttribute": (ok, pointer, dword, size, pointer, size, pointer, pointer),
            "DeleteProcThreadAttributeList": (None, pointer),
            # HRESULTs as plain numbers: ctypes.HRESULT would raise, and E_NOTIMPL is worth telling apart
            "CreatePseudoConsole": (ctypes.c_long, COORD, handle, handle, dword, ctypes.POINTER(handle)),
            "ResizePseudoConsole": (ctypes.c_long, handle, COORD),
            "ClosePseudoConsole": (None, handle),
        },
        "ntdll": {"NtResumeProcess": (ctypes.c_long, handle)},
        "iphlpapi": {
            "IcmpCreateFile": (handle,),
            "Icmp6CreateFile": (handle,),
            "IcmpCloseHandle": (ok, handle),
            "IcmpSendEcho": (dword, handle, w.ULONG, pointer, w.WORD, pointer, pointer, dword, dword),
            "Icmp6SendEcho2": (dword, handle, handle, pointer, pointer, pointer, pointer, pointer, w.WORD, pointer,
                               pointer, dword, dword),
        },
    }
    for dll_name, functions in calls.items():
        dll = ctypes.WinDLL(dll_name, use_last_error=True)
        for name, (restype, *argtypes) in functions.items():
            function = getattr(dll, name, None)
            if function is not None:
                function.restype, function.argtypes = restype, argtypes
            setattr(c, name, function)
    c.wine = hasattr(ctypes.WinDLL("ntdll"), "wine_get_version")
    WIN32.append(c)
    return c


def win32_error(what):
    """OSError for the Win32 call `what` that just failed."""
    api = win32()
    code = api.ctypes.get_last_error()
    return OSError(None, "%s failed: %s" % (what, api.ctypes.FormatError(code).strip()), None, code)


def win32_handle(value):
    """A HANDLE as ctypes returns it (None for NULL) as an int, 0 for none."""
    return value or 0


# -- a process tree in a job object ------------------------------------------

class JobTree:
    """A process and everything it starts, in a job object of their own:
    end() takes them all at once. A job that could not be had (Windows 7
    inside another job) leaves end() with the first process only."""

    def __init__(self, process, job):
        self.process, self.job = process, job   # handles; the job may be 0
        self.killed = False
        self.lock = threading.Lock()

    def hang_up(self):
        """Nothing: a console program has no hangup to be given; end() is the way."""

    def alive(self):
        api = win32()
        with self.lock:
            if self.job:
                info = api.JOB_ACCOUNTING_INFO()
                if api.QueryInformationJobObject(self.job, JOB_ACCOUNTING, api.ctypes.byref(info),
                                                 api.ctypes.sizeof(info), None):
                    return info.ActiveProcesses > 0
            return bool(self.process) and api.WaitForSingleObject(self.process, 0) == WAIT_TIMEOUT

    def end(self, grace=0):
        """Every process of the tree ended now, waited for (briefly)."""
        api = win32()
        with self.lock:
            self.killed = True
            if self.job:
                api.TerminateJobObject(self.job, 1)
            elif self.process:
                api.TerminateProcess(self.process, 1)
        deadline = time.monotonic() + 5.0
        while self.alive() and time.monotonic() < deadline:
            time.sleep(0.02)

    def wait(self, timeout=None):
        """True once the first process has exited."""
        ms = INFINITE if timeout is None else max(0, int(timeout * 1000))
        return win32().WaitForSingleObject(self.process, ms) != WAIT_TIMEOUT

    def release(self):
        """Give the handles back. Processes a finished command left running
        (started with `start`) go on, as on other systems: the job no longer
        kills them when it closes."""
        api = win32()
        with self.lock:
            job, process, self.job, self.process = self.job, self.process, 0, 0
        if job:
            if not self.killed:
                api.SetInformationJobObject(job, JOB_EXTENDED_LIMITS, api.ctypes.byref(api.JOB_LIMITS()),
                                            api.ctypes.sizeof(api.JOB_LIMITS))
            api.CloseHandle(job)
        if process:
            api.CloseHandle(process)


def new_job():
    """A job object whose processes die when its last handle closes; 0 where
    none can be had."""
    api = win32()
    job = win32_handle(api.CreateJobObjectW(None, None))
    if job:
        limits = api.JOB_LIMITS(LimitFlags=JOB_OBJECT_LIMIT_KILL_ON_JOB_CLOSE)
        if not api.SetInformationJobObject(job, JOB_EXTENDED_LIMITS, api.ctypes.byref(limits),
                                           api.ctypes.sizeof(limits)):
            api.CloseHandle(job)
            job = 0
    return job


def into_job(process):
    """A JobTree for the suspended `process` (a handle of ours), now let run:
    it starts nothing before it is in the job."""
    api = win32()
    job = new_job()
    if job and not api.AssignProcessToJobObject(job, process):
        api.CloseHandle(job)
        job = 0
    if not job and WINDOWS_SAID("no-job"):
        log.warning("cannot put commands in a job object (%s): a timeout or a closed terminal ends only the "
                    "first process, not what it started", win32_error("AssignProcessToJobObject").strerror)
    return JobTree(process, job)


def start_in_job(argv, **popen_kwargs):
    """subprocess.Popen(argv, ...) in a job object of its own, without a
    console window; (proc, JobTree)."""
    import subprocess
    api = win32()
    proc = subprocess.Popen(argv, creationflags=CREATE_SUSPENDED | CREATE_NO_WINDOW, **popen_kwargs)
    process = win32_handle(api.OpenProcess(PROCESS_JOB_RIGHTS, False, proc.pid))
    if not process:
        error = win32_error("OpenProcess")
        proc.kill()
        proc.wait()
        raise error
    tree = into_job(process)
    if api.NtResumeProcess(process) != 0:
        tree.end()
        tree.release()
        proc.wait()
        raise OSError(None, "NtResumeProcess failed")
    return proc, tree


def pipes_with_input(fds, timeout):
    """Those of the pipes `fds` (C runtime descriptors) that hold input or
    have ended, within `timeout` s. select() takes sockets only on Windows,
    so the pipes are looked into (PeekNamedPipe), more rarely the longer
    they stay quiet."""
    import msvcrt
    api = win32()
    deadline = time.monotonic() + timeout
    pause = 0.005
    while True:
        ready = []
        for fd in fds:
            waiting = api.ctypes.c_ulong()
            try:
                peeked = api.PeekNamedPipe(msvcrt.get_osfhandle(fd), None, 0, None, api.ctypes.byref(waiting), None)
            except OSError:
                peeked = False
            if not peeked or waiting.value:
                ready.append(fd)   # a failed peek is the end: os.read says so
        remaining = deadline - time.monotonic()
        if ready or remaining <= 0:
            return ready
        time.sleep(min(pause, remaining))
        pause = min(pause * 2, 0.1)


# -- the panel's command as a script file ---------------------------------------

def powershell_script(command):
    """The .ps1 file the official agent writes: a UTF-8 byte order mark, a
    line that makes PowerShell's output UTF-8, the command."""
    return b"\xef\xbb\xbf[Console]::OutputEncoding = [System.Text.Encoding]::UTF8\n" + \
        command.encode("utf-8", "replace")


def batch_script(command, encoding):
    """The .cmd file for cmd.exe: echo off, CRLF lines (cmd.exe misreads
    jumps in LF-only files), in cmd's code page `encoding`; ValueError when
    the command holds characters that code page cannot hold."""
    text = "@echo off\r\n" + command.replace("\r\n", "\n").replace("\n", "\r\n")
    try:
        return text.encode(encoding)
    except UnicodeError:
        raise ValueError("cmd.exe reads scripts in code page %s, which cannot hold this command (PowerShell would: "
                         "it is missing here)" % encoding)


def powershell_command(powershell, script_path):
    return [powershell, "-NoProfile", "-ExecutionPolicy", "Bypass", "-File", script_path]


def cmd_command(cmd, script_path):
    """cmd.exe's command line for a script: /s and the doubled quotes keep
    a path with spaces or parentheses whole; /d skips AutoRun commands."""
    return '"%s" /d /s /c ""%s""' % (cmd, script_path)


def windows_script(command):
    """(command line, script file, output encoding) for the panel's command:
    PowerShell as the official agent runs it, else cmd.exe. The caller
    deletes the file."""
    import shutil
    import tempfile
    powershell = shutil.which("powershell")
    if powershell:
        data, suffix = powershell_script(command), ".ps1"
    else:
        data, suffix = batch_script(command, "oem"), ".cmd"
    fd, path = tempfile.mkstemp(prefix="komari-task-", suffix=suffix)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    if powershell:
        return powershell_command(powershell, path), path, "utf-8"
    return cmd_command(os.environ.get("ComSpec") or shutil.which("cmd") or "cmd.exe", path), path, "oem"


# -- ICMP through the helper API ---------------------------------------------

def icmp_helper_echo(family, address, timeout):
    """Milliseconds (whole ones, as Windows measures them) for one echo
    through the ICMP helper API, which needs no administrator rights; None
    on no reply. OSError when the API itself fails."""
    api = win32()
    reply = api.ctypes.create_string_buffer(1024)
    ms = max(1, int(timeout * 1000))
    if family == socket.AF_INET:
        handle = win32_handle(api.IcmpCreateFile())
        call, status_at = "IcmpSendEcho", 4
    else:
        handle = win32_handle(api.Icmp6CreateFile())
        call, status_at = "Icmp6SendEcho2", 28   # after a packed 26-byte IPV6_ADDRESS_EX
    if handle in (0, -1, (1 << 64) - 1):
        raise win32_error(call.replace("SendEcho2", "CreateFile").replace("SendEcho", "CreateFile"))
    try:
        if family == socket.AF_INET:
            target = int.from_bytes(socket.inet_aton(address), "little")
            count = api.IcmpSendEcho(handle, target, ICMP_PAYLOAD, len(ICMP_PAYLOAD), None, reply, len(reply), ms)
        else:
            source = struct.pack("<HHI16sI", 23, 0, 0, bytes(16), 0)   # AF_INET6 is 23 on Windows
            target = struct.pack("<HHI16sI", 23, 0, 0, socket.inet_pton(socket.AF_INET6, address.split("%")[0]), 0)
            count = api.Icmp6SendEcho2(handle, None, None, None, source, target, ICMP_PAYLOAD, len(ICMP_PAYLOAD),
                                       None, reply, len(reply), ms)
        error = api.ctypes.get_last_error()
    finally:
        api.IcmpCloseHandle(handle)
    if not count:
        if IP_STATUS_BASE <= error <= IP_STATUS_LAST:
            return None
        raise win32_error(call)
    status, rtt = struct.unpack_from("<II", reply.raw, status_at)
    return float(rtt) if status == 0 else None


# -- the web terminal's console ----------------------------------------------------

def windows_shell():
    """PowerShell where it is found, else cmd.exe (the official agent's order)."""
    import shutil
    return shutil.which("powershell") or os.environ.get("ComSpec") or shutil.which("cmd") or "cmd.exe"


def conpty_unusable():
    """Why the pseudo console cannot serve here, or None when it can."""
    api = win32()
    if sys.getwindowsversion().build < CONPTY_BUILD or api.CreatePseudoConsole is None:
        return "Windows before 10 1809 (Server 2019) has no pseudo console (ConPTY)"
    if api.wine:
        # it answers S_OK, but the shell's output goes to the agent's console
        return "Wine's pseudo console does not pass the shell's output on"
    return None


def environment_block(env):
    """CreateProcessW's UNICODE environment: NAME=value strings, sorted as
    Windows keeps them, each ending in NUL, a NUL after the last."""
    return "".join("%s=%s\0" % (k, v) for k, v in sorted(env.items(), key=lambda kv: kv[0].upper())) + "\0"


class WindowsConsole:
    """A shell's console as two byte streams, each served by a thread of its
    own (a pipe cannot be waited on beside a socket on Windows): read()
    takes output as it comes, write() hands keystrokes to a writer that
    blocks for the shell instead of the caller."""

    INPUT_BUFFER = 64 << 10
    writable_fd = None   # nothing to select() on: write() never blocks
    notice = b""

    def __init__(self, tree, output_fd, input_fd):
        import queue
        self.tree = tree
        self.output = queue.Queue()
        self.output_fd, self.input_fd = output_fd, input_fd
        self.to_shell = bytearray()
        self.shell_gone = False
        self.closing = False
        self.cond = threading.Condition()
        self.threads = [threading.Thread(target=self.pump_from_shell, name="terminal-read", daemon=True),
                        threading.Thread(target=self.pump_to_shell, name="terminal-write", daemon=True)]
        for thread in self.threads:
            thread.start()

    def pump_from_shell(self):
        try:
            while True:
                data = os.read(self.output_fd, 4096)
                if not data:
                    break
                data = self.from_shell(data)
                if data:
                    self.output.put(data)
        except OSError:
            pass
        self.output.put(b"")

    def from_shell(self, data):
        return data

    def pump_to_shell(self):
        while True:
            with self.cond:
                self.cond.wait_for(lambda: self.to_shell or self.closing)
                if self.closing:
                    return
                data = bytes(self.to_shell)
                del self.to_shell[:]
            try:
                while data:
                    data = data[os.write(self.input_fd, data):]
            except OSError:
                with self.cond:
                    self.shell_gone = True
                return

    def read(self, timeout):
        """Output bytes; None when none came within `timeout` s; b"" at the end."""
        import queue
        try:
            return self.output.get(timeout=timeout)
        except queue.Empty:
            return None

    def send(self, data):
        """Queue bytes for the shell; False once it takes no more input."""
        with self.cond:
            if self.shell_gone:
                return False
            self.to_shell += data
            self.cond.notify()
        return True

    def write(self, pending):
        """Move what the writer has room for from the bytearray `pending`."""
        with self.cond:
            room = max(0, self.INPUT_BUFFER - len(self.to_shell))
        data = bytes(pending[:room])
        del pending[:room]
        return self.send(data) if data else not self.shell_gone

    def resize(self, rows, cols):
        return True

    def end(self):
        self.tree.end()

    def close(self):
        """After end(), once no pump of the session touches this console."""
        with self.cond:
            self.closing = True
            self.cond.notify_all()
        deadline = time.monotonic() + 2.0
        for thread in self.threads:
            thread.join(max(0.0, deadline - time.monotonic()))
        for fd, thread in ((self.output_fd, self.threads[0]), (self.input_fd, self.threads[1])):
            if not thread.is_alive():   # else it may still use the descriptor: better kept than reused
                try:
                    os.close(fd)
                except OSError:
                    pass
        self.tree.release()


class LineEditor:
    """Keystrokes made into lines, as a console in line mode would, for a
    shell on a pipe, which reads whole lines and echoes nothing: printable
    keys are echoed, Backspace and Ctrl+U erase, Ctrl+C drops the line,
    escape sequences (arrow keys) are ignored, Enter gives the line."""

    LIMIT = 8192   # a line this long takes no more keys

    def __init__(self):
        import codecs
        self.typed = codecs.getincrementaldecoder("utf-8")("replace")
        self.line, self.escape, self.after_cr = [], "", False

    def feed(self, data):
        """(echo text, [whole lines]) for the keystrokes `data` (UTF-8)."""
        echo, lines = [], []
        for ch in self.typed.decode(data):
            if self.escape:
                self.escape += ch
                if len(self.escape) > 2 and "@" <= ch <= "~" or len(self.escape) == 2 and ch not in "[O":
                    self.escape = ""
                continue
            after_cr, self.after_cr = self.after_cr, ch == "\r"
            if ch == "\x1b":
                self.escape = ch
            elif ch in "\r\n":
                if not (ch == "\n" and after_cr):   # CRLF in a paste is one Enter
                    lines.append("".join(self.line))
                    self.line = []
                    echo.append("\r\n")
            elif ch in "\x7f\b":
                if self.line:
                    echo.append(erase(self.line.pop()))
            elif ch == "\x15":
                echo.extend(erase(c) for c in reversed(self.line))
                self.line = []
            elif ch == "\x03":
                self.line = []
                echo.append("^C\r\n")
            elif (ch >= " " or ch == "\t") and len(self.line) < self.LIMIT:
                self.line.append(ch)
                echo.append(ch)
        return "".join(echo), lines


def erase(ch):
    """What takes the character `ch` off the screen: two columns for a wide one."""
    import unicodedata
    width = 2 if unicodedata.east_asian_width(ch) in ("W", "F") else 1
    return "\b" * width + " " * width + "\b" * width


class EchoDropper:
    """A shell that echoes each line it reads from a pipe (cmd.exe does)
    would show it twice beside the local echo: when the first thing it
    writes after a line is that line, that is dropped."""

    def __init__(self):
        self.expected, self.held = "", ""

    def expect(self, line):
        self.expected = line + "\r\n"

    def filter(self, text):
        if not self.expected:
            return text
        text, self.held = self.held + text, ""
        if text.startswith(self.expected):
            text, self.expected = text[len(self.expected):], ""
        elif self.expected.startswith(text):
            self.held, text = text, ""   # too early to tell
        else:
            self.expected = ""
        return text


class PipeConsole(WindowsConsole):
    """The shell on plain pipes, where there is no pseudo console: lines are
    edited here (LineEditor) and sent on Enter; text goes both ways in the
    OEM code page, as console programs write it to a pipe."""

    def __init__(self, reason):
        import codecs
        import subprocess
        shell = windows_shell()
        powershell = os.path.basename(shell).lower().startswith("powershell")
        home = os.path.expanduser("~")
        proc, tree = start_in_job([shell, "-NoLogo", "-Command", "-"] if powershell else [shell],
                                  stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                  env=child_env(), cwd=home if os.path.isdir(home) else None, bufsize=0)
        self.editor, self.dropper = LineEditor(), EchoDropper()
        self.shown = codecs.getincrementaldecoder("oem")("replace")
        self.notice = ("\r\n[komari-agent: %s, so %s runs on pipes: a line goes to it on Enter; no resize, no "
                       "full-screen programs; Ctrl+C clears the line typed, it cannot stop a running program "
                       "(close the terminal for that)]\r\n" % (reason, os.path.basename(shell))).encode()
        super().__init__(tree, os.dup(proc.stdout.fileno()), os.dup(proc.stdin.fileno()))
        proc.stdout.close()
        proc.stdin.close()

    def from_shell(self, data):
        text = self.shown.decode(data)
        with self.cond:
            text = self.dropper.filter(text)
        return text.encode("utf-8")

    def write(self, pending):
        with self.cond:
            room = max(0, self.INPUT_BUFFER - len(self.to_shell))
        data = bytes(pending[:room])
        del pending[:room]
        echo, lines = self.editor.feed(data)
        if echo:
            self.output.put(echo.encode("utf-8"))
        for line in lines:
            with self.cond:
                self.dropper.expect(line)
            if not self.send((line + "\r\n").encode("oem", "replace")):
                return False
        return not self.shell_gone


class ConPtyConsole(WindowsConsole):
    """The shell on a pseudo console: a real console, VT sequences both ways,
    resizable. The pseudo console is closed when the shell exits, which ends
    its output stream."""

    def __init__(self, rows=24, cols=80, argv=None):
        import msvcrt
        api = win32()
        ctypes = api.ctypes
        handles = []

        def pipe():
            read_end, write_end = ctypes.wintypes.HANDLE(), ctypes.wintypes.HANDLE()
            if not api.CreatePipe(ctypes.byref(read_end), ctypes.byref(write_end), None, 0):
                raise win32_error("CreatePipe")
            handles.extend((read_end.value, write_end.value))
            return read_end.value, write_end.value
        self.console = 0
        self.console_lock = threading.Lock()
        try:
            console_in, input_end = pipe()
            output_end, console_out = pipe()
            self.console, process, thread = start_on_pseudo_console(
                argv or [windows_shell()], child_env(), rows, cols, console_in, console_out)
        except BaseException:
            for h in handles:
                api.CloseHandle(h)
            self.close_console()
            raise
        for h in (console_in, console_out):   # the pseudo console holds its own
            api.CloseHandle(h)
        tree = into_job(process)
        api.ResumeThread(thread)
        api.CloseHandle(thread)
        super().__init__(tree, msvcrt.open_osfhandle(output_end, os.O_RDONLY),
                         msvcrt.open_osfhandle(input_end, os.O_WRONLY))
        watcher = threading.Thread(target=self.close_when_done, name="terminal-wait", daemon=True)
        self.threads.append(watcher)
        watcher.start()

    def close_when_done(self):
        self.tree.wait()
        self.close_console()

    def close_console(self):
        with self.console_lock:
            console, self.console = self.console, 0
        if console:
            win32().ClosePseudoConsole(console)

    def resize(self, rows, cols):
        api = win32()
        with self.console_lock:
            result = api.ResizePseudoConsole(self.console, api.COORD(cols, rows)) if self.console else 0
        if result and WINDOWS_SAID("resize"):
            log.info("terminal: the pseudo console cannot be resized here (HRESULT 0x%08X)", result & 0xFFFFFFFF)
        return True

    def end(self):
        super().end()
        self.close_console()


def start_on_pseudo_console(argv, env, rows, cols, console_in, console_out):
    """(pseudo console, process, thread) handles: `argv` started suspended
    on a new pseudo console that reads `console_in` and writes
    `console_out`. Its standard handles are the pseudo console's, even
    where the agent's own are redirected (a service's log file)."""
    import subprocess
    api = win32()
    ctypes = api.ctypes
    console = ctypes.wintypes.HANDLE()
    result = api.CreatePseudoConsole(api.COORD(cols, rows), console_in, console_out, 0, ctypes.byref(console))
    if result != 0:
        raise OSError(None, "CreatePseudoConsole failed (HRESULT 0x%08X)" % (result & 0xFFFFFFFF))
    size = ctypes.c_size_t(0)
    api.InitializeProcThreadAttributeList(None, 1, 0, ctypes.byref(size))
    attributes = ctypes.create_string_buffer(size.value)
    try:
        if not api.InitializeProcThreadAttributeList(attributes, 1, 0, ctypes.byref(size)):
            raise win32_error("InitializeProcThreadAttributeList")
        try:
            # the attribute's value is the pseudo console handle itself
            if not api.UpdateProcThreadAttribute(attributes, 0, PROC_THREAD_ATTRIBUTE_PSEUDOCONSOLE, console,
                                                 ctypes.sizeof(console), None, None):
                raise win32_error("UpdateProcThreadAttribute")
            info = api.STARTUPINFOEXW(cb=ctypes.sizeof(api.STARTUPINFOEXW), dwFlags=STARTF_USESTDHANDLES,
                                      hStdInput=-1, hStdOutput=-1, hStdError=-1,
                                      lpAttributeList=ctypes.addressof(attributes))
            started = api.PROCESS_INFORMATION()
            home = os.path.expanduser("~")
            if not api.CreateProcessW(None, ctypes.create_unicode_buffer(subprocess.list2cmdline(argv)), None, None,
                                      False, EXTENDED_STARTUPINFO_PRESENT | CREATE_UNICODE_ENVIRONMENT |
                                      CREATE_SUSPENDED, ctypes.create_unicode_buffer(environment_block(env)),
                                      home if os.path.isdir(home) else None, ctypes.byref(info),
                                      ctypes.byref(started)):
                raise win32_error("CreateProcessW")
        finally:
            api.DeleteProcThreadAttributeList(attributes)
    except BaseException:
        api.ClosePseudoConsole(console)
        raise
    return console.value, started.hProcess, started.hThread


def open_windows_console(rows, cols):
    """The terminal's shell on a pseudo console, or on pipes where there is
    none (said once in the log; the terminal says it in each session)."""
    reason = conpty_unusable()
    if reason is None:
        try:
            return ConPtyConsole(rows, cols)
        except OSError as e:
            reason = "the pseudo console failed (%s)" % describe_error(e)
    if WINDOWS_SAID("pipe-terminal"):
        log.info("terminal: %s; the shell runs on pipes (no resize, lines sent on Enter)", reason)
    return PipeConsole(reason)

# -- starting at boot: a Scheduled Task; the official agent's service -------------------

TASK_NAME = "komari-agent"
OFFICIAL_RECORD = "official-agent.json"   # beside the script: the official service this install stopped
SERVICE_CONFIG = "service.json"           # in the state directory: the task's token, for --config
SECRET_FLAGS = {"token": "--token", "auto_discovery_key": "--auto-discovery"}   # --config key: flag
# The official agent's Windows service (NSSM, as its install.ps1 installs it)
# and where NSSM keeps the agent's command line.
OFFICIAL_SERVICE = "komari-agent"
SERVICES_KEY = r"SYSTEM\CurrentControlSet\Services"
SERVICE_START_TYPES = {2: "auto", 3: "demand", 4: "disabled"}
# Task Scheduler starts the agent again only if it is not running: every
# minute is its shortest period. RestartOnFailure alone answers only a start
# that fails, not an exit status (a crash, or the 42 of a self-update).
TASK_WATCH_EVERY = "PT1M"


def windows_args(text):
    """A Windows command line's arguments as the C runtime (and Go) split
    them: quotes group, 2n backslashes before a quote are n, 2n+1 are n and
    a literal quote, other backslashes are themselves."""
    args, current, quoted, started = [], [], False, False
    i = 0
    while i < len(text):
        ch = text[i]
        if ch == "\\":
            j = i
            while j < len(text) and text[j] == "\\":
                j += 1
            if j < len(text) and text[j] == '"':
                current.append("\\" * ((j - i) // 2))
                if (j - i) % 2:
                    current.append('"')
                    j += 1
            else:
                current.append("\\" * (j - i))
            i, started = j, True
        elif ch == '"':
            if quoted and text[i + 1:i + 2] == '"':
                current.append('"')
                i += 1
            else:
                quoted = not quoted
            i, started = i + 1, True
        elif ch in " \t" and not quoted:
            if started:
                args.append("".join(current))
            current, started = [], False
            i += 1
        else:
            current.append(ch)
            i, started = i + 1, True
    if started:
        args.append("".join(current))
    return args


def task_xml(python, script, args, start_boundary):
    """The Scheduled Task (Task Scheduler schema 1.2) that runs `python
    script args` as SYSTEM: at boot, and again within TASK_WATCH_EVERY
    whenever it is not running; never stopped for running long (the default
    is 72 hours) or for running on battery. Settings left out keep Task
    Scheduler's defaults."""
    import ntpath   # a Windows path wherever this runs
    from subprocess import list2cmdline
    from xml.sax.saxutils import escape
    values = {"description": escape("Komari agent (komari_agent.py), written by `komari_agent.py service install`"),
              "every": TASK_WATCH_EVERY, "start": start_boundary, "system": "S-1-5-18",
              "command": escape(python), "arguments": escape(list2cmdline([script] + list(args))),
              "directory": escape(ntpath.dirname(script))}
    return """<?xml version="1.0" encoding="UTF-16"?>
<Task version="1.2" xmlns="http://schemas.microsoft.com/windows/2004/02/mit/task">
  <RegistrationInfo>
    <Description>%(description)s</Description>
  </RegistrationInfo>
  <Triggers>
    <BootTrigger>
      <Enabled>true</Enabled>
    </BootTrigger>
    <TimeTrigger>
      <Enabled>true</Enabled>
      <StartBoundary>%(start)s</StartBoundary>
      <Repetition>
        <Interval>%(every)s</Interval>
        <StopAtDurationEnd>false</StopAtDurationEnd>
      </Repetition>
    </TimeTrigger>
  </Triggers>
  <Principals>
    <Principal id="Author">
      <UserId>%(system)s</UserId>
      <RunLevel>HighestAvailable</RunLevel>
    </Principal>
  </Principals>
  <Settings>
    <MultipleInstancesPolicy>IgnoreNew</MultipleInstancesPolicy>
    <DisallowStartIfOnBatteries>false</DisallowStartIfOnBatteries>
    <StopIfGoingOnBatteries>false</StopIfGoingOnBatteries>
    <StartWhenAvailable>true</StartWhenAvailable>
    <ExecutionTimeLimit>PT0S</ExecutionTimeLimit>
    <Priority>6</Priority>
    <RestartOnFailure>
      <Interval>%(every)s</Interval>
      <Count>999</Count>
    </RestartOnFailure>
  </Settings>
  <Actions Context="Author">
    <Exec>
      <Command>%(command)s</Command>
      <Arguments>%(arguments)s</Arguments>
      <WorkingDirectory>%(directory)s</WorkingDirectory>
    </Exec>
  </Actions>
</Task>
""" % values


def create_task_commands(name, xml_path):
    """schtasks' argument lists: an old instance stopped (it may fail: none
    runs), the task written over any of that name, and started now."""
    return [["schtasks", "/End", "/TN", name], ["schtasks", "/Create", "/TN", name, "/XML", xml_path, "/F"],
            ["schtasks", "/Run", "/TN", name]]


def delete_task_commands(name):
    return [["schtasks", "/End", "/TN", name], ["schtasks", "/Delete", "/TN", name, "/F"]]


def service_switch_commands(service, start):
    """sc.exe's argument lists that stop and disable a service (start
    "disabled"), or set its start type back and start it."""
    if start == "disabled":
        return [["sc.exe", "stop", service], ["sc.exe", "config", service, "start=", "disabled"]]
    return [["sc.exe", "config", service, "start=", start], ["sc.exe", "start", service]]


def official_service(name=OFFICIAL_SERVICE):
    """The official agent's service as NSSM registered it: {"parameters":
    its arguments as one string, "directory": its working directory,
    "start": its start type for sc.exe}; None when there is none."""
    service = registry_values(SERVICES_KEY + "\\" + name)
    if not service:
        return None
    nssm = registry_values(SERVICES_KEY + "\\" + name + "\\Parameters")
    start = SERVICE_START_TYPES.get(service.get("Start"), "demand")
    return {"parameters": str(nssm.get("AppParameters") or ""), "directory": str(nssm.get("AppDirectory") or ""),
            "start": "delayed-auto" if start == "auto" and service.get("DelayedAutostart") else start}


def running_as_administrator():
    try:
        return bool(win32().ctypes.windll.shell32.IsUserAnAdmin())
    except (AttributeError, OSError):
        return False


# ---------------------------------------------------------------------------
# Platform: every difference between operating systems, behind one host
# ---------------------------------------------------------------------------

IS_LINUX = sys.platform.startswith("linux")
IS_MACOS = sys.platform == "darwin"
IS_WINDOWS = sys.platform == "win32"


def psutil_module():
    import psutil  # imported only where /proc is not enough
    return psutil


def glibc():
    """The C library through ctypes, or None where it is not glibc-like."""
    if not IS_LINUX:
        return None
    try:
        import ctypes
        lib = ctypes.CDLL("libc.so.6")
        lib.mallopt  # noqa: B018 - it must exist
        return lib
    except (OSError, AttributeError):
        return None


def limit_malloc_arenas():
    """glibc gives each thread its own malloc arena; for a few mostly idle
    threads that is megabytes of RSS for nothing."""
    lib = glibc()
    if lib is not None:
        lib.mallopt(-8, 1)  # M_ARENA_MAX


def return_free_memory():
    """Hand freed heap pages back to the kernel. Start-up (the script's syntax
    tree, a TLS handshake) leaves megabytes free inside glibc's heap that it
    would otherwise keep for good; called once per new report link."""
    lib = glibc()
    if lib is not None:
        lib.malloc_trim(0)


def sys_root():
    """/sys, or HOST_SYS as gopsutil honours it (a container watching its host)."""
    return (os.environ.get("HOST_SYS") or "/sys").rstrip("/") or "/sys"

# -- the host: where each figure and fact is read ------------------------------------

class PsutilHost:
    """Figures and facts through psutil, on every system it knows; the
    fallback where a faster source does not answer. Every method returns its
    value or raises (the Collector turns a failure into a message line)."""

    def __init__(self, cfg=None):
        self.cfg = cfg
        self.proc = getattr(cfg, "host_proc", "/proc")
        self.said = OncePer()

    def cpu_times(self):
        """(busy, total) CPU time since boot."""
        t = psutil_module().cpu_times()
        total = sum(t)
        return total - t.idle - getattr(t, "iowait", 0), total

    def memory(self, include_cache):
        """((total, used), (swap total, swap used)) in bytes: RAM is never
        lost because swap cannot be read."""
        vm = psutil_module().virtual_memory()
        used = vm.total - vm.free if include_cache else vm.total - vm.available
        return (vm.total, max(0, used)), self.swap()

    def swap(self):
        """(total, used) bytes of swap; 0 where the system will not tell, said once."""
        try:
            sw = psutil_module().swap_memory()
        except Exception as e:
            if self.said("swap"):
                log.warning("swap is reported as 0: psutil cannot read it (%s: %s)", type(e).__name__, e)
            return 0, 0
        return sw.total, sw.used

    def load(self):
        return os.getloadavg()

    def all_mounts(self):
        """Every mount as a Mount, pseudo file systems too (list-disk)."""
        return [Mount(p.device, "/", p.mountpoint, p.fstype, p.device, p.opts)
                for p in psutil_module().disk_partitions(all=True)]

    def counted_mounts(self):
        """[(key, Mount)] whose space counts as disk; a key stands for one device."""
        return [("dev:" + p.device, Mount(p.device, "/", p.mountpoint, p.fstype, p.device, p.opts))
                for p in psutil_module().disk_partitions(all=False)]

    def disk_usage(self, path):
        """(total, used, available) bytes of the file system holding `path`."""
        usage = psutil_module().disk_usage(path)
        return usage.total, usage.used, usage.free

    def nic_counters(self):
        """{nic: (received, sent)} bytes, every NIC."""
        return {n: (c.bytes_recv, c.bytes_sent) for n, c in psutil_module().net_io_counters(pernic=True).items()}

    def connections(self):
        """(tcp, udp) sockets."""
        conns = psutil_module().net_connections("inet")
        tcp = sum(1 for c in conns if c.type == socket.SOCK_STREAM)
        return tcp, len(conns) - tcp

    def uptime(self):
        return int(time.time() - psutil_module().boot_time())

    def process_count(self):
        return len(psutil_module().pids())

    def boot_identity(self):
        """(boot id, boot time in epoch seconds): a new id means the NIC
        counters started again from zero."""
        try:
            boot_time = float(psutil_module().boot_time())
        except Exception:
            boot_time = time.time() - time.monotonic()
        return "btime:%d" % round(boot_time, -1), boot_time

    def cpu_facts(self):
        """(CPU name, logical CPUs, physical cores; 0 when unknown)."""
        ps = psutil_module()
        return platform.processor() or "Unknown", ps.cpu_count() or os.cpu_count() or 1, \
            ps.cpu_count(logical=False) or 0

    def os_name(self):
        return platform.system() or "Unknown"

    def kernel_version(self):
        return platform.release() or "Unknown"

    def gpu_name(self):
        return gpu_name(sys_root())

    def virtualization(self):
        return virtualization(proc=self.proc, sys_root=sys_root())


class LinuxHost(PsutilHost):
    """/proc and /sys, read directly: a report costs a tenth of psutil's CPU.
    psutil only where they do not answer. --host-proc (HOST_PROC) and
    HOST_SYS point at a host's from inside a container."""

    def __init__(self, cfg=None):
        super().__init__(cfg)
        self.files = OpenProcFiles()

    def cpu_times(self):
        return cpu_busy_total(self.files.first_line(self.proc + "/stat"))

    def memory(self, include_cache):
        info = parse_meminfo(self.files.read(self.proc + "/meminfo"))
        if info.get("MemTotal"):
            return ram_usage(info, include_cache), swap_usage(info)
        return super().memory(include_cache)

    def load(self):
        parts = self.files.first_line(self.proc + "/loadavg").split()
        return float(parts[0]), float(parts[1]), float(parts[2])

    def all_mounts(self):
        path = self.proc + "/1/mountinfo" if self.proc != "/proc" else "/proc/self/mountinfo"
        return parse_mountinfo(read_text(path))

    def counted_mounts(self):
        return countable_mounts(self.all_mounts())

    def disk_usage(self, path):
        st = os.statvfs(path)
        return st.f_blocks * st.f_frsize, (st.f_blocks - st.f_bfree) * st.f_frsize, st.f_bavail * st.f_frsize

    def nic_counters(self):
        return parse_net_dev(self.files.read(self.proc + "/net/dev"))

    def connections(self):
        net = self.proc + "/net/"
        try:
            v4 = self.files.read(net + "sockstat")
        except OSError:
            v4 = None
        if v4:
            try:
                v6 = self.files.read(net + "sockstat6")
            except OSError:
                v6 = ""
            return connections_from_sockstat(v4, v6)
        return count_table_rows([net + "tcp", net + "tcp6"]), count_table_rows([net + "udp", net + "udp6"])

    def uptime(self):
        if hasattr(time, "CLOCK_BOOTTIME"):
            # rounded up, as sysinfo(2) rounds it for the official agent
            return math.ceil(time.clock_gettime(time.CLOCK_BOOTTIME))
        return super().uptime()

    def process_count(self):
        return sum(map(str.isdigit, os.listdir(self.proc)))

    def boot_identity(self):
        return boot_identity(self.proc) or super().boot_identity()

    def cpu_facts(self):
        cpuinfo, stat = (read_or_empty(self.proc + name) for name in ("/cpuinfo", "/stat"))
        if not cpuinfo:
            return super().cpu_facts()
        return cpu_name_from_cpuinfo(cpuinfo), logical_cpus(cpuinfo, stat), physical_cores(sys_root(), cpuinfo)

    def os_name(self):
        return os_name()


# -- macOS and FreeBSD ---------------------------------------------------------------

class BsdHost(PsutilHost):
    """What macOS and FreeBSD share: psutil for the figures; sysctl, netstat
    and getfsstat's mount list where psutil's own answer would be wrong or
    need root."""

    SOCKETS_TTL = 4.5  # seconds between two counts: netstat is a program run
    CPU_NAME_SYSCTL = ""

    def __init__(self, cfg=None):
        super().__init__(cfg)
        self.sysctls = {}
        self.sockets = None
        self.sockets_at = 0.0

    def sysctl(self, name):
        """A sysctl's value, "" where the system has none; asked once a run."""
        if name not in self.sysctls:
            self.sysctls[name] = run_quiet(["sysctl", "-n", name]).strip()
        return self.sysctls[name]

    def counted_mounts(self):
        return bsd_countable_mounts(psutil_module().disk_partitions(all=True))

    def connections(self):
        now = time.monotonic()
        if self.sockets is None or now - self.sockets_at >= self.SOCKETS_TTL:
            self.sockets, self.sockets_at = self.count_sockets(), now
        return self.sockets

    def count_sockets(self):
        """netstat lists every socket without root, TIME_WAIT included;
        psutil sees only sockets some process holds, and on macOS only as
        root. A count neither can give is 0, said once in the log."""
        counts = sockets_from_netstat(run_quiet(["netstat", "-an"], timeout=5.0))
        if counts is not None:
            return counts
        try:
            counts = super().connections()
        except Exception as e:
            if self.said("connections"):
                log.warning("connections are reported as 0: netstat -an gave nothing and psutil cannot list "
                            "sockets (%s)", describe_error(e))
            return 0, 0
        if self.said("netstat"):
            log.info("connections: netstat -an gave nothing; counting the sockets psutil sees instead")
        return counts

    def cpu_facts(self):
        ps = psutil_module()
        return self.sysctl(self.CPU_NAME_SYSCTL) or "Unknown", ps.cpu_count() or os.cpu_count() or 1, \
            ps.cpu_count(logical=False) or 0


class MacHost(BsdHost):
    """macOS: the facts from sw_vers, system_profiler and sysctl, as the
    official agent gets them."""

    CPU_NAME_SYSCTL = "machdep.cpu.brand_string"

    def os_name(self):
        return macos_name(run_quiet(["sw_vers"])) or "macOS"

    def gpu_name(self):
        # a few seconds on a cold start; asked once a run
        return group_names(gpu_names_from_system_profiler(run_quiet(["system_profiler", "SPDisplaysDataType"],
                                                                    timeout=20.0)))

    def virtualization(self):
        return macos_virtualization(self.sysctl("kern.hv_vmm_present"), self.sysctl("machdep.cpu.features"),
                                    self.sysctl("hw.model"))

    def disk_usage(self, path):
        """Used is total - available: on APFS every volume of a container
        reports the container's size and free space, so this is the
        container's use, counted once for all its volumes."""
        st = os.statvfs(path)
        total, avail = st.f_blocks * st.f_frsize, st.f_bavail * st.f_frsize
        return total, max(0, total - avail), avail


class FreeBSDHost(BsdHost):
    """FreeBSD: the facts from uname, pciconf and sysctl."""

    CPU_NAME_SYSCTL = "hw.model"

    def os_name(self):
        return run_quiet(["uname", "-sr"]).strip() or "FreeBSD"

    def gpu_name(self):
        return group_names(gpu_names_from_pciconf(run_quiet(["pciconf", "-lv"])))

    def virtualization(self):
        return freebsd_virtualization(self.sysctl("security.jail.jailed"), self.sysctl("kern.vm_guest"))


# -- Windows -------------------------------------------------------------------------

class WindowsHost(PsutilHost):
    """Windows: the facts from the registry, as the official agent reads
    them but without DXGI or SMBIOS; the figures through psutil and
    kernel32. Where the performance counters are missing (turned off, or
    Wine) load is 0 and swap comes from GetPerformanceInfo, each said once."""

    def __init__(self, cfg=None):
        super().__init__(cfg)
        self.load_problem = None  # why psutil's load average cannot be had, once known

    def cpu_times(self):
        # GetSystemTimes, as gopsutil: psutil would count interrupt and DPC time twice
        idle, kernel, user = system_times()
        return kernel + user - idle, kernel + user

    def swap(self):
        try:
            sw = psutil_module().swap_memory()  # page file use from the performance counters
            return sw.total, sw.used
        except Exception as e:
            problem = "%s: %s" % (type(e).__name__, e)
        try:
            files = page_file_pages()
        except OSError:
            files = None
        if self.said("swap"):
            log.warning("swap is read from GetPerformanceInfo: psutil cannot read it (%s)%s", problem,
                        "" if files else "; its use cannot be read either and is reported as 0")
        return swap_from_commit(*performance_pages(), page_files=files)

    def load(self):
        """psutil's processor-queue average (gopsutil's on the official
        agent); 0 where the performance counters are missing, said once."""
        if self.load_problem is None:
            try:
                return tuple(psutil_module().getloadavg())
            except Exception as e:
                self.load_problem = "%s: %s" % (type(e).__name__, e)
                log.warning("load is reported as 0: Windows' performance counters cannot be read (%s)",
                            self.load_problem)
        return 0.0, 0.0, 0.0

    def counted_mounts(self):
        return fixed_volume_mounts(psutil_module().disk_partitions(all=False), volume_identity)

    def connections(self):
        return socket_counts()

    def uptime(self):
        return milliseconds_since_boot() // 1000

    def cpu_facts(self):
        # not platform.processor(): Python 3.12 on asks WMI for it, slowly or not at all
        ps = psutil_module()
        name = str(registry_values(CPU0_KEY).get("ProcessorNameString") or "").strip()
        return name or "Unknown", ps.cpu_count() or os.cpu_count() or 1, ps.cpu_count(logical=False) or 0

    def os_name(self):
        version = registry_values(WINDOWS_VERSION_KEY)
        return windows_edition(version.get("ProductName"), version.get("CurrentBuild"))

    def kernel_version(self):
        version = registry_values(WINDOWS_VERSION_KEY)
        return windows_kernel(version.get("CurrentBuild"), version.get("UBR"))

    def gpu_name(self):
        return group_names(gpu_names_from_display_class(display_adapter_descriptions()))

    def virtualization(self):
        return windows_virtualization(firmware_values())


def make_host(cfg=None):
    """The host this agent runs on: the one place that tells systems apart."""
    if IS_LINUX:
        return LinuxHost(cfg)
    if sys.platform == "darwin":
        return MacHost(cfg)
    if sys.platform.startswith("freebsd"):
        return FreeBSDHost(cfg)
    if IS_WINDOWS:
        return WindowsHost(cfg)
    return PsutilHost(cfg)


# -- state, output and stopping --------------------------------------------------------

def can_create_files_in(directory):
    """Whether this process may create files in `directory`: on Windows the
    ACL says, which os.access() does not read."""
    if IS_WINDOWS:
        return folder_accepts_files(directory)
    return os.access(directory, os.W_OK | os.X_OK)


def default_state_dir():
    """Where state lives without --state-dir. On Windows: %ProgramData%\\komari-agent
    for SYSTEM (a boot task or a service), else beside the script when it can
    be written there, else %LOCALAPPDATA%\\komari-agent. Elsewhere: beside the
    script when writable, else the user's state directory
    (/var/lib/komari-agent for root)."""
    beside = os.path.join(os.path.dirname(SCRIPT_PATH), "state")
    if IS_WINDOWS:
        if process_user_sid() == LOCAL_SYSTEM_SID:
            return os.path.join(os.environ.get("ProgramData") or "C:\\ProgramData", "komari-agent")
        if can_create_files_in(beside if os.path.isdir(beside) else os.path.dirname(beside)):
            return beside
        return os.path.join(os.environ.get("LOCALAPPDATA") or os.path.expanduser("~"), "komari-agent")
    if os.access(os.path.dirname(beside), os.W_OK) and (not os.path.exists(beside) or os.access(beside, os.W_OK)):
        return beside
    if hasattr(os, "geteuid") and os.geteuid() == 0:
        return "/var/lib/komari-agent"
    base = os.environ.get("XDG_STATE_HOME") or os.path.join(os.path.expanduser("~"), ".local", "state")
    return os.path.join(base, "komari-agent")


def state_dir(cfg):
    """Where state that must survive restarts lives (traffic totals, undelivered
    results): --state-dir, else default_state_dir(). Never the working
    directory, which a service manager may set anywhere."""
    if cfg.state_dir:
        return os.path.abspath(os.path.expanduser(cfg.state_dir))
    return default_state_dir()


def private_directory(path):
    """Create `path` if missing and make sure no one else can get in (someone
    could read the token, or plant links or FIFOs in it). On Windows the
    folder gets an ACL for SYSTEM, the Administrators and its owner alone.
    Elsewhere it is made mode 0700: one that others can write is made private
    when it is ours, else refused. Returns what is wrong with it, or ""."""
    try:
        make_private_dirs(path)
        st = os.stat(path)
        if not S_ISDIR(st.st_mode):
            return "%s is not a directory" % path
        if IS_WINDOWS:
            set_folder_dacl(path)
        elif st.st_mode & 0o022:
            mine = not hasattr(os, "geteuid") or st.st_uid == os.geteuid()
            if not mine or st.st_mode & 0o1000:   # sticky: a shared one like /tmp, never ours to change
                return "%s can be written by other users" % path
            os.chmod(path, 0o700)
            log.warning("%s could be written by other users; made it private (mode 0700)", path)
        if not can_create_files_in(path):
            return "%s is not writable" % path
    except OSError as e:
        return "%s: %s" % (path, describe_error(e))
    return ""


# websocket-client sets TCP_KEEPIDLE, TCP_KEEPINTVL and TCP_KEEPCNT on a socket
# it dials; Windows before 10 1709 and Server 2016 (and Wine) refuse them and
# the dial fails. There the agent dials the socket itself (its own WebSocket
# pings find a dead link anyway).
DIAL_WEBSOCKETS_OURSELVES = IS_WINDOWS


def utf8_output():
    """Windows writes piped and redirected output in the ANSI code page
    (cp1252, …), which cannot hold most names (a GPU's, a host's, a path's):
    UTF-8 there, as on the wire. A console shows Unicode anyway."""
    if not IS_WINDOWS:
        return
    for stream in (sys.stdout, sys.stderr):
        if stream is not None and hasattr(stream, "reconfigure") and not stream.isatty():
            stream.reconfigure(encoding="utf-8", errors="backslashreplace")


# Windows ends a process a few seconds after its console closes or the system
# starts to shut down, once the control handler returns: the handler waits
# this long, and the agent's own clean stop ends the process first.
CONSOLE_CLOSE_GRACE = 10.0
CONSOLE_HANDLERS = []  # ctypes callbacks the system calls: they must live as long as the process


def stop_for_console_event(stop, event):
    """A console control handler's answer: whether the event was handled."""
    if not console_event_stops(event):
        return False  # a user logging off: the next handler's (the system's) to judge
    stop.set()
    if event in (CTRL_CLOSE_EVENT, CTRL_SHUTDOWN_EVENT):
        time.sleep(CONSOLE_CLOSE_GRACE)
    return True


def stop_on_console_events(stop):
    """On Windows, set `stop` on the console's control events: Ctrl+C,
    Ctrl+Break, the console closing, shutdown. Python would run its signal
    handlers only in the main thread, which waits for the agent's thread and
    runs none; the system runs a console handler on a thread of its own.
    Nothing elsewhere."""
    if not IS_WINDOWS:
        return
    try:
        CONSOLE_HANDLERS.append(on_console_events(lambda event: stop_for_console_event(stop, event)))
    except OSError as e:
        log.warning("Ctrl+C and the console closing cannot stop the agent cleanly: %s", describe_error(e))


# SIGHUP first (shells save history, jobs get told); SIGKILL after this
HANGUP_GRACE = 0.5


# -- process sessions ----------------------------------------------------------

def ping_command(family, timeout):
    """The system ping's argument list for one echo, the address to follow;
    None without one. Linux's -W is seconds, the BSDs' milliseconds, macOS
    has ping6 for IPv6, and Windows counts with -n and waits -w ms."""
    import shutil
    name = "ping6" if family == socket.AF_INET6 and IS_MACOS else "ping"
    path = shutil.which(name)
    if not path:
        return None
    if IS_WINDOWS:
        return [path, "-n", "1", "-w", str(max(1, int(timeout * 1000)))]   # the address literal sets the family
    if IS_LINUX:
        argv = [path, "-n", "-c", "1", "-W", str(max(1, int(timeout + 0.999)))]
    else:
        argv = [path, "-n", "-c", "1"] + ([] if name == "ping6" else ["-W", str(max(1, int(timeout * 1000)))])
    if family == socket.AF_INET6 and name == "ping":
        argv.append("-6")
    return argv


def session_members(leader):
    """Live pids whose session or process group is `leader`; an interactive
    shell puts each job in its own group, the session holds them all."""
    if not IS_LINUX:
        return psutil_session_members(leader)
    members = []
    try:
        names = os.listdir("/proc")
    except OSError:
        return members
    for name in names:
        if not name.isdigit():
            continue
        try:
            with open("/proc/%s/stat" % name, "rb") as f:
                stat = f.read()
            fields = stat[stat.rindex(b")") + 2:].split()
            state, pgrp, session = fields[0], int(fields[2]), int(fields[3])
        except (OSError, ValueError, IndexError):
            continue
        if state != b"Z" and (pgrp == leader or session == leader):
            members.append(int(name))
    return members


def psutil_session_members(leader):
    """session_members() without Linux's /proc."""
    members = []
    try:
        ps = psutil_module()
        pids = ps.pids()
    except Exception:
        return members
    for pid in pids:
        try:
            if leader in (os.getpgid(pid), os.getsid(pid)) and ps.Process(pid).status() != ps.STATUS_ZOMBIE:
                members.append(pid)
        except Exception:  # gone meanwhile, or not ours to look at
            continue
    return members


def signal_session(leader, signum):
    try:
        os.killpg(leader, signum)
    except OSError:
        pass
    for pid in session_members(leader):
        try:
            os.kill(pid, signum)
        except OSError:
            pass


def end_session(leader, grace=HANGUP_GRACE):
    """Hang up every process of the session led by `leader`, then SIGKILL what
    is left; returns when none is left (or after a bounded number of rounds,
    for a process that keeps forking)."""
    if grace > 0:
        signal_session(leader, signal.SIGHUP)
        deadline = time.monotonic() + grace
        while session_members(leader) and time.monotonic() < deadline:
            time.sleep(0.05)
    for _ in range(20):
        signal_session(leader, signal.SIGKILL)
        if not session_members(leader):
            return
        time.sleep(0.02)


# -- processes: a command's whole tree, a terminal's console ---------------------------

class SessionTree:
    """A process and everything it starts, in a session and process group of
    its own (POSIX): a hangup, then SIGKILL, reach every member."""

    def __init__(self, proc):
        self.proc = proc
        self.killed = False

    def hang_up(self):
        signal_session(self.proc.pid, signal.SIGHUP)

    def alive(self):
        return bool(session_members(self.proc.pid))

    def end(self, grace=0):
        self.killed = True
        end_session(self.proc.pid, grace)

    def release(self):
        """Nothing to give back: a session is no handle."""


def start_tree(argv, **popen_kwargs):
    """subprocess.Popen(argv, ...) as the first process of a tree of its own
    (a session here, a job object on Windows); (proc, tree)."""
    if IS_WINDOWS:
        return start_in_job(argv, **popen_kwargs)
    import subprocess
    proc = subprocess.Popen(argv, start_new_session=True, **popen_kwargs)
    return proc, SessionTree(proc)


# The panel's command running, with stdout and stderr piped: its process, its
# tree, the encoding of its output and the script file to delete (or None).
Script = namedtuple("Script", "proc tree encoding path")


def feed_stdin(pipe, data):
    try:
        pipe.write(data)
    except OSError:
        pass  # the script stopped reading: what it has read runs
    finally:
        try:
            pipe.close()
        except OSError:
            pass


def start_script(command):
    """Start the panel's command as a Script: `sh -s` reading it on stdin as
    in the official agent; on Windows a script file for PowerShell, or
    cmd.exe where PowerShell is missing (windows_script). OSError or
    ValueError when it cannot start."""
    import subprocess
    pipes = {"stdout": subprocess.PIPE, "stderr": subprocess.PIPE, "env": child_env()}
    if IS_WINDOWS:
        argv, path, encoding = windows_script(command)
        try:
            proc, tree = start_tree(argv, stdin=subprocess.DEVNULL, **pipes)
        except BaseException:
            os.unlink(path)
            raise
        return Script(proc, tree, encoding, path)
    proc, tree = start_tree(["sh", "-s"], stdin=subprocess.PIPE, **pipes)
    threading.Thread(target=feed_stdin, args=(proc.stdin, command.encode("utf-8", "replace")),
                     name="exec-stdin", daemon=True).start()
    return Script(proc, tree, "utf-8", None)


def finish_script(script):
    """Once its process has been waited for: the tree's handles and the script file go."""
    script.tree.release()
    if script.path:
        try:
            os.unlink(script.path)
        except OSError:
            pass


def readable_pipes(fds, timeout):
    """Those of the pipes `fds` that hold input or have ended, waiting up to
    `timeout` s for one."""
    if IS_WINDOWS:
        return pipes_with_input(fds, timeout)
    import select
    poller = select.poll()
    for fd in fds:
        poller.register(fd, select.POLLIN)
    return [fd for fd, _ in poller.poll(timeout * 1000)]


FALLBACK_SHELLS = ("zsh", "bash", "sh")
# Run by /bin/sh before the user's shell, as the official agent does: the
# update-motd.d scripts (Debian's print the kernel line), /etc/motd, then
# exec of the shell given as $1, which POSIX sh runs for any login shell.
MOTD_PRELUDE = ('for f in /etc/update-motd.d/*; do [ -e "$f" ] && [ -x "$f" ] && "$f"; done; '
                '[ -r /etc/motd ] && cat /etc/motd; exec "$1"')


def login_shell(passwd="/etc/passwd", uid=None, home=None, path=None):
    """The user's shell from the passwd file when it can run (not nologin or
    false), else the first of zsh, bash, sh on PATH; None without any.
    $SHELL is not used, as in the official agent."""
    import shutil
    uid = os.getuid() if uid is None else uid
    home = home if home is not None else os.path.expanduser("~")
    shell = ""
    try:
        entries = [line.split(":") for line in read_text(passwd).splitlines()]
    except OSError:
        entries = []
    # this uid's line; the official agent takes the first line holding $HOME
    for fields in entries:
        if len(fields) >= 7 and (fields[2] == str(uid) or (not shell and home and fields[5] == home)):
            shell = fields[6].strip()
            if fields[2] == str(uid):
                break
    if shell and os.path.basename(shell) not in ("nologin", "false"):
        found = shell if os.path.isabs(shell) and os.access(shell, os.X_OK) else shutil.which(shell, path=path)
        if found and not os.path.isdir(found):
            return found
    for name in FALLBACK_SHELLS:
        found = shutil.which(name, path=path)
        if found:
            return found
    return None


def shell_command(shell):
    """argv for the terminal: the MOTD prelude in /bin/sh, which then execs
    the shell; the shell alone where there is no /bin/sh."""
    if os.access("/bin/sh", os.X_OK):
        return ["/bin/sh", "-c", MOTD_PRELUDE, "komari-motd", shell]
    return [shell]


def shell_env(shell, home):
    """The terminal's environment: the agent's (without its AGENT_* settings),
    with the official agent's TERM, LANG and LC_ALL."""
    return child_env({"TERM": "xterm-256color", "LANG": "C.UTF-8", "LC_ALL": "C.UTF-8", "HOME": home,
                      "SHELL": shell})


def home_directory():
    try:
        import pwd
        return pwd.getpwuid(os.getuid()).pw_dir
    except (ImportError, KeyError):
        return os.environ.get("HOME") or "/"


def set_window_size(fd, rows, cols):
    import fcntl
    import termios
    fcntl.ioctl(fd, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))


def write_some(fd, pending):
    """Write what the non-blocking `fd` takes now from the bytearray
    `pending`, and remove that from it; False when the fd is gone."""
    try:
        del pending[:os.write(fd, pending[:65536])]
    except BlockingIOError:
        pass
    except OSError:
        return False
    return True

# Run by the terminal's child right after setsid(): the pty becomes the
# controlling terminal (so Ctrl-C, job control and hangups work) and the shell
# replaces it. Doing this in a Python child instead of pty.fork() keeps fork()
# out of this multi-threaded process.
CTTY_SHIM = ("import fcntl,os,sys,termios\n"
             "try:\n fcntl.ioctl(0,termios.TIOCSCTTY,0)\nexcept OSError:\n pass\n"
             "os.execv(sys.argv[1],sys.argv[2:])\n")


class PtyConsole:
    """The user's login shell on a pty of its own, leading its own session
    (POSIX): its output read, keystrokes written without blocking, resized,
    and ended with everything in its session."""

    notice = b""

    def __init__(self, rows=24, cols=80):
        master, slave = os.openpty()
        try:
            set_window_size(slave, rows, cols)
            shell = login_shell()
            if shell is None:
                raise OSError(2, "no supported shell found among [%s]" % " ".join(FALLBACK_SHELLS))
            home = home_directory()
            command = shell_command(shell)
            argv = [sys.executable, "-I", "-S", "-c", CTTY_SHIM, command[0]] + command
            self.proc, self.tree = start_tree(argv, stdin=slave, stdout=slave, stderr=slave, close_fds=True,
                                              env=shell_env(shell, home), cwd=home if os.path.isdir(home) else "/")
        except BaseException:
            os.close(master)
            raise
        finally:
            os.close(slave)
        os.set_blocking(master, False)
        self.master = self.writable_fd = master

    def read(self, timeout):
        """Output bytes; None when none came within `timeout` s; b"" at the end."""
        import select
        if not select.select([self.master], [], [], timeout)[0]:
            return None
        try:
            return os.read(self.master, 4096)
        except BlockingIOError:
            return None
        except OSError:
            return b""  # EIO: no process holds the pty any more

    def write(self, pending):
        return write_some(self.master, pending)

    def resize(self, rows, cols):
        try:
            set_window_size(self.master, rows, cols)
        except OSError:
            return False
        return True

    def end(self):
        self.tree.end(HANGUP_GRACE)
        self.proc.wait()

    def close(self):
        """After end(), once no pump of the session touches the pty."""
        os.close(self.master)


def open_console(rows=24, cols=80):
    """A shell on a console of its own for the web terminal, as an object
    with read(timeout), write(pending bytearray), resize(rows, cols), end(),
    close(), its process tree, a `writable_fd` to select() on while
    keystrokes wait (or None) and a `notice` to show first. OSError when no
    shell can start."""
    if IS_WINDOWS:
        return open_windows_console(rows, cols)
    return PtyConsole(rows, cols)


# -- ICMP ------------------------------------------------------------------------------

# The ICMP sockets to try, in order, before the system ping. Windows answers
# raw ICMP sockets only for administrators, and only once bound: its helper
# API (icmp_helper) serves there instead.
ICMP_SOCKET_KINDS = () if IS_WINDOWS else ((socket.SOCK_DGRAM, "an unprivileged ICMP socket"),
                                           (socket.SOCK_RAW, "a raw ICMP socket"))


def load_task_support():
    """Load now, while the agent has one thread, what commands, terminals and
    probes need on Windows: under Wine, a DLL loaded on one thread while
    another sits in a native call (psutil's) has hung the whole agent."""
    if IS_WINDOWS:
        import importlib
        win32()
        for name in ("codecs", "msvcrt", "queue", "subprocess", "tempfile", "unicodedata"):
            importlib.import_module(name)


def icmp_helper():
    """The system's own way to send one echo without privileges, as a
    function(family, address, timeout) -> ms or None, or None where there is
    none (ICMP sockets serve there)."""
    return icmp_helper_echo if IS_WINDOWS else None


# -- helper programs and starting at boot ----------------------------------------------

# What console programs write to a pipe: Windows' OEM code page, UTF-8 elsewhere.
CONSOLE_ENCODING = "oem" if IS_WINDOWS else "utf-8"


def boot_task_problem():
    """Why `service` (a Scheduled Task) cannot serve here, or None."""
    if IS_WINDOWS:
        return None
    return "Windows only: on Linux, macOS and FreeBSD install.sh installs the agent as a service"


# -- restarting this agent (self-update) ----------------------------------------------

# Asks a running agent for an update check (`update` run by hand); none on Windows.
UPDATE_SIGNAL = getattr(signal, "SIGUSR1", None)
# os.execv replaces this process (same pid) on Unix; on Windows it starts a
# new one and ends this one, which a service wrapper takes for an exit and
# answers with a second agent: there the agent exits for a restart instead.
EXEC_IN_PLACE = not IS_WINDOWS


# ---------------------------------------------------------------------------
# Report figures: what each realtime report measures, whatever the system
# ---------------------------------------------------------------------------

# -- cpu and disk --------------------------------------------------------------

def cpu_percent(previous, current):
    """Busy share of all CPUs between two (busy, total) samples, 0.001-100.
    Never 0: the server drops a zero usage (omitempty)."""
    busy = current[0] - previous[0]
    total = current[1] - previous[1]
    if total <= 0:
        return 100.0 if busy > 0 else 0.001
    return min(100.0, max(0.001, busy * 100.0 / total))


def sum_disk_usage(usages):
    """(total, used) from [(key, total, used, avail)]. Per device the largest
    total wins; a ZFS pool is its datasets' used plus the free space they share."""
    devices, pools = {}, {}
    for key, total, used, avail in usages:
        if key.startswith("zfs:"):
            pool = pools.setdefault(key, [0, 0])
            pool[0] += used
            pool[1] = max(pool[1], avail)
        elif key not in devices or total > devices[key][0]:
            devices[key] = (total, used)
    total = sum(t for t, _ in devices.values()) + sum(u + a for u, a in pools.values())
    used = sum(u for _, u in devices.values()) + sum(u for u, _ in pools.values())
    return total, used


# -- network -----------------------------------------------------------------

# Virtual NICs whose traffic is already counted on a physical NIC: the
# official agent's list, so that both count the same totals (tun*, wg* and
# the like carry traffic of their own and count).
VIRTUAL_NIC_PREFIXES = ("lo", "br", "cni", "docker", "podman", "flannel", "veth", "virbr", "vmbr", "tap",
                        "fwbr", "fwpr")


def nic_counted(name, include=(), exclude=()):
    """Whether a NIC's bytes count. An explicit include wins over everything;
    with an include list, nothing else counts."""
    if include:
        return any(fnmatchcase(name, p) for p in include)
    if name.startswith(VIRTUAL_NIC_PREFIXES):
        return False
    return not any(fnmatchcase(name, p) for p in exclude)


class NetMeter:
    """Per-NIC byte counters between reports: speeds from per-NIC deltas, so a
    NIC that vanishes or resets does not zero the others' traffic."""

    def __init__(self):
        self.previous = None
        self.at = None

    def sample(self, counters, now):
        """(up_per_s, down_per_s) since the last sample; (0, 0) the first time."""
        up = down = 0
        if self.previous is not None:
            for nic, (rx, tx) in counters.items():
                old = self.previous.get(nic)
                if old is not None:
                    down += rx - old[0] if rx >= old[0] else 0
                    up += tx - old[1] if tx >= old[1] else 0
        elapsed = now - self.at if self.at is not None else 0
        self.previous, self.at = counters, now
        if elapsed <= 0:
            return 0, 0
        return int(up / elapsed), int(down / elapsed)


# -- GPU figures (--gpu) -----------------------------------------------------------

def gpu_tool(name, usual_path):
    """The path of a GPU tool: its usual place, else PATH; "" when missing."""
    import shutil
    return usual_path if os.path.exists(usual_path) else shutil.which(name) or ""


def leading_number(text):
    """25.0 from "25 %", "1024 MiB", "65 C", "45.0"; 0.0 for "[N/A]" and the like."""
    found = re.match(r"^\s*(\d+(?:\.\d+)?)", str(text))
    return float(found.group(1)) if found else 0.0


# one GPU's figures as its tool gave them (bytes, %, degrees C); report_payload() guards their ranges
GpuDevice = namedtuple("GpuDevice", "name memory_total memory_used utilization temperature")


def nvidia_devices(csv_text):
    """Devices from nvidia-smi's CSV query (name, MiB total, MiB used, %, C):
    every field the panel shows, at a fraction of the cost of `-q -x`."""
    devices = []
    for line in csv_text.splitlines():
        fields = [f.strip() for f in line.split(",")]
        if len(fields) >= 5:
            devices.append(GpuDevice(fields[0], leading_number(fields[1]) * (1 << 20),
                                      leading_number(fields[2]) * (1 << 20), leading_number(fields[3]),
                                      leading_number(fields[4])))
    return devices


def rocm_devices(json_text):
    """Devices from `rocm-smi --showallinfo --json` (its card* entries)."""
    data = json.loads(json_text)
    if not isinstance(data, dict):
        raise ValueError("rocm-smi output is not a JSON object")
    devices = []
    for key in sorted(k for k in data if k.startswith("card")):
        card = data[key] if isinstance(data[key], dict) else {}
        devices.append(GpuDevice(str(card.get("Card series", "")), leading_number(card.get("VRAM Total Memory (B)", "")),
                                  leading_number(card.get("VRAM Total Used Memory (B)", "")),
                                  leading_number(card.get("GPU use (%)", "")),
                                  leading_number(card.get("Temperature (Sensor junction) (C)", ""))))
    return devices


NVIDIA_QUERY = ["--query-gpu=name,memory.total,memory.used,utilization.gpu,temperature.gpu",
                "--format=csv,noheader,nounits"]


def gpu_devices():
    """The GPUs' figures, NVIDIA's through nvidia-smi, else AMD's through
    rocm-smi; an error names what failed."""
    smi = gpu_tool("nvidia-smi", "/usr/bin/nvidia-smi")
    if smi:
        status, out = run_output([smi] + NVIDIA_QUERY, timeout=2.0)
        if status == 0:
            return nvidia_devices(out)
    rocm = gpu_tool("rocm-smi", "/opt/rocm/bin/rocm-smi")
    if not rocm:
        raise OSError("rocm-smi tool not found")
    status, out = run_output([rocm, "--showallinfo", "--json"], timeout=5.0)
    if status != 0:
        raise OSError("no data available")
    return rocm_devices(out)


def gpu_details():
    """(GpuDevices, or only the model names, or None; a problem or ""), as
    the official agent: nothing without GPUs; on failure the message line
    and, when the names can still be read, those."""
    try:
        devices = gpu_devices()
    except (OSError, ValueError) as e:
        problem = str(e) if not isinstance(e, OSError) or not e.strerror else e.strerror
        try:
            models = [d.name for d in gpu_devices() if d.name]
        except (OSError, ValueError):
            models = []
        return (models or None), problem
    return (devices or None), ""


# -- the report ----------------------------------------------------------------

# One report's figures, as measured; report_payload() (Wire protocol) turns
# them into the message the panel decodes.
Figures = namedtuple("Figures", "cpu ram_total ram_used swap_total swap_used load1 load5 load15 disk_total disk_used "
                                "up down total_up total_down tcp udp uptime processes gpu message")


class Collector:
    """Everything that changes between reports: CPU and NIC baselines, the
    mount table cache. One instance lives for the whole run so speeds and CPU
    usage stay continuous across reconnects."""

    MOUNTS_TTL = 30.0

    def __init__(self, cfg, host=None):
        self.cfg = cfg
        self.host = host or make_host(cfg)
        self.net = NetMeter()
        self.cpu_previous = None
        self.mounts = None
        self.mounts_at = 0.0
        self.processes = None
        self.processes_at = 0.0
        self.nic_decisions = {}
        self.traffic = None   # a TrafficLedger when --month-rotate is set
        self.mount_problems = {}  # --include-mountpoint entries that cannot be counted -> why
        self.lock = threading.Lock()
        self.cpu_sample()  # baseline, so the first report has a real CPU figure

    # each collector returns its figure or raises; figures() turns failures into message lines
    def cpu_sample(self):
        return self.host.cpu_times()

    def cpu_usage(self):
        current = self.cpu_sample()
        previous, self.cpu_previous = self.cpu_previous, current
        return cpu_percent(previous, current) if previous else 0.001

    def memory(self):
        return self.host.memory(self.cfg.memory_include_cache)

    def load(self):
        return self.host.load()

    def mount_table(self):
        now = time.monotonic()
        if self.mounts is None or now - self.mounts_at > self.MOUNTS_TTL:
            self.mounts = self.host.counted_mounts()
            self.mounts_at = now
        return self.mounts

    def disk(self):
        usages = []
        if self.cfg.mountpoints:
            for i, path in enumerate(dict.fromkeys(self.cfg.mountpoints)):
                try:
                    usages.append(("path:%d" % i,) + self.host.disk_usage(path))
                    self.mount_problems.pop(path, None)
                except OSError as e:
                    if path not in self.mount_problems:
                        log.warning("--include-mountpoint %s is not counted: %s", path, describe_error(e))
                    self.mount_problems[path] = describe_error(e)
        else:
            for key, mount in self.mount_table():
                try:
                    usages.append((key,) + self.host.disk_usage(mount.mountpoint))
                except OSError:
                    continue
        return sum_disk_usage(usages)

    def nic_counters(self):
        """{nic: (rx, tx)} over the counted NICs."""
        return {n: c for n, c in self.host.nic_counters().items() if self.nic_counted(n)}

    def nic_counted(self, name):
        # decided once per NIC name: the wildcard matching is not free
        counted = self.nic_decisions.get(name)
        if counted is None:
            if len(self.nic_decisions) > 4096:
                self.nic_decisions.clear()
            counted = self.nic_decisions[name] = nic_counted(name, self.cfg.nics_include, self.cfg.nics_exclude)
        return counted

    def sample_traffic(self):
        """Count --month-rotate traffic without a report. Under the report's
        lock: counters read earlier but counted later would look like a reset."""
        with self.lock:
            self.traffic.update(self.nic_counters())

    def network(self):
        counters = self.nic_counters()
        up, down = self.net.sample(counters, time.monotonic())
        if self.traffic is not None:
            total_up, total_down = self.traffic.update(counters)
        else:
            total_up = sum(tx for _, tx in counters.values())
            total_down = sum(rx for rx, _ in counters.values())
        return up, down, total_up, total_down

    def connections(self):
        return self.host.connections()

    def uptime(self):
        return self.host.uptime()

    PROCESSES_TTL = 4.5

    def process_count(self):
        """Processes, recounted every few seconds: listing /proc makes the
        kernel walk every task, the dearest read of a report on Linux."""
        now = time.monotonic()
        if self.processes is None or now - self.processes_at >= self.PROCESSES_TTL:
            self.processes = self.host.process_count()
            self.processes_at = now
        return self.processes

    def ram_swap_disk_totals(self):
        try:
            (ram, _), (swap, _) = self.memory()
        except Exception:
            ram = swap = 0
        try:
            disk = self.disk()[0]
        except Exception:
            disk = 0
        return ram, swap, disk

    def figures(self):
        """The figures of one realtime report (report_payload() names their
        keys). A collector that fails gives zeros and a line in `message`; it
        never stops the report."""
        with self.lock:
            failures = []

            def attempt(name, function, fallback):
                try:
                    return function()
                except Exception as e:
                    failures.append("failed to get %s: %s" % (name, describe_error(e)))
                    return fallback

            usage = attempt("cpu", self.cpu_usage, 0.001)
            (ram_total, ram_used), (swap_total, swap_used) = attempt("memory", self.memory, ((0, 0), (0, 0)))
            load1, load5, load15 = attempt("load", self.load, (0.0, 0.0, 0.0))
            disk_total, disk_used = attempt("disk", self.disk, (0, 0))
            up, down, total_up, total_down = attempt("network", self.network, (0, 0, 0, 0))
            tcp, udp = attempt("connections", self.connections, (0, 0))
            uptime = attempt("uptime", self.uptime, 0)
            processes = attempt("processes", self.process_count, 0)
            if self.traffic is not None and self.traffic.problem:
                failures.append(self.traffic.problem)
            failures += ["disk: mount point %s not counted (%s)" % item for item in sorted(self.mount_problems.items())]
            gpu = None
            if self.cfg.gpu:
                gpu, problem = gpu_details()
                if problem:
                    failures.append("failed to get detailed GPU info: " + problem)
            return Figures(usage, ram_total, ram_used, swap_total, swap_used, load1, load5, load15, disk_total,
                           disk_used, up, down, total_up, total_down, tcp, udp, uptime, processes, gpu,
                           "\n".join(failures))


# ---------------------------------------------------------------------------
# Basic info: the static facts together, and the public addresses
# ---------------------------------------------------------------------------

# The readers below take the roots they read under (proc, sys and the
# filesystem root, like gopsutil's HOST_PROC/HOST_SYS) so that they run
# unchanged on fixture trees; helper programs are looked up on PATH.

GO_ARCH = {"x86_64": "amd64", "amd64": "amd64", "aarch64": "arm64", "arm64": "arm64", "i386": "386",
           "i486": "386", "i586": "386", "i686": "386", "x86": "386", "loongarch64": "loong64",
           "riscv64": "riscv64", "s390x": "s390x", "ppc64le": "ppc64le", "ppc64": "ppc64",
           "mips": "mips", "mipsel": "mipsle", "mips64": "mips64", "mips64el": "mips64le"}


def go_arch(machine):
    machine = machine.lower()
    if machine in GO_ARCH:
        return GO_ARCH[machine]
    if machine.startswith("arm"):
        return "arm"
    return machine or "unknown"


# -- public addresses ----------------------------------------------------------

# The official agent's services, in its order: the first ones answer from
# mainland China, where many Komari users are.
IPV4_LOOKUPS = ("https://www.visa.cn/cdn-cgi/trace", "https://www.qualcomm.cn/cdn-cgi/trace",
                "https://www.toutiao.com/stream/widget/local_weather/data/", "https://edge-ip.html.zone/geo",
                "https://vercel-ip.html.zone/geo", "http://ipv4.ip.sb", "https://api.ipify.org?format=json")
IPV6_LOOKUPS = ("https://v6.ip.zxinc.org/info.php?type=json", "https://api6.ipify.org?format=json",
                "https://ipv6.icanhazip.com", "http://api-ipv6.ip.sb/geoip")
IP_LOOKUP_TIMEOUT = 15.0


def address_in_text(text, family):
    import ipaddress
    pattern = r"\d{1,3}(?:\.\d{1,3}){3}" if family == socket.AF_INET else r"[0-9a-fA-F:]*:[0-9a-fA-F:.]+"
    for candidate in re.findall(pattern, text):
        try:
            address = ipaddress.ip_address(candidate)
        except ValueError:
            continue
        if address.version == (4 if family == socket.AF_INET else 6) and address.is_global:
            return str(address)
    return ""


def fetch_over_family(url, family, timeout, cfg=None):
    """Body of a GET to `url` connecting only over `family` (so the answer is
    our IPv4 or IPv6 address, whatever the resolver prefers). Through the
    environment's proxy when it names one, as the official agent does."""
    import http.client
    from urllib.parse import urlsplit
    headers = {"User-Agent": "curl/8.0.1"}
    if environment_proxy(url):
        import urllib.request
        # a fresh opener: urlopen()'s global one keeps the proxy of its first call forever
        opener = urllib.request.build_opener()
        with opener.open(urllib.request.Request(url, headers=headers), timeout=timeout) as reply:
            return reply.read(4096).decode("utf-8", "replace")
    parts = urlsplit(url)
    port = parts.port or (443 if parts.scheme == "https" else 80)
    address = resolve_host(cfg, parts.hostname, port, family)[0][1]
    sock = socket.create_connection(address, timeout=timeout)
    try:
        if parts.scheme == "https":
            sock = ssl.create_default_context().wrap_socket(sock, server_hostname=parts.hostname)
        conn = http.client.HTTPConnection(parts.hostname, port, timeout=timeout)
        conn.sock = sock
        conn.request("GET", (parts.path or "/") + ("?" + parts.query if parts.query else ""), headers=headers)
        return conn.getresponse().read(4096).decode("utf-8", "replace")
    finally:
        sock.close()


def lookup_public_ip(family, cfg=None, timeout=IP_LOOKUP_TIMEOUT, services=None):
    for url in services or (IPV4_LOOKUPS if family == socket.AF_INET else IPV6_LOOKUPS):
        try:
            address = address_in_text(fetch_over_family(url, family, timeout, cfg), family)
        except Exception:  # any failure: try the next service
            continue
        if address:
            log.info("Get IPV%d Success: %s", 4 if family == socket.AF_INET else 6, address)
            return address
    return ""


def nic_addresses(cfg):
    """(ipv4, ipv6) of the counted NICs that are up: the first IPv4 (any
    scope) and the first IPv6 that is not link-local, as the official agent
    picks them."""
    import ipaddress
    v4 = v6 = ""
    try:
        ps = psutil_module()
        addrs, stats = ps.net_if_addrs(), ps.net_if_stats()
    except Exception:
        return "", ""
    for nic, entries in addrs.items():
        if not nic_counted(nic, cfg.nics_include, cfg.nics_exclude) or not getattr(stats.get(nic), "isup", False):
            continue
        for entry in entries:
            try:
                ip = ipaddress.ip_address(entry.address.split("%")[0])
            except ValueError:
                continue
            if ip.is_loopback:
                continue
            if ip.version == 4 and not v4:
                v4 = str(ip)
            elif ip.version == 6 and not v6 and not ip.is_link_local:
                v6 = str(ip)
    return v4, v6


class PublicAddresses:
    """The box's public IPv4/IPv6, looked up in the background once per info
    interval so that no upload waits on slow lookup services."""

    def __init__(self, cfg, on_change=None):
        self.cfg = cfg
        self.on_change = on_change
        self.v4 = cfg.custom_ipv4
        self.v6 = cfg.custom_ipv6
        self.done = threading.Event()
        self.fetched_at = None
        self.lock = threading.Lock()

    def refresh_async(self):
        with self.lock:
            if self.fetched_at is not None and time.monotonic() - self.fetched_at < self.cfg.info_report_interval * 60:
                return
            self.fetched_at = time.monotonic()
        threading.Thread(target=self._refresh, name="ip-lookup", daemon=True).start()

    def _refresh(self):
        cfg = self.cfg
        before = (self.v4, self.v6)
        # as the official agent: addresses found on the NICs win over the
        # --custom-ipv4/6 values and the lookups
        v4, v6 = nic_addresses(cfg) if cfg.get_ip_addr_from_nic else ("", "")
        if v4 or v6:
            self.v4, self.v6 = v4, v6
        else:
            self.v4, self.v6 = cfg.custom_ipv4 or self.v4, cfg.custom_ipv6 or self.v6
            threads = []
            if not cfg.custom_ipv4:
                threads.append(threading.Thread(target=lambda: setattr(self, "v4", lookup_public_ip(socket.AF_INET, cfg) or self.v4)))
            if not cfg.custom_ipv6:
                threads.append(threading.Thread(target=lambda: setattr(self, "v6", lookup_public_ip(socket.AF_INET6, cfg) or self.v6)))
            for t in threads:
                t.daemon = True
                t.start()
            for t in threads:
                t.join()
        self.done.set()
        if (self.v4, self.v6) != before and self.on_change:
            self.on_change()

    def current(self, wait=0.0):
        self.refresh_async()
        self.done.wait(wait)
        return self.v4, self.v6


# -- the whole of it ---------------------------------------------------------------

def slow_facts(host):
    """The facts that need helper programs (lspci, systemd-detect-virt):
    looked up once per run."""
    return {"gpu_name": host.gpu_name(), "os": host.os_name(), "virtualization": host.virtualization()}


# basic_info_payload() (Wire protocol) names these for the panel
BasicFacts = namedtuple("BasicFacts", "cpu_name cpu_cores cpu_physical_cores arch os kernel_version gpu_name "
                                      "virtualization ipv4 ipv6 mem_total swap_total disk_total")


def basic_facts(cfg, collector, addresses, slow, wait=IP_LOOKUP_WAIT):
    """Everything basic info says, now: `slow` from slow_facts(), totals
    from the collector, public addresses waited for up to `wait` seconds."""
    cpu_name, cpu_cores, cpu_physical_cores = collector.host.cpu_facts()
    ipv4, ipv6 = addresses.current(wait)
    ram, swap, disk = collector.ram_swap_disk_totals()
    return BasicFacts(
        cpu_name=cpu_name, cpu_cores=cpu_cores, cpu_physical_cores=cpu_physical_cores,
        arch=go_arch(platform.machine()), os=slow.get("os") or collector.host.os_name(),
        kernel_version=collector.host.kernel_version(), gpu_name=slow.get("gpu_name", ""),
        virtualization=slow.get("virtualization", ""), ipv4=ipv4, ipv6=ipv6,
        mem_total=ram, swap_total=swap, disk_total=disk)


# ---------------------------------------------------------------------------
# Monthly traffic: the ledger behind --month-rotate
# ---------------------------------------------------------------------------

TRAFFIC_FILE = "traffic.json"
CALIBRATION_FILE = "traffic-calibration.json"
TRAFFIC_SAVE_EVERY = 60.0       # seconds: a power cut loses at most this much counting
CALIBRATION_CHECK_EVERY = 3.0   # seconds between looks for a calibration file
NET_STATIC = "net_static.json"  # the official agent's store, in its working directory
OFFICIAL_INSTALL_DIR = "/opt/komari"
SIZE_UNITS = "KMGTP"


def epoch_of(now):
    """Seconds since the epoch from a number, a datetime (naive = local time) or None (now)."""
    if now is None:
        return time.time()
    if hasattr(now, "timestamp"):
        return now.timestamp()
    return float(now)


def local_time(t):
    """"2024-06-01 00:00", or "?" for what is no moment (stored JSON can hold anything)."""
    try:
        return time.strftime("%Y-%m-%d %H:%M", time.localtime(t)) if isinstance(t, (int, float)) else "?"
    except (OverflowError, OSError, ValueError):
        return "?"


def reset_moment(year, month, day):
    """00:00 local time on `day` of the month; in a month without that day
    (31 in April, 30 in February) the 1st of the next month, as the official
    agent resets."""
    import calendar
    while month < 1:
        year, month = year - 1, month + 12
    while month > 12:
        year, month = year + 1, month - 12
    if day > calendar.monthrange(year, month)[1]:
        year, month, day = year + month // 12, month % 12 + 1, 1
    return time.mktime((year, month, day, 0, 0, 0, 0, 0, -1))


def period_bounds(reset_day, now):
    """(start, end) epoch seconds of the accounting period that holds `now`."""
    t = time.localtime(now)
    start = reset_moment(t.tm_year, t.tm_mon, reset_day)
    if now < start:
        return reset_moment(t.tm_year, t.tm_mon - 1, reset_day), start
    end = reset_moment(t.tm_year, t.tm_mon + 1, reset_day)
    if end <= start:  # this month's reset rolled into the next month, whose own reset comes later
        end = reset_moment(t.tm_year, t.tm_mon + 2, reset_day)
    return start, end


def parse_size(text):
    """Bytes from '120G', '1.5T', '512MiB', '100' (units K M G T P, 1024-based); ValueError if not a size."""
    match = re.match(r"^\s*(\d+(?:\.\d*)?|\.\d+)\s*(?:([kmgtp])(?:i?b)?|b)?\s*$", str(text), re.IGNORECASE)
    if not match:
        raise ValueError("not a size: %r (use a number with K, M, G, T or P, e.g. 120G or 1.5T)" % text)
    power = SIZE_UNITS.index(match.group(2).upper()) + 1 if match.group(2) else 0
    size = float(match.group(1)) * 1024 ** power
    if not size < 1 << 63:  # also infinity, from 400 digits
        raise ValueError("%s is more than the panel can count (at most 8 EiB)" % str(text).strip()[:40])
    return int(round(size))


def human_size(n):
    for power in range(len(SIZE_UNITS), 0, -1):
        if n >= 1024 ** power:
            return "%.2f %siB" % (n / 1024.0 ** power, SIZE_UNITS[power - 1])
    return "%d B" % n


def net_static_totals(data, start, end):
    """{nic: [up, down]} summed over the official store's records stamped within [start, end]."""
    totals = {}
    interfaces = data.get("interfaces") if isinstance(data, dict) else None
    for nic, records in (interfaces or {}).items():
        if not isinstance(records, list):
            continue
        up = down = 0
        for record in records:
            try:
                stamp, tx, rx = float(record["timestamp"]), int(record.get("tx", 0)), int(record.get("rx", 0))
            except (TypeError, ValueError, KeyError, AttributeError):
                continue
            if start <= stamp <= end and tx >= 0 and rx >= 0:
                up, down = up + tx, down + rx
        if up or down:
            totals[str(nic)] = [up, down]
    return totals


def net_static_from_snapshot(state, stamp):
    """The official agent's net_static.json holding this period's totals of a
    traffic.json snapshot: one record per counted NIC, stamped `stamp`, so an
    official agent started in the same period reports the same totals. A
    calibration offset goes to the busiest NIC."""
    counted = [n for n in state.get("counted") or [] if isinstance(n, str)]
    nics = state.get("nics") or {}
    totals = {n: [whole((nics.get(n) or {}).get("up")), whole((nics.get(n) or {}).get("down"))] for n in counted}
    offset = state.get("offset") or {}
    for i, key in ((0, "up"), (1, "down")):
        shift = offset.get(key) if isinstance(offset.get(key), int) else 0
        if shift and totals:
            busiest = max(sorted(totals), key=lambda n: totals[n][i])
            totals[busiest][i] = max(0, totals[busiest][i] + shift)
    return {"interfaces": {n: [{"timestamp": int(stamp), "tx": up, "rx": down}] for n, (up, down) in totals.items()},
            "config": {"data_preserve_day": 31, "detect_interval": 2, "save_interval": 600, "nics": counted}}


def write_net_static(path, state, stamp):
    write_atomic(path, json.dumps(net_static_from_snapshot(state, stamp), separators=(",", ":")).encode(), 0o644)


def net_static_candidates(cwd=None):
    """Where an official agent that this one replaced left its net_static.json."""
    dirs = [os.path.dirname(SCRIPT_PATH), cwd or os.getcwd(), OFFICIAL_INSTALL_DIR]
    return [os.path.join(d, NET_STATIC) for d in dict.fromkeys(dirs)]


def whole(value):
    """A non-negative int from stored JSON, 0 for anything else."""
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else 0


def stored_time(value):
    """Epoch seconds from stored JSON; ValueError (or OverflowError) unless a
    real moment: time.localtime() of it must work."""
    value = float(value)
    time.localtime(value)
    return value


def saved_traffic(path):
    """The traffic.json snapshot at `path` for `traffic --show/--export`:
    FileNotFoundError when there is none, ValueError saying what is wrong
    when it is damaged (exported, it would give the official agent zeros)."""
    data = read_json_object(path)
    for key in ("period_start", "period_end", "saved_at"):
        value = data.get(key)
        try:
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise ValueError
            stored_time(value)
        except (ValueError, OverflowError, OSError):
            raise ValueError("%s is not a moment in time" % key)
    for key, shape, item in (("total", dict, int), ("offset", dict, int), ("nics", dict, dict),
                             ("counted", list, str), ("previous", dict, object)):
        value = data.get(key) or shape()
        items = list(value.values()) if isinstance(value, dict) else value
        if not isinstance(value, shape) or any(isinstance(v, bool) or not isinstance(v, item) for v in items):
            raise ValueError("%s is malformed" % key)
    return data


class TrafficLedger:
    """This period's traffic per NIC, kept in <state dir>/traffic.json so that
    restarts, reboots, NIC resets and a replaced agent do not lose it.

    Each NIC has its period totals and the last counters seen. A counter that
    went backwards (reboot, NIC reset, wrap) restarted from zero, so its new
    value is the traffic since; it is counted when that restart lies inside
    the period. The report is the sum over the NICs counted now, plus the
    calibration offset set with `traffic --set-up/--set-down`."""

    def __init__(self, directory, reset_day, counted=None, import_path="", import_candidates=(),
                 boot=None, now=None):
        self.path = os.path.join(directory, TRAFFIC_FILE)
        self.calibration_path = os.path.join(directory, CALIBRATION_FILE)
        self.reset_day = reset_day
        self.counted = counted or (lambda nic: True)
        self.counted_cache = {}
        self.boot_id, self.boot_time = boot or make_host().boot_identity()
        self.lock = threading.Lock()
        self.problem = ""
        self.sampled = False      # whether this process has sampled the counters yet
        self.saved_at = None      # None: save at the next update (the first one, say)
        self.calibration_checked = 0.0
        now = epoch_of(now)
        self.now_at_start = now
        self.reset_state()
        had_state = self.load()
        self.imported_now = False
        if import_path:
            self.import_net_static(import_path, now)
        elif not had_state:
            for candidate in import_candidates:
                if os.path.isfile(candidate):
                    self.import_net_static(candidate, now)
                    break
        self.roll(now)

    def reset_state(self):
        self.start, self.end = period_bounds(self.reset_day, self.now_at_start)
        self.nics = {}            # nic -> [up, down, rx, tx]; rx/tx None without a baseline
        self.offset = [0, 0]
        self.previous = None
        self.imported = []
        self.calibrated_at = 0.0
        self.state_boot_id = None
        self.sampled_at = None

    # -- state file ---------------------------------------------------------
    def load(self):
        """Take over the saved state; False when there is none. State that
        cannot be taken over, whatever the reason, is set aside as .bad: a
        file that fails at every start would otherwise stop the agent for good."""
        try:
            data = read_json_object(self.path)
            self.take_state(data)
        except FileNotFoundError:
            return False
        except Exception as e:
            log.warning("traffic state %s is unreadable (%s); starting afresh", self.path, describe_error(e))
            try:
                os.replace(self.path, self.path + ".bad")
            except OSError:
                pass
            self.reset_state()
            return False
        return True

    def take_state(self, data):
        start = data.get("period_start")
        if isinstance(start, (int, float)) and not isinstance(start, bool):
            self.start = stored_time(start)
            # no order is asked of them: after the clock went back, end can lie before start
            self.end = stored_time(data.get("period_end") or period_bounds(self.reset_day, self.start)[1])
        for nic, entry in (data.get("nics") or {}).items():
            if isinstance(entry, dict):
                rx, tx = entry.get("rx"), entry.get("tx")
                has_base = isinstance(rx, int) and isinstance(tx, int) and rx >= 0 and tx >= 0
                self.nics[str(nic)] = [whole(entry.get("up")), whole(entry.get("down")),
                                       rx if has_base else None, tx if has_base else None]
        offset = data.get("offset") or {}
        self.offset = [int(offset.get("up", 0)), int(offset.get("down", 0))]
        self.previous = data.get("previous") if isinstance(data.get("previous"), dict) else None
        self.imported = [p for p in data.get("imported") or [] if isinstance(p, str)]
        self.calibrated_at = stored_time(data.get("calibrated_at") or 0)
        self.state_boot_id = str(data.get("boot_id") or "") or None
        sampled_at = data.get("sampled_at")
        self.sampled_at = stored_time(sampled_at) if isinstance(sampled_at, (int, float)) else None
        if data.get("reset_day") != self.reset_day:
            # a new reset day moves the period's bounds; the totals so far are kept
            self.start, self.end = period_bounds(self.reset_day, self.now_at_start)
            log.warning("traffic: reset day changed from %s to %d; this period now runs from %s, totals kept "
                        "(correct them with `%s traffic --set-up/--set-down` if needed)",
                        data.get("reset_day"), self.reset_day, local_time(self.start), PROG)

    def snapshot(self, now):
        up, down = self.totals()
        return {"format": "komari_agent.py traffic 1", "reset_day": self.reset_day,
                "period_start": self.start, "period_end": self.end,
                "period_start_local": local_time(self.start),
                "total": {"up": up, "down": down},
                "counted": sorted(n for n in self.nics if self.is_counted(n)),
                "offset": {"up": self.offset[0], "down": self.offset[1]},
                "nics": {n: {"up": e[0], "down": e[1], "rx": e[2], "tx": e[3]} for n, e in sorted(self.nics.items())},
                "boot_id": self.boot_id, "sampled_at": self.sampled_at, "saved_at": now,
                "calibrated_at": self.calibrated_at, "imported": self.imported, "previous": self.previous}

    def save(self, now):
        try:
            snapshot = self.snapshot(now)
            write_atomic(self.path, json.dumps(snapshot, indent=1, sort_keys=True).encode())
            # the official agent's format beside ours: switching back keeps the month
            write_net_static(os.path.join(os.path.dirname(self.path), NET_STATIC), snapshot, now)
        except OSError as e:
            if not self.problem:
                log.warning("cannot save traffic totals in %s (%s); counting goes on in memory",
                            os.path.dirname(self.path), describe_error(e))
            # the report's message is public: the reason, never the path
            self.problem = "traffic totals kept in memory only: state directory not writable (%s)" % (
                e.strerror or type(e).__name__)
        else:
            if self.problem:
                log.info("traffic totals saved again in %s", os.path.dirname(self.path))
            self.problem = ""
        self.saved_at = now

    def flush(self, now=None):
        """Save now (clean exit)."""
        with self.lock:
            self.save(epoch_of(now))

    # -- sources besides the counters ----------------------------------------
    def import_net_static(self, path, now):
        """Add this period's records from the official agent's net_static.json, once per file."""
        real = os.path.realpath(path)
        if real in self.imported:
            return
        try:
            totals = net_static_totals(read_json_object(path), self.start, now)
        except (OSError, ValueError) as e:
            log.warning("cannot import %s: %s", path, describe_error(e))
            return
        for nic, (up, down) in totals.items():
            entry = self.nics.setdefault(nic, [0, 0, None, None])
            entry[0] += up
            entry[1] += down
        self.imported.append(real)
        self.imported_now = True
        log.info("imported this period's traffic from %s: %s", path,
                 ", ".join("%s up %s down %s" % (n, human_size(u), human_size(d))
                           for n, (u, d) in sorted(totals.items())) or "no records in this period")

    def check_calibration(self, now):
        """Apply a calibration file written by `traffic --set-up/--set-down`."""
        self.calibration_checked = now
        try:
            os.stat(self.calibration_path)
        except OSError:
            return
        try:
            data = read_json_object(self.calibration_path)
            at = stored_time(data.get("at") or 0)
        except (OSError, ValueError, TypeError, OverflowError) as e:
            log.warning("ignoring calibration file %s: %s", self.calibration_path, describe_error(e))
            at = None
        if at is not None and at > self.calibrated_at:
            if at < self.start:
                log.warning("ignoring a calibration written before this period began")
            else:
                up, down = self.counted_sums()
                for i, key, current in ((0, "up", up), (1, "down", down)):
                    target = data.get(key)
                    if isinstance(target, int) and not isinstance(target, bool) and target >= 0:
                        self.offset[i] = target - current
                self.calibrated_at = at
                self.saved_at = None  # save at once
                log.info("traffic calibrated: this period now up %s, down %s", *map(human_size, self.totals()))
        try:
            os.unlink(self.calibration_path)
        except OSError:
            pass  # calibrated_at keeps it from being applied twice

    # -- counting --------------------------------------------------------------
    def is_counted(self, nic):
        counted = self.counted_cache.get(nic)
        if counted is None:
            counted = self.counted_cache[nic] = bool(self.counted(nic))
        return counted

    def counted_sums(self):
        up = down = 0
        for nic, entry in self.nics.items():
            if self.is_counted(nic):
                up += entry[0]
                down += entry[1]
        return up, down

    def totals(self):
        up, down = self.counted_sums()
        return max(0, up + self.offset[0]), max(0, down + self.offset[1])

    def roll(self, now):
        """Start a new period when `now` is past the current one. A start that
        moved by less than two days (time zone or DST change) is no new period."""
        if self.start <= now < self.end:
            return
        start, end = period_bounds(self.reset_day, now)
        if start < self.start + 2 * 86400:
            # the clock went back, or a time zone change moved the start a little: same period
            self.end = end if start < self.start - 2 * 86400 else max(self.end, end)
            return
        up, down = self.totals()
        self.previous = {"start": self.start, "end": start, "up": up, "down": down}
        log.info("traffic period ended with up %s, down %s; counting afresh from %s",
                 human_size(up), human_size(down), local_time(start))
        for entry in self.nics.values():
            entry[0] = entry[1] = 0
        self.offset = [0, 0]
        self.start, self.end = start, end
        self.saved_at = None

    def restarted_inside_period(self, first_sample, fresh_boot, known):
        """Whether a counter that (re)started since the last sample did so inside this period."""
        if fresh_boot or (first_sample and not known):
            # its whole life is since boot (an imported store already holds this boot's traffic)
            return self.boot_time >= self.start and not (self.imported_now and not known)
        return self.sampled_at is not None and self.sampled_at >= self.start

    def update(self, counters, now=None):
        """(total_up, total_down) of this period after taking in `counters`
        ({nic: (rx_bytes, tx_bytes)} over the counted NICs)."""
        now = epoch_of(now)
        with self.lock:
            self.roll(now)
            first_sample = not self.sampled
            fresh_boot = first_sample and self.state_boot_id not in (None, self.boot_id)
            interval_inside = self.sampled_at is not None and self.sampled_at >= self.start
            for nic, (rx, tx) in counters.items():
                entry = self.nics.get(nic)
                if entry is None:
                    entry = self.nics[nic] = [0, 0, None, None]
                known = entry[2] is not None
                for total, value, base in ((1, rx, entry[2]), (0, tx, entry[3])):
                    if not known or fresh_boot or value < base:
                        # restarted from zero since the last sample: the new value is all new
                        # traffic (never a negative delta), if the restart was inside the period
                        if self.restarted_inside_period(first_sample, fresh_boot, known):
                            entry[total] += value
                    elif interval_inside:
                        entry[total] += value - base
                entry[2], entry[3] = rx, tx
            for nic, entry in self.nics.items():
                if entry[2] is not None and nic not in counters:
                    entry[2] = entry[3] = None  # gone: a NIC that comes back starts from zero
            self.sampled, self.sampled_at = True, now
            self.imported_now = False
            # after counting, so that a calibration sets exactly the total it names
            if now - self.calibration_checked >= CALIBRATION_CHECK_EVERY or now < self.calibration_checked:
                self.check_calibration(now)
            if self.saved_at is None or abs(now - self.saved_at) >= TRAFFIC_SAVE_EVERY:
                self.save(now)
            return self.totals()


def sample_traffic_while_idle(ledger, sample, stop):
    """Keep `ledger` counting while no report does (before the first link,
    during an outage): `sample()` (Collector.sample_traffic) at once and
    whenever the last sample is TRAFFIC_SAVE_EVERY old, so the state is
    saved, `traffic --show` is right and a reboot before the panel is
    reached loses at most that much. Returns when `stop` is set."""
    while True:
        idle = time.time() - ledger.sampled_at if ledger.sampled else TRAFFIC_SAVE_EVERY
        if not 0 <= idle < TRAFFIC_SAVE_EVERY:
            try:
                sample()
            except Exception as e:   # a NIC read failing now and then must not end the counting
                log.debug("traffic sample failed: %s", describe_error(e))
            idle = 0.0
        if stop.wait(TRAFFIC_SAVE_EVERY - idle):
            return


def traffic_ledger(cfg):
    """The TrafficLedger for --month-rotate, or None without it."""
    if not cfg.month_rotate:
        return None
    include, exclude = cfg.nics_include, cfg.nics_exclude
    ledger = TrafficLedger(state_dir(cfg), cfg.month_rotate, lambda nic: nic_counted(nic, include, exclude),
                           import_path=cfg.import_net_static, import_candidates=net_static_candidates(),
                           boot=make_host(cfg).boot_identity())
    log.info("traffic: counting from %s (reset day %d), state in %s",
             local_time(ledger.start), cfg.month_rotate, ledger.path)
    return ledger


# ---------------------------------------------------------------------------
# Wire protocol: the panel's paths, every message we send and read; v1 beside v2 (JSON-RPC 2.0)
# ---------------------------------------------------------------------------

# Traps (the server's behaviour, docs/WIRE.md): exec results go by POST to
# TASK_RESULT_PATH even on v2 (the server ignores agent.taskResult); a terminal
# request needs a socket, so it never reaches an agent in POST mode; a v2 ping
# result's finished_at must carry a zone or the whole call fails; a v2 socket
# still carries legacy {"message": ...} frames (terminal always, exec and ping
# between the first and second report).

BASIC_INFO_PATH = "/api/clients/uploadBasicInfo"
REPORT_PATH = "/api/clients/report"
RPC_PATH = "/api/clients/v2/rpc"
TASK_RESULT_PATH = "/api/clients/task/result"
TERMINAL_PATH = "/api/clients/terminal"
REGISTER_PATH = "/api/clients/register"
# inbound messages larger than this are refused (by the frame header, before
# buffering, on the sockets)
MAX_MESSAGE_BYTES = 1 << 20
# what a v2 agent says it can take in agent.pull (no terminal: it needs a socket)
PULL_CAPABILITIES = ("exec", "ping")
# JSON-RPC errors that mean "this server does not speak v2 as we do"; others
# (-32602 invalid params, -32000 failed to save) are about one message's content
RPC_PROTOCOL_ERRORS = (-32700, -32600, -32601)


def finite(value, low, high):
    """A float the server accepts: no NaN or infinity, within [low, high]."""
    value = float(value)
    if value != value or value in (float("inf"), float("-inf")):
        return low
    return min(high, max(low, value))


def count(value):
    """A non-negative JSON integer (the server rejects 1.0 where it wants int64)."""
    try:
        return max(0, min(int(value), 2 ** 63 - 2))
    except (TypeError, ValueError, OverflowError):
        return 0


# -- what we send ----------------------------------------------------------------

def basic_info_payload(f):
    """The basic-info object for BasicFacts `f`: exactly the keys the server
    has columns for (v1's POST body, v2's agent.basicInfo params.info)."""
    return {"cpu_name": f.cpu_name, "cpu_cores": f.cpu_cores, "cpu_physical_cores": f.cpu_physical_cores,
            "arch": f.arch, "os": f.os, "kernel_version": f.kernel_version, "gpu_name": f.gpu_name,
            "virtualization": f.virtualization, "ipv4": f.ipv4, "ipv6": f.ipv6, "mem_total": int(f.mem_total),
            "swap_total": int(f.swap_total), "disk_total": int(f.disk_total), "version": __version__}


def report_payload(f):
    """The realtime report for Figures `f`, as the panel decodes it (the v1
    frame, and params.report of v2's agent.report), with every number in
    the range and type the Go server accepts."""
    report = {
        "cpu": {"usage": finite(f.cpu, 0.001, 100.0)},
        "ram": {"total": count(f.ram_total), "used": count(f.ram_used)},
        "swap": {"total": count(f.swap_total), "used": count(f.swap_used)},
        "load": {"load1": finite(f.load1, 0.0, 1000.0), "load5": finite(f.load5, 0.0, 1000.0),
                 "load15": finite(f.load15, 0.0, 1000.0)},
        "disk": {"total": count(f.disk_total), "used": count(f.disk_used)},
        "network": {"up": count(f.up), "down": count(f.down), "totalUp": count(f.total_up),
                    "totalDown": count(f.total_down)},
        "connections": {"tcp": count(f.tcp), "udp": count(f.udp)},
        "uptime": count(f.uptime),
        "process": count(f.processes),
        "message": f.message,
    }
    if f.gpu:
        report["gpu"] = gpu_block(f.gpu)
    return report


def gpu_block(gpu):
    """The report's gpu object: every device's figures, or {"models": [...]}
    when only the names could be read."""
    if isinstance(gpu[0], str):
        return {"models": list(gpu)}
    devices = [{"name": d.name, "memory_total": count(d.memory_total), "memory_used": count(d.memory_used),
                "utilization": finite(d.utilization, 0.0, 100.0), "temperature": count(d.temperature)}
               for d in gpu]
    return {"count": len(devices), "average_usage": sum(d["utilization"] for d in devices) / len(devices),
            "detailed_info": devices}


def task_result(task_id, text, code):
    """An exec result for TASK_RESULT_PATH (v1 and v2 alike)."""
    return {"task_id": task_id, "result": text, "exit_code": code, "finished_at": rfc3339_now()}


def ping_result_params(task_id, kind, value):
    """agent.pingResult's params; finished_at must carry a zone."""
    return {"task_id": task_id, "ping_type": kind, "value": value, "finished_at": rfc3339_now()}


def ping_result_v1(task_id, kind, value):
    """The v1 socket's ping_result frame: the same fields, typed."""
    return dict({"type": "ping_result"}, **ping_result_params(task_id, kind, value))


def rpc_request(method, params, request_id):
    return encode({"jsonrpc": "2.0", "method": method, "params": params, "id": request_id})


def rpc_notification(method, params):
    return encode({"jsonrpc": "2.0", "method": method, "params": params})


def rpc_report(report_json, acks, request_id=None):
    """agent.report around an already encoded report: built as a string, since
    this runs every interval and the report is the whole message. Without a
    request id it is a notification, which the panel does not answer."""
    acked = ',"ack_event_ids":' + encode(acks) if acks else ""
    asked = ',"id":' + encode(request_id) if request_id is not None else ""
    return '{"jsonrpc":"2.0","method":"agent.report","params":{"report":%s%s}%s}' % (report_json, acked, asked)


def rpc_basic_info(info, request_id):
    """agent.basicInfo: the same object v1 POSTs to BASIC_INFO_PATH."""
    return rpc_request("agent.basicInfo", {"info": info}, request_id)


def rpc_ping_result(task_id, kind, value, request_id=None):
    """agent.pingResult: a notification on the socket, a request by POST."""
    params = ping_result_params(task_id, kind, value)
    if request_id is None:
        return rpc_notification("agent.pingResult", params)
    return rpc_request("agent.pingResult", params, request_id)


def rpc_pull(acks, request_id):
    return rpc_request("agent.pull", {"capabilities": list(PULL_CAPABILITIES), "ack_event_ids": list(acks)},
                       request_id)


# -- what we read ----------------------------------------------------------------

# JSON may carry a lone UTF-16 surrogate ("\ud800") that UTF-8 cannot encode
LONE_SURROGATE = re.compile("[\ud800-\udfff]")


def clean_strings(value):
    """Decoded JSON with every lone surrogate in its strings (keys too)
    replaced by U+FFFD, as Go's decoder does: whatever the panel sent can then
    be logged, spooled and echoed back without a UnicodeEncodeError."""
    if isinstance(value, str):
        return LONE_SURROGATE.sub("\ufffd", value)
    if isinstance(value, dict):
        return {clean_strings(k): clean_strings(v) for k, v in value.items()}
    if isinstance(value, list):
        return [clean_strings(v) for v in value]
    return value


def parse_event(data):
    """The event dict from a frame, or None (with the reason logged) when the
    frame is not a JSON object."""
    if len(data) > MAX_MESSAGE_BYTES:
        log.warning("skipping a %d-byte message from the panel: too large", len(data))
        return None
    try:
        text = data.decode("utf-8") if isinstance(data, bytes) else data
        event = clean_strings(json.loads(text))
    except (ValueError, RecursionError, UnicodeDecodeError) as e:
        log.warning("skipping a message from the panel that is not JSON (%s)", type(e).__name__)
        return None
    if not isinstance(event, dict):
        log.warning("skipping a message from the panel that is not a JSON object")
        return None
    return event


# v2 methods as the v1 events Tasks knows; None: logged and acknowledged only
RPC_EVENTS = {"agent.exec": "exec", "agent.ping": "ping", "agent.terminal.request": "terminal",
              "agent.message": None, "agent.event": None}


def event_from_rpc(method, params):
    """The v1-shaped event for a v2 method and its params; None for a kind that
    is only logged; KeyError for a method we do not know."""
    kind = RPC_EVENTS[method]
    if kind is None:
        log.info("the panel says (%s): %s", method, clipped(json.dumps(params, ensure_ascii=False), 200))  # NaN too
        return None
    event = dict(params) if isinstance(params, dict) else {}
    event["message"] = kind
    return event


class RpcReply:
    """One decoded v2 message: its notification events, the events a result
    carried (with ids), or the error, and the id it answers."""

    def __init__(self, answers=None, events=(), error=None, legacy=None):
        self.answers = answers   # the id of our request this answers, or None
        self.events = events     # [(event id or None, method, params)]
        self.error = error       # (code, text) of a JSON-RPC error
        self.legacy = legacy     # a v1 {"message": ...} frame on the v2 link

    @property
    def refuses_protocol(self):
        return self.error is not None and self.error[0] in RPC_PROTOCOL_ERRORS


def read_rpc(message):
    """An RpcReply from a decoded JSON object sent on a v2 link; ValueError
    when it is neither JSON-RPC 2.0 nor a legacy frame."""
    if "message" in message or (message.get("status") == "error" and "jsonrpc" not in message):
        return RpcReply(legacy=message)
    if message.get("jsonrpc") != "2.0":
        raise ValueError("not JSON-RPC 2.0")
    method = message.get("method")
    if isinstance(method, str):
        return RpcReply(events=[(None, method, message.get("params"))])
    if "error" in message:
        error = message["error"] if isinstance(message["error"], dict) else {}
        code = error.get("code")
        text = "%s %s" % (error.get("message", ""), error.get("data", "") or "")
        return RpcReply(request_id(message), error=(code if isinstance(code, int) else 0, clipped(text.strip(), 200)))
    if "result" not in message:
        raise ValueError("neither a result nor an error")
    result = message["result"]
    events = result.get("events") if isinstance(result, dict) else None
    queued = []
    for item in events if isinstance(events, list) else ():
        if isinstance(item, dict) and isinstance(item.get("method"), str):
            event_id = item.get("id")
            queued.append((event_id if isinstance(event_id, str) and event_id else None,
                           item["method"], item.get("params")))
    return RpcReply(request_id(message), events=queued)


def request_id(message):
    """The id a reply answers, when it is one we could have sent."""
    value = message.get("id")
    return value if isinstance(value, (int, str)) and not isinstance(value, bool) else None

# -- the panel's events and answers, field by field ---------------------------------

def valid_task_id(value):
    return isinstance(value, int) and not isinstance(value, bool) and 0 < value < 1 << 63


def exec_request(event):
    """(task id or None when it has none usable, command) of an exec event."""
    task_id, command = event.get("task_id"), event.get("command")
    return (task_id if isinstance(task_id, str) and task_id else None), \
        (command if isinstance(command, str) else "")


def ping_request(event):
    """(task id, probe kind, target) of a ping event; None when malformed."""
    task_id, kind, target = event.get("ping_task_id"), event.get("ping_type"), event.get("ping_target")
    if valid_task_id(task_id) and isinstance(kind, str) and isinstance(target, str):
        return task_id, kind, target
    return None


def terminal_request(event):
    """The request id of a terminal event; None when unusable."""
    request_id = event.get("request_id")
    return request_id if isinstance(request_id, str) and 0 < len(request_id) <= 256 else None


def terminal_input(text):
    """What a text frame means: ("resize", rows, cols), ("keys", bytes) or
    None to ignore. A text frame that is not a JSON object is typed as it is."""
    try:
        message = json.loads(text.decode("utf-8"))
    except (ValueError, UnicodeDecodeError, RecursionError):
        return ("keys", text)
    if message is None:
        return None
    if not isinstance(message, dict):
        return ("keys", text)
    kind = message.get("type")
    if kind == "resize":
        rows, cols = message.get("rows"), message.get("cols")
        if all(isinstance(v, int) and not isinstance(v, bool) and 0 < v < 65536 for v in (rows, cols)):
            return ("resize", rows, cols)
        return None
    if kind == "input" and isinstance(message.get("input"), str) and message["input"]:
        return ("keys", clean_strings(message["input"]).encode("utf-8"))
    return None  # heartbeat, close and kinds we do not know are never typed


def registration_answer(body):
    """(token, uuid) from the panel's answer to an auto-discovery
    registration; ValueError when it holds none."""
    try:
        data = clean_strings(json.loads(body.decode("utf-8")))["data"]
        token, uuid = data["token"], data.get("uuid", "")
    except (ValueError, KeyError, TypeError, AttributeError, RecursionError):
        raise ValueError("no registration in the answer")
    if not isinstance(token, str) or not token:
        raise ValueError("no token in the answer")
    return token, (uuid if isinstance(uuid, str) else "")  # NaN or an object would not even save


def accepted(body):
    """The panel's JSON answer to a v1 POST when it says success, else None
    (a proxy or a wrong endpoint can answer 200 with HTML)."""
    try:
        parsed = json.loads(body.decode("utf-8"))
    except ValueError:
        return None
    return parsed if isinstance(parsed, dict) and parsed.get("status") == "success" else None


# ---------------------------------------------------------------------------
# Transport: HTTP uploads to the panel, undelivered results, auto-discovery
# ---------------------------------------------------------------------------

class PanelRefused(AgentError):
    """The panel answered, but not with success."""

    def __init__(self, status, detail):
        super().__init__("HTTP %s %s" % (status, detail))
        self.status = status
        self.detail = detail


class Panel:
    """URLs and HTTP calls towards one panel."""

    def __init__(self, cfg):
        self.cfg = cfg
        self.endpoint = cfg.endpoint
        self.token = cfg.token
        self._opener = None

    def url(self, path, **query):
        from urllib.parse import urlencode
        query = dict(token=self.token, **query)
        return self.endpoint + path + "?" + urlencode(query)

    def ws_url(self, path, **query):
        url = self.url(path, **query)
        return "ws" + url[4:] if url.startswith("http") else url

    def opener(self, cutter=None):
        """An opener whose connections `cutter` (a ConnectionCutter) can cut."""
        import urllib.request
        if self._opener is None:  # kept here: the TLS context (False for an http panel)
            # loading the CA store costs megabytes: only for an https panel
            self._opener = tls_context(self.cfg) if self.endpoint.startswith("https") else False
        dial = self.dial_through_custom_dns if self.cfg.custom_dns else None
        return urllib.request.build_opener(*cuttable_handlers(cutter, self._opener or None, dial))

    def dial_through_custom_dns(self, address, timeout=None, source_address=None):
        """socket.create_connection for urllib, resolving the panel's name
        through --custom-dns."""
        return dial_tcp(self.cfg, address[0], address[1], timeout)

    def exchange(self, url, obj, headers=(), limit=1 << 20, timeout=HTTP_TIMEOUT, answer_headers=None):
        """POST obj as JSON to url; (status, body) whatever the status, or
        OSError when the panel could not be reached. `timeout` bounds the
        whole exchange, not each read: a panel or proxy that trickles its
        answer is cut off. The answer's headers go into the dict
        `answer_headers` (names in lower case) when one is given."""
        import urllib.error
        import urllib.request
        data = obj if isinstance(obj, bytes) else encode(obj).encode("utf-8")
        request = urllib.request.Request(url, data=data, method="POST", headers=post_headers(headers))
        cutter = ConnectionCutter(timeout)
        try:
            try:
                with self.opener(cutter).open(request, timeout=timeout) as reply:
                    keep_headers(reply.headers, answer_headers)
                    return reply.status, reply.read(limit)
            except urllib.error.HTTPError as e:
                keep_headers(e.headers, answer_headers)
                return e.code, e.read(4096) if e.fp else b""
        except (OSError, ValueError, http_exceptions()) as e:
            raise http_failure(e, cutter)
        finally:
            cutter.cancel()

    def post_json(self, path, obj, timeout=HTTP_TIMEOUT):
        """POST obj; returns the decoded JSON reply, or raises PanelRefused
        (the panel said no) or OSError (it could not be reached)."""
        status, body = self.exchange(self.url(path), obj, timeout=timeout)
        parsed = accepted(body)
        if status != 200 or parsed is None:
            raise PanelRefused(status, describe_body(body))
        return parsed


def keep_headers(headers, into):
    if into is not None and headers is not None:
        into.update((name.lower(), value) for name, value in headers.items())


def explain_refusal(error, what):
    """One log line that says what a refusal means for the user."""
    status = getattr(error, "status", None)
    if status == 401:
        return "%s: the panel refused the token (HTTP 401); check --token" % what
    if status == 404:
        return "%s: HTTP 404, the panel has no such API; check --endpoint (no extra path)" % what
    if status == 200:
        return "%s: the panel answered with %s instead of the API; check --endpoint" % (what, error.detail)
    return "%s: %s" % (what, error)


def upload_basic_info(panel, info):
    """Send basic info; an older panel that rejects the two newest keys gets
    the upload again without them."""
    try:
        panel.post_json(BASIC_INFO_PATH, info)
        return
    except PanelRefused as e:
        if e.status in (401, 200) or "kernel_version" not in info:
            raise
    older = {k: v for k, v in info.items() if k not in ("kernel_version", "cpu_physical_cores")}
    panel.post_json(BASIC_INFO_PATH, older)


# -- undelivered results -----------------------------------------------------

SPOOL_DIR = "results"
SPOOL_MAX_FILES = 1000
SPOOL_MAX_BYTES = 50 << 20
# "-r": a refusal (empty command, remote control off, too many running) that
# cost nothing to make; the first to go when the spool is full
SPOOL_NAME = re.compile(r"^\d{20}-\d+-\d+(-r)?\.json$")


class ResultSpool:
    """Exec results on their way to the panel, one file each (mode 0600) in
    the state directory. A result is written here before the first POST and
    removed only after the panel's 200, so neither an outage nor a SIGKILL
    loses it. File names never contain server-supplied text; their order is
    the order the results were made. When the directory cannot be written,
    or others could write in it, results wait in memory (and the problem is
    logged once). The directory is listed once, at start; after that an
    index in memory says what is waiting, so a write costs the same with a
    thousand results waiting as with none."""

    def __init__(self, directory, max_files=SPOOL_MAX_FILES, max_bytes=SPOOL_MAX_BYTES):
        self.directory = directory
        self.max_files = max_files
        self.max_bytes = max_bytes
        self.lock = threading.Lock()
        self.memory = {}  # name -> bytes, for results the directory would not take
        self.sequence = 0
        self.trouble_log = OncePer(3600.0)
        # name -> size, oldest first; refusals apart, since they are evicted first
        self.results, self.refusals = OrderedDict(), OrderedDict()
        self.total = 0
        self.problem = private_directory(directory)
        if self.problem:
            self.trouble(self.problem)
        else:
            self.index_directory()

    def trouble(self, why):
        if self.trouble_log("write"):
            log.error("cannot keep undelivered results in %s (%s); keeping them in memory only", self.directory, why)

    def index_directory(self):
        try:
            names = sorted(name for name in os.listdir(self.directory) if SPOOL_NAME.match(name))
        except OSError:
            return
        for name in names:
            try:
                st = os.lstat(os.path.join(self.directory, name))
            except OSError:
                continue
            self.add(name, st.st_size if S_ISREG(st.st_mode) else 0)

    def add(self, name, size):
        (self.refusals if name.endswith("-r.json") else self.results)[name] = size
        self.total += size

    def put(self, result, refusal=False):
        data = encode(result).encode("utf-8")
        with self.lock:
            self.sequence += 1
            name = "%020d-%d-%d%s.json" % (time.time_ns(), os.getpid(), self.sequence, "-r" if refusal else "")
            try:
                if self.problem:
                    raise OSError(self.problem)
                write_atomic(os.path.join(self.directory, name), data)
            except OSError as e:
                self.trouble(describe_error(e))
                self.memory[name] = data
            self.add(name, len(data))
            self._trim()
        return name

    def pending(self):
        """Names of the results still to deliver, oldest first."""
        with self.lock:
            return sorted(list(self.results) + list(self.refusals))

    def load(self, name):
        """The result stored under `name`, or None when it is gone or unreadable
        (an unreadable one is removed: it can never be delivered). Only a
        regular file of a sane size is read: never a link, a FIFO or a device."""
        with self.lock:
            data = self.memory.get(name)
        if data is None:
            try:
                data = read_regular_file(os.path.join(self.directory, name), self.max_bytes, follow=False)
            except OSError as e:
                if e.errno != errno.ENOENT:
                    log.error("dropping undelivered result %s: %s", name, describe_error(e))
                self.remove(name)
                return None
        try:
            result = json.loads(data.decode("utf-8"))
        except ValueError:
            result = None
        if not isinstance(result, dict):
            log.error("dropping an unreadable undelivered result %s", name)
            self.remove(name)
            return None
        return result

    def remove(self, name):
        with self.lock:
            self._forget(name)

    def _forget(self, name):
        self.memory.pop(name, None)
        size = self.results.pop(name, None)
        if size is None:
            size = self.refusals.pop(name, 0)
        self.total -= size
        try:
            os.unlink(os.path.join(self.directory, name))
        except OSError:
            pass

    def _trim(self):
        """Drop results past the bounds, refusals first, then the oldest: a
        panel that never takes them must not fill the disk."""
        while len(self.results) + len(self.refusals) > self.max_files or self.total > self.max_bytes:
            name = next(iter(self.refusals or self.results))
            log.error("dropping the oldest undelivered %s %s: more than %d results or %d MB waiting",
                      "refusal" if name in self.refusals else "result", name, self.max_files, self.max_bytes >> 20)
            self._forget(name)


# -- tasks already run ---------------------------------------------------------------

def task_key(task_id):
    """What a task id is remembered by: itself, or a digest of a long one."""
    if len(task_id) <= 64:
        return task_id
    import hashlib
    return "sha256:" + hashlib.sha256(task_id.encode("utf-8", "replace")).hexdigest()


RAN_DIR = "ran"
RAN_KEEP = 512
RAN_MAX_BYTES = 20 << 20
RAN_NAME = re.compile(r"^[0-9a-f]{40}\.json$")


class RunLedger:
    """The exec tasks already run, each with its result once there is one:
    one file per task (mode 0600) in the state directory, named by a digest
    of its id, the newest RAN_KEEP (RAN_MAX_BYTES in all) kept. The panel
    hands an exec over again when our acknowledgement got lost, after a
    restart of ours too; the ledger makes that a second sending of the kept
    result, never a second run. A task is written down before it starts, so
    one that a SIGKILL interrupted is not run again either. Like the spool,
    it falls back to memory when the directory cannot be written."""

    def __init__(self, directory, keep=RAN_KEEP, max_bytes=RAN_MAX_BYTES):
        self.directory = directory
        self.keep, self.max_bytes = keep, max_bytes
        self.lock = threading.Lock()
        self.names = OrderedDict()   # name -> size, oldest first
        self.total = 0
        self.memory = {}             # name -> bytes, when the directory would not take them
        self.mine = set()            # names claimed by this process
        self.problem = private_directory(directory)
        if not self.problem:
            self.index_directory()

    def index_directory(self):
        try:
            found = [(entry.stat(follow_symlinks=False), entry.name) for entry in os.scandir(self.directory)
                     if RAN_NAME.match(entry.name)]
        except OSError:
            return
        for st, name in sorted(found, key=lambda item: item[0].st_mtime_ns):
            self.names[name] = st.st_size
            self.total += st.st_size

    @staticmethod
    def name(task_id):
        import hashlib
        return hashlib.sha256(task_id.encode("utf-8", "replace")).hexdigest()[:40] + ".json"

    def claim(self, task_id, record=True):
        """("new", None) for a task not run before, then written down as
        started unless not `record`; ("running", None) for one this process
        runs now; ("done", result) with its kept result; ("lost", None) for
        one an earlier process started and never finished."""
        name = self.name(task_id)
        with self.lock:
            if name not in self.names:
                if record:
                    self.mine.add(name)
                    self._store(name, {"task_id": task_id})
                return "new", None
            kept = self._load(name)
            if isinstance(kept, dict) and kept.get("task_id") == task_id and "result" in kept:
                return "done", kept
            return ("running" if name in self.mine else "lost"), None

    def finished(self, result):
        """Keep the result of a task claimed by this process."""
        name = self.name(str(result.get("task_id")))
        with self.lock:
            if name in self.mine:
                self.mine.discard(name)
                self._store(name, result)

    def _store(self, name, obj):
        data = encode(obj).encode("utf-8")
        try:
            if self.problem:
                raise OSError(self.problem)
            write_atomic(os.path.join(self.directory, name), data)
        except OSError:
            self.memory[name] = data   # the spool says once that the state directory fails
        self.total += len(data) - self.names.pop(name, 0)
        self.names[name] = len(data)
        while len(self.names) > self.keep or self.total > self.max_bytes and len(self.names) > 1:
            old = next(iter(self.names))
            self.total -= self.names.pop(old)
            self.memory.pop(old, None)
            try:
                os.unlink(os.path.join(self.directory, old))
            except OSError:
                pass

    def _load(self, name):
        data = self.memory.get(name)
        try:
            if data is None:
                data = read_regular_file(os.path.join(self.directory, name), 64 << 20, follow=False)
            return json.loads(data.decode("utf-8"))
        except (OSError, ValueError):
            return None


# -- auto-discovery ----------------------------------------------------------------

def discovery_file(cfg):
    return os.path.join(state_dir(cfg), "auto-discovery.json")


def official_discovery_files(cwd=None):
    """Where the official agent that this one replaced kept its registration
    (beside its binary): registering again would add a second client."""
    dirs = [os.path.dirname(SCRIPT_PATH), OFFICIAL_INSTALL_DIR, cwd or os.getcwd()]
    return [os.path.join(d, "auto-discovery.json") for d in dict.fromkeys(dirs)]


def saved_discovery_token(cfg, official=None):
    """The token an earlier registration stored (ours, else the official
    agent's), or ""."""
    for path in [discovery_file(cfg)] + (official_discovery_files() if official is None else list(official)):
        try:   # never through a link, a FIFO or a huge file planted there
            data = json.loads(read_regular_file(path, 1 << 16, follow=False).decode("utf-8"))
        except (OSError, ValueError):
            continue
        token = data.get("token") if isinstance(data, dict) else ""
        if isinstance(token, str) and token:
            if path != discovery_file(cfg):
                log.info("Using existing auto-discovery token for UUID: %s (from %s)", data.get("uuid"), path)
            return token
    return ""


def register_with_key(panel):
    """Register this host with the panel's auto-discovery key; returns the new
    token after saving it (mode 0600), since every registration creates a new
    client on the panel."""
    from urllib.parse import urlencode
    cfg = panel.cfg
    url = cfg.endpoint + REGISTER_PATH + "?" + urlencode({"name": socket.gethostname()})
    status, body = panel.exchange(url, {"key": cfg.auto_discovery}, limit=1 << 16,
                                  headers={"Authorization": "Bearer " + cfg.auto_discovery})
    try:
        token, uuid = registration_answer(body)
    except ValueError:
        token = None
    if status != 200 or token is None:
        raise PanelRefused(status, describe_body(body))
    write_atomic(discovery_file(cfg), encode({"uuid": uuid, "token": token}).encode(), 0o600)
    log.info("registered with the panel by auto-discovery as client %s", uuid)
    return token


# ---------------------------------------------------------------------------
# Links: WebSocket framing, the three report links, choosing one
# ---------------------------------------------------------------------------

class LinkClosed(AgentError):
    """The report link is gone (the panel closed it, a write failed, a ping
    went unanswered, a frame was too large); the agent loop dials again."""


class ProtocolRejected(AgentError):
    """The panel answered, but not in protocol v2: a refused upgrade (non-101),
    a POST answered with something else than 200, a JSON-RPC error saying it
    does not speak it, an unparsable reply. Counted apart from network errors
    (OSError) when deciding to fall back."""

    def __init__(self, status, detail):
        super().__init__(detail)
        self.status = status
        self.detail = detail


class SocketSilent(AgentError):
    """A v2 socket that the panel (or a proxy) took, on which the first call
    went unanswered for FIRST_ANSWER_DEADLINE: not a working link."""


# Retry-After is honoured up to this; a proxy cannot park the agent for longer
RETRY_AFTER_CAP = 300.0


class PanelBusy(AgentError):
    """The panel, or a proxy in front of it, answered 429 or 5xx: a passing
    problem, never a refusal of protocol v2. `wait`: the seconds its
    Retry-After asked for (capped), or None."""

    def __init__(self, status, detail, wait):
        super().__init__("HTTP %s with %s%s" % (status, detail, "" if wait is None else
                                                 ", asking to wait %d s (Retry-After)" % round(wait)))
        self.status, self.detail, self.wait = status, str(self), wait


def busy_wait(busy, interval, streak):
    """Seconds to keep quiet after the `streak`-th busy answer in a row (from
    0): what Retry-After asks, but never less than `interval` doubling with
    each answer (a date already past, or none, must not make a loop)."""
    backoff = min(RETRY_AFTER_CAP, max(0.1, interval) * 2 ** min(streak, 12))
    return max(backoff, busy.wait or 0.0)


def busy_status(status):
    return status == 429 or 500 <= (status or 0) < 600


def retry_after_seconds(value, now=None):
    """The seconds a Retry-After header asks for (a number, or an HTTP date),
    within [0, RETRY_AFTER_CAP]; None when there is none that can be read."""
    value = (value or "").strip()
    if value.isdigit():
        return min(RETRY_AFTER_CAP, float(value))
    from email.utils import parsedate_to_datetime
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError, OverflowError):
        return None
    if when is None:
        return None
    if when.tzinfo is None:   # "-0000": UTC, as HTTP dates always are
        from datetime import timezone
        when = when.replace(tzinfo=timezone.utc)
    return min(RETRY_AFTER_CAP, max(0.0, when.timestamp() - (time.time() if now is None else now)))


class Inbox:
    """Events from every link on their way to Tasks. It outlives the links, so
    an event delivered twice (by a pull result, again by a report result, once
    more as a notification after a reconnect) runs once: events are known by
    id, execs by task id. Handled ids wait here until a reply confirms the
    panel got the acknowledgement."""

    # ids remembered: the panel queues at most 128 per client, and execs from
    # longer ago are known to the RunLedger; every one kept is memory for good
    KEEP = 1024
    MAX_ID = 128  # the server's event ids are UUIDs: a longer one is refused

    def __init__(self, dispatch):
        self.dispatch = dispatch
        self.lock = threading.Lock()
        self.seen = {}   # event ids and ("exec", task_key(task id)), oldest first
        self.acks = {}   # event ids to acknowledge, oldest first
        self.refusal_log = OncePer(3600.0)

    def _remember(self, key):
        """False when key was seen before."""
        if key in self.seen:
            return False
        self.seen[key] = True
        while len(self.seen) > self.KEEP:
            del self.seen[next(iter(self.seen))]
        return True

    def take(self, event, event_id=None):
        """Run one event from a v2 link (event: the v1-shaped dict, or None for
        one that is only logged)."""
        with self.lock:
            fresh = event_id is None or self._remember(event_id)
            if fresh and event is not None and event.get("message") == "exec":
                task_id = event.get("task_id")
                fresh = not isinstance(task_id, str) or not task_id or self._remember(("exec", task_key(task_id)))
                if not fresh:
                    log.info("remote command %s already run; not again", task_id[:40])
        if fresh and event is not None:
            self.dispatch(event)
        if event_id is not None:
            with self.lock:
                self.acks[event_id] = True
                while len(self.acks) > self.KEEP:  # a panel that never confirms
                    del self.acks[next(iter(self.acks))]

    def take_rpc(self, event_id, method, params):
        """Never raises: in POST mode this runs on the agent's and the pull's
        threads, and one odd event must not end them nor the events after it."""
        if event_id is not None and len(event_id) > self.MAX_ID:
            # kept and echoed back, ids of any size would cost megabytes each
            if self.refusal_log("long id"):
                log.warning("refusing events from the panel whose ids are longer than %d characters "
                            "(one of %d)", self.MAX_ID, len(event_id))
            return
        try:
            event = event_from_rpc(method, params)
        except KeyError:
            # not acknowledged: the panel offers it again until it expires
            log.warning("ignoring an unknown event %r from the panel", str(method)[:40])
            return
        try:
            self.take(event, event_id)
        except Exception:
            log.exception("error while handling the event %r from the panel; skipped", str(method)[:40])

    def pending_acks(self):
        with self.lock:
            return list(self.acks)[:128]

    def acknowledged(self, ids):
        with self.lock:
            for event_id in ids:
                self.acks.pop(event_id, None)


def open_websocket(cfg, url, timeout=WS_CONNECT_TIMEOUT, header=None):
    """A connected websocket-client WebSocket: no Origin header (the panel's
    browser origin policy would apply), proxies from the environment, TLS
    verified unless -u. Only a v2 report link's `header` offers compression."""
    import websocket
    sslopt = {"cert_reqs": ssl.CERT_NONE, "check_hostname": False} if cfg.ignore_unsafe_cert else {}
    kwargs = {}
    # dialled here only where no proxy connects for us: a socket of ours would bypass it
    ours = cfg.prefer_ip_version or cfg.custom_dns or DIAL_WEBSOCKETS_OURSELVES
    if ours and not environment_proxy("http" + url[2:]):
        kwargs["socket"] = preferred_socket(cfg, url, timeout)
    if header:
        kwargs["header"] = header
    ws = websocket.create_connection(url, timeout=timeout, suppress_origin=True, sslopt=sslopt,
                                     enable_multithread=True, skip_utf8_validation=True, **kwargs)
    return ws


def handshake_problem(error):
    """One line explaining a failed WebSocket dial."""
    status = getattr(error, "status_code", getattr(error, "status", None))
    if status == 401:
        return "the panel refused the token (HTTP 401); check --token"
    if status == 200:
        return "the panel answered with a web page instead of a WebSocket (HTTP 200): check --endpoint " \
               "(no extra path, no doubled slash)"
    if status is not None:
        return "the panel answered HTTP %s instead of a WebSocket upgrade" % status
    return "%s: %s" % (type(error).__name__, error)


def client_frame(opcode, payload, key=None, rsv1=False):
    """One final WebSocket frame from a client: masked, as RFC 6455 5.3 requires;
    rsv1 marks a permessage-deflate message."""
    first = (0xC0 if rsv1 else 0x80) | opcode
    n = len(payload)
    if n < 126:
        head = struct.pack("!BB", first, 0x80 | n)
    elif n < 65536:
        head = struct.pack("!BBH", first, 0x80 | 126, n)
    else:
        head = struct.pack("!BBQ", first, 0x80 | 127, n)
    key = key or os.urandom(4)
    # XOR as one big integer: many times faster than a loop over the bytes
    mask = int.from_bytes((key * (n // 4 + 1))[:n], "big")
    return head + key + (int.from_bytes(payload, "big") ^ mask).to_bytes(n, "big")


def unmask(data, key):
    if not key or not data:
        return data
    n = len(data)
    mask = int.from_bytes((key * (n // 4 + 1))[:n], "big")
    return (int.from_bytes(data, "big") ^ mask).to_bytes(n, "big")


# -- permessage-deflate (RFC 7692) -------------------------------------------------

DEFLATE_OFFER = "permessage-deflate; client_max_window_bits"
SYNC_TAIL = b"\x00\x00\xff\xff"


def deflate_params(header):
    """The permessage-deflate parameters the server accepted in its
    Sec-WebSocket-Extensions header, or None when it accepted none."""
    for extension in (header or "").split(","):
        parts = [part.strip() for part in extension.split(";")]
        if parts[0].lower() != "permessage-deflate":
            continue
        params = {}
        for item in parts[1:]:
            name, _, value = item.partition("=")
            params[name.strip().lower()] = value.strip().strip('"')
        return params
    return None


class Deflate:
    """Compression state of one socket as negotiated. With context takeover
    (what the permessage-deflate server of the websockets package agrees to)
    one compressor lives as long as the socket, and a report compresses to a
    tenth of its size; the Go panel (gorilla) insists on no context takeover,
    and each message starts afresh."""

    def __init__(self, params):
        self.keep_out = "client_no_context_takeover" not in params
        self.keep_in = "server_no_context_takeover" not in params
        try:
            bits = int(params.get("client_max_window_bits") or 15)
        except ValueError:
            bits = 15
        # a message starting afresh is one report: a small window does as well
        self.bits = min(15 if self.keep_out else 11, max(9, bits))
        self.compressor = zlib.compressobj(6, zlib.DEFLATED, -self.bits)
        self.decompressor = zlib.decompressobj(-15)

    def compress(self, data):
        # Without context takeover a full flush forgets the history, so each
        # message stands alone; reusing the one compressor spares a fresh
        # zlib state (over 100 KB allocated and freed) every report.
        flush = zlib.Z_SYNC_FLUSH if self.keep_out else zlib.Z_FULL_FLUSH
        out = self.compressor.compress(data) + self.compressor.flush(flush)
        return out[:-4] if out.endswith(SYNC_TAIL) else out

    def decompress(self, data, limit):
        """The inflated message; ValueError when it would exceed `limit`
        (inflating stops there, a bomb costs nothing) or is not deflate."""
        try:
            out = self.decompressor.decompress(data + SYNC_TAIL, limit + 1)
        except zlib.error as e:
            raise ValueError("bad compressed data (%s)" % e)
        if len(out) > limit:
            raise ValueError("more than %d bytes inflated" % limit)
        if not self.keep_in:
            self.decompressor = zlib.decompressobj(-15)
        return out


# -- report links ------------------------------------------------------------------

# frames the panel should never send (too large, fragments that never end):
# one line per kind an hour, whatever a hostile panel keeps doing
FRAME_TROUBLE_LOG = OncePer(3600.0)
# A v2 socket whose first call is not answered within this is not working
# (a proxy that upgrades and then passes nothing): POST mode is tried next,
# and the socket again only after SILENT_RETRY_INTERVALS --reconnect-interval's
# (a minute by default), each try costing the deadline.
FIRST_ANSWER_DEADLINE = 5.0
SILENT_RETRY_INTERVALS = 12


# The close code of every socket we leave: the server logs an error for a
# 1000 (normal closure) and nothing for 1001 (going away).
GOING_AWAY = 1001

# The kinds of report link, in fallback order (LinkChooser).
V2_SOCKET, V2_POST, V1_SOCKET = LINK_KINDS = ("v2 WebSocket", "v2 POST", "v1 WebSocket")


class Link:
    """What every report link offers the agent loop, whatever its kind:
    start(); send_report(report); send_ping_result(task_id, kind, value);
    send_basic_info(info) (False: the agent uploads it by HTTP instead);
    keepalive(now) (pings, dead-link detection; returns when to call it
    again); proven() (the panel answered on it); close().
    State: `kind` (one of LINK_KINDS) and `label` (the kind with its details,
    for the log); the Event `dead` with `why`; `rejected` (the
    ProtocolRejected that killed it, when the panel refused the protocol on
    it); `successor` (a link to use next instead of dialling);
    `reported_at_open` (the dial itself carried the first report)."""

    kind = ""
    reported_at_open = False

    def __init__(self):
        self.label = self.kind
        self.dead = threading.Event()
        self.why = ""
        self.rejected = None
        self.successor = None

    def fail(self, why):
        if not self.dead.is_set():
            self.why = why
            self.dead.set()

    def start(self):
        pass

    def send_basic_info(self, info):
        return False


class SocketLink(Link):
    """A report WebSocket's frames, for the v1 and the v2 socket alike;
    subclasses say what a message means (on_message) and how reports go.

    Frames are read and written here, not by websocket-client: its reader
    buffers a whole message before any size check, cannot inflate compressed
    frames, and holds a lock through a 5 s read that a close would wait on.
    Every write holds write_lock (reports, ping results and pings come from
    different threads); a reader thread hands the panel's messages to
    on_message and notes when anything was last heard."""

    def __init__(self, ws, deflate=None):
        super().__init__()
        self.ws = ws
        self.sock = ws.sock
        self.deflate = deflate
        self.write_lock = threading.Lock()
        self.last_heard = time.monotonic()
        self.ping_sent = None
        self.next_ping = self.last_heard + PING_EVERY
        self.buffer = b""
        self.reader = threading.Thread(target=self._read_loop, name="ws-reader", daemon=True)

    def start(self):
        if self.reader.ident is not None:
            return  # started already, to be verified (verified())
        # a short socket timeout bounds every blocked send; the reader treats
        # timeouts as "nothing yet" and keeps going
        self.sock.settimeout(5.0)
        self.next_ping = time.monotonic() + PING_EVERY
        self.reader.start()

    def on_message(self, payload):
        raise NotImplementedError

    def send_text(self, text):
        # Framed here and written straight to the socket: websocket-client's
        # general send path costs a fifth of a whole report.
        data = text.encode("utf-8")
        deflate = self.deflate
        if deflate is None:
            frame = client_frame(0x1, data)
            self._write(lambda: self.sock.sendall(frame))
        else:
            # compressed under the lock: the compressor's context follows the frames' order
            self._write(lambda: self.sock.sendall(client_frame(0x1, deflate.compress(data), rsv1=True)))

    def send_ping(self):
        self.ping_sent = time.monotonic()
        frame = client_frame(0x9, b"komari")
        self._write(lambda: self.sock.sendall(frame))

    def _write(self, action):
        if self.dead.is_set():
            raise LinkClosed(self.why or "link closed")
        try:
            with self.write_lock:
                action()
        except Exception as e:
            self.fail("send failed: %s" % (describe_error(e) if isinstance(e, OSError) else type(e).__name__))
            raise LinkClosed(self.why)

    def ping_outstanding(self):
        return self.ping_sent is not None and self.last_heard < self.ping_sent

    def answered_ping(self):
        return self.ping_sent is not None and self.last_heard >= self.ping_sent

    proven = answered_ping

    def silent_too_long(self, now):
        """True when a ping went unanswered past the deadline."""
        return self.ping_sent is not None and self.last_heard < self.ping_sent and \
            now - self.ping_sent > PONG_DEADLINE

    def keepalive(self, now):
        if now >= self.next_ping and not self.ping_outstanding():
            self.send_ping()
            self.next_ping = now + PING_EVERY
        if self.silent_too_long(now):
            self.fail("no answer to a ping for %g s" % PONG_DEADLINE)
            raise LinkClosed(self.why)
        return min(self.next_ping, (self.ping_sent or now) + PONG_DEADLINE + 0.05)

    def close(self, status=GOING_AWAY):
        """Never waits on the reader, nor long on a writer stuck on a dead peer:
        the close frame gets one short chance, then TCP goes."""
        self.fail(self.why or "closed")
        if self.write_lock.acquire(timeout=0.2):
            try:
                self.sock.settimeout(0.5)
                self.sock.sendall(client_frame(0x8, struct.pack("!H", status)))
            except Exception:
                pass
            finally:
                self.write_lock.release()
        drop_tcp(self.sock)

    # -- reading -------------------------------------------------------------
    def _read_loop(self):
        while not self.dead.is_set():
            try:
                payload = self.read_message()
            except LinkClosed:
                return
            except ValueError as e:
                self.refuse("bad frame", "a frame the agent cannot read (%s)" % e)
                return
            except Exception as e:
                self.fail("connection lost (%s)" % (describe_error(e) if isinstance(e, OSError) else type(e).__name__))
                drop_tcp(self.sock)
                return
            try:
                self.on_message(payload)
            except Exception:
                log.exception("error while handling a message from the panel; skipped")

    def _recv(self, n):
        """Exactly n bytes from the socket (n is bounded by the caller)."""
        while len(self.buffer) < n:
            if self.dead.is_set():
                raise LinkClosed(self.why)
            try:
                chunk = self.sock.recv(max(65536, n - len(self.buffer)))
            except socket.timeout:
                continue
            if not chunk:
                self.fail("the panel closed the connection")
                raise LinkClosed(self.why)
            self.buffer += chunk
        data, self.buffer = self.buffer[:n], self.buffer[n:]
        return data

    def refuse(self, kind, what):
        """Drop the TCP link without reading on (a close handshake would read
        the rest of a huge frame first)."""
        if FRAME_TROUBLE_LOG(kind):
            log.warning("%s: the panel sent %s; dropping the link", kind, what)
        self.fail("the panel sent %s" % what)
        drop_tcp(self.sock)
        raise LinkClosed(self.why)

    def read_message(self):
        """The next data message's payload, inflated; pings are answered and
        every frame counts as a sign of life on the way. Sizes are checked
        against each frame header and the running total of a fragmented
        message before anything of it is read."""
        parts, total, compressed, started = [], 0, False, False
        while True:
            b0, b1 = self._recv(2)
            n = b1 & 0x7F
            if n == 126:
                n = struct.unpack("!H", self._recv(2))[0]
            elif n == 127:
                n = struct.unpack("!Q", self._recv(8))[0]
            key = self._recv(4) if b1 & 0x80 else None
            opcode = b0 & 0x0F
            self.last_heard = time.monotonic()
            if opcode >= 0x8:
                if n > 125:
                    self.refuse("bad frame", "a control frame of %d bytes" % n)
                self.on_control(opcode, unmask(self._recv(n), key))
                continue
            if (opcode == 0) != started:
                self.refuse("bad frame", "fragments out of order")
            total += n
            if total > MAX_MESSAGE_BYTES:
                self.refuse("frame too large", "a message of more than %d bytes" % MAX_MESSAGE_BYTES)
            if not started:
                started, compressed = True, bool(b0 & 0x40)
            parts.append(unmask(self._recv(n), key))
            if b0 & 0x80:
                break
        payload = parts[0] if len(parts) == 1 else b"".join(parts)
        if compressed:
            if self.deflate is None:
                self.refuse("bad frame", "a compressed frame that was not negotiated")
            try:
                payload = self.deflate.decompress(payload, MAX_MESSAGE_BYTES)
            except ValueError as e:
                self.refuse("frame too large" if "inflated" in str(e) else "bad frame", "a compressed message: %s" % e)
        return payload

    def on_control(self, opcode, payload):
        if opcode == 0x8:
            self.fail("the panel closed the connection%s" % close_reason(payload))
            drop_tcp(self.sock)
            raise LinkClosed(self.why)
        if opcode == 0x9:
            frame = client_frame(0xA, payload)
            self._write(lambda: self.sock.sendall(frame))


def close_reason(payload):
    """ " (1008 policy violation: ...)" for a close frame's payload: its code
    and reason, as far as they are printable; "" when it has none."""
    if len(payload) < 2:
        return ""
    code = struct.unpack("!H", payload[:2])[0]
    reason = "".join(c if c.isprintable() else "?" for c in payload[2:125].decode("utf-8", "replace")).strip()
    return " (%d%s)" % (code, ": " + clipped(reason, 123) if reason else "")


class ReportLink(SocketLink):
    """The v1 report WebSocket: reports and ping results as JSON frames, the
    panel's events as {"message": ...} frames handed to `handle`."""

    kind = V1_SOCKET

    def __init__(self, ws, handle):
        super().__init__(ws)
        self.handle = handle

    def on_message(self, payload):
        self.handle(payload)

    def send_report(self, report):
        self.send_text(encode(report))

    def send_ping_result(self, task_id, kind, value):
        self.send_text(encode(ping_result_v1(task_id, kind, value)))


class RpcLink(SocketLink):
    """The v2 report WebSocket: JSON-RPC 2.0, compressed when the panel agreed.
    A report is a request (answered) when it carries acks, when it is the
    first on the link or every ASK_EVERY-th, and while the panel refuses
    reports; otherwise a notification, as the official agent sends them. The
    answer confirms the acks it carried, may hand over queued events and says
    when the panel refused a report (which it drops silently from a
    notification); on a socket the panel pushes events itself, so an answer
    to every report would only cost bytes (a fifth of the link's traffic)
    and CPU. Events also come as notifications and, by the panel's v1/v2
    flag quirk, as legacy frames."""

    ASK_EVERY = 10
    kind = V2_SOCKET
    FIRST_ID = 1

    def __init__(self, ws, inbox, deflate=None):
        super().__init__(ws, deflate)
        self.inbox = inbox
        self.label = "%s (%s)" % (self.kind, "permessage-deflate" if deflate else "no compression")
        self.ids = itertools.count(self.FIRST_ID)
        # request id -> what it carried: ("report", acks) or ("info", info);
        # an answer to any other id answers nothing we asked
        self.asked = OrderedDict()
        self.acks_lock = threading.Lock()
        self.strikes = 0
        self.reports = 0
        self.first_sent = None   # when the link's first request went out
        self.first_answer = threading.Event()
        self.error_log = OncePer(60.0)

    def request(self, text_for, what):
        """Send a request (text_for(request id)), remembered until answered."""
        with self.acks_lock:
            request_id = next(self.ids)
            self.asked[request_id] = what
            while len(self.asked) > 64:  # requests the panel never answered
                del self.asked[next(iter(self.asked))]
            if self.first_sent is None:
                self.first_sent = time.monotonic()
        self.send_text(text_for(request_id))

    def send_report(self, report):
        acks = self.inbox.pending_acks()
        self.reports += 1
        if self.first_sent is not None and not acks and not self.strikes and self.reports % self.ASK_EVERY != 1:
            self.send_text(rpc_report(encode(report), acks))
            return
        report_json = encode(report)
        self.request(lambda request_id: rpc_report(report_json, acks, request_id), ("report", acks))

    def send_ping_result(self, task_id, kind, value):
        self.send_text(rpc_ping_result(task_id, kind, value))

    def send_basic_info(self, info):
        self.request(lambda request_id: rpc_basic_info(info, request_id), ("info", info))
        return True

    def proven(self):
        """The panel answered a call on the link (a pong alone may be a proxy's)."""
        return self.first_answer.is_set()

    def on_message(self, payload):
        message = parse_event(payload)
        if message is None:
            return
        try:
            reply = read_rpc(message)
        except ValueError as e:
            if self.error_log(("unreadable", str(e))):
                log.warning("skipping a message from the panel: %s", e)
            return
        if reply.legacy is not None:
            self.inbox.take(reply.legacy)
        for event_id, method, params in reply.events:
            self.inbox.take_rpc(event_id, method, params)
        if reply.answers is not None or reply.error is not None:
            self.answered(reply)

    def answered(self, reply):
        with self.acks_lock:
            what = self.asked.pop(reply.answers, None)
        if what is None:
            # a proxy's or a confused panel's answer to nothing of ours: it
            # refuses nothing (and must not make us give v2 up)
            if reply.error is not None and self.error_log(("unasked", reply.error[0])):
                log.warning("ignoring an error from the panel that answers no request of ours (id %s): %s "
                            "(JSON-RPC error %s)", clipped(repr(reply.answers), 40), reply.error[1], reply.error[0])
            return
        first = reply.answers == self.FIRST_ID
        self.first_answer.set()
        kind, carried = what
        if reply.error is None:
            self.strikes = 0
            if kind == "report" and carried:
                self.inbox.acknowledged(carried)
            return
        code, text = reply.error
        if kind == "info" and "kernel_version" in carried:
            # an older panel without the two newest columns, as by HTTP (upload_basic_info)
            older = {k: v for k, v in carried.items() if k not in ("kernel_version", "cpu_physical_cores")}
            log.info("the panel refused basic info (%s); sending it again without the newest keys", text)
            return self.send_basic_info(older)
        if self.error_log(text):
            log.warning("the panel refused a message: %s (JSON-RPC error %s)", text, code)
        self.strikes += 1  # reports are asked about until the panel takes one again
        if first and reply.refuses_protocol:
            self.rejected = ProtocolRejected(None, "JSON-RPC error %s: %s" % (code, text))
            self.fail("the panel refused protocol v2 (%s)" % self.rejected.detail)


def gzip_bytes(data):
    compressor = zlib.compressobj(6, zlib.DEFLATED, 31)
    return compressor.compress(data) + compressor.flush()


def gunzip_bytes(data, limit=MAX_MESSAGE_BYTES):
    out = zlib.decompressobj(47).decompress(data, limit + 1)
    if len(out) > limit:
        raise ValueError("reply larger than %d bytes" % limit)
    return out


def rpc_refusal(status, body):
    if status == 401:
        return "the panel refused the token (HTTP 401); check --token"
    return "HTTP %s with %s" % (status, describe_body(body))


class KeptAlive:
    """POSTs to one URL over one kept-alive HTTP connection, for one thread: a
    report every interval must not cost a TCP and TLS handshake each. Through
    urllib (a connection per request) where an environment proxy applies."""

    def __init__(self, panel, url):
        from urllib.parse import urlsplit
        import urllib.request
        parts = urlsplit(url)
        self.panel, self.url, self.parts = panel, url, parts
        self.target = parts.path + "?" + parts.query
        self.direct = not urllib.request.getproxies().get(parts.scheme) or \
            bool(urllib.request.proxy_bypass(parts.hostname or ""))
        self.context = tls_context(panel.cfg) if parts.scheme == "https" and self.direct else None
        self.conn = None

    def connection(self, timeout):
        import http.client
        if self.context is not None:
            conn = http.client.HTTPSConnection(self.parts.hostname, self.parts.port, timeout=timeout,
                                               context=self.context)
        else:
            conn = http.client.HTTPConnection(self.parts.hostname, self.parts.port, timeout=timeout)
        if self.panel.cfg.custom_dns:
            conn._create_connection = self.panel.dial_through_custom_dns
        return conn

    def post(self, body, headers, timeout, limit=MAX_MESSAGE_BYTES, answer_headers=None):
        """(status, body) as Panel.exchange gives them, within `timeout` overall
        (a ConnectionCutter, as there: a trickled answer is cut off)."""
        if not self.direct:
            return self.panel.exchange(self.url, body, headers=headers, limit=limit, timeout=timeout,
                                       answer_headers=answer_headers)
        headers = post_headers(headers)
        cutter = ConnectionCutter(timeout)
        try:
            for attempt in (1, 2):
                reused = self.conn is not None
                if self.conn is None:
                    self.conn = self.connection(timeout)
                    self.conn._create_connection = cutter.watch(self.conn._create_connection)
                try:
                    if self.conn.sock is not None:
                        cutter.follow(self.conn.sock)
                        self.conn.sock.settimeout(timeout)
                    self.conn.timeout = timeout
                    self.conn.request("POST", self.target, body, headers)
                    reply = self.conn.getresponse()
                    keep_headers(reply.headers, answer_headers)
                    data = reply.read(limit)
                    if reply.will_close or not reply.isclosed():
                        self.close()  # the panel closes it, or we left part of the body unread
                    return reply.status, data
                except (OSError, ValueError, http_exceptions()) as e:
                    self.close()
                    # a kept-alive connection the panel had closed meanwhile: once more on a new one
                    if reused and attempt == 1 and not cutter.fired and not isinstance(e, socket.timeout):
                        continue
                    raise http_failure(e, cutter)
        finally:
            cutter.cancel()

    def close(self):
        conn, self.conn = self.conn, None
        if conn is not None:
            try:
                conn.close()
            except Exception:
                pass

    def abort(self):
        """End a request under way on another thread (shutdown() wakes it)."""
        conn = self.conn
        sock = conn.sock if conn is not None else None
        if sock is not None:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass


class PostLink(Link):
    """Protocol v2 by HTTP POST, for a panel behind a proxy that refuses
    WebSocket upgrades: a report POSTed every interval (gzip), one agent.pull
    long poll always waiting for events, and a dial of the WebSocket
    (`redial`, which gives a link the panel answered on) every
    `socket_wait` seconds (--reconnect-interval; SILENT_RETRY_INTERVALS of
    them after a silent socket), and at once when a POST gets through after
    failing; the first that works becomes this link's successor. A 429 or 5xx from
    the panel or a proxy is a pause, as long as its Retry-After asks, not a
    failure. A terminal can never reach this link: the panel needs a socket
    for it."""

    kind = V2_POST

    def __init__(self, cfg, panel, inbox, redial):
        super().__init__()
        self.cfg, self.panel, self.inbox, self.redial = cfg, panel, inbox, redial
        self.url = panel.url(RPC_PATH)
        self.ids = itertools.count(1)
        # one kept-alive connection for the reports (the agent thread), one for the pulls
        self.reporting = KeptAlive(panel, self.url)
        self.pulling = KeptAlive(panel, self.url)
        self.lock = threading.Lock()
        self.strikes = 0
        self.failures = 0
        self.last_success = time.monotonic()
        self.heard = False
        self.trouble_log = OncePer(60.0)
        self.quiet_until = 0.0   # a busy panel or proxy asked for quiet until then
        self.busy_streak = 0
        self.socket_wait = cfg.reconnect_interval
        self.redial_now = threading.Event()

    @classmethod
    def open(cls, cfg, panel, inbox, redial, first_report):
        """A PostLink once the panel took `first_report` by POST;
        ProtocolRejected or OSError when it did not."""
        link = cls(cfg, panel, inbox, redial)
        acks = inbox.pending_acks()
        link.settle(link.post(link.report_request(first_report, acks), via=link.reporting), acks)
        link.last_success = time.monotonic()
        link.reported_at_open = True
        return link

    def start(self):
        threading.Thread(target=self._pull_loop, name="v2-pull", daemon=True).start()
        threading.Thread(target=self._retry_websocket, name="v2-ws-retry", daemon=True).start()

    def report_request(self, report, acks):
        return rpc_report(encode(report), acks, "report-%d" % next(self.ids))

    def post(self, text, timeout=HTTP_TIMEOUT, via=None):
        """The RpcReply to one request (sent `via` a KeptAlive, else on a
        connection of its own); ProtocolRejected when the panel does not
        answer in v2, OSError when it cannot be reached."""
        body, headers = text.encode("utf-8"), {}
        if not self.cfg.disable_compression:
            body, headers = gzip_bytes(body), {"Content-Encoding": "gzip"}
        answer = {}
        if via is not None:
            status, data = via.post(body, headers, timeout, answer_headers=answer)
        else:
            status, data = self.panel.exchange(self.url, body, headers=headers, timeout=timeout, answer_headers=answer)
        try:
            if data[:2] == b"\x1f\x8b":
                data = gunzip_bytes(data)
        except (ValueError, zlib.error):
            pass
        if busy_status(status):
            raise PanelBusy(status, describe_body(data), retry_after_seconds(answer.get("retry-after")))
        try:
            message = clean_strings(json.loads(data.decode("utf-8")))
            reply = read_rpc(message) if isinstance(message, dict) else None
        except (ValueError, UnicodeDecodeError, RecursionError, zlib.error):
            reply = None
        if reply is None or reply.legacy is not None:
            raise ProtocolRejected(status, rpc_refusal(status, data))
        if status == 200 and reply.error is None:
            return reply
        if status == 400 and reply.error is not None and not reply.refuses_protocol:
            return reply  # about this message's content, not the protocol
        if status == 401 or reply.error is None:
            raise ProtocolRejected(status, rpc_refusal(status, data))
        raise ProtocolRejected(status, "HTTP %s, JSON-RPC error %s: %s" % (status, reply.error[0], reply.error[1]))

    def settle(self, reply, acks):
        """Acks confirmed, events taken, errors logged."""
        self.heard = True
        if reply.error is not None:
            if self.trouble_log(reply.error[1]):
                log.warning("the panel refused a message: %s (JSON-RPC error %s)", reply.error[1], reply.error[0])
        elif acks:
            self.inbox.acknowledged(acks)
        for event_id, method, params in reply.events:
            self.inbox.take_rpc(event_id, method, params)

    def exchange(self, text, acks=(), timeout=HTTP_TIMEOUT, via=None):
        """post() and settle(); protocol failures are counted here, and the
        link dies after PROTOCOL_STRIKES of them in a row. OSError passes."""
        try:
            reply = self.post(text, timeout, via)
        except PanelBusy as e:
            return self.pause(e)
        except ProtocolRejected as e:
            if e.status == 401:  # a revoked token, not a panel without v2: no strike, no fallback
                self.fail(e.detail)
                return
            with self.lock:
                self.strikes += 1
                strikes = self.strikes
            if self.trouble_log(("refused", e.status)):
                log.warning("v2 POST refused: %s", e.detail)
            if strikes >= PROTOCOL_STRIKES:
                self.rejected = e
                self.fail("the panel refused protocol v2 by POST (%s)" % e.detail)
            return
        with self.lock:
            self.strikes = 0
            self.busy_streak = 0
        self.settle(reply, acks)

    def pause(self, busy):
        """Keep quiet as long as a busy panel or proxy asks (Retry-After), else
        for a wait that doubles while it stays busy; one line per episode."""
        with self.lock:
            wait = busy_wait(busy, self.cfg.reconnect_interval, self.busy_streak)
            self.quiet_until = max(self.quiet_until, time.monotonic() + wait)
            self.busy_streak += 1
            first = self.busy_streak == 1
        if first:
            log.warning("v2 POST: the panel or a proxy in front of it is busy (%s); quiet for %d s, staying on "
                        "protocol v2", busy.detail, round(wait))

    def quiet(self):
        return time.monotonic() < self.quiet_until

    def send_report(self, report):
        if self.quiet():
            return  # skipped, as a busy panel or proxy asked
        acks = self.inbox.pending_acks()
        try:
            self.exchange(self.report_request(report, acks), acks, timeout=PONG_DEADLINE, via=self.reporting)
        except OSError as e:
            # dead like a socket whose ping went unanswered: nothing got through for PONG_DEADLINE
            self.failures += 1
            if self.failures >= 3 or time.monotonic() - self.last_success > PONG_DEADLINE:
                self.fail("%d reports by POST failed in a row (%s)" % (self.failures, describe_error(e)))
        else:
            if self.failures:
                self.redial_now.set()  # the panel is back: the socket may be too
            self.failures = 0
            self.last_success = time.monotonic()
        if self.dead.is_set():
            raise LinkClosed(self.why)

    def send_ping_result(self, task_id, kind, value):
        request = rpc_ping_result(task_id, kind, value, "ping-%d" % next(self.ids))
        try:
            self.exchange(request)
        except OSError as e:
            log.warning("ping result %d not sent: %s", task_id, describe_error(e))

    def send_basic_info(self, info):
        """False when it did not get through: the agent then uploads it by
        HTTP, with retries, as after a socket's failed send."""
        try:
            self.exchange(rpc_basic_info(info, "info-%d" % next(self.ids)))
        except OSError as e:
            log.warning("basic info upload by POST failed: %s", describe_error(e))
            return False
        return True

    def keepalive(self, now):
        return now + 1.0  # a POST that fails is how this link finds out

    def proven(self):
        return self.heard

    def close(self, status=GOING_AWAY):
        """Ends the waiting agent.pull too: none is left open on the panel."""
        self.fail(self.why or "closed")
        self.redial_now.set()
        self.pulling.abort()
        self.reporting.close()

    def _pull_loop(self):
        """One agent.pull always waiting: the panel answers when it has events
        for us, or after 25 s."""
        while not self.dead.is_set():
            if self.quiet():
                self.dead.wait(self.quiet_until - time.monotonic())
                continue
            acks = self.inbox.pending_acks()
            started = time.monotonic()
            try:
                self.exchange(rpc_pull(acks, "pull-%d" % next(self.ids)), acks, timeout=PULL_TIMEOUT, via=self.pulling)
            except OSError as e:
                if not self.dead.is_set() and self.trouble_log(("pull", type(e).__name__)):
                    log.warning("agent.pull failed: %s", describe_error(e))
                self.dead.wait(self.cfg.reconnect_interval)
                continue
            if time.monotonic() - started < 1.0:
                self.dead.wait(0.5)  # a panel that does not hold the poll is not polled in a loop
        self.pulling.close()

    def _retry_websocket(self):
        while True:
            self.redial_now.wait(self.socket_wait)
            self.redial_now.clear()
            if self.dead.is_set():
                return
            if self.quiet():
                continue
            try:
                link = self.redial()
            except Exception as e:
                silent = isinstance(e, SocketSilent)
                self.socket_wait = self.cfg.reconnect_interval * (SILENT_RETRY_INTERVALS if silent else 1)
                log.debug("the v2 WebSocket still fails: %s", str(e) if silent else handshake_problem(e))
                continue
            if self.dead.is_set():
                link.close()
                return
            self.successor = link
            log.info("leaving POST mode: the WebSocket works again")
            self.fail("the WebSocket works again")
            self.pulling.abort()
            return


# -- choosing a link ---------------------------------------------------------------

PROTOCOL_STRIKES = 3
PULL_TIMEOUT = 35.0


def dial_websocket(cfg, url, header=None):
    """open_websocket(), with a refused upgrade as ProtocolRejected, and a
    429 or 5xx (a busy panel or proxy) as PanelBusy."""
    try:
        return open_websocket(cfg, url, header=header)
    except Exception as e:
        status = getattr(e, "status_code", None)
        if busy_status(status):
            headers = getattr(e, "resp_headers", None) or {}
            raise PanelBusy(status, describe_body(getattr(e, "resp_body", None) or b""),
                            retry_after_seconds(headers.get("retry-after")))
        if status is not None:
            raise ProtocolRejected(status, handshake_problem(e))
        raise


def dial_rpc_socket(cfg, panel, inbox):
    header = None if cfg.disable_compression else ["Sec-WebSocket-Extensions: " + DEFLATE_OFFER]
    try:
        ws = dial_websocket(cfg, panel.ws_url(RPC_PATH), header)
    except ProtocolRejected as e:
        if e.status == 200:
            e.detail = "the panel answered /v2/rpc with a web page (HTTP 200): a panel without protocol v2, " \
                       "or check --endpoint"
        raise
    headers = ws.getheaders() or {}
    offered = headers.get("sec-websocket-extensions") or headers.get("Sec-WebSocket-Extensions")
    params = None if cfg.disable_compression else deflate_params(offered)
    return RpcLink(ws, inbox, Deflate(params) if params is not None else None)


def verified(link, first_report):
    """`link`, a new RpcLink, started, once the panel answered its first call
    (`first_report`); SocketSilent (the link closed) when no answer came
    within FIRST_ANSWER_DEADLINE, or what ended the link meanwhile."""
    link.start()
    deadline = time.monotonic() + FIRST_ANSWER_DEADLINE
    try:
        link.send_report(first_report)
        while not link.first_answer.wait(0.05):
            if link.dead.is_set():
                raise link.rejected or LinkClosed(link.why)
            if time.monotonic() >= deadline:
                raise SocketSilent("the panel took the v2 WebSocket but did not answer its first call within "
                                   "%g s" % FIRST_ANSWER_DEADLINE)
    except BaseException:
        link.close()
        raise
    if link.rejected is not None:
        link.close()
        raise link.rejected
    link.reported_at_open = True
    return link


def dial_report_socket(cfg, panel, handle):
    return ReportLink(dial_websocket(cfg, panel.ws_url(REPORT_PATH)), handle)


class LinkChooser:
    """Which link to dial next (LINK_KINDS), from what the last attempts said,
    and the dialling itself: every decision about protocol versions is here.
    The v2 WebSocket first; v2 POST after --max-retries failed dials of it,
    refused upgrades included (the official agent drops to v1 there, whose
    upgrade a WebSocket-blocking proxy refuses too, and stays offline); v1
    after PROTOCOL_STRIKES protocol failures in a row, one of them by POST
    (an old panel answers both with its web page), until that v1 link is
    lost. With --protocol-version 1, always v1."""

    def __init__(self, cfg, panel, inbox, handle, report):
        """`handle` takes a v1 socket's messages; `report` makes a report now
        (POST mode opens with one)."""
        self.cfg, self.panel, self.inbox, self.handle, self.report = cfg, panel, inbox, handle, report
        self.only_v1 = cfg.protocol_version == 1
        self.retries = max(1, cfg.max_retries)
        self.interval = cfg.reconnect_interval
        self.on_v1 = self.only_v1
        self.dials = 0          # failed v2 WebSocket dials in a row
        self.strikes = 0        # protocol failures in a row
        self.post_refused = False
        self.v1_dials = 0
        self.v1_failed = ""     # why v1 failed, when it never connected since the last fallback
        self.last_problem = ""
        self.v1_reason = "--protocol-version 1"
        self.silent_at = None   # when a v2 socket last went unanswered

    def next(self):
        if self.on_v1:
            return V1_SOCKET
        return V2_POST if self.dials >= self.retries else V2_SOCKET

    def dial(self, kind):
        """A live link of `kind`; ProtocolRejected or another error when it
        could not be had. The panel's answer to POST mode's first report is
        the sign to try the socket at once: a panel back from an outage is
        back on the socket, not in POST mode until the next retry."""
        if kind == V2_SOCKET:
            return self.dial_v2_socket()
        if kind == V2_POST:
            post = PostLink.open(self.cfg, self.panel, self.inbox, self.dial_v2_socket, self.report())
            if self.silent_recently():
                post.socket_wait = self.silent_wait()
                return post
            try:
                link = self.dial_v2_socket()
            except Exception as e:
                if isinstance(e, SocketSilent):
                    post.socket_wait = self.silent_wait()
                return post
            post.close()  # never started: no pull waits on it
            return link
        return dial_report_socket(self.cfg, self.panel, self.handle)

    def dial_v2_socket(self):
        """A v2 socket the panel answered on (verified())."""
        try:
            return verified(dial_rpc_socket(self.cfg, self.panel, self.inbox), self.report())
        except SocketSilent:
            self.silent_at = time.monotonic()
            raise

    def silent_wait(self):
        return self.interval * SILENT_RETRY_INTERVALS

    def silent_recently(self):
        return self.silent_at is not None and time.monotonic() - self.silent_at < self.silent_wait()

    def why(self, kind):
        """Why `kind` is in use, for the one line naming the mode."""
        if kind == V1_SOCKET:
            return self.v1_reason
        if kind == V2_POST:
            return "the v2 WebSocket failed %d times in a row (last: %s); retrying it every %gs" % (
                self.dials, self.last_problem, self.silent_wait() if self.silent_recently() else self.interval)
        return "--protocol-version 2"

    def failed(self, kind, error, problem):
        """Count a failed dial. True when the next kind of link is to be
        dialled at once: this one was refused, not unreachable."""
        self.last_problem = problem
        # a refused token says nothing about the protocol: it is no strike
        protocol = isinstance(error, ProtocolRejected) and error.status != 401
        if kind == V2_SOCKET and isinstance(error, SocketSilent):
            self.dials = self.retries  # one is enough: POST mode now
            return True
        if kind == V2_SOCKET:
            self.dials += 1
        elif kind == V2_POST and not protocol:
            # unreachable rather than refusing: alternate with the WebSocket,
            # and take whichever comes back first
            self.dials = self.retries - 1
        elif kind == V1_SOCKET and not self.only_v1:
            self.v1_dials += 1
            if self.v1_dials >= self.retries:
                self.v1_failed = "v1 failed as well (last: %s)" % problem
                self.start_over()
        if protocol and kind != V1_SOCKET:
            self.strikes += 1
            self.post_refused = self.post_refused or kind == V2_POST
            if self.strikes >= PROTOCOL_STRIKES and self.post_refused:
                self.fall_back("the panel refused protocol v2 %d times in a row (last: %s)" % (self.strikes, problem))
        return protocol and LINK_KINDS.index(self.next()) > LINK_KINDS.index(kind)

    def fall_back(self, why):
        if self.v1_failed:
            log.warning("the panel answers neither v2 nor v1: %s, and %s; is --endpoint the panel's address? "
                        "trying v1 again, then v2", why, self.v1_failed)
        else:
            log.warning("falling back to protocol v1: %s; until that link is lost", why)
        self.on_v1, self.v1_dials, self.v1_reason = True, 0, why

    def start_over(self):
        self.on_v1 = self.only_v1
        self.dials = self.strikes = self.v1_dials = 0
        self.post_refused = False

    def connected(self, link):
        kind = link.kind
        self.v1_failed = ""
        if kind == V2_SOCKET:
            self.dials = 0
        if kind != V1_SOCKET:
            self.strikes, self.post_refused = 0, False
        else:
            self.v1_dials = 0

    def lost(self, link):
        kind = link.kind
        if link.rejected is not None and kind != V1_SOCKET:
            self.fall_back("the panel refused protocol v2 (%s)" % link.rejected.detail)
        elif kind == V1_SOCKET and not self.only_v1:
            # like the official agent, v2 again on the next link; but the panel
            # refused it before, so one more refusal (not a network error) is enough
            self.start_over()
            self.strikes, self.post_refused = PROTOCOL_STRIKES - 1, True


# ---------------------------------------------------------------------------
# Tasks: events from the panel (exec, ping probes, web terminal)
# ---------------------------------------------------------------------------

PROBE_TIMEOUT = 3.0
# a probe slower than this is measured again (a lost SYN or packet inflates one try)
HIGH_LATENCY_MS = 1000.0
MAX_PROBES = 32
# so that one slow target cannot hold every probe slot
MAX_PROBES_PER_TARGET = 8
# probes waiting for a slot (up to PROBE_TIMEOUT); beyond this they report loss at once
MAX_PROBES_WAITING = 64
# after the shell of an exec exits, how long background jobs that still hold
# its output may keep it open before the result is sent without them
EXEC_LINGER = 2.0
EXEC_EXIT_WAIT = 1.0  # seconds for a shell whose output ended to exit before its tree is ended
# at shutdown, how long the threads of killed commands get to spool their results
EXEC_SPOOL_WAIT = 0.5
TERMINAL_IDLE_PING = 30.0
# keystrokes held for a shell that is not reading them (a big paste into `sleep`)
TERMINAL_INPUT_BUFFER = 1 << 20
DROPPED_INPUT_LOG = OncePer()  # once per terminal session
DISABLED_EXEC = "Remote control is disabled."
DISABLED_TERMINAL = "\n\nWeb SSH is disabled. Enable it by running without the --disable-web-ssh flag."


# -- exec ------------------------------------------------------------------------

class HeadTail:
    """The first and last bytes of a stream, up to `limit` in all, and its
    total length: a command cannot fill the agent's memory."""

    def __init__(self, limit):
        self.head_limit = limit // 2
        self.tail_limit = limit - self.head_limit
        self.head, self.tail = bytearray(), bytearray()
        self.total = 0

    def add(self, data):
        self.total += len(data)
        room = self.head_limit - len(self.head)
        if room > 0:
            self.head += data[:room]
            data = data[room:]
        if data:
            self.tail += data
            if len(self.tail) > self.tail_limit:
                del self.tail[:len(self.tail) - self.tail_limit]

    def kept(self):
        return bytes(self.head + self.tail)


def omission_marker(count):
    return b"\n[... %d bytes of output omitted (--exec-max-output) ...]\n" % count


def combine_output(out, err, limit):
    """stdout, then stderr after a newline (none when stdout is empty), as
    bytes; over `limit` bytes only the head and the tail are kept, with a
    marker in between. `out` and `err` are HeadTail(limit)."""
    sep = b"\n" if out.total and err.total else b""
    total = out.total + len(sep) + err.total
    if total <= limit:
        return out.kept() + sep + err.kept()
    head_size = limit // 2
    tail_size = limit - head_size
    # each HeadTail keeps at least head_size/tail_size bytes of each end
    head = (out.kept()[:head_size] + sep + err.kept()[:head_size])[:head_size]
    tail = (out.kept()[-tail_size:] + sep + err.kept()[-tail_size:])[-tail_size:] if tail_size else b""
    return head + omission_marker(total - head_size - tail_size) + tail


def result_text(data, encoding="utf-8"):
    return data.decode(encoding, "replace").replace("\r\n", "\n")


def run_command(command, timeout, limit, started=None):
    """Run `command` as a script in a process tree of its own (start_script:
    `sh -s` in a new session; PowerShell or cmd.exe in a job object on
    Windows). Returns (output text, exit code, timed out); while the shell
    runs, the timeout (0 = none) ends its whole tree. Background jobs still
    running after the shell exits are left alone. `started(script)` is
    called once it runs."""
    try:
        script = start_script(command)
    except (OSError, ValueError) as e:
        return "cannot start the shell: %s" % (describe_error(e) if isinstance(e, OSError) else e), -1, False
    proc = script.proc
    if started:
        started(script)
    try:
        streams = {proc.stdout.fileno(): HeadTail(limit), proc.stderr.fileno(): HeadTail(limit)}
        open_pipes = set(streams)
        deadline = time.monotonic() + timeout if timeout else None
        linger_until = None
        timed_out = False
        while open_pipes:
            now = time.monotonic()
            if linger_until is None and proc.poll() is not None:
                linger_until = now + EXEC_LINGER
                # the shell is done: jobs it left running are the user's
                # (daemons started this way), not ours to time out
                deadline = None
            if deadline is not None and now >= deadline:
                timed_out = True
                deadline = None
                script.tree.end()
                linger_until = now + 1.0  # collect what the killed tree had written
            if linger_until is not None and now >= linger_until:
                break
            wake = min(t for t in (deadline, linger_until, now + 0.25) if t is not None)
            for fd in readable_pipes(sorted(open_pipes), max(0.0, wake - now)):
                try:
                    data = os.read(fd, 65536)
                except OSError:
                    data = b""
                if data:
                    streams[fd].add(data)
                else:
                    open_pipes.discard(fd)
        output = combine_output(streams[proc.stdout.fileno()], streams[proc.stderr.fileno()], limit)
    finally:
        for pipe in (proc.stdout, proc.stderr):
            pipe.close()
        try:
            # a shell that closed its output is usually exiting: a busy box
            # may take a moment to finish that, which is no reason to kill it
            proc.wait(EXEC_EXIT_WAIT)
        except Exception:  # subprocess.TimeoutExpired: still running after our timeout or error
            script.tree.end()
        proc.wait()
        finish_script(script)
    code = proc.returncode
    text = result_text(output, script.encoding)
    if timed_out:
        text += "%s[komari-agent: the command ran longer than --exec-timeout %gs; its process group was killed]" \
            % ("\n" if text and not text.endswith("\n") else "", timeout)
        return text, -1, True
    return text, (-1 if code < 0 or script.tree.killed else code), False


# -- ping probes -------------------------------------------------------------------

def probe_addresses(cfg, host, deadline=None):
    """[(family, address)] for a probe target, preferred family first:
    --custom-dns when set (UDP A/AAAA queries, within `deadline`), else the
    system resolver."""
    host = host.strip()
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    family = ip_family(host)
    if family is not None:
        return [(family, host)]
    if not host:
        return []
    want_v6 = cfg.prefer_ip_version == "6"
    if cfg.custom_dns:
        server = dns_server_address(cfg.custom_dns)
        found = []
        for qtype in ((28, 1) if want_v6 else (1, 28)):
            try:
                family = socket.AF_INET if qtype == 1 else socket.AF_INET6
                timeout = 2.0 if deadline is None else min(2.0, deadline - time.monotonic())
                found = [(family, a) for a in dns_lookup(server, host, qtype, timeout)] if timeout > 0 else []
            except (OSError, ValueError) as e:
                log.debug("DNS query for a probe target failed: %s", e)
            if found:
                return found
        return []
    infos = socket.getaddrinfo(host, None, 0, socket.SOCK_STREAM)
    found = [(info[0], info[4][0]) for info in infos if info[0] in (socket.AF_INET, socket.AF_INET6)]
    if cfg.prefer_ip_version:
        want = socket.AF_INET6 if want_v6 else socket.AF_INET
        found.sort(key=lambda item: item[0] != want)
    return found


def first_address(cfg, host, deadline=None):
    try:
        found = probe_addresses(cfg, host, deadline)
    except (OSError, ValueError, UnicodeError):
        return None
    return found[0] if found else None


def icmp_checksum(data):
    if len(data) % 2:
        data += b"\0"
    total = sum(struct.unpack("!%dH" % (len(data) // 2), data))
    total = (total >> 16) + (total & 0xFFFF)
    total += total >> 16
    return ~total & 0xFFFF


def echo_request(family, ident, seq):
    kind = 8 if family == socket.AF_INET else 128
    payload = b"komari-agent-py!"
    header = struct.pack("!BBHHH", kind, 0, 0, ident, seq)
    # IPv6 sockets and ping sockets fill the checksum in themselves
    checksum = icmp_checksum(header + payload) if family == socket.AF_INET else 0
    return struct.pack("!BBHHH", kind, 0, checksum, ident, seq) + payload


def icmp_echo(family, address, timeout, kind):
    """Milliseconds for one echo over an ICMP socket of `kind`
    (SOCK_DGRAM: unprivileged ping socket; SOCK_RAW: needs root or
    CAP_NET_RAW), None on no reply. PermissionError when the kernel does not
    allow that kind of socket here."""
    proto = socket.IPPROTO_ICMP if family == socket.AF_INET else socket.IPPROTO_ICMPV6
    reply_type = 0 if family == socket.AF_INET else 129
    ident, seq = UNGUESSABLE.getrandbits(16), UNGUESSABLE.getrandbits(16)
    sock = socket.socket(family, kind, proto)
    try:
        start = time.monotonic()
        deadline = start + timeout
        try:
            sock.sendto(echo_request(family, ident, seq), (address, 0))
        except PermissionError:
            return None  # a firewall said no: a lost probe, not a missing privilege
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return None
            sock.settimeout(remaining)
            packet = sock.recv(2048)
            elapsed = (time.monotonic() - start) * 1000
            if family == socket.AF_INET and packet and packet[0] >> 4 == 4:
                # a raw IPv4 socket (and the BSDs' ping socket) sees the IP header;
                # no ICMP type starts with 0x4_
                packet = packet[(packet[0] & 0x0F) * 4:]
            if len(packet) < 8:
                continue
            rtype, _, _, rident, rseq = struct.unpack("!BBHHH", packet[:8])
            # a ping socket rewrites the identifier: the kernel already matched it
            if rtype == reply_type and rseq == seq and (kind == socket.SOCK_DGRAM or rident == ident):
                return elapsed
    except socket.timeout:
        return None
    except PermissionError:
        raise
    except OSError:
        return None
    finally:
        sock.close()


def system_ping(family, address, timeout):
    """Milliseconds from the system `ping` (argument list, never a shell; the
    address is an IP literal), None on failure."""
    import subprocess
    argv = ping_command(family, timeout)
    if argv is None:
        return None
    try:
        done = subprocess.run(argv + [address], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                              stdin=subprocess.DEVNULL, timeout=timeout + 2, env=child_env({"LC_ALL": "C"}))
    except (OSError, subprocess.SubprocessError):
        return None
    # "time=0.042 ms", "time<1ms" (Windows, under a millisecond), "Zeit=3ms"
    found = re.search(rb"([=<])\s*([0-9.]+)\s*ms\b", done.stdout)
    if done.returncode != 0 or not found:
        return None
    return 0.0 if found.group(1) == b"<" else float(found.group(2))


class IcmpProber:
    """Sends one echo by the first way the system allows: its own helper
    (Windows' ICMP API), a ping socket, a raw socket, then the system ping.
    Remembers what was refused."""

    def __init__(self):
        self.refused = set()
        self.said = OncePer()

    def __call__(self, family, address, timeout=PROBE_TIMEOUT):
        helper = icmp_helper()
        if helper is not None and (family, "helper") not in self.refused:
            try:
                value = helper(family, address, timeout)
            except OSError as e:
                self.refused.add((family, "helper"))
                log.warning("icmp probes: the system's ICMP API failed (%s); trying other ways", describe_error(e))
            else:
                if self.said(("icmp", family, "helper")):
                    log.info("icmp probes use the system's ICMP API")
                return value
        for kind, name in ICMP_SOCKET_KINDS:
            if (family, kind) in self.refused:
                continue
            try:
                value = icmp_echo(family, address, timeout, kind)
            except OSError:  # PermissionError mostly; any socket the system will not make
                self.refused.add((family, kind))
                continue
            if self.said(("icmp", family, kind)):
                log.info("icmp probes use %s", name)
            return value
        if self.said(("icmp", family, "ping")):
            log.info("icmp probes use the system ping (no ICMP socket allowed here: see net.ipv4.ping_group_range)")
        return system_ping(family, address, timeout)


def tcp_connect_ms(cfg, target, timeout=PROBE_TIMEOUT):
    parsed = split_host_port(target)
    if parsed is None:
        return None
    deadline = time.monotonic() + timeout
    found = first_address(cfg, parsed[0], deadline)
    if found is None or time.monotonic() >= deadline:
        return None
    family, address = found
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.settimeout(deadline - time.monotonic())
    try:
        start = time.monotonic()
        sock.connect((address, parsed[1]))
        return (time.monotonic() - start) * 1000
    except OSError:
        return None
    finally:
        sock.close()


def http_probe_url(target):
    """The URL an http probe GETs: http:// added when there is no scheme,
    a bare IPv6 address bracketed."""
    text = target.strip()
    if re.match(r"(?i)https?://", text):
        return text
    if ":" in text and "[" not in text and ip_family(text.split("/", 1)[0]) == socket.AF_INET6:
        head, _, rest = text.partition("/")
        text = "[%s]" % head + ("/" + rest if rest or text.endswith("/") else "")
    return "http://" + text


def wait_ready(sock, deadline, write=False):
    """Until `sock` can be read (or written); socket.timeout past `deadline`."""
    import select
    remaining = deadline - time.monotonic()
    ready = remaining > 0 and select.select([] if write else [sock], [sock] if write else [], [], remaining)
    if not ready or not (ready[0] or ready[1]):
        raise socket.timeout("probe deadline")


def response_head(sock, deadline, limit=65536):
    """The bytes of an HTTP response up to the end of its headers, read from a
    non-blocking (TLS or plain) socket by `deadline`: a server that trickles
    its answer a byte at a time still cannot hold the probe longer."""
    head = b""
    while b"\r\n\r\n" not in head and b"\n\n" not in head:
        try:
            data = sock.recv(4096)
        except (ssl.SSLWantReadError, BlockingIOError):
            wait_ready(sock, deadline)
            continue
        except ssl.SSLWantWriteError:
            wait_ready(sock, deadline, write=True)
            continue
        if not data or len(head) > limit:
            raise ValueError("no complete response head")
        head += data
        if time.monotonic() > deadline:
            raise socket.timeout("probe deadline")
    return head


def tls_handshake(sock, deadline):
    while True:
        try:
            return sock.do_handshake()
        except ssl.SSLWantReadError:
            wait_ready(sock, deadline)
        except ssl.SSLWantWriteError:
            wait_ready(sock, deadline, write=True)


def http_get_ms(cfg, target, timeout=PROBE_TIMEOUT):
    """Milliseconds until the response headers of a GET (name lookup,
    connect and TLS included), all within one deadline of `timeout` s; None
    unless the status is 2xx/3xx. Redirects are not followed and no proxy is
    used."""
    from urllib.parse import quote, urlsplit
    try:
        parts = urlsplit(http_probe_url(target))
        host, secure = parts.hostname, parts.scheme.lower() == "https"
        port = parts.port or (443 if secure else 80)
    except ValueError:
        return None
    if not host:
        return None
    start = time.monotonic()
    deadline = start + timeout
    found = first_address(cfg, host, deadline)
    if found is None:
        return None
    family, address = found
    path = quote((parts.path or "/") + ("?" + parts.query if parts.query else ""),
                 safe="!#$%&'()*+,/:;=?@[]~", errors="replace")  # non-ASCII as UTF-8 %xx
    if re.search(r"[\x00-\x20\x7f]", path + host):
        return None  # it would break the request line or smuggle a header
    try:
        host_name = host.encode("ascii")
    except UnicodeError:
        try:
            host_name = host.encode("idna")
        except UnicodeError:
            return None
    host_header = (b"[%s]" % host_name if b":" in host_name else host_name) + \
        (b"" if parts.port is None else b":%d" % port)
    request = b"GET %s HTTP/1.1\r\nHost: %s\r\nUser-Agent: komari-agent-py/%s\r\nAccept: */*\r\n" \
        b"Connection: close\r\n\r\n" % (path.encode("ascii"), host_header, __version__.encode())
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return None
        sock.settimeout(remaining)
        sock.connect((address, port))
        if secure:
            sock = ssl.create_default_context().wrap_socket(sock, server_hostname=host, do_handshake_on_connect=False)
        sock.settimeout(0.0)
        if secure:
            tls_handshake(sock, deadline)
        sock.settimeout(max(0.05, deadline - time.monotonic()))
        sock.sendall(request)  # a few hundred bytes: the socket buffer takes them at once
        sock.settimeout(0.0)
        head = response_head(sock, deadline)
        elapsed = (time.monotonic() - start) * 1000
    except (OSError, ValueError):
        return None
    finally:
        sock.close()
    status = re.match(rb"HTTP/\d(?:\.\d)? (\d{3})[ \r]", head)
    if status is None or not 200 <= int(status.group(1)) < 400 or elapsed > timeout * 1000:
        return None
    return elapsed


class ProbeSlots:
    """Admits at most MAX_PROBES + MAX_PROBES_WAITING probes; of those, at
    most MAX_PROBES run at once and at most MAX_PROBES_PER_TARGET against one
    target, so a target that answers slowly never takes the others' slots.
    A probe that finds no slot waits for one up to PROBE_TIMEOUT."""

    def __init__(self):
        self.cond = threading.Condition()
        self.admitted = 0
        self.running = 0
        self.per_target = {}

    def admit(self):
        with self.cond:
            if self.admitted >= MAX_PROBES + MAX_PROBES_WAITING:
                return False
            self.admitted += 1
            return True

    def start(self, target, timeout=PROBE_TIMEOUT):
        """True once the probe may run; False when no slot came free in time."""
        def free():
            return self.running < MAX_PROBES and self.per_target.get(target, 0) < MAX_PROBES_PER_TARGET
        with self.cond:
            if not self.cond.wait_for(free, timeout):
                return False
            self.running += 1
            self.per_target[target] = self.per_target.get(target, 0) + 1
            return True

    def finish(self, target, started):
        with self.cond:
            self.admitted -= 1
            if started:
                self.running -= 1
                self.per_target[target] -= 1
                if not self.per_target[target]:
                    del self.per_target[target]
            self.cond.notify_all()


def settle_latency(measure, kind):
    """The value a probe reports: whole milliseconds, -1 for a failure. A
    result over 1 s is measured up to 3 more times and the first one under
    1 s is used; for tcp a drop of more than 800 ms means the first SYN was
    lost and retransmitted, which is reported as loss."""
    first = measure()
    if first is None:
        return -1
    if first <= HIGH_LATENCY_MS:
        return int(first)
    for _ in range(3):
        again = measure()
        if again is None:
            return -1
        if again <= HIGH_LATENCY_MS:
            return -1 if kind == "tcp" and first - again > 800 else int(again)
    return -1


# -- web terminal ------------------------------------------------------------------

def drop_socket(ws, goodbye=True):
    """Close a terminal socket at once, from any thread. The panel never
    answers a close frame on this socket, so none is waited for, and the
    frame is sent only when no other thread may be blocked writing."""
    if goodbye:
        try:
            ws.sock and ws.sock.settimeout(0.5)
            ws.send_close()
        except Exception:
            pass
    try:
        ws.sock and ws.sock.shutdown(socket.SHUT_RDWR)  # wakes a thread blocked on it
    except Exception:
        pass
    try:
        ws.shutdown()
    except Exception:
        pass


class TerminalSession:
    """One login shell on a console of its own (open_console: a pty, or on
    Windows a pseudo console or pipes) bridged to one WebSocket. When either
    side ends, the shell and everything it started go."""

    def __init__(self, ws, request_id, register, unregister):
        self.ws, self.request_id = ws, request_id
        self.register, self.unregister = register, unregister
        self.console = None
        self.done = threading.Event()
        self.end_lock = threading.Lock()

    def run(self):
        try:
            self.console = open_console(24, 80)
        except Exception as e:   # OSError mostly; a Windows call this system lacks too
            log.warning("terminal: cannot start a shell: %s", describe_error(e))
            try:
                self.ws.send("\r\nCannot start a shell: %s\r\n" % describe_error(e))
            except Exception:
                pass
            drop_socket(self.ws)
            return
        self.register(self)
        log.info("terminal session %s started", self.request_id[:8])
        output = threading.Thread(target=self.pump_output, name="terminal-out", daemon=True)
        output.start()
        try:
            if self.console.notice:
                self.ws.send_binary(self.console.notice)
            self.pump_input()
        except Exception:
            pass  # the socket failed: the session ends
        finally:
            self.end()
            # the console is closed only when neither pump can touch it again
            output.join()
            self.console.close()

    def pump_input(self):
        """Socket to console until the socket ends (EOF, reset or close
        frame). The console is written without blocking: keystrokes the shell
        does not read yet wait in a bounded buffer, so this thread keeps
        watching the socket and notices at once when the panel drops it."""
        import select
        import websocket
        self.ws.settimeout(TERMINAL_IDLE_PING)
        pending = bytearray()
        heard = time.monotonic()
        ping_out = False
        while not self.done.is_set():
            if pending and not self.console.write(pending):
                return
            sock = self.ws.sock
            if sock is None:
                return
            buffered = isinstance(sock, ssl.SSLSocket) and sock.pending()
            if not buffered:
                silent = time.monotonic() - heard
                if silent >= TERMINAL_IDLE_PING:
                    if ping_out:
                        return  # nothing heard for a whole ping period: the peer is gone
                    try:
                        self.ws.ping(b"komari")
                    except Exception:
                        return
                    ping_out, heard = True, time.monotonic()
                    continue
                wait = TERMINAL_IDLE_PING - silent
                # a console with nothing to select() on is offered the keystrokes again soon
                writable = [self.console.writable_fd] if pending and self.console.writable_fd is not None else []
                if pending:
                    wait = min(wait, 0.5 if writable else 0.05)
                try:
                    readable, _, _ = select.select([sock], writable, [], wait)
                except (OSError, ValueError):
                    return
                if not readable:
                    continue
            try:
                opcode, frame = self.ws.recv_data_frame(True)
            except websocket.WebSocketTimeoutException:
                continue  # a frame that stalled half-way: the silence clock decides
            except Exception:
                return
            heard, ping_out = time.monotonic(), False
            if opcode == websocket.ABNF.OPCODE_CLOSE or not self.take_input(opcode, frame.data, pending):
                return

    def take_input(self, opcode, data, pending):
        """Apply one frame from the browser: a resize now, keystrokes onto
        `pending` (up to TERMINAL_INPUT_BUFFER). False when the console is gone."""
        import websocket
        if opcode == websocket.ABNF.OPCODE_BINARY:
            action = ("keys", data)
        elif opcode == websocket.ABNF.OPCODE_TEXT:
            action = terminal_input(data)
        else:
            return True
        if action is None:
            return True
        if action[0] == "resize":
            if not self.console.resize(action[1], action[2]):
                return False
        elif len(pending) + len(action[1]) <= TERMINAL_INPUT_BUFFER:
            pending += action[1]
        elif DROPPED_INPUT_LOG(self.request_id):
            log.warning("terminal session %s: the shell is not reading its input; keystrokes beyond "
                        "%d KiB are dropped", self.request_id[:8], TERMINAL_INPUT_BUFFER >> 10)
        return True

    def pump_output(self):
        """Console to socket until the shell side closes."""
        try:
            while not self.done.is_set():
                data = self.console.read(0.5)
                if data is None:
                    continue
                if not data:
                    return self.end(goodbye=True)  # the shell is gone; the socket is fine
                self.ws.send_binary(data)
        except Exception:
            pass
        finally:
            self.end()

    def end(self, goodbye=False):
        with self.end_lock:
            if self.done.is_set():
                return
            self.done.set()
        if self.console is not None:
            self.console.end()
            self.unregister(self)
        drop_socket(self.ws, goodbye)
        log.info("terminal session %s ended", self.request_id[:8])


# -- dispatch ----------------------------------------------------------------------

# terminal refusals waiting for the one thread that dials to say so; beyond
# this a refusal is only logged
TERMINAL_REFUSALS_WAITING = 8


class WorkerPool:
    """Up to `size` long-lived daemon threads (named `name`) taking jobs in
    order, and at most `backlog` jobs waiting beyond them: a burst of events
    costs no thread each, and no thread is started and ended per task (glibc
    keeps the stacks of ended threads, memory that does not come back)."""

    def __init__(self, name, size, backlog=0):
        self.name, self.size, self.backlog = name, size, backlog
        self.cond = threading.Condition()
        self.jobs = []
        self.threads = self.idle = 0

    def submit(self, job, *args):
        """False, and nothing queued, when every thread is busy and the
        backlog is full."""
        with self.cond:
            unserved = len(self.jobs) - self.idle  # queued jobs no idle thread is left for
            if unserved >= 0 and self.threads >= self.size and unserved >= self.backlog:
                return False
            self.jobs.append((job, args))
            if unserved >= 0 and self.threads < self.size:
                self.threads += 1
                self.idle += 1   # counted idle from now: the job is its
                threading.Thread(target=self._work, name=self.name, daemon=True).start()
            else:
                self.cond.notify()
            return True

    def _work(self):
        while True:
            with self.cond:
                while not self.jobs:
                    self.cond.wait()
                self.idle -= 1
                job, args = self.jobs.pop(0)
            try:
                job(*args)
            except Exception:
                log.exception("a %s task failed", self.name)
            with self.cond:
                self.idle += 1


class Tasks:
    """Runs the panel's events on worker pools (WorkerPool), one per kind of
    task and each as large as that kind's limit, so the report socket's
    reader and the report schedule are never held up, and a burst of events
    is refused beyond the limits rather than given a thread each."""

    def __init__(self, cfg, panel, deliver_result, send_ping_result, ledger=None):
        """`deliver_result(result, refusal)` keeps an exec result until the
        panel has it; `send_ping_result(task_id, kind, value)` is False when
        no link could carry it; `ledger` (a RunLedger) knows the execs
        already run."""
        self.cfg, self.panel, self.ledger = cfg, panel, ledger
        self.deliver_result, self.link_ping_result = deliver_result, send_ping_result
        # an exec's slot is freed before its result is spooled: room for as many more
        self.exec_pool = WorkerPool("exec", cfg.max_execs, cfg.max_execs)
        self.probe_pool = WorkerPool("ping", MAX_PROBES, MAX_PROBES_WAITING)
        self.terminal_pool = WorkerPool("terminal", cfg.max_terminals, cfg.max_terminals)  # as for exec
        self.refusal_pool = WorkerPool("terminal-refusal", 1, TERMINAL_REFUSALS_WAITING)
        self.error_once = OncePer()
        self.refusal_log = OncePer(60.0)
        self.lock = threading.Lock()
        self.execs = {}        # pid -> Script of running commands
        self.exec_threads = 0  # commands whose result is not spooled yet
        self.execs_done = threading.Condition(self.lock)
        self.terminals = set()  # live TerminalSession objects
        self.exec_slots = threading.BoundedSemaphore(self.cfg.max_execs)
        self.terminal_slots = threading.BoundedSemaphore(self.cfg.max_terminals)
        self.probe_slots = ProbeSlots()
        self.request_ids = {}   # terminal request ids already answered (a bounded, ordered set)
        self.icmp = IcmpProber()
        self.closing = False
        load_task_support()

    def handle(self, data):
        event = parse_event(data)
        if event is not None:
            self.dispatch(event)

    def dispatch(self, event):
        """Run one event in the v1 shape (v2 events arrive converted)."""
        kind = event.get("message")
        if event.get("status") == "error" and not kind:
            text = clipped(event.get("error") or event.get("message") or "", 200)
            if self.error_once(text):
                log.warning("the panel reported an error: %s", text)
            return
        handlers = {"exec": self.on_exec, "ping": self.on_ping, "terminal": self.on_terminal}
        handler = handlers.get(kind) if isinstance(kind, str) else None
        if handler is None:
            log.info("ignoring an unknown event %r from the panel", str(kind)[:40])
            return
        handler(event)

    # -- exec --------------------------------------------------------------
    def on_exec(self, event):
        task_id, command = exec_request(event)
        if task_id is None:
            log.warning("ignoring an exec event without a task id")
            return
        if self.ledger is not None and self.run_before(task_id, *self.ledger.claim(task_id, record=False)):
            return
        if not command.strip():
            return self.finish_exec(task_id, "No command provided", 0, refusal=True)
        if self.cfg.disable_web_ssh:
            log.warning("refused remote command %s: remote control is disabled (--disable-web-ssh)", task_id[:40])
            return self.finish_exec(task_id, DISABLED_EXEC, -1, refusal=True)
        if self.closing:
            return
        if not self.exec_slots.acquire(blocking=False):
            log.warning("refused remote command %s: %d already running (--max-execs)", task_id[:40], self.cfg.max_execs)
            return self.finish_exec(task_id, "Refused: %d commands are already running on this server (--max-execs %d)."
                                    % (self.cfg.max_execs, self.cfg.max_execs), -1, refusal=True)
        if self.ledger is not None and self.run_before(task_id, *self.ledger.claim(task_id)):
            self.exec_slots.release()
            return
        with self.lock:
            self.exec_threads += 1
        self.exec_pool.submit(self.run_exec, task_id, command)

    def run_before(self, task_id, state, kept):
        """Deal with an exec the ledger knows; False for a new one."""
        if state == "new":
            return False
        if state == "done":
            log.info("remote command %s already run; sending its kept result again", clipped(task_id, 40))
            self.deliver_result(kept, False)
        elif state == "running":
            log.info("remote command %s is running already; not again", clipped(task_id, 40))
        else:
            log.warning("remote command %s was started before the agent restarted and its result was lost; "
                        "not running it again", clipped(task_id, 40))
            self.deliver_result(task_result(task_id, "komari-agent: the agent stopped while this command ran; "
                                            "its output was lost and it was not run again.", -1), False)
        return True

    def run_exec(self, task_id, command):
        try:
            try:
                log.info("running remote command %s (%d bytes)", task_id[:40], len(command))
                log.debug("remote command %s: %r", task_id[:40], command[:500])
                text, code, timed_out = run_command(command, self.cfg.exec_timeout, self.cfg.exec_max_output,
                                                    started=self.exec_started)
                if timed_out:
                    log.warning("remote command %s timed out after %gs and was killed",
                                task_id[:40], self.cfg.exec_timeout)
                elif self.closing and code == -1:
                    text += "%s[komari-agent: the agent was stopped; the command's process group was killed]" \
                        % ("\n" if text and not text.endswith("\n") else "")
            except Exception as e:
                log.exception("remote command %s failed", task_id[:40])
                text, code = "komari-agent: the command could not be run (%s)" % type(e).__name__, -1
            finally:
                self.exec_slots.release()
            self.finish_exec(task_id, text, code)
        finally:
            with self.lock:
                self.exec_threads -= 1
                self.execs_done.notify_all()

    def exec_started(self, script):
        with self.lock:
            self.execs[script.proc.pid] = script
            closing = self.closing
        if closing:
            script.tree.end()

    def finish_exec(self, task_id, text, code, refusal=False):
        with self.lock:
            for pid in [pid for pid, script in self.execs.items() if script.proc.returncode is not None]:
                del self.execs[pid]
        self.deliver_result(task_result(task_id, text, code), refusal)

    # -- ping --------------------------------------------------------------
    def on_ping(self, event):
        request = ping_request(event)
        if request is None:
            if self.refusal_log("bad-ping"):
                log.warning("ignoring a malformed ping event (task id %r)", str(event.get("ping_task_id"))[:20])
            return
        task_id, kind, target = request
        if not self.probe_slots.admit():
            if self.refusal_log("ping-busy"):
                log.warning("too many ping probes at once (%d); reporting loss", MAX_PROBES + MAX_PROBES_WAITING)
            return self.send_ping_result(task_id, kind, -1)
        if not self.probe_pool.submit(self.run_probe, task_id, kind, target):
            self.probe_slots.finish(None, False)
            return self.send_ping_result(task_id, kind, -1)

    def run_probe(self, task_id, kind, target):
        slot = (kind.lower(), target.strip().lower())
        started = False
        value = -1
        try:
            started = self.probe_slots.start(slot)
            if started:
                value = settle_latency(lambda: self.measure(kind.lower(), target), kind.lower())
            elif self.refusal_log("ping-wait"):
                log.warning("no free ping probe slot within %gs (a slow target?); reporting loss", PROBE_TIMEOUT)
        except Exception:
            log.exception("ping probe %d failed", task_id)
        finally:
            self.probe_slots.finish(slot, started)
        self.send_ping_result(task_id, kind, value)

    def measure(self, kind, target):
        """Milliseconds for one probe of `kind`, None on failure."""
        if kind == "tcp":
            return tcp_connect_ms(self.cfg, target)
        if kind == "http":
            return http_get_ms(self.cfg, target)
        if kind == "icmp":
            parsed = split_host_port(target)
            deadline = time.monotonic() + PROBE_TIMEOUT
            found = first_address(self.cfg, parsed[0] if parsed else target, deadline)
            remaining = deadline - time.monotonic()
            return None if found is None or remaining <= 0 else self.icmp(found[0], found[1], remaining)
        if self.refusal_log(("ping-type", kind[:20])):
            log.warning("unsupported ping type %r; reporting loss", kind[:20])
        return None

    def send_ping_result(self, task_id, kind, value):
        if not self.link_ping_result(task_id, kind, value):
            log.debug("ping result %d dropped: no report link", task_id)

    # -- terminal ----------------------------------------------------------
    def on_terminal(self, event):
        request_id = terminal_request(event)
        if request_id is None:
            log.warning("ignoring a terminal event without a usable request id")
            return
        with self.lock:
            if request_id in self.request_ids:
                log.warning("ignoring a repeated terminal request %s", request_id[:8])
                return
            self.request_ids[request_id] = True
            while len(self.request_ids) > 256:
                del self.request_ids[next(iter(self.request_ids))]
        if self.closing:
            return
        url = self.panel.ws_url(TERMINAL_PATH, id=request_id)
        if self.cfg.disable_web_ssh:
            log.warning("refused a terminal session: remote control is disabled (--disable-web-ssh)")
            return self.queue_refusal(url, DISABLED_TERMINAL)
        if not self.terminal_slots.acquire(blocking=False):
            if self.refusal_log("terminals-busy"):
                log.warning("refused a terminal session: %d already open (--max-terminals)", self.cfg.max_terminals)
            return self.queue_refusal(url, "\r\nRefused: %d terminal sessions are already open on this server "
                                      "(--max-terminals %d). Close one and try again.\r\n"
                                      % (self.cfg.max_terminals, self.cfg.max_terminals))
        if not self.terminal_pool.submit(self.run_terminal, request_id, url):
            self.terminal_slots.release()

    def queue_refusal(self, url, text):
        """The refusal is said on the terminal's socket, dialled by one thread;
        a burst past TERMINAL_REFUSALS_WAITING is only logged."""
        if not self.refusal_pool.submit(self.refuse_terminal, url, text) and self.refusal_log("refusals-busy"):
            log.warning("too many terminal requests at once; refusing the rest without an answer")

    def run_terminal(self, request_id, url):
        freed = []

        def free_slot(session=None):
            # at the session's end, not when its threads are done: a dropped
            # link must never keep a slot
            with self.lock:
                if session is not None:
                    self.terminals.discard(session)
                if freed:
                    return
                freed.append(True)
            self.terminal_slots.release()
        try:
            ws = self.dial_terminal(url)
            if ws is not None:
                TerminalSession(ws, request_id, self.terminal_started, free_slot).run()
        finally:
            free_slot()

    def dial_terminal(self, url):
        try:
            return open_websocket(self.cfg, url)
        except Exception as e:
            log.warning("cannot open the terminal socket: %s", handshake_problem(e))
            return None

    def refuse_terminal(self, url, text):
        ws = self.dial_terminal(url)
        if ws is None:
            return
        try:
            ws.send(text)
        except Exception:
            pass
        drop_socket(ws)

    def terminal_started(self, session):
        with self.lock:
            self.terminals.add(session)
            closing = self.closing
        if closing:
            session.end()

    def shutdown(self):
        """Called once on SIGTERM/SIGINT: every running command and terminal
        session loses its whole process tree (the process is about to exit,
        so this does not wait for the sessions' own threads)."""
        with self.lock:
            self.closing = True
            commands = [script.tree for script in self.execs.values() if script.proc.returncode is None]
            shells = [session.console.tree for session in self.terminals if session.console is not None]
        for tree in shells:
            tree.hang_up()
        for tree in commands:
            tree.end()
        deadline = time.monotonic() + 0.3
        while shells and time.monotonic() < deadline and any(tree.alive() for tree in shells):
            time.sleep(0.05)
        for tree in shells:
            tree.end()
        # the killed commands' results go to the spool before the process exits
        with self.lock:
            self.execs_done.wait_for(lambda: self.exec_threads == 0, EXEC_SPOOL_WAIT)


# ---------------------------------------------------------------------------
# Self-update: a release replaces this file only once verified and seen reaching the panel
# ---------------------------------------------------------------------------
#
# Who does what. The way back cannot be left to the new code, which may be
# the broken part, so the old version stays the parent until the new one has
# reached the panel:
# - At start, before the first link (update_at_start), and for `update` run
#   by hand with no agent running: the feed is asked, the new komari_agent.py
#   downloaded and checked against SHA256SUMS and requirements.txt, staged
#   beside this file, compiled, run with --version and with --check and the
#   same settings, and then run for real as a CHILD of this process (same
#   arguments, same environment, same state directory) for up to
#   TRIAL_SECONDS. Only when the child's status.json says "connected" is it
#   stopped, this file replaced atomically (the old one kept as .previous)
#   and the new version started: exit 42 where a service manager restarts us
#   (SUPERVISED_ENV, set by install.sh's services), else exec in place (by
#   hand, cron; EXEC_IN_PLACE). A child that exits or is not connected in time is stopped,
#   the release is skipped until a newer one (update.json), and this process
#   runs on as the old version: the installed file was never touched, so a
#   crash or a kill during the trial cannot leave an untried version behind.
# - A running agent (Updater, the "update" thread) only asks the feed, every
#   UPDATE_EVERY and on SIGUSR1 (`update` run by hand); a newer release that
#   downloads with the right checksum makes it stop and start again, since a
#   trial needs the panel link free: the fresh start does the above.

# The project's release location. install.sh's DEFAULT_AGENT_URL names the
# same repository (a test holds them equal); OWNER/REPO is the placeholder
# until the project publishes releases, and no feed is asked meanwhile.
RELEASE_REPOSITORY = "OWNER/REPO"
PLACEHOLDER_REPOSITORY = "OWNER/REPO"
DEFAULT_UPDATE_URL = "https://api.github.com/repos/%s/releases/latest" % RELEASE_REPOSITORY
UPDATE_EVERY = 6 * 3600.0       # as the official agent
RESTART_STATUS = 42             # the official agent's; install.sh's services restart on it
# Set (to anything but "" or "0") by the services install.sh writes: they
# restart the agent when it exits with RESTART_STATUS. Without it the agent
# executes the new version in place, which works under anything.
SUPERVISED_ENV = "KOMARI_AGENT_SUPERVISED"
TRIAL_ENV = "KOMARI_UPDATE_TRIAL"    # set for the trial child: its parent does the updating
TRIAL_SECONDS = 60.0
TRIAL_HOLD = 2.0      # and still connected this long after: its first reports went out
TRIAL_SECONDS_ENV = "KOMARI_UPDATE_TRIAL_SECONDS"   # shorter trials, for tests (docs/UPDATING.md)
FEED_TIMEOUT = 10.0             # a start waits at most this for a feed that does not answer
DOWNLOAD_TIMEOUT = 60.0
FEED_LIMIT, AGENT_LIMIT, SMALL_LIMIT = 1 << 20, 8 << 20, 64 << 10
AGENT_ASSET, SUMS_ASSET, REQUIREMENTS_ASSET = "komari_agent.py", "SHA256SUMS", "requirements.txt"
# requirements.txt (a test holds them equal): a release needing others waits for install.sh
REQUIREMENTS = ("psutil>=5.6", "websocket-client>=1.0")
UPDATE_FILE = "update.json"
# Written by the agent loop's LinkStatus; a trial run is judged by it.
STATUS_FILE = "status.json"
STAGED_SUFFIX, PREVIOUS_SUFFIX = ".update", ".previous"
# Set by SIGUSR1 (main() installs the handler): `update` run by hand asks a running agent.
UPDATE_WANTED = threading.Event()
COMPILE_ONLY = "import sys; compile(open(sys.argv[1], 'rb').read(), sys.argv[1], 'exec')"

Release = namedtuple("Release", "tag version prerelease assets")


class UpdateProblem(AgentError):
    """Why a release was not taken, in one line. `skip`: the release itself
    is at fault (it does not compile, refuses the settings, never linked), so
    asking again will not help until a newer one appears."""

    def __init__(self, message, skip=False):
        super().__init__(message)
        self.skip = skip


def update_feed(cfg):
    return cfg.update_url or DEFAULT_UPDATE_URL


def version_key(text):
    """(0, 2, 0, 0) for "0.2.0" or "v0.2.0", padded so that 0.2 == 0.2.0;
    None for anything else ("0.3.0-rc1", "dev"), which is never installed."""
    match = re.match(r"[vV]?(\d{1,9}(?:\.\d{1,9}){0,3})$", (text or "").strip())
    if not match:
        return None
    numbers = [int(n) for n in match.group(1).split(".")]
    return tuple(numbers + [0] * (4 - len(numbers)))


def update_impossible(cfg):
    """Why this agent cannot update itself here, as one line, or ""."""
    if PLACEHOLDER_REPOSITORY in update_feed(cfg):
        return ("no release feed yet: the project's address is still the placeholder %s; "
                "--update-url URL names one" % PLACEHOLDER_REPOSITORY)
    problem = not_replaceable(SCRIPT_PATH)
    if problem:
        return "not updating: %s" % problem
    problem = private_directory(state_dir(cfg))
    if problem:
        return "not updating: %s, where a new version's first link would be watched" % problem
    return ""


def not_replaceable(path):
    """Why `path` is not ours to replace, or "": a link, a package manager's
    or a git checkout's file, or one this user cannot write."""
    if os.path.islink(path):
        return "%s is a symbolic link" % path
    if re.match(r"/usr/(?!local/)", path) or re.search(r"[/\\](site|dist)-packages[/\\]", path):
        return "%s belongs to a package manager; update it with that" % path
    directory = os.path.dirname(path)
    parent = directory
    while True:
        if os.path.exists(os.path.join(parent, ".git")):
            return "%s is in a git checkout; update it with git" % path
        if os.path.dirname(parent) == parent:
            break
        parent = os.path.dirname(parent)
    if not (os.access(path, os.W_OK) and os.access(directory, os.W_OK | os.X_OK)):
        return "%s cannot be written by this user (a read-only install)" % path
    return ""


def trial_seconds():
    try:
        return min(TRIAL_SECONDS, max(1.0, float(os.environ.get(TRIAL_SECONDS_ENV, TRIAL_SECONDS))))
    except ValueError:
        return TRIAL_SECONDS


# -- the release feed ----------------------------------------------------------------

def fetch_limited(cfg, url, limit, timeout, accept="*/*"):
    """The body of a GET to `url`, at most `limit` bytes, redirects followed
    only to https:// (or to loopback); UpdateProblem otherwise. Certificates
    are verified even with --ignore-unsafe-cert, which is for the panel: what
    comes from here is run. A private CA goes in SSL_CERT_FILE."""
    import urllib.error
    import urllib.request
    problem = code_url_problem(url)
    if problem:
        raise UpdateProblem("%s %s" % (url, problem))

    class CheckedRedirects(urllib.request.HTTPRedirectHandler):
        def redirect_request(self, req, fp, code, msg, headers, newurl):
            if code_url_problem(newurl):
                raise urllib.error.URLError("redirected to %s, which %s" % (newurl, code_url_problem(newurl)))
            return super().redirect_request(req, fp, code, msg, headers, newurl)
    cutter = ConnectionCutter(timeout)
    dial = (lambda address, timeout=None, source_address=None: dial_tcp(cfg, address[0], address[1], timeout)) \
        if cfg.custom_dns else None
    opener = urllib.request.build_opener(*cuttable_handlers(cutter, ssl.create_default_context(), dial),
                                         CheckedRedirects())
    request = urllib.request.Request(url, headers={"User-Agent": "komari-agent-py/" + __version__, "Accept": accept})
    try:
        with opener.open(request, timeout=timeout) as reply:
            body = reply.read(limit + 1)
    except urllib.error.HTTPError as e:
        raise UpdateProblem("%s answered HTTP %d" % (url, e.code))
    except (OSError, ValueError, http_exceptions()) as e:
        error = http_failure(e, cutter)
        raise UpdateProblem("%s: %s" % (url, getattr(error, "strerror", None) or str(error) or type(error).__name__))
    finally:
        cutter.cancel()
    if len(body) > limit:
        raise UpdateProblem("%s is larger than %d bytes" % (url, limit))
    return body


def parse_release(body):
    """A GitHub-style release (tag_name, prerelease, assets[].name and
    .browser_download_url) from the feed's answer; UpdateProblem if it is none."""
    try:
        data = json.loads(body.decode("utf-8"))
    except ValueError:
        data = None
    if not isinstance(data, dict) or not isinstance(data.get("tag_name"), str):
        raise UpdateProblem("the release feed answered %s, not a release with a tag_name" % describe_body(body))
    assets = {}
    for asset in data.get("assets") if isinstance(data.get("assets"), list) else ():
        if isinstance(asset, dict) and isinstance(asset.get("name"), str) \
                and isinstance(asset.get("browser_download_url"), str):
            assets[asset["name"]] = asset["browser_download_url"]
    tag = data["tag_name"].strip()[:80]
    return Release(tag, version_key(tag), data.get("prerelease") is True, assets)


def latest_release(cfg):
    return parse_release(fetch_limited(cfg, update_feed(cfg), FEED_LIMIT, FEED_TIMEOUT,
                                       accept="application/vnd.github+json"))


def listed_sha256(sums, name):
    """The SHA-256 that a SHA256SUMS file (sha256sum's output) gives for `name`, or None."""
    for line in sums.decode("utf-8", "replace").splitlines():
        match = re.match(r"\s*([0-9a-fA-F]{64})\s+\*?(.+?)\s*$", line)
        if match and os.path.basename(match.group(2)) == name:
            return match.group(1).lower()
    return None


def requirement_lines(text):
    """The requirements in a requirements.txt, as compared: no comments,
    blanks, spaces or case."""
    lines = (line.split("#", 1)[0].replace(" ", "").lower() for line in text.splitlines())
    return sorted(line for line in lines if line)


def checked_asset(cfg, release, sums, name, limit):
    """An asset of `release`, downloaded, with the SHA-256 that `sums` lists for it."""
    import hashlib
    data = fetch_limited(cfg, release.assets[name], limit, DOWNLOAD_TIMEOUT)
    want = listed_sha256(sums, name)
    if want is None:
        raise UpdateProblem("%s not taken: its %s does not list %s" % (release.tag, SUMS_ASSET, name))
    if hashlib.sha256(data).hexdigest() != want:
        raise UpdateProblem("%s not taken: the SHA-256 of its %s does not match %s" % (release.tag, name, SUMS_ASSET))
    return data


# -- the state: the skipped release, the steps ------------------------------------------

class UpdateLog:
    """update.json in the state directory: the release a failed trial ruled
    out (skipped until a newer one) and the last steps, each also said as one
    line (logged by the agent, printed by `update`). `update` run by hand
    follows a running agent's steps here."""

    KEEP = 40

    def __init__(self, directory, say):
        self.path = os.path.join(directory, UPDATE_FILE)
        self.say = say      # say(level, line)

    def load(self):
        try:
            return read_json_object(self.path, 1 << 20)
        except (OSError, ValueError):
            return {}

    def save(self, data):
        try:
            write_atomic(self.path, (json.dumps(data, indent=1) + "\n").encode("utf-8"), mode=0o644)
        except OSError as e:
            log.debug("cannot write %s: %s", self.path, describe_error(e))

    def steps(self):
        steps = self.load().get("steps")
        return [s for s in steps if isinstance(s, dict) and isinstance(s.get("seq"), int)] \
            if isinstance(steps, list) else []

    def step(self, line, final=False, ok=True):
        """Say `line`; `final`: the last step of a check, `ok` whether it went well."""
        line = redacted(line)
        self.say(logging.INFO if ok else logging.WARNING, line)
        data = self.load()
        steps = self.steps()
        seq = steps[-1]["seq"] + 1 if steps else 1
        steps.append({"seq": seq, "at": rfc3339_now(), "line": line, "final": final, "ok": ok})
        data["steps"] = steps[-self.KEEP:]
        self.save(data)

    def skipped(self):
        skip = self.load().get("skip")
        return skip if isinstance(skip, dict) and version_key(str(skip.get("tag"))) else None

    def skip(self, release, why):
        data = self.load()
        data["skip"] = {"tag": release.tag, "why": why, "at": rfc3339_now()}
        self.save(data)

    def forget_skip(self):
        data = self.load()
        if data.pop("skip", None) is not None:
            self.save(data)


# -- finding, checking, trying, installing --------------------------------------------

def fetch_update(cfg, steps, retry_skipped=False):
    """(release, its komari_agent.py) when the feed has a newer stable
    release, not skipped, whose file matches SHA256SUMS and whose
    requirements.txt is ours; None (said) when there is nothing to take."""
    release = latest_release(cfg)
    current = version_key(__version__)
    if current is None:
        steps.step("update: %s is not a release version; not updating" % __version__, final=True)
        return None
    if release.version is None or release.prerelease:
        steps.step("update: the latest release, %s, is a pre-release; staying at %s" % (release.tag, __version__),
                   final=True)
        return None
    if release.version <= current:
        steps.step("update: %s is up to date (latest release: %s)" % (__version__, release.tag), final=True)
        return None
    skip = steps.skipped()
    if skip and not retry_skipped and release.version <= version_key(skip["tag"]):
        steps.step("update: %s is skipped (%s); waiting for a newer release, or `%s update` to try it again"
                   % (release.tag, skip.get("why"), PROG), final=True)
        return None
    steps.step("update: found %s (running %s)" % (release.tag, __version__))
    missing = [name for name in (AGENT_ASSET, SUMS_ASSET) if name not in release.assets]
    if missing:
        raise UpdateProblem("%s not taken: it has no %s" % (release.tag, " or ".join(missing)))
    sums = fetch_limited(cfg, release.assets[SUMS_ASSET], SMALL_LIMIT, DOWNLOAD_TIMEOUT)
    data = checked_asset(cfg, release, sums, AGENT_ASSET, AGENT_LIMIT)
    if REQUIREMENTS_ASSET in release.assets:
        needs = checked_asset(cfg, release, sums, REQUIREMENTS_ASSET, SMALL_LIMIT)
        needs = requirement_lines(needs.decode("utf-8", "replace"))
        if needs != requirement_lines("\n".join(REQUIREMENTS)):
            raise UpdateProblem("%s not taken: it needs %s (this one: %s); re-run install.sh to install it"
                                % (release.tag, ", ".join(needs)[:200], ", ".join(REQUIREMENTS)))
    steps.step("update: %s downloaded; its SHA-256 matches %s" % (release.tag, SUMS_ASSET))
    return release, data


def run_python(args, timeout=30.0):
    """(exit status or None, stdout, last line of stderr) of this Python with `args`."""
    import subprocess
    try:
        done = subprocess.run([sys.executable] + list(args), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, timeout=timeout, env=trial_environment())
    except subprocess.TimeoutExpired:
        return None, "", "no answer within %g s" % timeout
    except OSError as e:
        return None, "", describe_error(e)
    lines = done.stderr.decode("utf-8", "replace").strip().splitlines()
    return done.returncode, done.stdout.decode("utf-8", "replace"), redacted(lines[-1].strip()) if lines else ""


def trial_environment():
    return dict(os.environ, **{TRIAL_ENV: "1"})


def verify_staged(path, release, argv):
    """UpdateProblem unless the file at `path` compiles, says it is `release`
    and accepts these settings (`argv`, the environment, the config file)."""
    status, _, last = run_python(["-c", COMPILE_ONLY, path])
    if status != 0:
        raise UpdateProblem("%s not taken: it does not compile (%s)" % (release.tag, last), skip=True)
    status, out, last = run_python([path, "--version"])
    said = out.split()[-1] if status == 0 and out.split() else last
    if version_key(said) != release.version:
        raise UpdateProblem("%s not taken: its --version says %r" % (release.tag, said[:80]), skip=True)
    status, _, last = run_python([path] + list(argv) + ["--check"])
    if status != 0:
        raise UpdateProblem("%s not taken: its --check refuses these settings (%s)" % (release.tag, last), skip=True)


def panel_reachable(cfg):
    """Can a TCP connection to the panel be opened now (True where a proxy
    opens it for us)? A trial while the panel is down would blame the release."""
    from urllib.parse import urlsplit
    if environment_proxy(cfg.endpoint):
        return True
    parts = urlsplit(cfg.endpoint)
    try:
        drop_tcp(dial_tcp(cfg, parts.hostname, parts.port or (443 if parts.scheme == "https" else 80),
                          WS_CONNECT_TIMEOUT))
        return True
    except (OSError, ValueError):
        return False


def relay_lines(pipe, last):
    """Copy a child's stderr to ours line by line, keeping its last line in `last`."""
    for raw in pipe:
        line = raw.decode("utf-8", "replace").rstrip("\n")
        if line.strip():
            last[:] = [line]
        try:
            sys.stderr.write(line + "\n")
            sys.stderr.flush()
        except (OSError, ValueError):
            pass


def trial_status(path, pid):
    """The trial child's status.json (state, error), or {} before it writes one."""
    try:
        status = read_json_object(path, 1 << 16)
    except (OSError, ValueError):
        return {}
    return status if status.get("pid") == pid else {}


def trial_run(path, argv, directory, stop, seconds):
    """Run the file at `path` as the agent, a child of this process, until
    its status.json has said connected for TRIAL_HOLD seconds, it exits,
    `seconds` pass or `stop` is set; then stop it (SIGTERM: it saves its
    state). Returns (outcome, detail): ("connected", seconds it took),
    ("refused", the panel's words), ("stopped", None) when stopped from
    outside, or ("failed", why)."""
    import subprocess
    status_path = os.path.join(directory, STATUS_FILE)
    started = time.monotonic()
    child = subprocess.Popen([sys.executable, path] + list(argv), stdin=subprocess.DEVNULL, stderr=subprocess.PIPE,
                             env=trial_environment())
    last, connected = [], None
    relay = threading.Thread(target=relay_lines, args=(child.stderr, last), name="trial-log", daemon=True)
    relay.start()
    try:
        while True:
            status = trial_status(status_path, child.pid)
            took = time.monotonic() - started
            connected = (took if connected is None else connected) if status.get("state") == "connected" else None
            if connected is not None and took - connected >= TRIAL_HOLD and child.poll() is None:
                return "connected", connected
            if status.get("state") == "refused":
                return "refused", redacted(str(status.get("error")))[:200]
            code = child.poll()
            if code == 0 or stop.is_set():
                # the agent exits 0 only when told to stop (SIGTERM, Ctrl-C
                # to the terminal's group): not the release's fault
                return "stopped", None
            if code is not None:
                said = re.sub(r"^\d{4}/\d\d/\d\d \d\d:\d\d:\d\d (\w+ )?", "", last[0]) if last else "no message"
                return "failed", "exited with status %d %s reaching the panel (%s)" % (
                    code, "before" if connected is None else "just after", redacted(said)[:200])
            if took >= seconds:
                seen = "%s: %s" % (status["state"], status.get("error") or "no error") if status else "no status.json"
                return "failed", "did not reach the panel within %g s (its last state: %s)" % (
                    seconds, redacted(seen)[:200])
            stop.wait(0.1)
    finally:
        if child.poll() is None:
            child.terminate()
            try:
                child.wait(10.0)
            except subprocess.TimeoutExpired:
                child.kill()
                child.wait()
        relay.join(1.0)


def install_file(data, path=SCRIPT_PATH):
    """Replace `path` with `data` atomically, its bytes so far kept as
    path.previous, with the same mode and owner, and refresh its cached
    bytecode."""
    old = read_regular_file(path, AGENT_LIMIT, follow=False)
    st = os.stat(path)
    for target, content in ((path + PREVIOUS_SUFFIX, old), (path, data)):
        write_atomic(target, content, mode=st.st_mode & 0o7777)
        try:   # root updating a file that belongs to the agent's user
            if os.stat(target).st_uid != st.st_uid:
                os.chown(target, st.st_uid, st.st_gid)
        except (AttributeError, OSError):
            pass
    refresh_bytecode(path)


def refresh_bytecode(path):
    """Rewrite this Python's cached bytecode of `path` where there is one,
    and drop other versions' (an import would otherwise trust a cache whose
    source stamp, mtime and size, matches by chance)."""
    import importlib.util
    import py_compile
    cache = os.path.join(os.path.dirname(path), "__pycache__")
    stem = os.path.splitext(os.path.basename(path))[0] + "."
    mine = importlib.util.cache_from_source(path)
    try:
        names = [n for n in os.listdir(cache) if n.startswith(stem) and n.endswith(".pyc")]
        for name in names:
            if os.path.join(cache, name) != mine:
                os.unlink(os.path.join(cache, name))
        if os.path.exists(mine):
            py_compile.compile(path, cfile=mine, doraise=True)
    except (OSError, py_compile.PyCompileError) as e:
        log.debug("cannot refresh the bytecode in %s: %s", cache, describe_error(e))


def install_update(cfg, argv, stop, steps, release, data):
    """Stage `data` (the release's komari_agent.py) beside this file, verify
    it, try it as the agent, and install it if it reached the panel. True
    when installed; UpdateProblem when not taken."""
    staged = SCRIPT_PATH + STAGED_SUFFIX
    try:
        try:
            write_atomic(staged, data, mode=0o644)
        except OSError as e:
            raise UpdateProblem("cannot write %s: %s" % (staged, describe_error(e)))
        verify_staged(staged, release, argv)
        steps.step("update: %s verified: it compiles, its --version agrees, its --check accepts these settings"
                   % release.tag)
        if not panel_reachable(cfg):
            raise UpdateProblem("%s not tried: the panel cannot be reached now" % release.tag)
        outcome, detail = trial_run(staged, argv, state_dir(cfg), stop, trial_seconds())
        if outcome == "stopped":
            steps.step("update: stopped while trying %s; nothing changed" % release.tag, final=True, ok=False)
            return False
        if outcome == "refused":
            raise UpdateProblem("%s not tried: the panel refuses the token (%s)" % (release.tag, detail))
        if outcome != "connected":
            raise UpdateProblem("rolled back to %s: %s %s" % (__version__, release.tag, detail), skip=True)
        steps.step("update: %s reached the panel %.1f s after starting" % (release.tag, detail))
        try:
            install_file(data)
        except OSError as e:
            raise UpdateProblem("cannot replace %s: %s" % (SCRIPT_PATH, describe_error(e)))
        steps.step("update: swapped: %s is now %s; %s kept as %s" % (SCRIPT_PATH, release.tag, __version__,
                                                                    os.path.basename(SCRIPT_PATH) + PREVIOUS_SUFFIX),
                   final=True)
        return True
    finally:
        try:
            os.unlink(staged)
        except OSError:
            pass


def try_update(cfg, argv, stop, steps, retry_skipped=False):
    """Find, check, try and install a newer release: "swapped" when this
    file now holds it, "current" when there is none to take, "failed" (said,
    and the release skipped when it is at fault)."""
    release = None
    try:
        found = fetch_update(cfg, steps, retry_skipped)
        if found is None:
            return "current"
        release = found[0]
        return "swapped" if install_update(cfg, argv, stop, steps, *found) else "failed"
    except UpdateProblem as e:
        if e.skip and release is not None:
            steps.skip(release, str(e))
        then = "skipped until a newer release" if e.skip else "trying again at the next check"
        steps.step("update: %s; %s" % (e, then), final=True, ok=False)
    except Exception as e:  # a fault here must never keep the agent from running
        log.debug("update failed", exc_info=True)
        steps.step("update: failed (%s: %s); trying again at the next check" % (type(e).__name__, e),
                   final=True, ok=False)
    return "failed"


def restart_self(argv, why):
    """Start this file afresh with the same arguments, saying `why`: the exit
    status for main() (RESTART_STATUS) where a service manager restarts the
    agent, else execute it in place (same pid, terminal and arguments); None
    when that failed."""
    if os.environ.get(SUPERVISED_ENV, "") not in ("", "0") or not EXEC_IN_PLACE:
        log.info("update: %s: exiting with status %d for the service manager to start %s again", why,
                 RESTART_STATUS, SCRIPT_PATH)
        return RESTART_STATUS
    command = own_command()
    log.info("update: %s: executing %s afresh, same arguments", why, " ".join(command[1:]))
    for handler in logging.getLogger().handlers:
        handler.flush()
    sys.stdout.flush()
    sys.stderr.flush()
    try:
        os.execv(command[0], command + list(argv))
    except OSError as e:
        log.error("update: cannot execute %s: %s", SCRIPT_PATH, describe_error(e))
    return None


def own_command():
    """How this agent was started, without its arguments: `python -m
    komari_agent` (install.sh's services, which start from the compiled
    bytecode) or `python path/komari_agent.py`."""
    if __name__ == "__main__" and __spec__ is not None and __spec__.name:
        return [sys.executable, "-m", __spec__.name]
    return [sys.executable, SCRIPT_PATH]


def update_at_start(cfg, argv, stop):
    """The check at start, before the first link: the exit status for main()
    to return when a new version takes over, else None (run on)."""
    if cfg.disable_auto_update or os.environ.get(TRIAL_ENV):
        return None   # a trial run's parent does the updating
    problem = update_impossible(cfg)
    if problem:
        log.info("update: %s", problem)
        return None
    if try_update(cfg, argv, stop, UpdateLog(state_dir(cfg), log.log)) != "swapped" or stop.is_set():
        return None
    return restart_self(argv, "taking over")


class Updater:
    """The "update" thread of a running agent: every UPDATE_EVERY (never with
    --disable-auto-update) and whenever UPDATE_WANTED is set, it asks the
    feed. A newer release that downloads with the right checksum sets
    `restart_wanted` and stops the agent; main() then restarts this file,
    whose start (update_at_start) tries and installs the release."""

    def __init__(self, cfg, agent):
        self.cfg, self.agent = cfg, agent
        self.restart_wanted = False
        self.steps = UpdateLog(state_dir(cfg), log.log)

    def start(self):
        threading.Thread(target=self.run, name="update", daemon=True).start()
        return self

    def run(self):
        every = None if self.cfg.disable_auto_update else UPDATE_EVERY
        while not self.agent.stop.is_set():
            UPDATE_WANTED.wait(every)
            UPDATE_WANTED.clear()
            if self.agent.stop.is_set():
                return
            if self.agent.link is None:
                self.steps.step("update: not checking while the panel is out of reach; trying again at the next "
                                "check", final=True, ok=False)
                continue
            try:
                found = fetch_update(self.cfg, self.steps)
            except Exception as e:  # UpdateProblem, or a fault that must not end the checks
                log.debug("update check failed", exc_info=True)
                self.steps.step("update: %s; trying again at the next check" % (
                    e if isinstance(e, UpdateProblem) else "failed (%s: %s)" % (type(e).__name__, e)),
                    final=True, ok=False)
                found = None
            return_free_memory()
            if found:
                self.steps.step("update: restarting, to try %s before the first link" % found[0].tag)
                self.restart_wanted = True
                self.agent.stop.set()
                return


def start_updater(cfg, agent):
    """The Updater of a running agent, or None where there is nothing to update (said at start)."""
    if os.environ.get(TRIAL_ENV) or update_impossible(cfg):
        return None
    return Updater(cfg, agent).start()


# ---------------------------------------------------------------------------
# The agent loop
# ---------------------------------------------------------------------------

def backoff_delay(base, round_number, cap=BACKOFF_CAP, rng=UNGUESSABLE.random):
    """Seconds to wait before the next connect attempt: `base` in the first
    round, doubling each round up to `cap`, with +-20% jitter so a fleet of
    agents does not reconnect in lockstep."""
    delay = min(cap, base * (2 ** min(round_number, 16)))
    return max(0.1, min(cap, delay * (0.8 + 0.4 * rng())))


class LinkStatus:
    """status.json in the state directory: the link's last state and error, for
    install.sh and for people (`cat state/status.json`). Written only when it
    changes, mode 0600 like everything in the state directory (install.sh
    reads it as the agent's user or as root); a failure to write it never
    stops the agent."""

    def __init__(self, directory):
        self.path = os.path.join(directory, STATUS_FILE)
        self.started = int(time.time())
        self.last = None

    def set(self, state, error=""):
        """state: starting, connecting, connected, disconnected or refused
        (the panel said no to the token: retrying will not help)."""
        error = redacted(error)
        if (state, error) == self.last:
            return
        self.last = (state, error)
        status = {"state": state, "error": error, "since": rfc3339_now(), "pid": os.getpid(),
                  "started": self.started, "version": __version__}
        try:
            write_atomic(self.path, (json.dumps(status, indent=1) + "\n").encode("utf-8"))
        except OSError:
            pass


def certificate_untrusted(error):
    """Whether `error` (or the error behind it) is a TLS certificate that
    failed verification: CERTIFICATE_VERIFY_FAILED, a self-signed panel."""
    for _ in range(5):  # urllib's URLError holds it as its reason
        if isinstance(error, ssl.SSLCertVerificationError) or "CERTIFICATE_VERIFY_FAILED" in str(error):
            return True
        reason = getattr(error, "reason", None)
        error = reason if isinstance(reason, BaseException) else error.__cause__ or error.__context__
        if error is None:
            break
    return False


# an outage shorter than this is redialled every --reconnect-interval, so the
# agent is back within that of the panel's return; only then does the wait grow
FAST_REDIAL_FOR = 600.0


def reconnect_delay(base, outage, rng=UNGUESSABLE.random):
    """Seconds to wait before the next connect attempt, `outage` seconds into
    an outage: `base` (less up to 20%: never later than the user asked) for
    the first FAST_REDIAL_FOR seconds, then doubling every minute to the cap,
    with jitter so a fleet of agents does not redial in lockstep."""
    if outage < FAST_REDIAL_FOR:
        return max(0.1, base * (0.8 + 0.2 * rng()))
    return backoff_delay(base, 1 + int((outage - FAST_REDIAL_FOR) // 60), rng=rng)


class Agent:
    """The running agent. Threads, and the Event that wakes each:
    - "agent" (run): dials a link (LinkChooser), then reports on it every
      period until it dies (serve); wakes by a plain sleep, checks `stop`.
    - "basic-info" (info_loop): on `info_wanted` (a new link, changed public
      addresses) and every --info-report-interval.
    - "results" (result_loop): POSTs spooled exec results on `results_due`.
    - "traffic" (sample_traffic_while_idle, with --month-rotate): counts
      traffic while no report has for a minute (no link yet, an outage).
    - per link: "ws-reader" (a socket link's frames), or "v2-pull" and
      "v2-ws-retry" (POST mode); each ends when the link's `dead` is set.
    - per event: "exec", "ping", "terminal" workers started by Tasks.
    The main thread waits on `stop` (SIGTERM, SIGINT) and calls shutdown()."""

    def __init__(self, cfg, stop=None):
        self.cfg = cfg
        self.stop = stop or threading.Event()
        self.panel = Panel(cfg)
        self.collector = Collector(cfg)
        self.collector.traffic = traffic_ledger(cfg)
        self.addresses = PublicAddresses(cfg, on_change=self.want_basic_info)
        self.ran = RunLedger(os.path.join(state_dir(cfg), RAN_DIR))
        self.tasks = Tasks(cfg, self.panel, self.deliver_result, self.send_ping_result, self.ran)
        self.inbox = Inbox(self.tasks.dispatch)
        self.chooser = LinkChooser(cfg, self.panel, self.inbox, self.tasks.handle,
                                   lambda: report_payload(self.collector.figures()))
        self.spool = ResultSpool(os.path.join(state_dir(cfg), SPOOL_DIR))
        self.results_due = threading.Event()
        self.link = None
        self.failures = 0  # connect attempts failed since the last good link
        self.outage_since = None  # when the first of them failed
        self.busy_streak = 0  # busy answers to dials in a row (PanelBusy)
        self.info_wanted = threading.Event()
        self.slow_facts = {}  # slow_facts(), looked up by the basic-info thread
        self.refused_log = OncePer(60.0)
        self.period = min(cfg.interval, MAX_REPORT_GAP)
        self.failed = False
        self.status = LinkStatus(state_dir(cfg))
        self.tls_hint_given = False

    def complain(self, what, error, hint=""):
        """Log that `what` failed (PanelRefused: what the refusal means; else
        the network error), once a minute per kind of failure; the line."""
        if isinstance(error, PanelRefused):
            key, line = (what, error.status), explain_refusal(error, what + " failed") + hint
        else:
            key, line = (what, type(error).__name__), "%s failed: %s%s%s" % (
                what, describe_error(error), self.tls_hint(error), hint)
        if self.refused_log(key):
            log.warning(line)
        return line

    # -- basic info ---------------------------------------------------------
    def want_basic_info(self):
        self.info_wanted.set()

    def info_loop(self):
        """Uploads basic info when asked (a new link, lookups changed) and every --info-report-interval minutes: once per
        link, on the link itself where it can carry it."""
        self.slow_facts = slow_facts(self.collector.host)
        next_due = time.monotonic() + self.cfg.info_report_interval * 60
        while not self.stop.is_set():
            timeout = max(0.0, next_due - time.monotonic())
            if self.info_wanted.wait(timeout) or time.monotonic() >= next_due:
                self.info_wanted.clear()
                if self.stop.is_set():
                    return
                self.upload_info_with_retries()
                next_due = time.monotonic() + self.cfg.info_report_interval * 60

    def upload_info_with_retries(self):
        info = basic_info_payload(basic_facts(self.cfg, self.collector, self.addresses, self.slow_facts))
        link = self.link
        try:
            if link is not None and link.send_basic_info(info):
                log.info("basic info uploaded (%s)", link.label)
                return True
        except LinkClosed:
            pass
        for attempt in range(self.cfg.max_retries + 1):
            try:
                upload_basic_info(self.panel, info)
                log.info("basic info uploaded")
                return True
            except (PanelRefused, OSError) as e:
                line = self.complain("basic info upload", e)
                if getattr(e, "status", None) == 401:
                    self.status.set("refused", line)
                    return False
            if self.stop.wait(min(2.0 * (attempt + 1), 10.0)):
                return False
        return False

    # -- results ------------------------------------------------------------
    def deliver_result(self, result, refusal=False):
        """Spool an exec result, then let the courier POST it."""
        if not refusal:
            self.ran.finished(result)
        self.spool.put(result, refusal)
        self.results_due.set()

    def result_loop(self):
        """The courier: sends spooled results, oldest first, now, after every
        connect, and with growing pauses while the panel will not take them
        (it overwrites on a repeated POST, so sending one twice is harmless)."""
        attempt = 0
        while not self.stop.is_set():
            wait = None if attempt == 0 else backoff_delay(2.0, attempt - 1, cap=30.0)
            self.results_due.wait(wait)
            self.results_due.clear()
            if self.stop.is_set():
                return
            attempt = 0 if self.send_spooled_results() else attempt + 1

    def send_spooled_results(self):
        """True when nothing is left to send."""
        for name in self.spool.pending():
            if self.stop.is_set():
                return False
            result = self.spool.load(name)
            if result is None:
                continue
            task = str(result.get("task_id"))[:40]
            try:
                self.panel.post_json(TASK_RESULT_PATH, result)
            except PanelRefused as e:
                if e.status == 400:
                    # the panel will never take this one; keeping it would hold up the rest
                    log.error("the panel rejected the result of task %s as invalid (%s); dropped", task, e.detail)
                    self.spool.remove(name)
                    continue
                self.complain("task result upload", e, "; kept for later")
                return False
            except OSError as e:
                self.complain("task result upload", e, "; kept for later")
                return False
            self.spool.remove(name)
            log.info("result of task %s delivered", task)
        return True

    def send_ping_result(self, task_id, kind, value):
        """Send a ping result on the current link; False when there is none."""
        link = self.link
        if link is None:
            return False
        try:
            link.send_ping_result(task_id, kind, value)
            return True
        except LinkClosed:
            return False

    # -- the report link ----------------------------------------------------
    def connect(self):
        """A live link, after as many attempts as it takes; None once
        stopping. The address is resolved anew at every attempt, so a panel
        that moved is found at the next one."""
        while not self.stop.is_set():
            kind = self.chooser.next()
            try:
                return self.chooser.dial(kind)
            except Exception as e:
                problem = e.detail if isinstance(e, ProtocolRejected) else \
                    str(e) if isinstance(e, AgentError) else handshake_problem(e)
                # refused, not unreachable: the next kind of link is dialled at once
                at_once = self.chooser.failed(kind, e, problem)
                # a wrong token will not fix itself in seconds
                refused_token = getattr(e, "status", None) == 401
                delay = None if at_once else self.failure_delay(refused_token=refused_token)
                if isinstance(e, PanelBusy):
                    delay = max(delay or 0.0, busy_wait(e, self.cfg.reconnect_interval, self.busy_streak))
                    self.busy_streak += 1
                    if self.busy_streak == 1:  # one line an episode: its Retry-After may change at every answer
                        log.warning("cannot connect the report link (%s): the panel or a proxy in front of it is "
                                    "busy (%s); next try in %s s, staying on protocol v2", kind, problem, round(delay, 1))
                elif self.refused_log(("link", problem)):
                    log.warning("cannot connect the report link (%s): %s%s; %s", kind, problem, self.tls_hint(e),
                                "trying %s at once" % self.chooser.next() if delay is None
                                else "next try in %s s" % round(delay, 1))
                self.status.set("refused" if refused_token else "connecting",
                                "cannot connect the report link (%s): %s" % (kind, problem))
                if delay is not None and self.stop.wait(delay):
                    return None
        return None

    def tls_hint(self, error):
        """The ways out of an untrusted certificate, the first time one is seen."""
        if self.tls_hint_given or not certificate_untrusted(error):
            return ""
        self.tls_hint_given = True
        return (" (the panel's TLS certificate is not trusted here: if it is self-signed or from a private CA, "
                "install that CA in this system's trust store, or run with --ignore-unsafe-cert to skip the check)")

    def wait_after_failure(self, refused_token=False):
        """Count a failed attempt and wait before the next. False once stopping."""
        return not self.stop.wait(self.failure_delay(refused_token))

    def failure_delay(self, refused_token=False):
        """Count a failed attempt; the seconds to wait before the next
        (reconnect_delay). No basic info here (the official agent uploads
        it after each failed round): the next link sends it, and two uploads
        in the same second when the panel returns are one too many."""
        self.failures += 1
        now = time.monotonic()
        if self.outage_since is None:
            self.outage_since = now
        retries = max(1, self.cfg.max_retries)
        if refused_token:
            return backoff_delay(self.cfg.reconnect_interval, 3 + (self.failures - 1) // retries)
        return reconnect_delay(self.cfg.reconnect_interval, now - self.outage_since)

    def serve(self, link, handover=False):
        """Report every period until the link dies or the agent stops. True
        when the panel answered on it (a link that proved itself). Basic info
        goes once per link, but not again on a `handover` (POST mode's
        socket, a moment later: the panel has it)."""
        proven = False
        self.chooser.connected(link)
        self.link = link
        link.start()
        log.info("report link up: %s; %s", link.label, self.chooser.why(link.kind))
        self.status.set("connected")
        if not handover:
            self.want_basic_info()
        self.results_due.set()
        next_report = first_report = time.monotonic() + (self.period if link.reported_at_open else 0.0)
        try:
            while not self.stop.is_set() and not link.dead.is_set():
                now = time.monotonic()
                if not proven and link.proven():
                    # the next outage starts from short delays again
                    proven, self.failures, self.outage_since, self.busy_streak = True, 0, None, 0
                if now >= next_report:
                    link.send_report(report_payload(self.collector.figures()))
                    if next_report == first_report:
                        return_free_memory()
                    # keep the schedule; after a stall skip ahead instead of bursting
                    next_report = max(next_report + self.period, now)
                wake = min(next_report, link.keepalive(now))
                # a plain sleep: waking from Event.wait costs about twice as
                # much CPU, and this runs every report; a link that dies
                # meanwhile is noticed within a second
                time.sleep(min(1.0, max(0.01, wake - time.monotonic())))
        except LinkClosed:
            pass
        if not self.stop.is_set() and link.successor is None:
            log.warning("report link lost (%s): %s; reconnecting", link.kind, link.why or "closed")
            self.status.set("disconnected", "report link lost (%s): %s" % (link.kind, link.why or "closed"))
        link.close()
        self.link = None
        self.chooser.lost(link)
        return proven or link.successor is not None

    def discover_token(self):
        """The token from auto-discovery: saved from an earlier run, or a new
        registration, retried until the panel answers."""
        token = saved_discovery_token(self.cfg)
        round_number = 0
        while not token and not self.stop.is_set():
            try:
                token = register_with_key(self.panel)
            except (PanelRefused, OSError) as e:
                status = getattr(e, "status", None)
                line = self.complain("auto-discovery registration", e,
                                     " (wrong auto-discovery key?)" if status in (401, 403) else "")
                self.status.set("refused" if status in (401, 403) else "connecting", line)
            if not token:
                self.stop.wait(backoff_delay(self.cfg.reconnect_interval, round_number))
                round_number += 1
        hide_secret(token)
        return token

    def run_until_stopped(self):
        """run(), and stop the whole agent if it ever ends by itself."""
        try:
            self.run()
        except Exception:
            log.exception("the agent loop failed")
            self.failed = True
        finally:
            self.stop.set()

    def run(self):
        self.status.set("starting")
        if self.collector.traffic is not None:
            threading.Thread(target=sample_traffic_while_idle, name="traffic", daemon=True,
                             args=(self.collector.traffic, self.collector.sample_traffic, self.stop)).start()
        if not self.panel.token:
            self.panel.token = self.cfg.token = self.discover_token()
        threading.Thread(target=self.info_loop, name="basic-info", daemon=True).start()
        threading.Thread(target=self.result_loop, name="results", daemon=True).start()
        self.results_due.set()
        link = None
        while not self.stop.is_set():
            successor = link and link.successor
            link = successor or self.connect()
            if link is None:
                break
            # a link that never answered counts as a failed attempt, so a panel
            # that accepts and drops at once is not dialled in a tight loop
            if not self.serve(link, handover=bool(successor)) and not self.stop.is_set() \
                    and not self.wait_after_failure():
                break

    def shutdown(self):
        self.stop.set()
        self.collector.traffic and self.collector.traffic.flush()
        self.info_wanted.set()
        self.results_due.set()
        self.tasks.shutdown()
        link = self.link
        if link is not None:
            link.close(GOING_AWAY)


# ---------------------------------------------------------------------------
# Subcommands: --check, --dry-run, list-disk, check-mem, traffic, update, service
# ---------------------------------------------------------------------------

# module -> the package that provides it (requirements.txt)
DEPENDENCIES = (("psutil", "psutil"), ("websocket", "websocket-client"))


def missing_packages():
    """The required packages this Python cannot find (looked up, not imported:
    psutil is loaded only where /proc does not answer)."""
    import importlib.util
    return [package for module, package in DEPENDENCIES if importlib.util.find_spec(module) is None]


def check_state_dir(cfg):
    """Say at start, not at the first save, when state cannot be kept."""
    problem = private_directory(state_dir(cfg))
    if problem:
        log.warning("state directory problem: %s; traffic totals and undelivered results are kept in memory "
                    "only and lost on restart (see --state-dir)", problem)


def check_settings(cfg):
    """--check: the settings in effect that differ from the defaults, one per
    line with where each came from; secrets masked. Nothing is contacted."""
    where = {"cli": "command line", "env": "environment", "file": "config file %s" % cfg.config}
    print("settings are valid; in effect (defaults left out):")
    for option in OPTIONS:
        if option.dest not in cfg.origins or option.dest in ("config", "dry_run", "state_dir"):
            continue
        value = getattr(cfg, option.dest)
        if option.secret and value:
            value = masked(value)
        print("  %-24s %-36s (%s)" % (option.flags[-1], value, where[cfg.origins[option.dest]]))
    print("  %-24s %s" % ("state directory", state_dir(cfg)))
    return 0


def dry_run(cfg):
    """Print the basic info and one report, each as the one line of JSON that
    would go on the wire."""
    collector = Collector(cfg)
    addresses = PublicAddresses(cfg)
    info = basic_info_payload(basic_facts(cfg, collector, addresses, slow_facts(collector.host)))
    collector.figures()  # baseline for speeds
    time.sleep(min(cfg.interval, 1.0))
    sys.stdout.write(encode(info) + "\n")
    sys.stdout.write(encode(report_payload(collector.figures())) + "\n")
    sys.stdout.flush()
    return 0


def go_log(message, stream=None):
    """A line in Go's log format, as the official agent's subcommands write
    theirs, on `stream` (stderr unless given)."""
    (stream or sys.stderr).write("%s %s\n" % (time.strftime("%Y/%m/%d %H:%M:%S"), message))


def go_answer(message):
    """A subcommand's answer in that format, on stdout (the official agent
    logs it on stderr), so that `check-mem | grep htoplike` works."""
    go_log(message, sys.stdout)


def subcommand_config(name, argv, environ):
    """The config of a subcommand, which takes the agent's flags to use the
    same settings and state; None after a bad flag (said on stderr)."""
    try:
        cfg, _ = load_config(list(argv) + ["--dry-run"], environ)
    except ConfigError as e:
        sys.stderr.write("%s %s: error: %s\n" % (PROG, name, e))
        return None
    return cfg


def monitored_mountpoints(collector):
    """The startup and list-disk line's list: "[/ (ext4) /data (xfs)]", or the
    --include-mountpoint entries as given."""
    if collector.cfg.mountpoints:
        return "[%s]" % " ".join(collector.cfg.mountpoints)
    return "[%s]" % " ".join("%s (%s)" % (m.mountpoint, m.fstype)
                             for _, m in sorted(collector.mount_table(), key=lambda km: km[1].mountpoint))


def monitored_interfaces(collector):
    """"[eth0 wg0]": the NICs whose traffic counts."""
    return "[%s]" % " ".join(sorted(collector.nic_counters()))


def log_monitored(collector):
    """The official agent's startup lines, which users grep for."""
    for what, listing in (("Mountpoints", monitored_mountpoints), ("Interfaces", monitored_interfaces)):
        try:
            log.info("Monitoring %s: %s", what, listing(collector))
        except OSError as e:
            log.warning("cannot list the monitored %s: %s", what.lower(), describe_error(e))


def list_disk_command(argv, environ):
    """`list-disk`: every mount, then the ones whose space counts (official output)."""
    cfg = subcommand_config("list-disk", argv, environ)
    if cfg is None:
        return 2
    try:
        mounts = make_host(cfg).all_mounts()
    except OSError as e:
        go_log("Failed to get disk partitions: %s" % describe_error(e))
        return 0
    go_answer("All Disk Partitions:")
    rows = [("Mountpoint", "Fstype")] + [(m.mountpoint, m.fstype) for m in mounts]
    width = max(len(r[0]) for r in rows) + 2
    sys.stdout.write("".join("%s%s\n" % (mountpoint.ljust(width), fstype) for mountpoint, fstype in rows))
    try:
        go_answer("Monitoring Mountpoints: %s" % monitored_mountpoints(Collector(cfg)))
    except OSError as e:
        go_log("Failed to get disk list: %s" % describe_error(e))
    return 0


def free_command_memory():
    """(total, used) from the Mem: line of `free -b`; zeros without free."""
    for line in run_quiet(["free", "-b"]).splitlines()[1:]:
        if line.startswith("Mem:"):
            fields = line.split()
            if len(fields) >= 3 and fields[1].isdigit() and fields[2].isdigit():
                return int(fields[1]), int(fields[2])
            break
    return 0, 0


def check_mem_command(argv, environ):
    """`check-mem`: /proc/meminfo and each formula for used memory (official output)."""
    cfg = subcommand_config("check-mem", argv, environ)
    if cfg is None:
        return 2
    mib = 1 << 20

    def line(mode, total, used):
        go_answer("[%s] Total: %d bytes (%d MiB), Used: %d bytes (%d MiB)" % (mode, total, total // mib, used, used // mib))
    go_answer("--- Memory Check ---")
    try:
        info = parse_meminfo(read_text("/proc/meminfo"))
    except OSError:
        info = {}
    if info:
        go_answer("--- /proc/meminfo ---")
        for key in ("MemTotal", "MemFree", "MemAvailable", "Buffers", "Cached", "SwapTotal", "SwapFree",
                    "SwapCached", "Shmem", "SReclaimable", "Zswap", "Zswapped"):
            go_answer("%-13s %d MiB" % (key + ":", info.get(key, 0) // mib))
        go_answer("---------------------")
    htop = ram_usage(info) if info.get("MemTotal") else (0, 0)
    # each way this system has: no /proc/meminfo or `free` on Windows, say
    if htop[0]:
        line("htoplike", *htop)
    vm = psutil_module().virtual_memory()
    line("gopsutil", vm.total, vm.total - vm.available)
    import shutil
    if shutil.which("free"):
        line("callFree", *free_command_memory())
    go_answer("--- Current Configured ---")
    if cfg.memory_include_cache:
        line("includeCache", vm.total, vm.total - vm.free)
    elif htop[0]:
        line("htoplike", *htop)
    else:
        line("gopsutil", vm.total, vm.total - vm.available)
    return 0


def traffic_command(argv, environ):
    """`komari_agent.py traffic [--set-up SIZE] [--set-down SIZE] [--show] [agent flags]`:
    calibrate or show this period's totals. Returns the exit code."""
    parser = ArgParser(prog=PROG + " traffic", allow_abbrev=False,
                       description="Show or correct this period's traffic totals. Give the same --state-dir "
                                   "and --config (or AGENT_* environment) as the agent so the same state is used.")
    parser.add_argument("--set-up", metavar="SIZE",
                        help="set this period's upload total, e.g. 120G (K/M/G/T/P, 1024-based, decimals allowed)")
    parser.add_argument("--set-down", metavar="SIZE", help="set this period's download total, e.g. 1.5T")
    parser.add_argument("--show", action="store_true", help="print the period start and totals (the default)")
    parser.add_argument("--export", metavar="PATH", nargs="?", const="",
                        help="write this period's totals as the official agent's net_static.json (default: in the "
                             "state directory), for switching back to it")
    try:
        args, rest = parser.parse_known_args(argv)
        sizes = {k: parse_size(v) for k, v in (("up", args.set_up), ("down", args.set_down)) if v is not None}
    except ValueError as e:
        sys.stderr.write("%s traffic: error: %s\n" % (PROG, e))
        return 2
    cfg = subcommand_config("traffic", rest, environ)
    if cfg is None:
        return 2
    directory = state_dir(cfg)
    calibration = os.path.join(directory, CALIBRATION_FILE)
    if sizes:
        try:
            pending = read_json_object(calibration)
        except (OSError, ValueError):
            pending = {}
        pending = {k: v for k, v in pending.items() if k in ("up", "down")}
        pending.update(sizes)
        pending["at"] = time.time()
        try:
            write_atomic(calibration, encode(pending).encode())
            if hasattr(os, "geteuid") and os.geteuid() == 0:
                # root calibrating for an agent that runs as its own user: let it read the file
                owner = os.stat(directory)
                os.chown(calibration, owner.st_uid, owner.st_gid)
        except OSError as e:
            sys.stderr.write("%s traffic: error: cannot write %s: %s (run it as the agent's user)\n"
                             % (PROG, calibration, describe_error(e)))
            return 1
        print("calibration saved in %s: %s; a running agent applies it within %d s, otherwise it is applied "
              "when the agent starts with --month-rotate" % (calibration, ", ".join(
                  "%s %s" % (k, human_size(v)) for k, v in sorted(sizes.items())), CALIBRATION_CHECK_EVERY + 2))
    if args.export is None and not args.show and sizes:
        return 0
    state = traffic_state_or_say_why(os.path.join(directory, TRAFFIC_FILE))
    if state is None:
        status = 1
    elif args.export is not None:
        status = export_traffic(state, args.export or os.path.join(directory, NET_STATIC))
    else:
        status = show_traffic(state, calibration)
    return 0 if sizes and args.export is None else status


def traffic_state_or_say_why(path):
    """saved_traffic(path), or None after one line on stderr saying why not."""
    try:
        return saved_traffic(path)
    except FileNotFoundError:
        why = "no traffic state at %s: is the agent running with --month-rotate and this --state-dir?" % path
    except OSError as e:
        why = "cannot read %s: %s" % (path, describe_error(e))
    except ValueError as e:
        why = "%s is damaged (%s); the agent sets it aside when it starts" % (path, e)
    sys.stderr.write("%s traffic: error: %s\n" % (PROG, why))
    return None


def export_traffic(state, path):
    try:
        write_net_static(os.path.abspath(path), state, state["saved_at"])
    except OSError as e:
        sys.stderr.write("%s traffic: error: cannot write %s: %s\n" % (PROG, path, describe_error(e)))
        return 1
    print("wrote %s; put it in the official agent's working directory (/opt/komari) before starting it" % path)
    return 0


def show_traffic(data, calibration):
    total = data.get("total") or {}
    print("period start: %s (reset day %s), next: %s" % (local_time(data.get("period_start")), data.get("reset_day"),
                                                         local_time(data.get("period_end"))))
    for key in ("up", "down"):
        value = whole(total.get(key))
        print("%-5s %s (%d bytes)" % (key + ":", human_size(value), value))
    counted = set(data.get("counted") or [])
    for nic, entry in sorted((data.get("nics") or {}).items()):
        print("  %s%s: up %s, down %s" % (nic, "" if nic in counted else " (not counted)",
                                          human_size(whole(entry.get("up"))), human_size(whole(entry.get("down")))))
    offset = data.get("offset") or {}
    if offset.get("up") or offset.get("down"):
        print("  calibration offset: up %+d, down %+d bytes" % (offset.get("up", 0), offset.get("down", 0)))
    previous = data.get("previous")
    if isinstance(previous, dict):
        print("previous period from %s: up %s, down %s" % (local_time(previous.get("start")),
                                                           human_size(whole(previous.get("up"))),
                                                           human_size(whole(previous.get("down")))))
    print("as of %s (the agent saves every minute while it runs)" % local_time(data.get("saved_at")))
    if os.path.exists(calibration):
        print("a calibration is waiting for the agent to apply it")
    return 0


# -- update ------------------------------------------------------------------------

# How long `update` follows a running agent's steps: two downloads, the
# checks, a restart and a trial.
FOLLOW_UPDATE_FOR = 2 * DOWNLOAD_TIMEOUT + TRIAL_SECONDS + 60


def update_command(argv, environ):
    """`update [--check] [agent flags]`: look for a newer release with the
    agent's settings and install it now (asking a running agent to do it),
    printing each step. Exit 0 when up to date or updated, 1 when not
    updated, 2 on a bad flag; with --check: 0 up to date, 1 newer release
    available, 2 when the feed cannot be asked."""
    parser = ArgParser(prog=PROG + " update", allow_abbrev=False,
                       description="Look for a newer release and install it now: checked against its SHA256SUMS, "
                                   "tried against the panel, and only then put in place of this file. Give the "
                                   "agent's flags, --config or AGENT_* environment, so the same settings are used; "
                                   "a running agent of the same state directory is asked to do it.")
    parser.add_argument("--check", action="store_true",
                        help="only say whether a newer release exists: exit 0 when up to date, 1 when there is one, "
                             "2 when the feed cannot be asked")
    try:
        args, rest = parser.parse_known_args(argv)
        cfg = load_config(rest + ["--dry-run"] * args.check, environ)[0]
    except ConfigError as e:
        sys.stderr.write("%s update: error: %s\n" % (PROG, e))
        return 2
    hide_secret(cfg.token)
    hide_secret(cfg.auto_discovery)
    if args.check:
        return check_for_update(cfg)
    problem = update_impossible(cfg)
    if problem:
        print("update: %s" % problem)
        return 1
    steps = UpdateLog(state_dir(cfg), lambda level, line: print(line, flush=True))
    steps.forget_skip()   # by hand, a skipped release is tried again
    pid = running_agent(state_dir(cfg))
    if pid:
        return ask_running_agent(pid, steps)
    outcome = try_update(cfg, rest, threading.Event(), steps, retry_skipped=True)
    if outcome == "swapped":
        print("update: start the agent (or its service) to run it")
    return 1 if outcome == "failed" else 0


def check_for_update(cfg):
    """`update --check`: 0 up to date, 1 a newer release exists, 2 the feed cannot be asked."""
    if PLACEHOLDER_REPOSITORY in update_feed(cfg):
        sys.stderr.write("%s update: error: %s\n" % (PROG, update_impossible(cfg)))
        return 2
    try:
        release = latest_release(cfg)
    except UpdateProblem as e:
        sys.stderr.write("%s update: error: %s\n" % (PROG, e))
        return 2
    current = version_key(__version__)
    stable = release.version is not None and not release.prerelease
    if not stable or current is None or release.version <= current:
        print("up to date: %s (latest release: %s%s)" % (__version__, release.tag, "" if stable else ", a pre-release"))
        return 0
    skip = UpdateLog(state_dir(cfg), None).skipped()
    skipped = skip and release.version <= version_key(skip["tag"])
    print("%s is available (running %s)%s" % (release.tag, __version__,
                                             "; the agent skips it: %s" % skip.get("why") if skipped else ""))
    return 1


def running_agent(directory):
    """The pid of an agent running with this state directory (its status.json
    names it), or None: a pid reused by another program is not one."""
    try:
        status = read_json_object(os.path.join(directory, STATUS_FILE), 1 << 16)
        pid, started = status.get("pid"), status.get("started")
        process = psutil_module().Process(pid)
        command, born = " ".join(process.cmdline()), process.create_time()
    except Exception:  # no file, no such process, no psutil: none running that we could ask
        return None
    if pid == os.getpid() or "komari_agent" not in command or not isinstance(started, (int, float)) \
            or born > started + 5:
        return None
    return pid


def ask_running_agent(pid, steps):
    """Have the agent `pid` check now (UPDATE_SIGNAL) and print its steps until its last."""
    if UPDATE_SIGNAL is None:
        print("update: an agent runs (pid %d) and cannot be signalled here; stop it, then run this again" % pid)
        return 1
    seen = max([s["seq"] for s in steps.steps()] or [0])
    try:
        os.kill(pid, UPDATE_SIGNAL)
    except OSError as e:
        print("update: cannot ask the running agent (pid %d): %s; run this as its user" % (pid, describe_error(e)))
        return 1
    print("update: asked the running agent (pid %d) to update now" % pid, flush=True)
    deadline = time.monotonic() + FOLLOW_UPDATE_FOR
    while time.monotonic() < deadline:
        for step in steps.steps():
            if step["seq"] > seen:
                seen = step["seq"]
                print(step.get("line"), flush=True)
                if step.get("final"):
                    return 0 if step.get("ok") else 1
        time.sleep(0.2)
    print("update: the agent said nothing more within %d s; see its log" % FOLLOW_UPDATE_FOR)
    return 1
def service_command(argv, environ):
    """`komari_agent.py service install [--name NAME] [agent flags]` and
    `service remove [--name NAME] [--restore-official]` (Windows): the agent
    started at boot as SYSTEM by a Scheduled Task, the counterpart of
    install.sh's services; an official agent's service found here hands its
    settings over and is stopped and disabled, until --restore-official."""
    parser = ArgParser(prog=PROG + " service", allow_abbrev=False,
                       description="Windows: start the agent at boot, as SYSTEM, from a Scheduled Task that starts it "
                                   "again within a minute whenever it is not running. Run it as Administrator.")
    parser.add_argument("action", choices=("install", "remove"))
    parser.add_argument("--name", default=TASK_NAME, help="the task's name (default %(default)s)")
    parser.add_argument("--restore-official", action="store_true",
                        help="with remove: enable and start the official agent's service this install stopped")
    try:
        args, rest = parser.parse_known_args(argv)
        if args.action == "remove" and rest:
            raise ConfigError("remove takes no agent flags: %s" % " ".join(rest))
    except ConfigError as e:
        sys.stderr.write("%s service: error: %s\n" % (PROG, e))
        return 2
    problem = boot_task_problem()
    if problem:
        sys.stderr.write("%s service: %s\n" % (PROG, problem))
        return 2
    if not running_as_administrator():
        sys.stderr.write("%s service: run it as Administrator (Task Scheduler runs the agent as SYSTEM)\n" % PROG)
        return 1
    record = os.path.join(os.path.dirname(SCRIPT_PATH), OFFICIAL_RECORD)
    if args.action == "remove":
        return remove_boot_task(args.name, record, args.restore_official)
    return install_boot_task(args.name, rest, record, environ)


def run_steps(commands, may_fail=()):
    """Run each argument list (its program looked up on PATH), saying what
    failed; False at the first failure not in `may_fail` (first words)."""
    import shutil
    import subprocess
    for argv in commands:
        try:
            done = subprocess.run([shutil.which(argv[0]) or argv[0]] + argv[1:], stdin=subprocess.DEVNULL,
                                  stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=60)
            failed = done.returncode != 0 and " ".join(argv[:2]) not in may_fail
            said = done.stdout.decode(CONSOLE_ENCODING, "replace").strip()
        except (OSError, subprocess.SubprocessError) as e:
            failed, said = True, describe_error(e)
        if failed:
            sys.stderr.write("%s service: `%s` failed: %s\n" % (PROG, " ".join(argv[:2]), said or "no output"))
            return False
    return True


def install_boot_task(name, agent_args, record, environ):
    import tempfile
    official = official_service() if not os.path.exists(record) else None
    if official is not None:
        # its flags first: the ones given now win, as the last of a flag does
        agent_args = windows_args(official["parameters"]) + list(agent_args)
        print("found the official agent's service %s: its settings are taken over" % OFFICIAL_SERVICE)
    try:
        # as the task will run it: without this shell's AGENT_* variables
        cfg, _ = load_config(agent_args, {k: v for k, v in environ.items() if not k.startswith("AGENT_")})
    except ConfigError as e:
        sys.stderr.write("%s service: error: %s\n" % (PROG, e))
        return 2
    missing = missing_packages()
    if missing:
        sys.stderr.write("%s service: error: missing Python package%s %s: install with `%s -m pip install %s`\n"
                         % (PROG, "s" * (len(missing) > 1), " and ".join(missing), sys.executable, " ".join(missing)))
        return 1
    agent_args, secrets = split_secret_flags(agent_args)
    if secrets and not cfg.config:
        # the task's command line shows in process lists: the token goes to a file only SYSTEM and
        # Administrators read, in the state directory
        directory = cfg.state_dir or os.path.join(os.environ.get("ProgramData") or "C:\\ProgramData", "komari-agent")
        config = os.path.join(os.path.abspath(directory), SERVICE_CONFIG)
        problem = private_directory(os.path.dirname(config))
        if problem:
            sys.stderr.write("%s service: error: %s\n" % (PROG, problem))
            return 1
        write_atomic(config, encode(secrets).encode())
        agent_args += ["--config", config]
    else:
        agent_args += [flag for key, value in secrets.items() for flag in (SECRET_FLAGS[key], value)]
    xml = task_xml(sys.executable, SCRIPT_PATH, agent_args, time.strftime("%Y-%m-%dT%H:%M:%S"))
    fd, path = tempfile.mkstemp(prefix="komari-task-", suffix=".xml")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(xml.encode("utf-16"))
        if not run_steps(create_task_commands(name, path), may_fail=("schtasks /End",)):
            return 1
    finally:
        os.unlink(path)
    print("scheduled task %s: %s %s, as SYSTEM at boot, started again within a minute whenever it is not running"
          % (name, sys.executable, SCRIPT_PATH))
    if official is not None:
        # its start type, never its parameters: they hold its token, and this folder is readable by all
        write_atomic(record, encode({"service": OFFICIAL_SERVICE, "start": official["start"]}).encode())
        import_official_traffic(official["directory"])
        if not run_steps(service_switch_commands(OFFICIAL_SERVICE, "disabled"), may_fail=("sc.exe stop",)):
            return 1
        print("the official agent's service %s is stopped and disabled; `%s service remove --restore-official` "
              "brings it back" % (OFFICIAL_SERVICE, PROG))
    return 0


def split_secret_flags(args):
    """(the other arguments, {--config key: value}) for the token and the
    auto-discovery key among the agent flags `args`, in any of argparse's
    forms (-t X, -tX, --token X, --token=X); the last one given wins."""
    names = {flag: key for key, flag in SECRET_FLAGS.items()}
    names["-t"] = "token"
    rest, secrets, i = [], {}, 0
    while i < len(args):
        name, eq, value = args[i].partition("=")
        if name in names and (eq or i + 1 < len(args)):
            if not eq:
                i += 1
                value = args[i]
            secrets[names[name]] = value
        elif args[i].startswith("-t") and not args[i].startswith("--") and len(args[i]) > 2:
            secrets["token"] = args[i][2:]
        else:
            rest.append(args[i])
        i += 1
    return rest, secrets


def import_official_traffic(directory):
    """The official agent's month of traffic, where this agent imports it at
    its first start (beside the script)."""
    import shutil
    source, target = os.path.join(directory, NET_STATIC), os.path.join(os.path.dirname(SCRIPT_PATH), NET_STATIC)
    if directory and os.path.isfile(source) and not os.path.exists(target):
        try:
            shutil.copyfile(source, target)
        except OSError as e:
            print("cannot copy %s (%s): this month's traffic starts from zero" % (source, describe_error(e)))


def remove_boot_task(name, record, restore_official):
    if not run_steps(delete_task_commands(name), may_fail=("schtasks /End",)):
        return 1
    print("scheduled task %s removed" % name)
    if not restore_official:
        return 0
    try:
        official = read_json_object(record)
    except (OSError, ValueError):
        sys.stderr.write("%s service: no official agent was stopped by this install (no %s)\n" % (PROG, record))
        return 1
    service, start = str(official.get("service") or OFFICIAL_SERVICE), str(official.get("start") or "auto")
    if start == "disabled" or not run_steps(service_switch_commands(service, start)):
        return 1
    os.unlink(record)
    print("the official agent's service %s is back: start type %s, started" % (service, start))
    return 0


# ---------------------------------------------------------------------------
# main()
# ---------------------------------------------------------------------------

def stop_on_signals():
    """An Event that SIGTERM, SIGINT and SIGHUP set: a hangup (the terminal
    that started the agent closed) is a clean stop like SIGTERM, never a
    death that orphans commands and loses unsaved totals. A SIGHUP that was
    ignored when the agent started (nohup) stays ignored. SIGUSR1 asks for
    an update check now (`update` run by hand). Only the main thread may
    install signal handlers. On Windows the console's control events stop
    the agent too (stop_on_console_events)."""
    stop = threading.Event()
    hangup = getattr(signal, "SIGHUP", None)  # none on Windows
    stopping = set()
    for signum in (signal.SIGTERM, signal.SIGINT, hangup):
        if signum is None or signum == hangup and signal.getsignal(signum) == signal.SIG_IGN:
            continue
        signal.signal(signum, lambda signum, frame: stop.set())
        stopping.add(int(signum))
    if UPDATE_SIGNAL is not None:
        signal.signal(UPDATE_SIGNAL, lambda signum, frame: UPDATE_WANTED.set())
    watch_signals(stop, stopping)
    stop_on_console_events(stop)
    return stop


def watch_signals(stop, stopping):
    """Act on signals from a thread of our own, through the wakeup pipe.
    Python runs a signal's handler only in the main thread, which sits in
    the interpreter's final join (see the end of this file): when the kernel
    hands the signal to another thread, that join is never interrupted and
    the handler never runs. The C-level handler writes every signal's number
    to the wakeup pipe, whichever thread it lands on."""
    try:
        reader, writer = os.pipe()
        os.set_blocking(writer, False)
        signal.set_wakeup_fd(writer)
    except (OSError, ValueError, AttributeError):  # Windows takes only a socket here
        return

    def watch():
        while True:
            for signum in os.read(reader, 64):
                if signum in stopping:
                    stop.set()
                elif signum == UPDATE_SIGNAL:
                    UPDATE_WANTED.set()
    threading.Thread(target=watch, name="signals", daemon=True).start()


SUBCOMMANDS = {"traffic": traffic_command, "list-disk": list_disk_command, "check-mem": check_mem_command,
               "update": update_command, "service": service_command}


def main(argv=None, stop=None):
    argv = sys.argv[1:] if argv is None else argv
    utf8_output()
    if argv[:1] and argv[0] in SUBCOMMANDS:
        return SUBCOMMANDS[argv[0]](argv[1:], os.environ)
    try:
        cfg, warnings = load_config(argv, os.environ)
    except ConfigError as e:
        sys.stderr.write("%s: error: %s\n" % (PROG, e))
        return 2
    missing = missing_packages()
    if missing and not cfg.check:   # --check judges settings: install.sh runs it before installing packages
        python = os.path.basename(sys.executable) or "python3"
        sys.stderr.write("%s: error: missing Python package%s %s: install with `%s -m pip install %s` (or re-run "
                         "install.sh)\n" % (PROG, "s" * (len(missing) > 1), " and ".join(missing), python, " ".join(missing)))
        return 1
    setup_logging(getattr(logging, cfg.log_level.upper()))
    hide_secret(cfg.token)
    hide_secret(cfg.auto_discovery)
    for warning in warnings:
        log.warning(warning)
    if cfg.show_warning:
        return 0  # the official agent's Windows toast helper; nothing to show elsewhere
    if cfg.check:
        return check_settings(cfg)
    if cfg.dry_run:
        return dry_run(cfg)
    log.info("Komari agent (Python) %s, panel %s, report every %gs", __version__, cfg.endpoint, cfg.interval)
    check_state_dir(cfg)
    stop = stop or stop_on_signals()
    taking_over = update_at_start(cfg, argv, stop)
    if taking_over is not None:
        return taking_over
    agent = Agent(cfg, stop)
    log_monitored(agent.collector)
    updater = start_updater(cfg, agent)
    worker = threading.Thread(target=agent.run_until_stopped, name="agent", daemon=True)
    worker.start()
    # no timeout: a main thread waking up every second costs more CPU than a report
    agent.stop.wait()
    if agent.failed:
        return 1
    log.info("shutting down")
    agent.shutdown()
    # shutdown() closed and saved everything; the worker may be asleep until
    # its next report, and need not be waited for beyond a moment
    worker.join(0.2)
    if updater is not None and updater.restart_wanted:
        return restart_self(argv, "restarting") or 1
    return 0


def exit_after_main(stop):
    """Run main() and end the process with its status, whatever happens."""
    try:
        status = main(stop=stop)
    except SystemExit as e:  # argparse's --help and --version
        status = e.code if isinstance(e.code, int) else 0 if e.code is None else 1
        if not isinstance(e.code, (int, type(None))):
            sys.stderr.write("%s\n" % e.code)
    except BaseException:
        import traceback
        traceback.print_exc()
        status = 1
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    # daemon threads may still sit in socket calls; interpreter teardown under
    # them can crash, and there is nothing left to clean up
    os._exit(status)


if __name__ == "__main__":
    # Python keeps a script's whole syntax tree (about 7 MB for this file)
    # until the script's top level returns. So the top level only starts the
    # agent's thread and returns, the tree is freed, and the interpreter waits
    # for that thread, which ends the process itself.
    limit_malloc_arenas()  # before the first thread, or that thread gets an arena of its own
    threading.Thread(target=exit_after_main, args=(stop_on_signals(),), name="main").start()
