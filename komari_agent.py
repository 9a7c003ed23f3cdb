#!/usr/bin/env python3
"""komari_agent.py - a single-file Komari monitoring agent.

Speaks the Komari agent protocol v1 (see PROTOCOL.md): basic info by HTTP POST,
a realtime report over a WebSocket, and the server's events (exec, ping,
terminal) on that socket.  Needs Python 3.8+, psutil and websocket-client.

    python3 komari_agent.py --endpoint https://panel.example --token TOKEN
    python3 komari_agent.py --dry-run        # print what would be sent
"""

import argparse
import json
import logging
import os
import platform
import random
import re
import signal
import socket
import ssl
import sys
import threading
import time
from fnmatch import fnmatchcase

__version__ = "0.1.0"
PROG = "komari_agent.py"

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


# ---------------------------------------------------------------------------
# Logging: the token never reaches a log line
# ---------------------------------------------------------------------------

class RedactingFormatter(logging.Formatter):
    """Formats like the Go agent (YYYY/MM/DD HH:MM:SS) and blanks out secrets,
    including any that sneak in through exception texts."""

    secrets = []

    def format(self, record):
        text = super().format(record)
        for secret in self.secrets:
            if secret:
                text = text.replace(secret, "***")
        return text


def setup_logging(level=logging.INFO):
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(RedactingFormatter("%(asctime)s %(levelname)s %(message)s", "%Y/%m/%d %H:%M:%S"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)


def hide_secret(secret):
    if secret and secret not in RedactingFormatter.secrets:
        RedactingFormatter.secrets.append(secret)
        if len(secret) > 3:
            from urllib.parse import quote
            RedactingFormatter.secrets.append(quote(secret, safe=""))


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


# ---------------------------------------------------------------------------
# Configuration: defaults < --config JSON < AGENT_* environment < command line
# ---------------------------------------------------------------------------

class ConfigError(Exception):
    """A bad setting: reported as one line on stderr, exit code 2."""


class Option:
    def __init__(self, dest, flags, kind, default, help, json_keys=(), env=(), check=None, metavar=None):
        self.dest, self.flags, self.kind, self.default, self.help = dest, flags, kind, default, help
        self.json_keys = json_keys or (dest,)
        self.env = env or ("AGENT_" + dest.upper(),)
        self.check = check
        self.metavar = metavar


def _positive(v):
    return None if v > 0 else "must be greater than 0"


def _not_negative(v):
    return None if v >= 0 else "must not be negative"


def _day_of_month(v):
    return None if 0 <= v <= 31 else "must be a day of the month, 1-31 (0 = off)"


def _ip_version(v):
    return None if v in ("", "4", "6") else "must be 4 or 6"


OPTIONS = [
    Option("endpoint", ("-e", "--endpoint"), "str", "", "panel URL, e.g. https://panel.example.com"),
    Option("token", ("-t", "--token"), "str", "", "client token from the panel"),
    Option("interval", ("-i", "--interval"), "float", 1.0, "seconds between reports (default 1.0)", check=_positive),
    Option("info_report_interval", ("--info-report-interval",), "float", 5.0,
           "minutes between basic-info uploads (default 5)", check=_positive),
    Option("reconnect_interval", ("-c", "--reconnect-interval"), "float", 5.0,
           "seconds between reconnect attempts; grows to 60 while the panel stays down (default 5)", check=_positive),
    Option("max_retries", ("-r", "--max-retries"), "int", 3,
           "connect attempts per round and retries per upload (default 3)", check=_not_negative),
    Option("ignore_unsafe_cert", ("-u", "--ignore-unsafe-cert"), "bool", False, "do not verify TLS certificates"),
    Option("disable_web_ssh", ("--disable-web-ssh",), "bool", False,
           "turn off all remote control: exec, terminal"),
    Option("disable_auto_update", ("--disable-auto-update",), "bool", False,
           "accepted for compatibility; this agent never updates itself"),
    Option("memory_include_cache", ("--memory-include-cache",), "bool", False,
           "count buffers and cache as used memory (used = MemTotal - MemFree)"),
    Option("memory_exclude_bcf", ("--memory-exclude-bcf",), "bool", False,
           "htop formula for used memory (the default on Linux)",
           json_keys=("memory_report_raw_used", "memory_exclude_bcf"),
           env=("AGENT_MEMORY_REPORT_RAW_USED", "AGENT_MEMORY_EXCLUDE_BCF")),
    Option("memory_mode_available", ("--memory-mode-available",), "bool", False,
           "deprecated, no effect (use --memory-include-cache)"),
    Option("include_nics", ("--include-nics",), "str", "", "comma list of NICs to count (* wildcards); wins over every exclusion"),
    Option("exclude_nics", ("--exclude-nics",), "str", "", "comma list of NICs not to count (* wildcards)"),
    Option("include_mountpoint", ("--include-mountpoint",), "str", "",
           "semicolon list of mount points to count as disk, replacing the automatic choice",
           json_keys=("include_mountpoints", "include_mountpoint"),
           env=("AGENT_INCLUDE_MOUNTPOINTS", "AGENT_INCLUDE_MOUNTPOINT")),
    Option("month_rotate", ("--month-rotate",), "int", 0,
           "count totalUp/totalDown from this day of the month (1-31; 0 = since boot)", check=_day_of_month),
    Option("import_net_static", ("--import-net-static",), "str", "",
           "the official agent's net_static.json to carry this period's totals over from, once (with "
           "--month-rotate; looked for beside this script, in the working directory and in /opt/komari)",
           metavar="PATH"),
    Option("gpu", ("--gpu",), "bool", False, "add detailed GPU usage (nvidia-smi) to reports",
           json_keys=("enable_gpu", "gpu"), env=("AGENT_ENABLE_GPU", "AGENT_GPU")),
    Option("custom_dns", ("--custom-dns",), "str", "", "DNS server (host or host:port) for panel and probe names"),
    Option("custom_ipv4", ("--custom-ipv4",), "str", "", "report this IPv4 address instead of looking it up"),
    Option("custom_ipv6", ("--custom-ipv6",), "str", "", "report this IPv6 address instead of looking it up"),
    Option("get_ip_addr_from_nic", ("--get-ip-addr-from-nic",), "bool", False,
           "report the addresses of the local NICs instead of looking them up"),
    Option("auto_discovery", ("--auto-discovery",), "str", "", "accepted for compatibility; not supported yet",
           json_keys=("auto_discovery_key", "auto_discovery"), env=("AGENT_AUTO_DISCOVERY_KEY",)),
    Option("protocol_version", ("--protocol-version",), "int", 1,
           "protocol version; only 1 is spoken, 2 falls back to 1"),
    Option("prefer_ip_version", ("--prefer-ip-version",), "str", "",
           "address family tried first for the panel: 4 or 6", check=_ip_version),
    Option("disable_compression", ("--disable-compression",), "bool", False, "accepted for compatibility; no effect"),
    Option("state_dir", ("--state-dir",), "str", "", "where traffic totals and unsent results are kept"),
    Option("exec_timeout", ("--exec-timeout",), "float", 3600.0,
           "seconds before a remote command is killed (default 3600; 0 = never)", check=_not_negative),
    Option("exec_max_output", ("--exec-max-output",), "int", 1048576,
           "bytes of command output kept (head and tail; default 1 MiB)", check=_positive),
    Option("max_execs", ("--max-execs",), "int", 8, "remote commands running at once (default 8)", check=_positive),
    Option("max_terminals", ("--max-terminals",), "int", 4, "terminal sessions at once (default 4)", check=_positive),
    Option("config", ("--config",), "str", "", "JSON config file (snake_case keys)",
           json_keys=("config_file",), env=("AGENT_CONFIG_FILE", "AGENT_CONFIG")),
    Option("dry_run", ("--dry-run",), "bool", False,
           "print the basic info and one report as JSON and exit; needs no panel"),
    Option("log_level", ("--log-level",), "str", "info", "debug, info, warning or error (default info)",
           check=lambda v: None if v.lower() in ("debug", "info", "warning", "error") else "must be debug, info, warning or error"),
]
OPTION_BY_DEST = {o.dest: o for o in OPTIONS}
# Flags the official agent dropped or renamed over the years: removed, with a warning.
DEPRECATED_FLAGS = {
    "-autoUpdate": "deprecated since 0.0.9, use --disable-auto-update",
    "--autoUpdate": "deprecated since 0.0.9, use --disable-auto-update",
    "-memory-mode-available": "deprecated, no effect; use --memory-include-cache",
}
TRUE_WORDS = ("1", "true", "yes", "on")
FALSE_WORDS = ("0", "false", "no", "off", "")


def convert(option, value, origin):
    """The value of `option` from a string (flag, env) or a JSON value, or ConfigError."""
    name = origin
    if option.kind == "bool":
        if isinstance(value, bool):
            return value
        word = str(value).strip().lower()
        if word in TRUE_WORDS:
            return True
        if word in FALSE_WORDS:
            return False
        raise ConfigError("%s: expected true or false, got %r" % (name, value))
    if option.kind in ("int", "float"):
        if isinstance(value, bool) or value is None:
            raise ConfigError("%s: expected a number, got %r" % (name, value))
        try:
            number = float(value) if option.kind == "float" else int(str(value).strip(), 10)
        except (TypeError, ValueError):
            if option.kind == "int" and isinstance(value, float) and value.is_integer():
                number = int(value)
            else:
                raise ConfigError("%s: expected %s, got %r" % (
                    name, "a number" if option.kind == "float" else "a whole number", value))
        if option.kind == "float" and number != number or number in (float("inf"), float("-inf")):
            raise ConfigError("%s: expected a finite number, got %r" % (name, value))
    else:
        if isinstance(value, (dict, list)) or value is None:
            raise ConfigError("%s: expected a string, got %r" % (name, value))
        number = str(value).strip() if not isinstance(value, bool) else str(value).lower()
    problem = option.check(number) if option.check else None
    if problem:
        raise ConfigError("%s %s (got %r)" % (name, problem, value))
    return number


class ArgParser(argparse.ArgumentParser):
    def error(self, message):
        raise ConfigError(message)


def build_arg_parser():
    parser = ArgParser(prog=PROG, allow_abbrev=False, argument_default=argparse.SUPPRESS,
                       description="Komari monitoring agent (protocol v1), version %s." % __version__,
                       epilog="Every option can also be set as AGENT_<NAME> in the environment or as a "
                              "snake_case key in the --config JSON file; the command line wins over the "
                              "environment, which wins over the file.")
    for option in OPTIONS:
        kwargs = {"dest": option.dest, "help": option.help}
        if option.kind == "bool":
            kwargs.update(nargs="?", const="true", metavar="BOOL")
        else:
            kwargs["metavar"] = option.metavar or option.kind.upper().replace("STR", "VALUE")
        parser.add_argument(*option.flags, **kwargs)
    parser.add_argument("--version", action="version", version="komari_agent.py " + __version__)
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
    try:
        with open(path, "rb") as f:
            raw = f.read()
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
    cli, unknown = build_arg_parser().parse_known_args(argv)
    for arg in unknown:
        if arg.startswith("-"):
            warnings.append("ignoring unknown option %s (from a newer official agent?)" % arg.split("=", 1)[0])
        else:
            warnings.append("ignoring stray argument %r" % arg)
    cli = vars(cli)
    values = {o.dest: o.default for o in OPTIONS}
    origin = {}

    config_path = cli.get("config") or next((environ[n] for n in OPTION_BY_DEST["config"].env if environ.get(n)), "")
    if config_path:
        data = read_config_file(config_path)
        known = set()
        for option in OPTIONS:
            for key in option.json_keys:
                if key in data:
                    known.add(key)
                    if option.dest != "config":
                        values[option.dest] = convert(option, data[key], "%s in %s" % (key, config_path))
                        origin[option.dest] = "file"
        for key in sorted(set(data) - known):
            warnings.append("ignoring unknown key %r in %s" % (key, config_path))
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
    values["host_proc"] = (environ.get("HOST_PROC") or "/proc").rstrip("/") or "/proc"
    cfg = argparse.Namespace(**values)
    return finish_config(cfg, warnings), warnings


def finish_config(cfg, warnings):
    """Cross-field checks and derived values."""
    if cfg.memory_mode_available:
        warnings.append("memory_mode_available is deprecated and has no effect; use --memory-include-cache")
    if cfg.protocol_version not in (0, 1):
        warnings.append("protocol version %d is not spoken by this agent; using v1" % cfg.protocol_version)
    if cfg.auto_discovery:
        warnings.append("auto-discovery is not supported yet; set --token")
    if cfg.disable_auto_update is False:
        pass  # nothing to update: the script is updated by re-running install.sh
    if not cfg.dry_run:
        if not cfg.endpoint:
            raise ConfigError("no panel endpoint: pass --endpoint https://your-panel (or AGENT_ENDPOINT)")
        if not cfg.token:
            raise ConfigError("no token: pass --token TOKEN from the panel (or AGENT_TOKEN)")
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
    parts = urlsplit(url)
    if parts.scheme.lower() not in ("http", "https") or not parts.hostname:
        raise ConfigError("endpoint must look like https://panel.example.com (got %r)" % endpoint)
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


def state_dir(cfg):
    """Where state that must survive restarts lives (traffic totals, undelivered
    results): --state-dir, else beside the script when writable, else the
    user's state directory (/var/lib/komari-agent for root). Never the working
    directory, which a service manager may set anywhere."""
    if cfg.state_dir:
        return os.path.abspath(os.path.expanduser(cfg.state_dir))
    beside = os.path.join(os.path.dirname(os.path.abspath(__file__)), "state")
    if os.access(os.path.dirname(beside), os.W_OK) and (not os.path.exists(beside) or os.access(beside, os.W_OK)):
        return beside
    if hasattr(os, "geteuid") and os.geteuid() == 0:
        return "/var/lib/komari-agent"
    base = os.environ.get("XDG_STATE_HOME") or os.path.join(os.path.expanduser("~"), ".local", "state")
    return os.path.join(base, "komari-agent")


def write_atomic(path, data, mode=0o600):
    """Replace `path` with `data` so that a crash leaves the old or the new
    file, never a torn one: temp file, fsync, rename, fsync the directory."""
    directory = os.path.dirname(path) or "."
    os.makedirs(directory, mode=0o700, exist_ok=True)
    temp = "%s.tmp-%d-%d" % (path, os.getpid(), threading.get_ident())
    fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
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


# ---------------------------------------------------------------------------
# Collectors: /proc readers and the pure arithmetic behind each figure
# ---------------------------------------------------------------------------

IS_LINUX = sys.platform.startswith("linux")


def read_text(path):
    with open(path, "r", encoding="utf-8", errors="replace") as f:
        return f.read()


def first_line(path):
    with open(path, "r", encoding="ascii", errors="replace") as f:
        return f.readline()


def describe_error(error):
    """A short, public-safe text for a failed collector (no paths, no secrets)."""
    if isinstance(error, OSError) and error.strerror:
        return error.strerror
    return type(error).__name__


def psutil_module():
    import psutil  # imported only where /proc is not enough
    return psutil


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


def cpu_percent(previous, current):
    """Busy share of all CPUs between two (busy, total) samples, 0.001-100.
    Never 0: the server drops a zero usage (omitempty)."""
    busy = current[0] - previous[0]
    total = current[1] - previous[1]
    if total <= 0:
        return 100.0 if busy > 0 else 0.001
    return min(100.0, max(0.001, busy * 100.0 / total))


# -- memory ------------------------------------------------------------------

def parse_meminfo(text):
    """/proc/meminfo as {field: bytes}."""
    info = {}
    for line in text.splitlines():
        name, _, rest = line.partition(":")
        parts = rest.split()
        if parts:
            try:
                info[name] = int(parts[0]) * (1024 if len(parts) > 1 else 1)
            except ValueError:
                pass
    return info


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


def statvfs_usage(path):
    st = os.statvfs(path)
    total = st.f_blocks * st.f_frsize
    return total, (st.f_blocks - st.f_bfree) * st.f_frsize, st.f_bavail * st.f_frsize


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

# Virtual NICs whose traffic is already counted on a physical NIC.
VIRTUAL_NIC_PREFIXES = ("lo", "br", "cni", "docker", "podman", "flannel", "veth", "virbr", "vmbr", "tap",
                        "fwbr", "fwpr", "kube", "tun", "vnet")


def nic_counted(name, include=(), exclude=()):
    """Whether a NIC's bytes count. An explicit include wins over everything;
    with an include list, nothing else counts."""
    if include:
        return any(fnmatchcase(name, p) for p in include)
    if name.startswith(VIRTUAL_NIC_PREFIXES):
        return False
    return not any(fnmatchcase(name, p) for p in exclude)


def parse_net_dev(text):
    """/proc/net/dev as {nic: (rx_bytes, tx_bytes)}."""
    counters = {}
    for line in text.splitlines()[2:]:
        name, sep, rest = line.partition(":")
        fields = rest.split()
        if sep and len(fields) >= 9:
            counters[name.strip()] = (int(fields[0]), int(fields[8]))
    return counters


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


# -- connections -------------------------------------------------------------

def parse_sockstat(text):
    """{"TCP": {"inuse": n, "tw": n, ...}, "UDP": {...}} from /proc/net/sockstat(6)."""
    table = {}
    for line in text.splitlines():
        name, _, rest = line.partition(":")
        words = rest.split()
        table[name.strip()] = {words[i]: int(words[i + 1]) for i in range(0, len(words) - 1, 2)
                               if words[i + 1].isdigit()}
    return table


def connections_from_sockstat(v4_text, v6_text):
    """(tcp, udp) socket counts, every state, IPv4 + IPv6. TCP's tw counter
    covers both families; TCP6 inuse is kept apart from TCP inuse."""
    v4 = parse_sockstat(v4_text)
    v6 = parse_sockstat(v6_text) if v6_text else {}
    tcp = v4.get("TCP", {}).get("inuse", 0) + v4.get("TCP", {}).get("tw", 0) + v6.get("TCP6", {}).get("inuse", 0)
    udp = v4.get("UDP", {}).get("inuse", 0) + v6.get("UDP6", {}).get("inuse", 0)
    return tcp, udp


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


# -- static facts for basic info -----------------------------------------------

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


ARM_PARTS = {"0xd03": "Cortex-A53", "0xd04": "Cortex-A35", "0xd05": "Cortex-A55", "0xd07": "Cortex-A57",
             "0xd08": "Cortex-A72", "0xd09": "Cortex-A73", "0xd0a": "Cortex-A75", "0xd0b": "Cortex-A76",
             "0xd0c": "Neoverse-N1", "0xd0d": "Cortex-A77", "0xd40": "Neoverse-V1", "0xd41": "Cortex-A78",
             "0xd44": "Cortex-X1", "0xd46": "Cortex-A510", "0xd47": "Cortex-A710", "0xd48": "Cortex-X2",
             "0xd49": "Neoverse-N2", "0xd4f": "Neoverse-V2", "0xc07": "Cortex-A7", "0xc09": "Cortex-A9",
             "0xc0f": "Cortex-A15"}


def cpu_name_from_cpuinfo(text):
    """The CPU model; never empty."""
    values = {}
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        key = key.strip()
        if sep and key not in values and value.strip():
            values[key] = value.strip()
    for key in ("model name", "Model", "Hardware", "cpu model", "Processor", "cpu"):
        if values.get(key):
            return values[key]
    part = values.get("CPU part", "").lower()
    if part in ARM_PARTS and values.get("CPU implementer", "").lower() == "0x41":
        return "ARM " + ARM_PARTS[part]
    return "Unknown"


def logical_cpus(cpuinfo_text):
    count = sum(1 for line in cpuinfo_text.splitlines() if line.startswith("processor"))
    return count or os.cpu_count() or 1


def physical_cores(sys_cpu="/sys/devices/system/cpu"):
    """Distinct cores by topology; 0 when unknown."""
    cores = set()
    try:
        names = [n for n in os.listdir(sys_cpu) if n.startswith("cpu") and n[3:].isdigit()]
    except OSError:
        return 0
    for name in names:
        for leaf in ("core_cpus_list", "thread_siblings_list"):
            try:
                cores.add(read_text(os.path.join(sys_cpu, name, "topology", leaf)).strip())
                break
            except OSError:
                continue
    return len(cores)


def os_name_from_release(text):
    for line in text.splitlines():
        if line.startswith("PRETTY_NAME="):
            return line.split("=", 1)[1].strip().strip("\"'")
    return ""


def os_name():
    for path, key in (("/etc/os-release", None), ("/usr/lib/os-release", None),
                      ("/etc/openwrt_release", "DISTRIB_DESCRIPTION=")):
        try:
            text = read_text(path)
        except OSError:
            continue
        if key is None:
            name = os_name_from_release(text)
        else:
            name = next((l.split("=", 1)[1].strip().strip("\"'") for l in text.splitlines() if l.startswith(key)), "")
        if name:
            return name
    return platform.system() or "Unknown"


def run_quiet(argv, timeout=3.0):
    """stdout of a helper program, or "" when it is missing, fails or hangs."""
    import subprocess
    try:
        done = subprocess.run(argv, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                              stdin=subprocess.DEVNULL, timeout=timeout)
    except (OSError, subprocess.SubprocessError):
        return ""
    return done.stdout.decode("utf-8", "replace") if done.returncode == 0 else ""


def gpu_names_from_lspci(text):
    names = []
    for line in text.splitlines():
        low = line.lower()
        if "vga" in low or "3d controller" in low or "display controller" in low:
            name = line.rsplit(":", 1)[-1].strip()
            name = re.sub(r"\s*\(rev [0-9a-f]+\)$", "", name)
            if name and not re.search(r"virtio|vmware|qxl|hyper-v|cirrus|bochs", name, re.I):
                names.append(name)
    return names


def group_names(names):
    """"A × 2, B" for [A, A, B]."""
    counts = {}
    for name in names:
        counts[name] = counts.get(name, 0) + 1
    return ", ".join(n if c == 1 else "%s \u00d7 %d" % (n, c) for n, c in counts.items())


def gpu_name():
    names = [l.strip() for l in run_quiet(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"]).splitlines()
             if l.strip()]
    if not names:
        names = gpu_names_from_lspci(run_quiet(["lspci"]))
    return group_names(names)


def virtualization_from_cgroup(text):
    for line in text.splitlines():
        low = line.lower()
        if re.search(r"/(docker|cri-containerd)[-/][0-9a-f]{12,64}(\.scope)?$", low):
            return "docker"
        if re.search(r"/(libpod|podman)[-_][0-9a-f]{12,64}(\.scope)?$", low):
            return "podman"
        if re.search(r"/kubepods[/.]", low):
            return "kubernetes"
        if re.search(r"/lxc(\.payload)?[./]", low):
            return "lxc"
    return ""


DMI_VENDORS = (("kvm", "kvm"), ("qemu", "qemu"), ("vmware", "vmware"), ("virtualbox", "oracle"),
               ("microsoft", "microsoft"), ("xen", "xen"), ("bochs", "bochs"), ("parallels", "parallels"),
               ("amazon ec2", "amazon"), ("google compute", "google"), ("openstack", "kvm"),
               ("bhyve", "bhyve"))


def virtualization():
    answer = run_quiet(["systemd-detect-virt"]).strip()
    if answer:
        return answer
    if os.path.exists("/.dockerenv"):
        return "docker"
    if os.path.exists("/run/.containerenv"):
        return "podman"
    try:
        verdict = virtualization_from_cgroup(read_text("/proc/1/cgroup"))
        if verdict:
            return verdict
    except OSError:
        pass
    if os.path.exists("/proc/vz") and not os.path.exists("/proc/bc"):
        return "openvz"
    try:
        if "microsoft" in read_text("/proc/sys/kernel/osrelease").lower():
            return "wsl"
    except OSError:
        pass
    dmi = ""
    for leaf in ("sys_vendor", "product_name", "bios_vendor"):
        try:
            dmi += " " + read_text("/sys/class/dmi/id/" + leaf).lower()
        except OSError:
            pass
    for needle, name in DMI_VENDORS:
        if needle in dmi:
            return name
    try:
        if re.search(r"^flags\s*:.*\bhypervisor\b", read_text("/proc/cpuinfo"), re.M):
            return "virtualized"
    except OSError:
        pass
    return "none"


# -- public addresses ----------------------------------------------------------

IPV4_LOOKUPS = ("https://api.ipify.org", "https://ipv4.icanhazip.com", "https://www.cloudflare.com/cdn-cgi/trace",
                "http://ipv4.ip.sb")
IPV6_LOOKUPS = ("https://api6.ipify.org", "https://ipv6.icanhazip.com", "https://www.cloudflare.com/cdn-cgi/trace",
                "http://ipv6.ip.sb")


def first_address(text, family):
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


def fetch_over_family(url, family, timeout):
    """Body of a GET to `url` connecting only over `family` (so the answer is
    our IPv4 or IPv6 address, whatever the resolver prefers)."""
    import http.client
    from urllib.parse import urlsplit
    parts = urlsplit(url)
    port = parts.port or (443 if parts.scheme == "https" else 80)
    address = socket.getaddrinfo(parts.hostname, port, family, socket.SOCK_STREAM)[0][4]
    sock = socket.create_connection(address[:2], timeout=timeout)
    try:
        if parts.scheme == "https":
            sock = ssl.create_default_context().wrap_socket(sock, server_hostname=parts.hostname)
        conn = http.client.HTTPConnection(parts.hostname, port, timeout=timeout)
        conn.sock = sock
        conn.request("GET", (parts.path or "/") + ("?" + parts.query if parts.query else ""),
                     headers={"User-Agent": "curl/8.0.1"})
        return conn.getresponse().read(4096).decode("utf-8", "replace")
    finally:
        sock.close()


def lookup_public_ip(family, timeout=4.0):
    for url in IPV4_LOOKUPS if family == socket.AF_INET else IPV6_LOOKUPS:
        try:
            address = first_address(fetch_over_family(url, family, timeout), family)
        except (OSError, ValueError, ssl.SSLError, Exception):  # any failure: try the next service
            continue
        if address:
            return address
    return ""


def nic_addresses(cfg):
    """(ipv4, ipv6): the first global-ish address of a counted NIC."""
    import ipaddress
    v4 = v6 = ""
    try:
        addrs = psutil_module().net_if_addrs()
    except Exception:
        return "", ""
    for nic, entries in addrs.items():
        if not nic_counted(nic, cfg.nics_include, cfg.nics_exclude):
            continue
        for entry in entries:
            try:
                ip = ipaddress.ip_address(entry.address.split("%")[0])
            except ValueError:
                continue
            if ip.is_loopback or ip.is_link_local:
                continue
            if ip.version == 4 and not v4:
                v4 = str(ip)
            elif ip.version == 6 and not v6:
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
        if cfg.get_ip_addr_from_nic:
            v4, v6 = nic_addresses(cfg)
            self.v4, self.v6 = cfg.custom_ipv4 or v4, cfg.custom_ipv6 or v6
        else:
            threads = []
            if not cfg.custom_ipv4:
                threads.append(threading.Thread(target=lambda: setattr(self, "v4", lookup_public_ip(socket.AF_INET) or self.v4)))
            if not cfg.custom_ipv6:
                threads.append(threading.Thread(target=lambda: setattr(self, "v6", lookup_public_ip(socket.AF_INET6) or self.v6)))
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


def basic_info(cfg, collector, addresses, wait=IP_LOOKUP_WAIT):
    """The basic-info object: exactly the keys the server has columns for."""
    try:
        cpuinfo = read_text("/proc/cpuinfo")
    except OSError:
        cpuinfo = ""
    ipv4, ipv6 = addresses.current(wait)
    ram, swap, disk = collector.ram_swap_disk_totals()
    info = {
        "cpu_name": cpu_name_from_cpuinfo(cpuinfo) if cpuinfo else (platform.processor() or "Unknown"),
        "cpu_cores": logical_cpus(cpuinfo),
        "cpu_physical_cores": physical_cores(),
        "arch": go_arch(platform.machine()),
        "os": os_name(),
        "kernel_version": platform.release() or "Unknown",
        "gpu_name": collector.static.get("gpu_name", ""),
        "virtualization": collector.static.get("virtualization", ""),
        "ipv4": ipv4,
        "ipv6": ipv6,
        "mem_total": int(ram),
        "swap_total": int(swap),
        "disk_total": int(disk),
        "version": __version__,
    }
    return info


# -- the report ----------------------------------------------------------------

class Collector:
    """Everything that changes between reports: CPU and NIC baselines, the
    mount table cache. One instance lives for the whole run so speeds and CPU
    usage stay continuous across reconnects."""

    MOUNTS_TTL = 30.0

    def __init__(self, cfg):
        self.cfg = cfg
        self.proc = cfg.host_proc
        self.net = NetMeter()
        self.cpu_previous = None
        self.mounts = None
        self.mounts_at = 0.0
        self.static = {}
        self.traffic = None   # a TrafficLedger when --month-rotate is set
        self.lock = threading.Lock()
        self.cpu_sample()  # baseline, so the first report has a real CPU figure

    def load_static(self):
        """Slow facts that need helper programs; looked up once."""
        if not self.static:
            self.static = {"gpu_name": gpu_name(), "virtualization": virtualization()}

    # each collector returns its figure or raises; report() turns failures into message lines
    def cpu_sample(self):
        if IS_LINUX:
            return cpu_busy_total(first_line(self.proc + "/stat"))
        t = psutil_module().cpu_times()
        total = sum(t)
        return total - t.idle - getattr(t, "iowait", 0), total

    def cpu_usage(self):
        current = self.cpu_sample()
        previous, self.cpu_previous = self.cpu_previous, current
        return cpu_percent(previous, current) if previous else 0.001

    def memory(self):
        if IS_LINUX:
            info = parse_meminfo(read_text(self.proc + "/meminfo"))
            if info.get("MemTotal"):
                return ram_usage(info, self.cfg.memory_include_cache), swap_usage(info)
        ps = psutil_module()
        vm, sw = ps.virtual_memory(), ps.swap_memory()
        used = vm.total - vm.free if self.cfg.memory_include_cache else vm.total - vm.available
        return (vm.total, max(0, used)), (sw.total, sw.used)

    def load(self):
        if IS_LINUX:
            parts = first_line(self.proc + "/loadavg").split()
            return float(parts[0]), float(parts[1]), float(parts[2])
        return os.getloadavg()

    def mount_table(self):
        now = time.monotonic()
        if self.mounts is None or now - self.mounts_at > self.MOUNTS_TTL:
            if IS_LINUX:
                path = self.proc + "/1/mountinfo" if self.proc != "/proc" else "/proc/self/mountinfo"
                self.mounts = countable_mounts(parse_mountinfo(read_text(path)))
            else:
                self.mounts = [("dev:" + p.device, Mount(p.device, "/", p.mountpoint, p.fstype, p.device, p.opts))
                               for p in psutil_module().disk_partitions(all=False)]
            self.mounts_at = now
        return self.mounts

    def disk(self):
        usages = []
        if self.cfg.mountpoints:
            for i, path in enumerate(dict.fromkeys(self.cfg.mountpoints)):
                try:
                    usages.append(("path:%d" % i,) + statvfs_usage(path))
                except OSError:
                    continue
        else:
            for key, mount in self.mount_table():
                try:
                    usages.append((key,) + statvfs_usage(mount.mountpoint))
                except OSError:
                    continue
        return sum_disk_usage(usages)

    def nic_counters(self):
        """{nic: (rx, tx)} over the counted NICs."""
        if IS_LINUX:
            raw = parse_net_dev(read_text(self.proc + "/net/dev"))
        else:
            raw = {n: (c.bytes_recv, c.bytes_sent) for n, c in psutil_module().net_io_counters(pernic=True).items()}
        cfg = self.cfg
        return {n: c for n, c in raw.items() if nic_counted(n, cfg.nics_include, cfg.nics_exclude)}

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
        net = self.proc + "/net/"
        if IS_LINUX:
            try:
                v4 = read_text(net + "sockstat")
            except OSError:
                v4 = None
            if v4:
                try:
                    v6 = read_text(net + "sockstat6")
                except OSError:
                    v6 = ""
                return connections_from_sockstat(v4, v6)
            return (count_table_rows([net + "tcp", net + "tcp6"]), count_table_rows([net + "udp", net + "udp6"]))
        conns = psutil_module().net_connections("inet")
        tcp = sum(1 for c in conns if c.type == socket.SOCK_STREAM)
        return tcp, len(conns) - tcp

    def uptime(self):
        if hasattr(time, "CLOCK_BOOTTIME"):
            return int(time.clock_gettime(time.CLOCK_BOOTTIME))
        return int(time.time() - psutil_module().boot_time())

    def process_count(self):
        if IS_LINUX:
            return sum(1 for name in os.listdir(self.proc) if name.isdigit())
        return len(psutil_module().pids())

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

    def report(self):
        """One realtime report. A collector that fails gives zeros and a line in
        `message`; it never stops the report."""
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
            report = {
                "cpu": {"usage": finite(usage, 0.001, 100.0)},
                "ram": {"total": count(ram_total), "used": count(ram_used)},
                "swap": {"total": count(swap_total), "used": count(swap_used)},
                "load": {"load1": finite(load1, 0.0, 1000.0), "load5": finite(load5, 0.0, 1000.0),
                         "load15": finite(load15, 0.0, 1000.0)},
                "disk": {"total": count(disk_total), "used": count(disk_used)},
                "network": {"up": count(up), "down": count(down), "totalUp": count(total_up),
                            "totalDown": count(total_down)},
                "connections": {"tcp": count(tcp), "udp": count(udp)},
                "uptime": count(uptime),
                "process": count(processes),
                "message": "\n".join(failures),
            }
            if self.cfg.gpu:
                gpu = attempt("gpu", gpu_details, None)
                if gpu:
                    report["gpu"] = gpu
                    report["message"] = "\n".join(failures)
            return report


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


def gpu_details():
    """The report's optional gpu block from nvidia-smi, or None without a GPU."""
    text = run_quiet(["nvidia-smi", "--query-gpu=name,memory.total,memory.used,utilization.gpu,temperature.gpu",
                      "--format=csv,noheader,nounits"], timeout=2.0)
    devices = []
    for line in text.splitlines():
        fields = [f.strip() for f in line.split(",")]
        if len(fields) < 5:
            continue

        def number(text, scale=1):
            try:
                return float(text) * scale
            except ValueError:
                return 0.0
        devices.append({"name": fields[0], "memory_total": count(number(fields[1], 1 << 20)),
                        "memory_used": count(number(fields[2], 1 << 20)),
                        "utilization": finite(number(fields[3]), 0.0, 100.0),
                        "temperature": count(number(fields[4]))})
    if not devices:
        return None
    return {"count": len(devices), "average_usage": sum(d["utilization"] for d in devices) / len(devices),
            "detailed_info": devices}


def encode(obj):
    """Compact JSON exactly as it goes on the wire; NaN is an error, not a token."""
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False, allow_nan=False)


# -- monthly traffic (--month-rotate) -------------------------------------------

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
    return time.strftime("%Y-%m-%d %H:%M", time.localtime(t)) if isinstance(t, (int, float)) else "?"


def reset_moment(year, month, day):
    """00:00 local time on `day` of the month, or on its last day when the month is shorter."""
    import calendar
    while month < 1:
        year, month = year - 1, month + 12
    while month > 12:
        year, month = year + 1, month - 12
    day = min(day, calendar.monthrange(year, month)[1])
    return time.mktime((year, month, day, 0, 0, 0, 0, 0, -1))


def period_bounds(reset_day, now):
    """(start, end) epoch seconds of the accounting period that holds `now`."""
    t = time.localtime(now)
    start = reset_moment(t.tm_year, t.tm_mon, reset_day)
    if now < start:
        return reset_moment(t.tm_year, t.tm_mon - 1, reset_day), start
    return start, reset_moment(t.tm_year, t.tm_mon + 1, reset_day)


def parse_size(text):
    """Bytes from '120G', '1.5T', '512MiB', '100' (units K M G T P, 1024-based); ValueError if not a size."""
    match = re.match(r"^\s*(\d+(?:\.\d*)?|\.\d+)\s*(?:([kmgtp])(?:i?b)?|b)?\s*$", str(text), re.IGNORECASE)
    if not match:
        raise ValueError("not a size: %r (use a number with K, M, G, T or P, e.g. 120G or 1.5T)" % text)
    power = SIZE_UNITS.index(match.group(2).upper()) + 1 if match.group(2) else 0
    return int(round(float(match.group(1)) * 1024 ** power))


def human_size(n):
    for power in range(len(SIZE_UNITS), 0, -1):
        if n >= 1024 ** power:
            return "%.2f %siB" % (n / 1024.0 ** power, SIZE_UNITS[power - 1])
    return "%d B" % n


def boot_identity(proc="/proc"):
    """(boot id, boot time in epoch seconds): a different id means the counters restarted."""
    try:
        boot_id = first_line(proc + "/sys/kernel/random/boot_id").strip()
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
        try:
            boot_time = float(psutil_module().boot_time())
        except Exception:
            boot_time = time.time() - time.monotonic()
    return boot_id or "btime:%d" % round(boot_time, -1), boot_time


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


def net_static_candidates(cwd=None):
    """Where an official agent that this one replaced left its net_static.json."""
    dirs = [os.path.dirname(os.path.abspath(__file__)), cwd or os.getcwd(), OFFICIAL_INSTALL_DIR]
    return [os.path.join(d, NET_STATIC) for d in dict.fromkeys(dirs)]


def read_json_object(path):
    """A JSON object from `path`; OSError or ValueError otherwise."""
    with open(path, "rb") as f:
        data = json.loads(f.read().decode("utf-8"))
    if not isinstance(data, dict):
        raise ValueError("not a JSON object")
    return data


def whole(value):
    """A non-negative int from stored JSON, 0 for anything else."""
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else 0


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
        self.boot_id, self.boot_time = boot or boot_identity()
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
        """Take over the saved state; False when there is none."""
        try:
            data = read_json_object(self.path)
            self.take_state(data)
        except FileNotFoundError:
            return False
        except (OSError, ValueError, TypeError, AttributeError) as e:
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
            self.start = float(start)
            self.end = float(data.get("period_end") or period_bounds(self.reset_day, self.start)[1])
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
        self.calibrated_at = float(data.get("calibrated_at") or 0)
        self.state_boot_id = str(data.get("boot_id") or "") or None
        sampled_at = data.get("sampled_at")
        self.sampled_at = float(sampled_at) if isinstance(sampled_at, (int, float)) else None
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
            write_atomic(self.path, json.dumps(self.snapshot(now), indent=1, sort_keys=True).encode())
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
            at = float(data.get("at") or 0)
        except (OSError, ValueError, TypeError) as e:
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


def traffic_ledger(cfg):
    """The TrafficLedger for --month-rotate, or None without it."""
    if not cfg.month_rotate:
        return None
    include, exclude = cfg.nics_include, cfg.nics_exclude
    ledger = TrafficLedger(state_dir(cfg), cfg.month_rotate, lambda nic: nic_counted(nic, include, exclude),
                           import_path=cfg.import_net_static, import_candidates=net_static_candidates(),
                           boot=boot_identity(cfg.host_proc))
    log.info("traffic: counting from %s (reset day %d), state in %s",
             local_time(ledger.start), cfg.month_rotate, ledger.path)
    return ledger


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
    try:
        args, rest = parser.parse_known_args(argv)
        sizes = {k: parse_size(v) for k, v in (("up", args.set_up), ("down", args.set_down)) if v is not None}
        cfg, _ = load_config(rest + ["--dry-run"], environ)
    except (ConfigError, ValueError) as e:
        sys.stderr.write("%s traffic: error: %s\n" % (PROG, e))
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
    if args.show or not sizes:
        shown = show_traffic(directory, calibration)
        return 0 if sizes else shown
    return 0


def show_traffic(directory, calibration):
    path = os.path.join(directory, TRAFFIC_FILE)
    try:
        data = read_json_object(path)
    except (OSError, ValueError) as e:
        print("no traffic state in %s (%s): is the agent running with --month-rotate and this --state-dir?"
              % (directory, describe_error(e)))
        return 1
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


# ---------------------------------------------------------------------------
# Transport: HTTP uploads and the report WebSocket
# ---------------------------------------------------------------------------

class PanelRefused(Exception):
    """The panel answered, but not with success."""

    def __init__(self, status, detail):
        super().__init__("HTTP %s %s" % (status, detail))
        self.status = status
        self.detail = detail


def tls_context(cfg):
    if cfg.ignore_unsafe_cert:
        context = ssl.create_default_context()
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
        return context
    return ssl.create_default_context()


def describe_body(body):
    """One line for a reply we did not expect (an HTML error page from a proxy,
    a JSON error from the panel)."""
    text = body[:2000].decode("utf-8", "replace")
    title = re.search(r"<title>(.*?)</title>", text, re.I | re.S)
    if title:
        return "an HTML page %r" % title.group(1).strip()[:80]
    if "<html" in text.lower():
        return "an HTML page"
    return repr(" ".join(text.split())[:160])


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

    def opener(self):
        if self._opener is None:
            import urllib.request
            self._opener = urllib.request.build_opener(urllib.request.HTTPSHandler(context=tls_context(self.cfg)))
        return self._opener

    def post_json(self, path, obj, timeout=HTTP_TIMEOUT):
        """POST obj; returns the decoded JSON reply, or raises PanelRefused
        (the panel said no) or OSError (it could not be reached)."""
        import urllib.error
        import urllib.request
        request = urllib.request.Request(self.url(path), data=encode(obj).encode("utf-8"), method="POST",
                                         headers={"Content-Type": "application/json",
                                                  "User-Agent": "komari-agent-py/" + __version__})
        try:
            with self.opener().open(request, timeout=timeout) as reply:
                status, body = reply.status, reply.read(1 << 20)
        except urllib.error.HTTPError as e:
            status, body = e.code, e.read(4096) if e.fp else b""
        except urllib.error.URLError as e:
            reason = e.reason
            raise reason if isinstance(reason, OSError) else OSError(str(reason))
        except (ValueError, http_exceptions()) as e:
            raise OSError("bad HTTP exchange: %s" % type(e).__name__)
        try:
            parsed = json.loads(body.decode("utf-8"))
        except ValueError:
            parsed = None
        # a proxy or a wrong endpoint can answer 200 with HTML: insist on the JSON success
        if status != 200 or not isinstance(parsed, dict) or parsed.get("status") != "success":
            raise PanelRefused(status, describe_body(body))
        return parsed


def http_exceptions():
    import http.client
    return http.client.HTTPException


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
        panel.post_json("/api/clients/uploadBasicInfo", info)
        return
    except PanelRefused as e:
        if e.status in (401, 200) or "kernel_version" not in info:
            raise
    older = {k: v for k, v in info.items() if k not in ("kernel_version", "cpu_physical_cores")}
    panel.post_json("/api/clients/uploadBasicInfo", older)


class LinkClosed(Exception):
    pass


def open_websocket(cfg, url, timeout=WS_CONNECT_TIMEOUT):
    """A connected websocket-client WebSocket: no Origin header (the panel's
    browser origin policy would apply), no compression, proxies from the
    environment, TLS verified unless -u."""
    import websocket
    sslopt = {"cert_reqs": ssl.CERT_NONE, "check_hostname": False} if cfg.ignore_unsafe_cert else {}
    kwargs = {}
    if cfg.prefer_ip_version:
        kwargs["socket"] = preferred_socket(cfg, url, timeout)
    ws = websocket.create_connection(url, timeout=timeout, suppress_origin=True, sslopt=sslopt,
                                     enable_multithread=True, skip_utf8_validation=True, **kwargs)
    return ws


def preferred_socket(cfg, url, timeout):
    """A TCP (and TLS) socket to the URL's host, trying the preferred address
    family first."""
    from urllib.parse import urlsplit
    parts = urlsplit(url)
    secure = parts.scheme == "wss"
    port = parts.port or (443 if secure else 80)
    infos = socket.getaddrinfo(parts.hostname, port, 0, socket.SOCK_STREAM)
    want = socket.AF_INET6 if cfg.prefer_ip_version == "6" else socket.AF_INET
    infos.sort(key=lambda info: info[0] != want)
    error = OSError("no address for %s" % parts.hostname)
    for family, kind, proto, _, address in infos:
        sock = socket.socket(family, kind, proto)
        sock.settimeout(timeout)
        try:
            sock.connect(address)
        except OSError as e:
            sock.close()
            error = e
            continue
        if secure:
            sock = tls_context(cfg).wrap_socket(sock, server_hostname=parts.hostname)
        return sock
    raise error


def handshake_problem(error):
    """One line explaining a failed WebSocket dial."""
    status = getattr(error, "status_code", None)
    if status == 401:
        return "the panel refused the token (HTTP 401); check --token"
    if status == 200:
        return "the panel answered with a web page instead of a WebSocket (HTTP 200): check --endpoint " \
               "(no extra path, no doubled slash)"
    if status is not None:
        return "the panel answered HTTP %s instead of a WebSocket upgrade" % status
    return "%s: %s" % (type(error).__name__, error)


class ReportLink:
    """One report WebSocket: every write goes through one lock (reports,
    ping results and pings come from different threads); a reader thread
    dispatches the server's frames and notes when anything was last heard."""

    def __init__(self, ws, on_message):
        self.ws = ws
        self.on_message = on_message
        self.write_lock = threading.Lock()
        self.dead = threading.Event()
        self.last_heard = time.monotonic()
        self.ping_sent = None
        self.why = ""
        self.reader = threading.Thread(target=self._read_loop, name="ws-reader", daemon=True)

    def start(self):
        # a short socket timeout bounds every blocked send; the reader treats
        # timeouts as "nothing yet" and keeps going
        self.ws.settimeout(5.0)
        self.reader.start()

    def send_text(self, text):
        self._write(lambda: self.ws.send(text))

    def send_ping(self):
        self.ping_sent = time.monotonic()
        self._write(lambda: self.ws.ping(b"komari"))

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

    def silent_too_long(self, now):
        """True when a ping went unanswered past the deadline."""
        return self.ping_sent is not None and self.last_heard < self.ping_sent and \
            now - self.ping_sent > PONG_DEADLINE

    def fail(self, why):
        if not self.dead.is_set():
            self.why = why
            self.dead.set()

    def close(self, status=1000):
        self.fail(self.why or "closed")
        try:
            # never wait on a dead peer: the close frame gets one short chance
            self.ws.sock and self.ws.sock.settimeout(0.5)
            self.ws.close(status=status, timeout=0.5)
        except Exception:
            pass
        try:
            self.ws.shutdown()
        except Exception:
            pass

    def _read_loop(self):
        import websocket
        while not self.dead.is_set():
            try:
                opcode, frame = self.ws.recv_data_frame(True)
            except websocket.WebSocketTimeoutException:
                continue
            except Exception as e:
                self.fail("connection lost (%s)" % (describe_error(e) if isinstance(e, OSError) else type(e).__name__))
                return
            self.last_heard = time.monotonic()
            if opcode == websocket.ABNF.OPCODE_CLOSE:
                self.fail("the panel closed the connection")
                return
            if opcode in (websocket.ABNF.OPCODE_TEXT, websocket.ABNF.OPCODE_BINARY):
                try:
                    self.on_message(self, frame.data)
                except Exception:
                    log.exception("error while handling a message from the panel; skipped")


# ---------------------------------------------------------------------------
# Tasks: events from the panel
# ---------------------------------------------------------------------------

MAX_MESSAGE_BYTES = 1 << 20


def parse_event(data):
    """The event dict from a frame, or None (with the reason logged) when the
    frame is not a JSON object."""
    if len(data) > MAX_MESSAGE_BYTES:
        log.warning("skipping a %d-byte message from the panel: too large", len(data))
        return None
    try:
        text = data.decode("utf-8") if isinstance(data, bytes) else data
        event = json.loads(text)
    except (ValueError, RecursionError, UnicodeDecodeError) as e:
        log.warning("skipping a message from the panel that is not JSON (%s)", type(e).__name__)
        return None
    if not isinstance(event, dict):
        log.warning("skipping a message from the panel that is not a JSON object")
        return None
    return event


class Tasks:
    """Runs the panel's events off the reader thread. The exec, ping and
    terminal handlers live below."""

    def __init__(self, agent):
        self.agent = agent
        self.error_once = OncePer()

    def handle(self, link, data):
        event = parse_event(data)
        if event is None:
            return
        kind = event.get("message")
        if event.get("status") == "error" and not kind:
            text = str(event.get("error") or event.get("message") or "")[:200]
            if self.error_once(text):
                log.warning("the panel reported an error: %s", text)
            return
        handler = {"exec": self.on_exec, "ping": self.on_ping, "terminal": self.on_terminal}.get(kind)
        if handler is None:
            log.info("ignoring an unknown event %r from the panel", str(kind)[:40])
            return
        handler(link, event)

    def on_exec(self, link, event):
        log.warning("remote exec is not available in this version; ignored")

    def on_ping(self, link, event):
        log.warning("ping probes are not available in this version; ignored")

    def on_terminal(self, link, event):
        log.warning("the web terminal is not available in this version; ignored")

    def shutdown(self):
        """Called once on SIGTERM/SIGINT: end what is running."""


# ---------------------------------------------------------------------------
# The agent loop
# ---------------------------------------------------------------------------

def backoff_delay(base, round_number, cap=BACKOFF_CAP, rng=random.random):
    """Seconds to wait before the next connect attempt: `base` in the first
    round, doubling each round up to `cap`, with +-20% jitter so a fleet of
    agents does not reconnect in lockstep."""
    delay = min(cap, base * (2 ** min(round_number, 16)))
    return max(0.1, min(cap, delay * (0.8 + 0.4 * rng())))


class Agent:
    def __init__(self, cfg):
        self.cfg = cfg
        self.stop = threading.Event()
        self.panel = Panel(cfg)
        self.collector = Collector(cfg)
        self.collector.traffic = traffic_ledger(cfg)
        self.addresses = PublicAddresses(cfg, on_change=self.want_basic_info)
        self.tasks = Tasks(self)
        self.link = None
        self.info_wanted = threading.Event()
        self.refused_log = OncePer(60.0)
        self.period = min(cfg.interval, MAX_REPORT_GAP)

    # -- basic info ---------------------------------------------------------
    def want_basic_info(self):
        self.info_wanted.set()

    def info_loop(self):
        """Uploads basic info when asked (start, connect, lookups changed) and
        every --info-report-interval minutes."""
        self.collector.load_static()
        next_due = time.monotonic()
        while not self.stop.is_set():
            timeout = max(0.0, next_due - time.monotonic())
            if self.info_wanted.wait(timeout) or time.monotonic() >= next_due:
                self.info_wanted.clear()
                if self.stop.is_set():
                    return
                self.upload_info_with_retries()
                next_due = time.monotonic() + self.cfg.info_report_interval * 60

    def upload_info_with_retries(self):
        info = basic_info(self.cfg, self.collector, self.addresses)
        for attempt in range(self.cfg.max_retries + 1):
            try:
                upload_basic_info(self.panel, info)
                log.info("basic info uploaded")
                return True
            except PanelRefused as e:
                if self.refused_log(("info", e.status)):
                    log.error(explain_refusal(e, "basic info upload failed"))
                if e.status == 401:
                    return False
            except OSError as e:
                if self.refused_log(("info-net", type(e).__name__)):
                    log.warning("basic info upload failed: %s", describe_error(e))
            if self.stop.wait(min(2.0 * (attempt + 1), 10.0)):
                return False
        return False

    # -- results ------------------------------------------------------------
    def deliver_result(self, result):
        """POST an exec result in the background, retrying until the panel
        takes it (the panel overwrites on a repeated POST, so retrying is safe)."""
        threading.Thread(target=self._post_result, args=(result,), name="task-result", daemon=True).start()

    def _post_result(self, result):
        attempt = 0
        while not self.stop.is_set():
            try:
                self.panel.post_json("/api/clients/task/result", result)
                log.info("result of task %s delivered", result.get("task_id"))
                return True
            except PanelRefused as e:
                if self.refused_log(("result", e.status)):
                    log.warning(explain_refusal(e, "task result upload failed"))
            except OSError as e:
                if self.refused_log(("result-net", type(e).__name__)):
                    log.warning("task result upload failed: %s", describe_error(e))
            attempt += 1
            if self.stop.wait(backoff_delay(2.0, attempt - 1, cap=30.0)):
                return False
        return False

    def send_on_link(self, obj):
        """Send a JSON message on the report socket; False when there is none."""
        link = self.link
        if link is None:
            return False
        try:
            link.send_text(encode(obj))
            return True
        except LinkClosed:
            return False

    # -- the report socket --------------------------------------------------
    def connect(self):
        """A live ReportLink, after as many attempts as it takes; None once stopping."""
        round_number = 0
        while not self.stop.is_set():
            for attempt in range(max(1, self.cfg.max_retries)):
                try:
                    ws = open_websocket(self.cfg, self.panel.ws_url("/api/clients/report"))
                except Exception as e:
                    problem = handshake_problem(e)
                    if self.refused_log(("ws", problem)):
                        log.warning("cannot connect the report socket: %s", problem)
                    if getattr(e, "status_code", None) == 401:
                        round_number = max(round_number, 3)
                    if self.stop.wait(backoff_delay(self.cfg.reconnect_interval, round_number)):
                        return None
                    continue
                return ReportLink(ws, self.tasks.handle)
            round_number += 1
            self.want_basic_info()
        return None

    def serve(self, link):
        """Report every period until the link dies or the agent stops."""
        self.link = link
        link.start()
        log.info("report socket connected")
        self.want_basic_info()
        next_report = time.monotonic()
        next_ping = next_report + PING_EVERY
        try:
            while not self.stop.is_set() and not link.dead.is_set():
                now = time.monotonic()
                if now >= next_report:
                    link.send_text(encode(self.collector.report()))
                    # keep the schedule; after a stall skip ahead instead of bursting
                    next_report = max(next_report + self.period, now)
                if now >= next_ping and not link.ping_outstanding():
                    link.send_ping()
                    next_ping = now + PING_EVERY
                if link.silent_too_long(now):
                    link.fail("no answer to a ping for %g s" % PONG_DEADLINE)
                    break
                wake = min(next_report, next_ping, (link.ping_sent or now) + PONG_DEADLINE + 0.05)
                link.dead.wait(max(0.01, wake - time.monotonic()))
        except LinkClosed:
            pass
        if not self.stop.is_set():
            log.warning("report socket lost: %s; reconnecting", link.why or "closed")
        link.close()
        self.link = None

    def run(self):
        threading.Thread(target=self.info_loop, name="basic-info", daemon=True).start()
        self.want_basic_info()
        while not self.stop.is_set():
            link = self.connect()
            if link is None:
                break
            self.serve(link)

    def shutdown(self):
        self.stop.set()
        self.collector.traffic and self.collector.traffic.flush()
        self.info_wanted.set()
        self.tasks.shutdown()
        link = self.link
        if link is not None:
            link.close()


# ---------------------------------------------------------------------------
# main()
# ---------------------------------------------------------------------------

def dry_run(cfg):
    """Print the basic info and one report, each as the one line of JSON that
    would go on the wire."""
    collector = Collector(cfg)
    collector.load_static()
    addresses = PublicAddresses(cfg)
    info = basic_info(cfg, collector, addresses)
    collector.report()  # baseline for speeds
    time.sleep(min(cfg.interval, 1.0))
    sys.stdout.write(encode(info) + "\n")
    sys.stdout.write(encode(collector.report()) + "\n")
    sys.stdout.flush()
    return 0


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["traffic"]:
        return traffic_command(argv[1:], os.environ)
    try:
        cfg, warnings = load_config(argv, os.environ)
    except ConfigError as e:
        sys.stderr.write("%s: error: %s\n" % (PROG, e))
        return 2
    setup_logging(getattr(logging, cfg.log_level.upper()))
    hide_secret(cfg.token)
    for warning in warnings:
        log.warning(warning)
    if cfg.dry_run:
        return dry_run(cfg)
    log.info("Komari agent (Python) %s, panel %s, report every %gs", __version__, cfg.endpoint, cfg.interval)
    agent = Agent(cfg)

    def on_signal(signum, frame):
        agent.stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    worker = threading.Thread(target=agent.run, name="agent", daemon=True)
    worker.start()
    while not agent.stop.wait(1.0):
        if not worker.is_alive():
            log.error("the agent loop ended unexpectedly")
            return 1
    log.info("shutting down")
    agent.shutdown()
    worker.join(1.5)
    return 0


if __name__ == "__main__":
    sys.exit(main())
