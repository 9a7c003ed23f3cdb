#!/bin/sh
# install.sh: install komari_agent.py with its dependencies as a boot-persistent service
# (systemd, OpenRC, procd, launchd on macOS, rc.d on FreeBSD, else a cron keep-alive).
#
#   curl -fsSL https://…/install.sh | sh -s -- -e https://panel.example.com -t TOKEN [agent flags]
#
# POSIX sh (dash, busybox ash). Takes the official installer's options (-e/-t, --install-dir,
# --install-service-name, --install-ghproxy, --install-version) plus every agent flag, which is
# passed to the service unchanged. Run with --help for the rest. Re-running updates in place and
# keeps the settings; --uninstall removes only what this script created. Where the official Go
# agent's service is installed, it is replaced in place: its settings are taken over, it is stopped
# and disabled (its files are kept), and it is started again if ours does not reach the panel.
# Every service restarts the agent whatever its exit status, 42 (the update's) included, sets
# KOMARI_AGENT_SUPERVISED=1 (SUPERVISED) so that an updated agent exits with 42 for it instead of
# executing itself in place, and runs it as `python3 -m komari_agent` from the install directory:
# it starts from the bytecode compiled at install time instead of compiling the file at every start.
#
# Everything lives inside main(), called on the last line, so a download cut short runs nothing,
# and every command gets </dev/null so that nothing eats the rest of a script read from a pipe.

# Every file this script writes carries this mark; --uninstall checks for it.
MARK='written by komari_agent.py install.sh'
# Where komari_agent.py comes from when not run from a checkout: the one place that names it
# (--source and KOMARI_AGENT_URL override it).
DEFAULT_AGENT_URL='https://raw.githubusercontent.com/OWNER/REPO/main/komari_agent.py'
# Seconds to wait for the started agent to reach the panel, and, when it replaced the official
# agent, before giving the box back to that one (KOMARI_INSTALL_WAIT overrides both).
WAIT_CONNECTED=20
WAIT_REPLACED=60
# Seconds an official agent that ran as a bare process is watched after it is stopped, for
# something that starts it again (a supervisor that restarts within this catches it).
RESPAWN_WATCH=5
# Same as requirements.txt (a test keeps them equal); used when no requirements.txt is at hand.
REQUIREMENTS='psutil>=5.6
websocket-client>=1.0'
# Set by every service definition, never by run-agent.sh: an agent that has updated itself exits
# with status 42 for the service manager to start the new version, where one started by hand
# (--no-service) executes it in place, since nothing would restart it.
SUPERVISED='KOMARI_AGENT_SUPERVISED=1'

# ---- output -------------------------------------------------------------------------------

say() { printf '%s\n' "$*"; }
warn() { printf 'install.sh: warning: %s\n' "$*" >&2; }
die() { printf 'install.sh: error: %s\n' "$*" >&2; exit 1; }
usage_error() { printf 'install.sh: error: %s (see --help)\n' "$*" >&2; exit 2; }

usage() {
	cat <<'EOF'
Usage: install.sh -e ENDPOINT -t TOKEN [options] [agent flags]
A first install needs -e and -t (or an official agent's service to take them from); a re-run
keeps the last install's settings. Without arguments install.sh prints this text and stops.
  -e, --endpoint URL            panel URL (kept from the last install when left out)
  -t, --token TOKEN             client token (kept in a 0600 config file, never on a command line)
  --install-dir DIR             default /opt/SERVICE_NAME as root, else ~/.local/share/SERVICE_NAME
  --install-service-name NAME   default komari-agent
  --install-ghproxy PREFIX      put PREFIX/ in front of GitHub download URLs (once)
  --install-version TAG         accepted for the official installer's sake; ignored
  --source URL|PATH             where to get komari_agent.py (default: $KOMARI_AGENT_URL, else
                                the copy beside this script, else the project's download URL)
  --pip-index-url URL           package index for pip (a mirror)
  --venv-system-site-packages   let the virtual environment see the system's Python packages
  --service KIND                auto (default), systemd, systemd-user, openrc, procd, launchd,
                                rc.d, cron
  --no-service                  install files and dependencies only
  --no-start                    write the service definition but do not enable or start it
  --uninstall                   stop the service and remove what install.sh created, except
                                state/ (traffic totals, undelivered results)
  --purge                       with --uninstall: remove state/ too
  --restore-official            with --uninstall: start the official agent this install replaced
  --take-over-official          an official agent running as a bare process (no service): take
                                its settings and stop it (without this, install.sh does not
                                install a second agent for its token)
  --dry-run                     print every action, change nothing
  -h, --help                    this text
Any other argument is an agent flag (see komari_agent.py --help) and is passed on unchanged;
the agent checks them all before anything is written.
An official Go agent found here (its systemd, OpenRC, procd or launchd service) is replaced: its
endpoint, token and flags are taken over, it is stopped and disabled (its files are kept), and it
is started again if ours has not reached the panel within 60 s.
Environment: KOMARI_PYTHON (interpreter, default python3), KOMARI_AGENT_URL (see --source),
KOMARI_INSTALL_ROOT (a fake root, for tests: every path install.sh reads or writes is inside it,
the install directory included; the service manager is the one its files show; the crontab is a
file there; enabling is the link or file a service manager would make; no process is started,
stopped or looked for), KOMARI_INSTALL_WAIT (seconds to wait for the agent to reach the panel:
20, 60 when replacing the official agent, 0 under KOMARI_INSTALL_ROOT, where nothing is started).
EOF
}

# q WORD: WORD single-quoted for sh.
q() { printf "'%s'" "$(printf '%s' "$1" | sed "s/'/'\\\\''/g")"; }

# at PATH: where PATH is on this box. Under KOMARI_INSTALL_ROOT that is inside the root; a path
# already inside it stays as it is.
at() {
	case $1 in
	"$ROOT" | "$ROOT"/*) printf '%s' "$1" ;;
	*) printf '%s%s' "$ROOT" "$1" ;;
	esac
}

# ---- actions: each one prints itself under --dry-run instead of running ---------------------

run() {
	if [ -n "$DRY_RUN" ]; then say "would run: $*"; return 0; fi
	"$@" </dev/null
}

# write_file PATH MODE: PATH gets stdin's text, atomically (temp file + rename).
write_file() {
	if [ -n "$DRY_RUN" ]; then
		say "would write $1 (mode $2):"
		sed 's/^/    | /'
		return 0
	fi
	mkdir -p "$(dirname "$1")" || die "cannot create $(dirname "$1")"
	if ! { cat >"$1.tmp.$$" && chmod "$2" "$1.tmp.$$" && mv -f "$1.tmp.$$" "$1"; }; then
		rm -f "$1.tmp.$$"
		die "cannot write $1"
	fi
}

make_dir() {
	[ -d "$1" ] && return 0
	if [ -n "$DRY_RUN" ]; then say "would create directory $1"; return 0; fi
	mkdir -p "$1" || die "cannot create directory $1"
}

remove() {
	[ -e "$1" ] || [ -L "$1" ] || return 0
	if [ -n "$DRY_RUN" ]; then say "would remove $1"; return 0; fi
	rm -rf "$1"
}

# ---- the manifest: what this script created, the only things --uninstall removes -------------

in_manifest() { printf '%s\n' "$MANIFEST" | grep -Fqx -- "$1"; }

# claim PATH: call before creating PATH. Something that was already there and is not ours from
# an earlier run (a panel's file in a shared directory) is never claimed.
claim() {
	if [ ! -e "$1" ] || in_manifest "$1"; then own "$1"; fi
}

# claim_parents PATH: the directories that must be made for PATH are ours (deepest last).
claim_parents() {
	set -- "$(dirname "$1")" # positional parameters: the only locals POSIX sh has
	[ -d "$1" ] && return 0
	claim_parents "$1"
	claim "$1"
}

# own PATH: PATH is ours whatever was there (service definitions of our service name).
own() {
	in_manifest "$1" && return 0
	MANIFEST="$MANIFEST
$1"
	save_manifest
}

save_manifest() {
	[ -n "$DRY_RUN" ] && return 0
	[ -d "$DIR" ] || return 0
	printf '# %s: what --uninstall removes\n%s\n' "$MARK" "$MANIFEST" | grep -v '^$' >"$DIR/install.manifest.tmp" &&
		mv -f "$DIR/install.manifest.tmp" "$DIR/install.manifest"
}

load_manifest() {
	MANIFEST=''
	[ -f "$DIR/install.manifest" ] && MANIFEST=$(grep -v '^#' "$DIR/install.manifest")
	return 0
}

# ---- small facts about the box -------------------------------------------------------------

have() { command -v "$1" >/dev/null 2>&1; }
is_root() { [ "$(id -u)" = 0 ]; }
pid1() { cat /proc/1/comm 2>/dev/null; }

# os: the kernel's name (Linux, Darwin, FreeBSD).
os() { uname -s 2>/dev/null; }

detect_service() {
	case $(os) in
	Darwin) echo launchd; return ;;
	FreeBSD) if is_root; then echo rc.d; else echo cron; fi; return ;;
	esac
	if [ -n "$ROOT" ]; then
		# a fake root: the service manager its files show, as no process of it runs
		if [ -d "$ROOT/run/systemd/system" ] || [ -d "$ROOT/etc/systemd/system" ]; then
			if is_root; then echo systemd; else echo systemd-user; fi
		elif is_root && { [ -d "$ROOT/run/openrc" ] || [ -x "$ROOT/sbin/openrc-run" ] || [ -d "$ROOT/etc/runlevels" ]; }; then
			echo openrc
		elif is_root && [ -f "$ROOT/etc/rc.common" ]; then
			echo procd
		else
			echo cron
		fi
	elif ! is_root; then
		if have systemctl && systemctl --user show-environment >/dev/null 2>&1 </dev/null; then
			echo systemd-user
		else
			echo cron
		fi
	elif [ -d /run/systemd/system ] && have systemctl; then
		echo systemd
	elif have openrc-run && { [ -d /run/openrc ] || [ "$(pid1)" = openrc-init ]; }; then
		echo openrc
	elif [ -f /etc/rc.common ] && { [ "$(pid1)" = procd ] || have uci; }; then
		echo procd
	else
		echo cron
	fi
}

# with_ghproxy URL: URL behind the --install-ghproxy prefix when it is a GitHub URL; a URL that
# already goes through a proxy is not a GitHub URL, so the prefix is never added twice.
with_ghproxy() {
	if [ -z "$GHPROXY" ]; then printf '%s' "$1"; return; fi
	case $1 in
	https://github.com/* | https://raw.githubusercontent.com/* | https://objects.githubusercontent.com/* | https://gist.githubusercontent.com/*)
		printf '%s/%s' "${GHPROXY%/}" "$1" ;;
	*) printf '%s' "$1" ;;
	esac
}

# fetch URL DEST: curl, else wget, else Python itself. On failure FETCH_ERROR says why, with
# the HTTP status where there was one ("HTTP 404").
fetch() {
	FETCH_ERROR=''
	if [ -n "$DRY_RUN" ]; then say "would download $1 to $2"; return 0; fi
	if have curl; then
		code=$(curl -sSL --retry 2 --connect-timeout 20 -o "$2" -w '%{http_code}' "$1" 2>"$2.err" </dev/null)
		rc=$?
		case $rc:$code in
		0:2??) rm -f "$2.err"; return 0 ;;
		0:*) FETCH_ERROR="HTTP $code" ;;
		*) FETCH_ERROR=$(tail -n 1 "$2.err") ;;
		esac
	elif have wget; then
		wget -S -q -T 20 -O "$2" "$1" 2>"$2.err" </dev/null && { rm -f "$2.err"; return 0; }
		code=$(sed -n 's/^ *HTTP\/[0-9.]* \([0-9][0-9][0-9]\).*/\1/p' "$2.err" | tail -n 1)
		FETCH_ERROR=${code:+HTTP $code}
	else
		"$PY" - "$1" "$2" 2>"$2.err" <<'EOF' && { rm -f "$2.err"; return 0; }
import sys, urllib.error, urllib.request
try:
    data = urllib.request.urlopen(sys.argv[1], timeout=20).read()
except urllib.error.HTTPError as e:
    sys.exit("HTTP %d" % e.code)
except Exception as e:
    sys.exit(str(e))
open(sys.argv[2], "wb").write(data)
EOF
		FETCH_ERROR=$(tail -n 1 "$2.err")
	fi
	rm -f "$2" "$2.err"
	return 1
}

# download_failed URL: one line, and what to do about it.
download_failed() {
	why=${FETCH_ERROR:-no answer}
	if [ "$SOURCE" = "$DEFAULT_AGENT_URL" ]; then
		where="the default address in this install.sh"
	else
		where="from --source or KOMARI_AGENT_URL"
	fi
	case $FETCH_ERROR in
	'HTTP 404') die "cannot download komari_agent.py from $1: HTTP 404, not found ($where); set --source URL|PATH or KOMARI_AGENT_URL to where komari_agent.py is published" ;;
	*) die "cannot download komari_agent.py from $1: $why ($where); check the address and the network, or set --source URL|PATH or KOMARI_AGENT_URL" ;;
	esac
}

# ---- Python and the dependencies ------------------------------------------------------------

check_python() {
	if ! have "$PY"; then
		die "$PY not found: install Python 3.8 or newer first (Debian/Ubuntu: apt-get install python3 python3-venv; Alpine: apk add python3; Fedora/RHEL: dnf install python3; OpenWrt: opkg install python3), then run this again"
	fi
	"$PY" -c 'import sys' </dev/null >/dev/null 2>&1 || die "$PY does not run: $("$PY" -c 'import sys' 2>&1 </dev/null | tail -n 1)"
	"$PY" -c 'import sys; sys.exit(sys.version_info < (3, 8))' </dev/null ||
		die "$("$PY" -V 2>&1) is too old: komari_agent.py needs Python 3.8 or newer"
	PY=$(command -v "$PY")
}

# requirements_met PYTHON [PYTHONPATH]: are psutil and websocket-client importable at the versions
# requirements.txt asks for?
requirements_met() {
	PYTHONPATH=${2:-} KI_REQUIREMENTS=$(cat "$REQ_FILE") "$1" - <<'EOF' >/dev/null 2>&1
import os, re, sys
import psutil, websocket  # noqa: F401 - importable is the point
from importlib import metadata
def numbers(version):
    return tuple(int(n) for n in re.findall(r"\d+", version)[:3])
for line in os.environ["KI_REQUIREMENTS"].splitlines():
    m = re.match(r"\s*([A-Za-z0-9_.-]+)\s*>=\s*([0-9.]+)", line)
    if m and numbers(metadata.version(m.group(1))) < numbers(m.group(2)):
        sys.exit(1)
EOF
}

pip_index_args() {
	[ -n "$PIP_INDEX_URL" ] && printf -- '--index-url\n%s\n' "$PIP_INDEX_URL"
	return 0
}

# see_python_packages VENV_PYTHON: where $PY is itself in a virtual environment, the packages
# it sees are that environment's, not the base Python's; a .pth file lets the new one see them.
see_python_packages() {
	dirs=$("$PY" -c 'import sys; sys.prefix != sys.base_prefix and print("\n".join(p for p in sys.path if p.endswith(("site-packages", "dist-packages"))))' </dev/null 2>/dev/null)
	[ -n "$dirs" ] || return 0
	target=$("$1" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])' </dev/null 2>/dev/null) || return 0
	printf '%s\n' "$dirs" >"$target/komari-install-python-packages.pth"
}

# deps_venv: a virtual environment in DIR/venv (made without pip first, so that nothing is
# downloaded when the packages it can see already do).
deps_venv() {
	venv_python="$DIR/venv/bin/python"
	made_venv=
	if ! "$venv_python" -c 'import sys' >/dev/null 2>&1 </dev/null; then
		if [ -e "$DIR/venv" ]; then
			in_manifest "$DIR/venv" || return 1 # somebody else's directory: leave it alone
			rm -rf "$DIR/venv"
		fi
		claim "$DIR/venv"
		"$PY" -m venv --without-pip ${VENV_SYSTEM_SITE:+--system-site-packages} "$DIR/venv" </dev/null >/dev/null 2>&1 || {
			rm -rf "$DIR/venv"
			return 1
		}
		made_venv=1
		[ -z "$VENV_SYSTEM_SITE" ] || see_python_packages "$venv_python"
	fi
	if ! requirements_met "$venv_python"; then
		"$venv_python" -m pip --version >/dev/null 2>&1 </dev/null ||
			"$venv_python" -m ensurepip --default-pip >/dev/null 2>&1 </dev/null || {
			say "no ensurepip for $PY (Debian/Ubuntu: apt-get install python3-venv)"
			[ -n "$made_venv" ] && rm -rf "$DIR/venv"
			return 1
		}
		# shellcheck disable=SC2046 # one word per line on purpose
		"$venv_python" -m pip install -q $(pip_index_args) -r "$REQ_FILE" </dev/null || return 1
		requirements_met "$venv_python" || return 1
	fi
	RUN_PYTHON=$venv_python RUN_PYTHONPATH='' DEPS="virtual environment $DIR/venv"
}

# deps_distro: the distribution's packages for the system Python (root only).
deps_distro() {
	is_root || return 1
	if have apt-get; then
		manager=apt-get
		set -- apt-get install -y -q python3-psutil python3-websocket
		DEBIAN_FRONTEND=noninteractive "$@" </dev/null || {
			apt-get update -q </dev/null && DEBIAN_FRONTEND=noninteractive "$@" </dev/null
		}
	elif have apk; then
		manager=apk
		apk add --no-cache py3-psutil py3-websocket-client </dev/null
	elif have dnf; then
		manager=dnf
		dnf install -y python3-psutil python3-websocket-client </dev/null
	elif have yum; then
		manager=yum
		yum install -y python3-psutil python3-websocket-client </dev/null
	elif have opkg; then
		manager=opkg
		opkg update </dev/null
		opkg install python3-psutil python3-websocket-client </dev/null
	else
		return 1
	fi
	requirements_met "$PY" || return 1
	RUN_PYTHON=$PY RUN_PYTHONPATH='' DEPS="distribution packages for $PY ($manager)"
}

# deps_target: pip install --target DIR/lib with the system Python's pip.
deps_target() {
	"$PY" -m pip --version >/dev/null 2>&1 </dev/null || return 1
	claim "$DIR/lib"
	# shellcheck disable=SC2046 # one word per line on purpose
	"$PY" -m pip install -q --upgrade $(pip_index_args) --target "$DIR/lib" -r "$REQ_FILE" </dev/null || return 1
	requirements_met "$PY" "$DIR/lib" || return 1
	RUN_PYTHON=$PY RUN_PYTHONPATH=$DIR/lib DEPS="pip install --target $DIR/lib"
}

install_dependencies() {
	if [ -n "$DRY_RUN" ]; then
		RUN_PYTHON=$DIR/venv/bin/python RUN_PYTHONPATH=''
		if "$PY" -c 'import venv, ensurepip' >/dev/null 2>&1 </dev/null; then
			say "would create the virtual environment $DIR/venv and pip install -r requirements.txt into it"
		else
			say "would fall back to distribution packages or pip install --target $DIR/lib (no venv/ensurepip for $PY)"
		fi
		return 0
	fi
	say "==> psutil and websocket-client"
	deps_venv || { requirements_met "$PY" && RUN_PYTHON=$PY RUN_PYTHONPATH='' DEPS="already installed for $PY"; } ||
		deps_distro || deps_target ||
		die "could not install psutil and websocket-client for $PY: install python3-venv (Debian/Ubuntu), or the distribution's python3-psutil and python3-websocket packages, or pip, then run this again"
	say "dependencies: $DEPS"
}

# ---- files in the install directory ---------------------------------------------------------

# obtain_agent: AGENT_FILE is a komari_agent.py to install: the --source file itself, or a
# download into a temporary directory. Nothing is written to the install directory yet.
obtain_agent() {
	if [ -f "$SOURCE" ]; then
		AGENT_FILE=$SOURCE
	else
		url=$(with_ghproxy "$SOURCE")
		say "==> downloading komari_agent.py from $url"
		AGENT_FILE=''
		[ -n "$DRY_RUN" ] && { fetch "$url" "$DIR/komari_agent.py"; return 0; }
		WORK=$(mktemp -d "${TMPDIR:-/tmp}/komari-install.XXXXXX") || die "cannot create a temporary directory"
		AGENT_FILE=$WORK/komari_agent.py
		fetch "$url" "$AGENT_FILE" || download_failed "$url"
	fi
	# A proxy's error page must not replace a working agent.
	if ! grep -q 'Komari' "$AGENT_FILE" ||
		! "$PY" -c 'import ast, sys; ast.parse(open(sys.argv[1], "rb").read())' "$AGENT_FILE" </dev/null 2>/dev/null; then
		die "$SOURCE is not komari_agent.py"
	fi
}

install_agent_file() {
	[ -z "$AGENT_FILE" ] && return 0 # dry run of a download: said so above
	verb=installing
	[ -z "$UPDATING" ] || verb=updating
	say "==> $verb komari_agent.py from $SOURCE"
	[ -n "$DRY_RUN" ] && { say "would copy $AGENT_FILE to $DIR/komari_agent.py"; return 0; }
	cp "$AGENT_FILE" "$DIR/komari_agent.py.new" || die "cannot copy $AGENT_FILE"
	claim "$DIR/komari_agent.py"
	chmod 0644 "$DIR/komari_agent.py.new" && mv -f "$DIR/komari_agent.py.new" "$DIR/komari_agent.py"
	# what the agent's self-update leaves beside it: the version before (.previous), and the
	# download a killed update did not clear (.update). Ours whenever the agent file is, even
	# when they are already there (written before the manifest listed them).
	if in_manifest "$DIR/komari_agent.py"; then
		own "$DIR/komari_agent.py.previous"
		own "$DIR/komari_agent.py.update"
	fi
}

# check_settings: the agent itself checks the settings the service will run with (the flags,
# the config file as it will be, no AGENT_* from this shell) and prints them; its one-line
# error stops the install before anything is written.
# shellcheck disable=SC2120 # "$@" is the agent flags, set inside
check_settings() {
	if [ -z "$AGENT_FILE" ]; then
		say "would check the settings with the downloaded komari_agent.py --check"
		return 0
	fi
	config=''
	[ -f "$DIR/config.json" ] && config=$DIR/config.json
	checked=$(
		# shellcheck disable=SC2046 # one name per word on purpose
		unset $(env | sed -n 's/^\(AGENT_[A-Za-z0-9_]*\)=.*/\1/p')
		eval "set -- $AGENT_ARGS"
		AGENT_ENDPOINT=$ENDPOINT AGENT_TOKEN=$TOKEN AGENT_AUTO_DISCOVERY_KEY=$DISCOVERY \
			"$PY" "$AGENT_FILE" ${config:+--config "$config"} --state-dir "$DIR/state" "$@" --check 2>&1 </dev/null
	) || {
		# a bad setting, like a bad option: exit 2
		printf 'install.sh: error: the agent refuses these settings: %s\n' \
			"$(printf '%s\n' "$checked" | tail -n 1 | sed 's/^komari_agent.py: error: //')" >&2
		exit 2
	}
	printf '%s\n' "$checked" | sed -n 's/^[0-9/]* [0-9:]* WARNING /install.sh: warning: agent: /p' >&2
	# The agent's own printout (its masking), each value labelled with where install.sh took it
	# from: the agent saw the flags on its command line, -e/-t in its environment and the kept
	# ones in config.json.
	printf '%s\n' "$checked" | grep -v -e '^[0-9/]* [0-9:]* [A-Z]* ' -e '^  state directory' | sed \
		-e "s/(command line)\$/($ARGS_FROM)/" \
		-e "/^  --endpoint /s/(environment)\$/($ENDPOINT_FROM)/" \
		-e "/^  --token /s/(environment)\$/($TOKEN_FROM)/" \
		-e "/^  --auto-discovery /s/(environment)\$/($DISCOVERY_FROM)/" \
		-e 's/(config file [^()]*)$/(kept from the last install)/'
	case $SAVED_AGENT_ARGS in
	*"'--disable-web-ssh'"* | *"'--disable-web-ssh=true'"*)
		case $AGENT_ARGS in
		*"'--disable-web-ssh'"* | *"'--disable-web-ssh=true'"*) ;;
		*) warn "this run drops --disable-web-ssh, which the last install had: remote control (exec, terminal) will be ON; add --disable-web-ssh to keep it off" ;;
		esac
		;;
	esac
	return 0
}

# write_config: endpoint, token and auto-discovery key go into a 0600 JSON file that the agent
# reads with --config; values come through the environment, never through argv.
write_config() {
	if [ -n "$DRY_RUN" ]; then
		token_note='kept'
		[ -n "$TOKEN" ] && token_note='given (not shown)'
		say "would write $DIR/config.json (mode 0600): endpoint ${ENDPOINT:-kept}, token $token_note"
		return 0
	fi
	KI_ENDPOINT=$ENDPOINT KI_TOKEN=$TOKEN KI_DISCOVERY=$DISCOVERY "$PY" - "$DIR/config.json" <<'EOF' ||
import json, os, sys
path = sys.argv[1]
try:
    with open(path) as f:
        config = json.load(f)
except FileNotFoundError:
    config = {}
for key, name in (("endpoint", "KI_ENDPOINT"), ("token", "KI_TOKEN"), ("auto_discovery_key", "KI_DISCOVERY")):
    if os.environ.get(name):
        config[key] = os.environ[name]
temp = path + ".tmp"
fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
os.fchmod(fd, 0o600)
with os.fdopen(fd, "w") as f:
    json.dump(config, f, indent=2)
    f.write("\n")
os.replace(temp, path)
EOF
		die "cannot write $DIR/config.json"
}

# config_has_credentials: does the config of an earlier install hold an endpoint and a token
# (or an auto-discovery key)?
config_has_credentials() {
	[ -f "$DIR/config.json" ] || return 1
	"$PY" -c 'import json, sys; c = json.load(open(sys.argv[1])); sys.exit(not (c.get("endpoint") and (c.get("token") or c.get("auto_discovery_key"))))' \
		"$DIR/config.json" </dev/null 2>/dev/null
}

# compile_agent: the agent's bytecode in DIR/__pycache__, for the interpreter that runs it, so
# that `-m komari_agent` starts from it (a script is compiled again at every start, and that
# peak of memory never goes back). Refreshed on every run.
compile_agent() {
	if [ -n "$DRY_RUN" ]; then say "would compile $DIR/komari_agent.py into $DIR/__pycache__"; return 0; fi
	claim "$DIR/__pycache__"
	(unset PYTHONPYCACHEPREFIX && "$RUN_PYTHON" -m compileall -q -f "$DIR/komari_agent.py" </dev/null >/dev/null) ||
		warn "could not compile $DIR/komari_agent.py: the agent compiles itself at every start"
}

# module_path: what the agent is imported from: the install directory, then DIR/lib if used.
module_path() { printf '%s%s' "$DIR" "${RUN_PYTHONPATH:+:$RUN_PYTHONPATH}"; }

write_launcher() {
	claim "$DIR/run-agent.sh"
	{
		printf '#!/bin/sh\n# %s: starts the agent. Re-run install.sh to change the flags.\n' "$MARK"
		printf 'cd %s || exit 1\n' "$(q "$DIR")"
		printf 'PYTHONPATH=%s\nexport PYTHONPATH\nunset PYTHONPYCACHEPREFIX\n' "$(q "$(module_path)")"
		printf 'exec %s -m komari_agent --config %s --state-dir %s%s "$@"\n' "$(q "$RUN_PYTHON")" \
			"$(q "$DIR/config.json")" "$(q "$DIR/state")" "$AGENT_ARGS"
	} | write_file "$DIR/run-agent.sh" 0755
}

# install.conf: the settings a re-run keeps (sourced by install.sh only).
write_settings() {
	claim "$DIR/install.conf"
	{
		printf '# %s: the settings a re-run of install.sh keeps\n' "$MARK"
		printf 'SAVED_AGENT_ARGS=%s\n' "$(q "$AGENT_ARGS")"
		printf 'SAVED_SERVICE=%s\n' "$(q "$SERVICE")"
		printf 'SAVED_GHPROXY=%s\n' "$(q "$GHPROXY")"
		printf 'SAVED_PIP_INDEX_URL=%s\n' "$(q "$PIP_INDEX_URL")"
		printf 'SAVED_VENV_SYSTEM_SITE=%s\n' "$(q "$VENV_SYSTEM_SITE")"
	} | write_file "$DIR/install.conf" 0600
}

load_settings() {
	SAVED_AGENT_ARGS='' SAVED_SERVICE='' SAVED_GHPROXY='' SAVED_PIP_INDEX_URL='' SAVED_VENV_SYSTEM_SITE=''
	if [ -f "$DIR/install.conf" ] && grep -Fq "$MARK" "$DIR/install.conf"; then
		# shellcheck disable=SC1091 # written by write_settings above
		. "$DIR/install.conf"
	fi
}

# ---- service definitions --------------------------------------------------------------------

unit_dir_user() { at "${XDG_CONFIG_HOME:-$HOME/.config}/systemd/user"; }

# launchd: a LaunchDaemon as root, a LaunchAgent (the user's own launchd domain) otherwise.
launchd_label() { printf 'com.komari.%s' "$1"; }
launchd_dir() { if is_root; then at /Library/LaunchDaemons; else at "$HOME/Library/LaunchAgents"; fi; }
launchd_domain() { if is_root; then printf system; else printf 'gui/%s' "$(id -u)"; fi; }
launchd_log() { if is_root; then printf '/var/log/%s.log' "$NAME"; else printf '%s/Library/Logs/%s.log' "$HOME" "$NAME"; fi; }

# rc.d: rc.subr names its variables after the script, with only letters, digits and _.
rcd_name() { printf '%s' "$NAME" | tr -c 'A-Za-z0-9_' '_'; }
rcd_enable_file() { printf '%s/etc/rc.conf.d/%s' "$ROOT" "$(rcd_name)"; }

service_file() {
	case $1 in
	systemd) printf '%s/etc/systemd/system/%s.service' "$ROOT" "$NAME" ;;
	systemd-user) printf '%s/%s.service' "$(unit_dir_user)" "$NAME" ;;
	openrc | procd) printf '%s/etc/init.d/%s' "$ROOT" "$NAME" ;;
	launchd) printf '%s/%s.plist' "$(launchd_dir)" "$(launchd_label "$NAME")" ;;
	rc.d) printf '%s/usr/local/etc/rc.d/%s' "$ROOT" "$NAME" ;;
	cron) printf '%s/keepalive.sh' "$DIR" ;;
	esac
}

# systemd_unit TARGET: a user manager has no network-online.target to wait for.
systemd_unit() {
	cat <<EOF
# $MARK; re-run it to change, or run it with --uninstall
[Unit]
Description=Komari monitoring agent (komari_agent.py)
EOF
	[ "$1" = multi-user.target ] && printf 'Wants=network-online.target\nAfter=network-online.target\n'
	cat <<EOF
StartLimitIntervalSec=0

[Service]
Type=simple
WorkingDirectory=$DIR
ExecStart=$DIR/run-agent.sh
Environment=PYTHONUNBUFFERED=1 $SUPERVISED
Restart=always
RestartSec=5

[Install]
WantedBy=$1
EOF
}

openrc_script() {
	cat <<EOF
#!/sbin/openrc-run
# $MARK; re-run it to change, or run it with --uninstall
name="$NAME"
description="Komari monitoring agent (komari_agent.py)"
command="$DIR/run-agent.sh"
directory="$DIR"
supervisor="supervise-daemon"
respawn_delay=5
respawn_max=0
pidfile="/run/$NAME.pid"
output_log="/var/log/$NAME.log"
error_log="/var/log/$NAME.log"
export $SUPERVISED

depend() {
	need net
	after firewall
}
EOF
}

# launchd_plist: KeepAlive starts the agent again whenever it exits, 5 s apart at most often.
launchd_plist() {
	cat <<EOF
<?xml version="1.0" encoding="UTF-8"?>
<!DOCTYPE plist PUBLIC "-//Apple//DTD PLIST 1.0//EN" "http://www.apple.com/DTDs/PropertyList-1.0.dtd">
<!-- $MARK; re-run it to change or to uninstall -->
<plist version="1.0">
<dict>
	<key>Label</key>
	<string>$(launchd_label "$NAME")</string>
	<key>ProgramArguments</key>
	<array>
		<string>$DIR/run-agent.sh</string>
	</array>
	<key>WorkingDirectory</key>
	<string>$DIR</string>
	<key>EnvironmentVariables</key>
	<dict>
		<key>PYTHONUNBUFFERED</key>
		<string>1</string>
		<key>${SUPERVISED%%=*}</key>
		<string>${SUPERVISED#*=}</string>
	</dict>
	<key>RunAtLoad</key>
	<true/>
	<key>KeepAlive</key>
	<true/>
	<key>ThrottleInterval</key>
	<integer>5</integer>
	<key>StandardOutPath</key>
	<string>$(launchd_log)</string>
	<key>StandardErrorPath</key>
	<string>$(launchd_log)</string>
</dict>
</plist>
EOF
}

# rcd_script: daemon(8) supervises the agent and starts it again 5 s after any exit (-r -R 5).
rcd_script() {
	rcname=$(rcd_name)
	cat <<EOF
#!/bin/sh
# $MARK; re-run it to change, or run it with --uninstall
#
# PROVIDE: $rcname
# REQUIRE: LOGIN NETWORKING
# KEYWORD: shutdown

. /etc/rc.subr

name="$rcname"
rcvar="${rcname}_enable"
load_rc_config "\$name"
: "\${${rcname}_enable:=NO}"

pidfile="/var/run/\${name}.pid"
command="/usr/sbin/daemon"
export $SUPERVISED
command_args="-r -R 5 -f -P \${pidfile} -t $NAME -o /var/log/$NAME.log $DIR/run-agent.sh"

run_rc_command "\$1"
EOF
}

# rcd_enable: what enables the rc.d script at boot (rc.conf.d, so /etc/rc.conf is left alone).
rcd_enable() {
	printf '# %s: %s starts at boot\n%s_enable="YES"\n' "$MARK" "$NAME" "$(rcd_name)"
}

procd_script() {
	cat <<EOF
#!/bin/sh /etc/rc.common
# $MARK; re-run it to change, or run it with --uninstall
USE_PROCD=1
START=99
STOP=10

start_service() {
	procd_open_instance
	procd_set_param command "$DIR/run-agent.sh"
	procd_set_param env $SUPERVISED
	procd_set_param respawn 3600 5 0
	procd_set_param stdout 1
	procd_set_param stderr 1
	procd_close_instance
}
EOF
}

keepalive_script() {
	cat <<EOF
#!/bin/sh
# $MARK: keeps the agent running where no service manager does (started by cron @reboot)
dir=$(q "$DIR")
export $SUPERVISED
EOF
	cat <<'EOF'
log="$dir/agent.log"
pidfile="$dir/keepalive.pid"
if [ -f "$pidfile" ] && kill -0 "$(cat "$pidfile")" 2>/dev/null; then exit 0; fi
echo $$ >"$pidfile"
child=
trap '' HUP
trap 'kill "$child" 2>/dev/null; wait "$child"; rm -f "$pidfile"; exit 0' TERM INT
while :; do
	# keep about 2 MB of log: one old file
	if [ -f "$log" ] && [ "$(wc -c <"$log")" -gt 1048576 ]; then mv -f "$log" "$log.1"; fi
	"$dir/run-agent.sh" >>"$log" 2>&1 </dev/null &
	child=$!
	wait "$child"
	# 42: the agent has updated itself; the new one starts at once
	[ $? -eq 42 ] && continue
	sleep 5 &
	child=$!
	wait "$child"
done
EOF
}

cron_line() { printf '@reboot /bin/sh %s >/dev/null 2>&1 # %s: %s\n' "$DIR/keepalive.sh" "$MARK" "$NAME"; }

crontab_file() { printf '%s/var/spool/cron/crontabs/%s' "$ROOT" "$(id -un)"; }

crontab_read() {
	if [ -n "$ROOT" ]; then cat "$(crontab_file)" 2>/dev/null; else crontab -l 2>/dev/null </dev/null; fi
	return 0
}

# crontab_write: the crontab gets stdin; one left with nothing in it is removed. It is read
# whole before anything is written, because stdin is usually a pipe from crontab_read of the
# same file.
crontab_write() {
	_crontab=$(cat)
	_empty=''
	printf '%s\n' "$_crontab" | grep -q '[^[:space:]]' || _empty=1
	if [ -n "$DRY_RUN" ] && [ -n "$_empty" ]; then
		say "would remove the crontab (nothing else is in it)"
	elif [ -n "$DRY_RUN" ]; then
		say "would set the crontab to:"
		printf '%s\n' "$_crontab" | sed 's/^/    | /'
	elif [ -n "$ROOT" ] && [ -n "$_empty" ]; then
		rm -f "$(crontab_file)"
	elif [ -n "$ROOT" ]; then
		mkdir -p "$(dirname "$(crontab_file)")" &&
			printf '%s\n' "$_crontab" >"$(crontab_file).new" && mv -f "$(crontab_file).new" "$(crontab_file)"
	elif [ -n "$_empty" ]; then
		crontab -r </dev/null >/dev/null 2>&1
	else
		printf '%s\n' "$_crontab" | crontab -
	fi
}

crontab_without_ours() { crontab_read | grep -Fv "# $MARK: $NAME"; }

# keepalive_pid: the running keepalive.sh of this install, if any.
keepalive_pid() {
	[ -f "$DIR/keepalive.pid" ] || return 1
	pid=$(cat "$DIR/keepalive.pid")
	case $pid in '' | *[!0-9]*) return 1 ;; esac
	kill -0 "$pid" 2>/dev/null || return 1
	[ ! -r "/proc/$pid/cmdline" ] || tr '\0' ' ' <"/proc/$pid/cmdline" | grep -Fq "$DIR/keepalive.sh" || return 1
	printf '%s' "$pid"
}

stop_keepalive() {
	pid=$(keepalive_pid) || return 0
	run kill "$pid"
	[ -n "$DRY_RUN" ] && return 0
	n=0
	while kill -0 "$pid" 2>/dev/null && [ $n -lt 100 ]; do sleep 0.1 2>/dev/null || sleep 1; n=$((n + 1)); done
}

start_keepalive() {
	if [ -n "$DRY_RUN" ]; then say "would start $DIR/keepalive.sh in the background"; return 0; fi
	if have setsid; then
		setsid /bin/sh "$DIR/keepalive.sh" </dev/null >/dev/null 2>&1 &
	else
		nohup /bin/sh "$DIR/keepalive.sh" </dev/null >/dev/null 2>&1 &
	fi
}

linger_hint() {
	have loginctl || return 0
	[ "$(loginctl show-user "$(id -un)" -p Linger 2>/dev/null </dev/null)" = Linger=yes ] && return 0
	say "note: to keep the agent running after you log out and start it at boot, run once as root:"
	say "      loginctl enable-linger $(id -un)"
}

# install_service: write the definition for $SERVICE, then enable and (re)start it.
install_service() {
	file=$(service_file "$SERVICE")
	say "==> service: $SERVICE ($file)"
	if [ -e "$file" ] && ! grep -Fq "$MARK" "$file" && [ "$file" != "$OFFICIAL_FILE" ]; then
		warn "replacing $file, which install.sh did not write"
	fi
	claim_parents "$file"
	case $SERVICE in
	systemd) own "$file"; systemd_unit multi-user.target | write_file "$file" 0644 ;;
	systemd-user) own "$file"; systemd_unit default.target | write_file "$file" 0644 ;;
	openrc) own "$file"; openrc_script | write_file "$file" 0755 ;;
	procd) own "$file"; procd_script | write_file "$file" 0755 ;;
	launchd) own "$file"; launchd_plist | write_file "$file" 0644 ;;
	rc.d) own "$file"; rcd_script | write_file "$file" 0755 ;;
	cron)
		claim "$file"
		[ -z "$ROOT" ] || claim_parents "$(crontab_file)"
		claim "$DIR/keepalive.pid"
		claim "$DIR/agent.log"
		claim "$DIR/agent.log.1"
		keepalive_script | write_file "$file" 0755
		if [ -z "$ROOT" ] && ! have crontab && is_root; then
			warn "no crontab command: the agent starts now but not at boot; add '/bin/sh $file &' to a boot script (/etc/rc.local)"
		elif [ -z "$ROOT" ] && ! have crontab; then
			warn "no crontab command: the agent starts now but not at boot; after a reboot start it with '/bin/sh $file &' (it starts one copy only, so a line in ~/.profile does too), or ask root to install cron"
		else
			{ crontab_without_ours; cron_line; } | crontab_write ||
				warn "could not add the @reboot entry to the crontab: the agent starts now but not at boot"
		fi
		;;
	*) usage_error "unknown service kind $SERVICE" ;;
	esac
	LOGS=$(log_hint "$SERVICE" follow)
	if [ -n "$NO_START" ]; then
		say "not enabled or started (--no-start)"
		return 0
	fi
	if [ "$SERVICE" = rc.d ]; then
		claim_parents "$(rcd_enable_file)"
		own "$(rcd_enable_file)"
		rcd_enable | write_file "$(rcd_enable_file)" 0644
	fi
	if [ -n "$ROOT" ]; then
		# no process is started or stopped; enabling is the link a service manager would make
		link=$(enable_link "$SERVICE" "$NAME")
		if [ -n "$link" ]; then
			claim_parents "$link"
			claim "$link"
			service_switch "$SERVICE" "$NAME" "$file" on
		fi
		say "not started: KOMARI_INSTALL_ROOT is set"
		return 0
	fi
	STARTED_AT=$(date +%s)
	case $SERVICE in
	systemd)
		run systemctl daemon-reload
		run systemctl enable "$NAME.service"
		run systemctl restart "$NAME.service"
		;;
	systemd-user)
		run systemctl --user daemon-reload
		run systemctl --user enable "$NAME.service"
		run systemctl --user restart "$NAME.service"
		linger_hint
		;;
	openrc)
		run rc-update add "$NAME" default
		run rc-service "$NAME" restart
		;;
	procd)
		run "$file" enable
		run "$file" restart
		;;
	launchd)
		# bootstrap loads and starts the job; a job of this label already loaded goes first
		run launchctl bootout "$(launchd_domain)/$(launchd_label "$NAME")" 2>/dev/null
		service_switch launchd "$NAME" "$file" on
		;;
	rc.d)
		run service "$NAME" restart
		;;
	cron)
		stop_keepalive
		start_keepalive
		;;
	esac
}

# log_hint KIND [follow]: how to read the agent's log.
log_hint() {
	follow=${2:+ -f}
	case $1 in
	systemd) printf 'journalctl -u %s%s' "$NAME" "$follow" ;;
	systemd-user) printf 'journalctl --user -u %s%s' "$NAME" "$follow" ;;
	openrc | rc.d) printf 'tail%s /var/log/%s.log' "$follow" "$NAME" ;;
	procd) printf 'logread%s -e komari' "$follow" ;;
	launchd) printf 'tail%s %s' "$follow" "$(launchd_log)" ;;
	cron) printf 'tail%s %s/agent.log' "$follow" "$DIR" ;;
	esac
}

stop_service() {
	file=$(service_file "$1")
	MANAGED=1
	[ -n "$ROOT" ] && MANAGED=''
	case $1 in
	systemd)
		[ -z "$MANAGED" ] || run systemctl disable --now "$NAME.service"
		;;
	systemd-user)
		[ -z "$MANAGED" ] || run systemctl --user disable --now "$NAME.service"
		;;
	openrc)
		[ -z "$MANAGED" ] || { run rc-service "$NAME" stop; run rc-update del "$NAME" default; }
		;;
	procd)
		[ -z "$MANAGED" ] || { [ -f "$file" ] && run "$file" stop; [ -f "$file" ] && run "$file" disable; }
		;;
	launchd)
		[ -z "$MANAGED" ] || run launchctl bootout "$(launchd_domain)/$(launchd_label "$NAME")"
		;;
	rc.d)
		[ -z "$MANAGED" ] || [ ! -f "$file" ] || run service "$NAME" stop
		remove "$(rcd_enable_file)"
		;;
	esac
	case $1 in
	systemd | systemd-user | openrc | procd)
		[ -n "$MANAGED" ] || remove "$(enable_link "$1" "$NAME")"
		;;
	cron)
		[ -z "$MANAGED" ] || stop_keepalive
		if { [ -n "$ROOT" ] || have crontab; } && crontab_read | grep -Fq "# $MARK: $NAME"; then
			crontab_without_ours | crontab_write
		fi
		;;
	esac
	return 0
}

# ---- the official Go agent: find it, take its settings, stand it down, give the box back ------

# enable_link KIND NAME: the link a service manager makes to enable NAME at boot. Under
# KOMARI_INSTALL_ROOT enabling and disabling is done on these links alone (launchd has none:
# its job is enabled by being there; rc.d's is a file of rc.conf.d, see rcd_enable).
enable_link() {
	case $1 in
	systemd) printf '%s/etc/systemd/system/multi-user.target.wants/%s.service' "$ROOT" "$2" ;;
	systemd-user) printf '%s/default.target.wants/%s.service' "$(unit_dir_user)" "$2" ;;
	openrc) printf '%s/etc/runlevels/default/%s' "$ROOT" "$2" ;;
	procd) printf '%s/etc/rc.d/S99%s' "$ROOT" "$2" ;;
	esac
}

# official_pids: the official agent's processes on this box ("PID EXECUTABLE" lines), never
# those of a fake root.
official_pids() {
	[ -z "$ROOT" ] || return 0
	# shellcheck disable=SC2013 # /proc/PID/comm paths: no spaces
	for comm in $(grep -lx -e komari-agent -e agent /proc/[0-9]*/comm 2>/dev/null); do
		pid=${comm#/proc/} pid=${pid%/comm}
		exe=$(tr '\0' '\n' <"/proc/$pid/cmdline" 2>/dev/null | head -n 1)
		case $exe in
		komari-agent | */komari-agent | */komari/agent) printf '%s %s\n' "$pid" "$exe" ;;
		esac
	done
}

# find_official: is the official agent installed here? Sets OFFICIAL_KIND (systemd,
# systemd-user, openrc, procd, launchd; process for one running without a service definition
# we know; binary for /opt/komari/agent alone), OFFICIAL_NAME, OFFICIAL_FILE (the definition,
# else the executable) and, for a process, OFFICIAL_PID.
find_official() {
	OFFICIAL_KIND='' OFFICIAL_NAME='' OFFICIAL_FILE='' OFFICIAL_PID=''
	for oname in "$NAME" komari-agent; do
		if is_root; then
			set -- "systemd $ROOT/etc/systemd/system/$oname.service" "initd $ROOT/etc/init.d/$oname"
		else
			set -- "systemd-user $(unit_dir_user)/$oname.service"
		fi
		set -- "$@" "launchd $(launchd_dir)/$(launchd_label "$oname").plist"
		for candidate; do
			kind=${candidate%% *} file=${candidate#* }
			[ -f "$file" ] || continue
			grep -Fq "$MARK" "$file" && continue
			if [ "$kind" = initd ]; then
				if grep -q 'openrc-run' "$file"; then kind=openrc; elif grep -q 'rc\.common' "$file"; then kind=procd; else continue; fi
			fi
			OFFICIAL_KIND=$kind OFFICIAL_NAME=$oname OFFICIAL_FILE=$file
			return 0
		done
	done
	found=$(official_pids | head -n 1)
	if [ -n "$found" ]; then
		OFFICIAL_KIND=process OFFICIAL_NAME=komari-agent OFFICIAL_PID=${found%% *} OFFICIAL_FILE=${found#* }
		return 0
	fi
	if [ -x "$ROOT/opt/komari/agent" ]; then
		OFFICIAL_KIND=binary OFFICIAL_NAME=komari-agent OFFICIAL_FILE=$ROOT/opt/komari/agent
		return 0
	fi
	return 1
}

# read_official: OFFICIAL_ENDPOINT, OFFICIAL_TOKEN, OFFICIAL_DISCOVERY, OFFICIAL_ARGS (the other
# flags, quoted like AGENT_ARGS), OFFICIAL_ARGV (its whole command line, quoted) and OFFICIAL_DIR
# (its working directory) from its service definition or command line; -e URL, -eURL,
# --endpoint URL and --endpoint=URL, quoted or not.
read_official() {
	parsed=$("$PY" - "$OFFICIAL_KIND" "${OFFICIAL_PID:-$OFFICIAL_FILE}" "$ROOT" <<'EOF'
import os, plistlib, re, shlex, sys
kind, source, root = sys.argv[1], sys.argv[2], sys.argv[3]

def words(text):
    try:
        return shlex.split(text)
    except ValueError:
        return text.split()

argv, workdir = [], ""
if kind == "process":
    with open("/proc/%s/cmdline" % source, "rb") as f:
        argv = [w.decode("utf-8", "replace") for w in f.read().split(b"\0") if w]
    try:
        workdir = os.readlink("/proc/%s/cwd" % source)
    except OSError:
        pass
elif kind == "binary":
    argv = [source[len(root):] if root and source.startswith(root + "/") else source]
elif kind == "launchd":
    with open(source, "rb") as f:
        job = plistlib.load(f)
    argv = [str(w) for w in job.get("ProgramArguments") or [job.get("Program", "")]]
    workdir = str(job.get("WorkingDirectory", ""))
else:
    with open(source, encoding="utf-8", errors="replace") as f:
        text = f.read()
    if kind.startswith("systemd"):
        for line in text.splitlines():
            key, _, value = line.strip().partition("=")
            if key.strip() == "ExecStart" and value.strip():
                argv = words(value.strip().lstrip("-@:+!"))
            elif key.strip() == "WorkingDirectory":
                workdir = value.strip().lstrip("-")
    else:
        var, command = {}, ""
        for line in text.splitlines():
            m = re.match(r"\s*([A-Za-z_][A-Za-z0-9_]*)=(.*)$", line)
            if m:
                value = words(m.group(2))
                var[m.group(1)] = value[0] if value else ""
            m = re.match(r"\s*procd_set_param\s+command\s+(.*)$", line)
            if m:
                command = m.group(1)
        if kind == "openrc":
            argv = [var.get("command", "")] + words(var.get("command_args", ""))
            workdir = var.get("directory", "")
        else:
            argv = words(re.sub(r"\$\{?([A-Za-z_][A-Za-z0-9_]*)\}?", lambda m: var.get(m.group(1), ""), command))
names = {"-e": "ENDPOINT", "--endpoint": "ENDPOINT", "-t": "TOKEN", "--token": "TOKEN",
         "--auto-discovery": "DISCOVERY"}
found, rest, args, i = {}, [], argv[1:], 0
while i < len(args):
    name, eq, value = args[i].partition("=")
    if name in names and (eq or i + 1 < len(args)):
        if not eq:
            i += 1
            value = args[i]
        found[names[name]] = value
    elif args[i][:2] in ("-e", "-t") and len(args[i]) > 2:
        found[names[args[i][:2]]] = args[i][2:]
    else:
        rest.append(args[i])
    i += 1
def quoted(words):
    return "".join(" '%s'" % word.replace("'", "'\\''") for word in words)
found["DIR"] = workdir or (os.path.dirname(argv[0]) if argv else "")
found["ARGS"] = quoted(rest)
found["ARGV"] = quoted(argv)
for key in ("ENDPOINT", "TOKEN", "DISCOVERY", "DIR", "ARGS", "ARGV"):
    print("OFFICIAL_%s=%s" % (key, shlex.quote(found.get(key, ""))))
EOF
	) || die "cannot read the official agent's settings from $OFFICIAL_FILE"
	eval "$parsed"
}

# official_record: what --uninstall --restore-official needs, kept beside a copy of the
# official agent's service definition.
official_record() { printf '%s/official-agent' "$DIR"; }

# official_what: the official agent found, in words.
official_what() {
	case $OFFICIAL_KIND in
	process) printf 'process %s (%s)' "$OFFICIAL_PID" "$OFFICIAL_FILE" ;;
	*) printf "%s '%s' (%s)" "$OFFICIAL_KIND" "$OFFICIAL_NAME" "$OFFICIAL_FILE" ;;
	esac
}

# stand_down_official: the official agent stopped and disabled, its service definition copied
# aside (ours may take its place), its files left where they are. For a bare process, its
# command line is what is kept, to start it again.
stand_down_official() {
	say "==> replacing the official agent: $(official_what)"
	record=$(official_record)
	claim "$record"
	make_dir "$record"
	argv=''
	if [ "$OFFICIAL_KIND" = process ]; then
		argv=$OFFICIAL_ARGV
	elif [ -n "$DRY_RUN" ]; then
		say "would copy $OFFICIAL_FILE to $record/"
	else
		cp -p "$OFFICIAL_FILE" "$record/" || die "cannot copy $OFFICIAL_FILE to $record"
	fi
	{
		printf '# %s: the official agent this install replaced (--uninstall --restore-official)\n' "$MARK"
		printf 'OFFICIAL_KIND=%s\nOFFICIAL_NAME=%s\nOFFICIAL_FILE=%s\nOFFICIAL_DIR=%s\nOFFICIAL_ARGV=%s\n' \
			"$(q "$OFFICIAL_KIND")" "$(q "$OFFICIAL_NAME")" "$(q "$OFFICIAL_FILE")" "$(q "$OFFICIAL_DIR")" "$(q "$argv")"
	} | write_file "$record/official.conf" 0600
	STOOD_DOWN=1
	service_switch "$OFFICIAL_KIND" "$OFFICIAL_NAME" "$OFFICIAL_FILE" off
}

# process_switch on|off: the official agent running as a bare process stopped (TERM, KILL after
# 10 s), or started again as it ran: same command line, same directory, detached.
process_switch() {
	if [ "$1" = off ]; then
		run kill "$OFFICIAL_PID" 2>/dev/null || die "cannot stop the official agent ($(official_what)): stop it yourself, then run this again"
		[ -n "$DRY_RUN" ] && return 0
		n=0
		while kill -0 "$OFFICIAL_PID" 2>/dev/null && [ $n -lt 100 ]; do sleep 0.1 2>/dev/null || sleep 1; n=$((n + 1)); done
		! kill -0 "$OFFICIAL_PID" 2>/dev/null || kill -9 "$OFFICIAL_PID" 2>/dev/null
		STOPPED_AT=$(date +%s)
		say "stopped the official agent: $(official_what)"
		return 0
	fi
	[ -z "$(official_pids)" ] || return 0 # running already
	if [ -n "$DRY_RUN" ]; then say "would start $OFFICIAL_FILE again as it ran"; return 0; fi
	(
		cd "$OFFICIAL_DIR" 2>/dev/null || cd /
		eval "set -- $OFFICIAL_ARGV"
		if have setsid; then
			setsid "$@" </dev/null >/dev/null 2>&1 &
		else
			nohup "$@" </dev/null >/dev/null 2>&1 &
		fi
	)
}

# service_switch KIND NAME FILE on|off: enable and start, or stop and disable, a service.
service_switch() {
	case $1 in
	systemd | systemd-user | openrc | procd | launchd) ;;
	process) process_switch "$4"; return 0 ;;
	*) return 0 ;;
	esac
	if [ -n "$ROOT" ]; then
		link=$(enable_link "$1" "$2")
		[ -n "$link" ] || return 0 # launchd: a job is enabled by being there
		if [ "$4" = on ]; then
			[ -n "$DRY_RUN" ] && { say "would enable $2 ($link)"; return 0; }
			mkdir -p "$(dirname "$link")" && ln -sf "${3#"$ROOT"}" "$link"
		else
			remove "$link"
		fi
		return 0
	fi
	user=''
	[ "$1" = systemd-user ] && user=--user
	case $1:$4 in
	systemd*:on) run systemctl $user daemon-reload; run systemctl $user enable --now "$2.service" ;;
	systemd*:off) run systemctl $user disable --now "$2.service" ;;
	openrc:on) run rc-update add "$2" default; run rc-service "$2" start ;;
	openrc:off) run rc-service "$2" stop; run rc-update del "$2" default ;;
	procd:on) run "$3" enable; run "$3" start ;;
	procd:off) run "$3" stop; run "$3" disable ;;
	launchd:on)
		run launchctl enable "$(launchd_domain)/$(launchd_label "$2")"
		run launchctl bootstrap "$(launchd_domain)" "$3"
		;;
	launchd:off)
		run launchctl bootout "$(launchd_domain)/$(launchd_label "$2")"
		run launchctl disable "$(launchd_domain)/$(launchd_label "$2")"
		;;
	esac
	return 0
}

# import_official_files: this month's traffic (net_static.json, which the agent imports from
# its own directory at its first start) and an auto-discovery registration.
import_official_files() {
	for name in net_static.json auto-discovery.json; do
		from=$ROOT$OFFICIAL_DIR/$name
		case $name in auto-discovery.json) to=$DIR/state/$name ;; *) to=$DIR/$name ;; esac
		[ -f "$from" ] && [ ! -e "$to" ] || continue
		claim "$to"
		if [ -n "$DRY_RUN" ]; then say "would copy $from to $to"; continue; fi
		write_file "$to" 0600 <"$from"
		say "imported $from"
	done
}

# put_back_official: the official agent's service definition back where ours was (still
# disabled). False when this install replaced none.
put_back_official() {
	record=$(official_record)
	[ -f "$record/official.conf" ] || return 1
	# shellcheck disable=SC1091 # written by stand_down_official
	. "$record/official.conf"
	copy=$record/$(basename "$OFFICIAL_FILE")
	if [ -f "$copy" ] && { [ ! -f "$OFFICIAL_FILE" ] || grep -Fq "$MARK" "$OFFICIAL_FILE"; }; then
		if [ -n "$DRY_RUN" ]; then
			say "would put $copy back as $OFFICIAL_FILE"
		else
			if ! { mkdir -p "$(dirname "$OFFICIAL_FILE")" && cp -p "$copy" "$OFFICIAL_FILE"; }; then
				die "cannot put $copy back as $OFFICIAL_FILE"
			fi
		fi
	fi
	return 0
}

# official_start_command: what starts the official agent again by hand.
official_start_command() {
	case $OFFICIAL_KIND in
	systemd) printf 'systemctl enable --now %s' "$OFFICIAL_NAME" ;;
	systemd-user) printf 'systemctl --user enable --now %s' "$OFFICIAL_NAME" ;;
	openrc) printf 'rc-update add %s default && rc-service %s start' "$OFFICIAL_NAME" "$OFFICIAL_NAME" ;;
	procd) printf '%s enable && %s start' "${OFFICIAL_FILE#"$ROOT"}" "${OFFICIAL_FILE#"$ROOT"}" ;;
	launchd)
		printf 'launchctl enable %s/%s && launchctl bootstrap %s %s' "$(launchd_domain)" \
			"$(launchd_label "$OFFICIAL_NAME")" "$(launchd_domain)" "${OFFICIAL_FILE#"$ROOT"}"
		;;
	*) printf 'start %s as before' "$OFFICIAL_FILE" ;;
	esac
}

# restore_official: the official agent back as it was: its service definition where ours was,
# enabled and started. False when this install replaced none.
restore_official() {
	put_back_official || return 1
	service_switch "$OFFICIAL_KIND" "$OFFICIAL_NAME" "$OFFICIAL_FILE" on
	if [ "$OFFICIAL_KIND" = process ]; then
		say "the official agent is back: $OFFICIAL_FILE started again as it ran"
	else
		say "the official agent is back: $OFFICIAL_KIND '$OFFICIAL_NAME' ($OFFICIAL_FILE) enabled and started${ROOT:+ (links only: KOMARI_INSTALL_ROOT is set)}"
	fi
	return 0
}

# ---- reaching the panel --------------------------------------------------------------------

# agent_status SINCE: "STATE<tab>ERROR" from the agent's status file, if an agent started at
# SINCE (epoch seconds) or later wrote it.
agent_status() {
	"$PY" - "$DIR/state/status.json" "$1" 2>/dev/null <<'EOF'
import json, sys
try:
    with open(sys.argv[1]) as f:
        status = json.load(f)
    if int(status.get("started", 0)) >= int(sys.argv[2]):
        print("%s\t%s" % (status.get("state", ""), " ".join(str(status.get("error", "")).split())))
except Exception:
    pass
EOF
}

# wait_for_panel SECONDS SINCE: true once the agent reports "connected"; otherwise STATUS_ERROR
# holds its last error. A refused token ends the wait at once: it will not fix itself.
wait_for_panel() {
	say "==> waiting up to $1 s for the agent to reach the panel"
	deadline=$(($(date +%s) + $1))
	line=''
	while :; do
		line=$(agent_status "$2")
		case $line in
		connected*) say "connected: the agent reached the panel"; return 0 ;;
		refused*) break ;;
		esac
		[ "$(date +%s)" -lt "$deadline" ] || break
		sleep 0.5 2>/dev/null || sleep 1
	done
	STATUS_ERROR=$(printf '%s' "$line" | cut -f2-)
	[ -n "$STATUS_ERROR" ] || STATUS_ERROR="no word from the agent (${line:-it did not start})"
	return 1
}

# ---- install and uninstall ------------------------------------------------------------------

# kept_token: the token in the config of an earlier install, if any.
kept_token() {
	[ -f "$DIR/config.json" ] || return 0
	"$PY" -c 'import json, sys; print(json.load(open(sys.argv[1])).get("token") or "")' "$DIR/config.json" </dev/null 2>/dev/null
}

# take_official_settings: what the official agent ran with, where not given now.
take_official_settings() {
	from='taken from the official agent'
	if [ -z "$ENDPOINT" ] && [ -n "$OFFICIAL_ENDPOINT" ]; then ENDPOINT=$OFFICIAL_ENDPOINT ENDPOINT_FROM=$from; fi
	if [ -z "$TOKEN" ] && [ -n "$OFFICIAL_TOKEN" ]; then TOKEN=$OFFICIAL_TOKEN TOKEN_FROM=$from; fi
	if [ -z "$DISCOVERY" ] && [ -n "$OFFICIAL_DISCOVERY" ]; then DISCOVERY=$OFFICIAL_DISCOVERY DISCOVERY_FROM=$from; fi
	if [ -z "$AGENT_ARGS_GIVEN" ] && [ -n "$OFFICIAL_ARGS" ]; then AGENT_ARGS=$OFFICIAL_ARGS ARGS_FROM=$from; fi
	return 0
}

# leave_official_process: an official agent running as a bare process that is not taken over
# (no --take-over-official). It may run on beside ours for another token only: two agents on
# one token knock each other off the panel every few seconds.
leave_official_process() {
	ours=${TOKEN:-$(kept_token)}
	if [ -n "$ours" ] && [ -n "$OFFICIAL_TOKEN" ] && [ "$ours" != "$OFFICIAL_TOKEN" ]; then
		say "found the official agent running as $(official_what) for another token: left running, none of its settings taken"
	elif [ -n "$NO_SERVICE" ]; then
		say "found the official agent running as $(official_what): left running (--no-service); stop it before starting this agent on the same token"
	else
		die "the official agent runs here as $(official_what), with no service install.sh knows; a second agent on its token would knock it off the panel. Stop it (kill $OFFICIAL_PID) and run this again with -e and -t, or add --take-over-official to take its settings and have install.sh stop it"
	fi
	OFFICIAL_KIND='' # nothing of it is imported
}

# official_came_back: dies, with ours removed again, when a bare official process this install
# stopped runs again within RESPAWN_WATCH s: something install.sh does not know restarts it.
official_came_back() {
	[ "$OFFICIAL_KIND" = process ] && [ -n "$STOOD_DOWN" ] && [ -z "$DRY_RUN" ] || return 0
	while :; do
		back=$(official_pids | head -n 1)
		[ -z "$back" ] || break
		[ "$(date +%s)" -lt $((STOPPED_AT + RESPAWN_WATCH)) ] || return 0
		sleep 0.5 2>/dev/null || sleep 1
	done
	pid=${back%% *}
	parent=$(sed -n 's/^PPid:[[:space:]]*//p' "/proc/$pid/status" 2>/dev/null)
	parent="$parent $(cat "/proc/$parent/comm" 2>/dev/null)"
	roll_back_to_official
	die "the official agent runs again (process $pid, started by process $parent) after install.sh stopped it: something else starts it. komari_agent.py is removed again, so that two agents do not share its token; stop what starts it, then run this again"
}

do_install() {
	START_TIME=$(date +%s)
	check_python
	load_settings
	UPDATING=''
	[ -f "$DIR/install.manifest" ] && [ -f "$DIR/install.conf" ] && UPDATING=1
	# where each setting comes from, for the printout
	ENDPOINT_FROM='kept from the last install' TOKEN_FROM='kept from the last install'
	DISCOVERY_FROM='kept from the last install' ARGS_FROM='command line'
	[ -z "$ENDPOINT" ] || ENDPOINT_FROM='command line'
	[ -z "$TOKEN" ] || TOKEN_FROM='command line'
	[ -z "$DISCOVERY" ] || DISCOVERY_FROM='command line'
	# Agent flags given now replace the saved ones; none given keeps them.
	if [ -z "$AGENT_ARGS_GIVEN" ]; then AGENT_ARGS=$SAVED_AGENT_ARGS ARGS_FROM='kept from the last install'; fi
	[ -n "$GHPROXY" ] || GHPROXY=$SAVED_GHPROXY
	[ -n "$PIP_INDEX_URL" ] || PIP_INDEX_URL=$SAVED_PIP_INDEX_URL
	[ -n "$VENV_SYSTEM_SITE" ] || VENV_SYSTEM_SITE=$SAVED_VENV_SYSTEM_SITE
	if [ -n "$VERSION" ]; then say "note: --install-version $VERSION ignored: komari_agent.py comes from $SOURCE"; fi
	REPLACING=''
	# (an install of ours that replaced it already, and is still here, has nothing to find)
	if ! { [ -f "$(official_record)/official.conf" ] && [ -f "$DIR/install.conf" ]; } && find_official; then
		read_official
		case $OFFICIAL_KIND in
		binary)
			say "found the official agent's binary $OFFICIAL_FILE (no service): left alone; its traffic totals and auto-discovery registration are taken over"
			;;
		process)
			if [ -z "$TAKE_OVER" ]; then
				leave_official_process
			elif [ -n "$NO_SERVICE" ]; then
				take_official_settings
				say "found the official agent running as $(official_what); its settings are taken over, it is left running (--no-service)"
			else
				take_official_settings
				REPLACING=1
				say "found the official agent running as $(official_what); it is replaced, its settings are taken over (--take-over-official)"
			fi
			;;
		*)
			take_official_settings
			if [ -n "$NO_SERVICE" ]; then
				say "found the official agent: $(official_what); its settings are taken over, it is left running (--no-service)"
			else
				REPLACING=1
				say "found the official agent: $(official_what); it is replaced, its settings are taken over"
			fi
			;;
		esac
	fi
	if [ -n "$TAKE_OVER" ] && [ "$OFFICIAL_KIND" != process ] && [ -z "$REPLACING" ]; then
		say "note: --take-over-official: no official agent runs here as a bare process"
	fi
	if [ -z "$SERVICE" ]; then SERVICE=${SAVED_SERVICE:-auto}; fi
	if [ "$SERVICE" = auto ]; then
		# in a fake root, the official agent's service shows which service manager the box has
		case $ROOT:$OFFICIAL_KIND in
		?*:systemd | ?*:systemd-user | ?*:openrc | ?*:procd | ?*:launchd) SERVICE=$OFFICIAL_KIND ;;
		*) SERVICE=$(detect_service) ;;
		esac
	fi
	[ -n "$NO_SERVICE" ] && SERVICE=none
	if [ -z "$ENDPOINT" ] || { [ -z "$TOKEN" ] && [ -z "$DISCOVERY" ]; }; then
		config_has_credentials || usage_error "-e ENDPOINT and -t TOKEN are needed (no earlier install in $DIR and no official agent's service to take them from)"
	fi
	REQ_FILE=$(dirname "$SOURCE")/requirements.txt
	[ -f "$SOURCE" ] && [ -f "$REQ_FILE" ] || REQ_FILE=$DIR/.requirements.tmp
	what="as service '$NAME' ($SERVICE)"
	[ "$SERVICE" = none ] && what="without a service (--no-service)"
	if [ -n "$UPDATING" ]; then
		say "Updating komari_agent.py in $DIR $what${DRY_RUN:+ [dry run: nothing is changed]}"
	else
		say "Installing komari_agent.py into $DIR $what${DRY_RUN:+ [dry run: nothing is changed]}"
	fi
	obtain_agent
	# shellcheck disable=SC2119 # it takes no arguments
	check_settings
	load_manifest
	[ -d "$DIR" ] || FRESH=1 # removed again if this run fails
	claim_parents "$DIR"
	claim "$DIR"
	make_dir "$DIR"
	save_manifest
	install_agent_file
	if [ "$REQ_FILE" = "$DIR/.requirements.tmp" ] && [ -z "$DRY_RUN" ]; then
		printf '%s\n' "$REQUIREMENTS" >"$REQ_FILE"
	fi
	install_dependencies
	rm -f "$DIR/.requirements.tmp"
	compile_agent
	if [ -z "$DRY_RUN" ]; then
		(cd "$DIR" && PYTHONPATH=$(module_path) "$RUN_PYTHON" -m komari_agent --version </dev/null >/dev/null 2>&1) ||
			die "the installed agent does not start: try cd $DIR && PYTHONPATH=$(module_path) $RUN_PYTHON -m komari_agent --version"
	fi
	claim "$DIR/config.json"
	(umask 077 && write_config) || exit 1
	claim "$DIR/state"
	make_dir "$DIR/state"
	write_launcher
	LOGS='' STARTED_AT=''
	[ -z "$REPLACING" ] || stand_down_official
	[ -z "$OFFICIAL_KIND" ] || import_official_files
	if [ -n "$NO_SERVICE" ]; then
		SERVICE=$SAVED_SERVICE # --no-service is about this run, not a setting to keep
		say "no service installed (--no-service); start the agent with: $DIR/run-agent.sh"
	else
		install_service
	fi
	write_settings
	save_manifest
	FINISHED=1
	uninstall_hint="Uninstall: add --uninstall${DIR_GIVEN:+ --install-dir $DIR}${NAME_GIVEN:+ --install-service-name $NAME}"
	wait=${KOMARI_INSTALL_WAIT:-}
	if [ -z "$wait" ]; then
		wait=$WAIT_CONNECTED
		[ -n "$REPLACING" ] && wait=$WAIT_REPLACED
		[ -n "$STARTED_AT" ] || wait=0
	fi
	case $wait in '' | *[!0-9]*) usage_error "KOMARI_INSTALL_WAIT must be a number of seconds" ;; esac
	if [ -n "$DRY_RUN" ] || [ -n "$NO_START" ] || [ -n "$NO_SERVICE" ] || [ "$wait" = 0 ]; then
		official_came_back
		say "Done.${LOGS:+ Logs: $LOGS}"
		say "Update: run the same command again. $uninstall_hint."
		return 0
	fi
	if wait_for_panel "$wait" "$START_TIME"; then
		official_came_back
		say "Done.${LOGS:+ Logs: $LOGS}"
		say "Update: run the same command again. $uninstall_hint${REPLACING:+ (add --restore-official to start the official agent again)}."
		return 0
	fi
	official_came_back
	if [ -n "$REPLACING" ]; then
		roll_back_to_official
		die "rolled back to the official agent: komari_agent.py did not reach the panel within $wait s: $STATUS_ERROR; its log: $(log_hint "$SERVICE")"
	fi
	warn "the agent has not reached the panel within $wait s: $STATUS_ERROR"
	say "It is installed and keeps trying. Logs: ${LOGS:-$DIR/state/status.json}; its last state: $DIR/state/status.json. $uninstall_hint."
	exit 1
}

# roll_back_to_official: ours stopped and removed, the official agent as it was. The cron
# keep-alive's log stays, for the rollback's message points to it.
roll_back_to_official() {
	dirs=$(dir_and_parents)
	stop_service "$SERVICE"
	MANIFEST=$(printf '%s\n' "$MANIFEST" | grep -Fvx "$DIR/agent.log")
	remove_installed # keeps the record of the official agent, which restore_official reads
	restore_official >/dev/null
	remove_installed purge
	rm -f "$DIR/install.manifest"
	[ -z "$FRESH" ] || remove_dirs "$dirs"
	return 0
}

# remove_installed [purge]: the manifest's paths, deepest first, except (without purge) state/
# and the record of a replaced official agent, which stay in the manifest.
remove_installed() {
	kept=''
	_top=$(dir_and_parents)
	while IFS='' read -r path; do
		if [ -z "$path" ] || printf '%s\n' "$_top" | grep -Fqx -- "$path"; then
			continue # last, and only when empty (remove_dirs)
		elif [ "$1" != purge ] && case $path in "$DIR/state" | "$DIR/state/"* | "$(official_record)" | "$(official_record)/"*) true ;; *) false ;; esac; then
			kept="$kept
$path"
			continue
		elif safe_to_remove "$path"; then
			remove "$path"
		elif [ -d "$path" ] && [ ! -L "$path" ]; then
			# a directory made for a service definition: only if nothing else is in it
			if [ -n "$DRY_RUN" ]; then say "would remove $path if empty"; else rmdir "$path" 2>/dev/null; fi
		elif [ -e "$path" ]; then
			warn "not removing $path: not a file install.sh wrote"
		fi
	done <<EOF
$(printf '%s\n' "$MANIFEST" | awk 'NF { print length($0) "\t" $0 }' | sort -rn | cut -f2-)
EOF
	MANIFEST=$kept
	[ -n "$_top" ] && [ -n "$kept" ] && MANIFEST="$_top$kept"
	return 0
}

# dir_and_parents: DIR and the directories made for it, as far as the manifest has them,
# deepest first.
dir_and_parents() {
	printf '%s\n' "$MANIFEST" | while IFS='' read -r path; do
		case $DIR in "$path" | "$path"/*) [ -z "$path" ] || printf '%s\n' "$path" ;; esac
	done | awk '{ print length($0) "\t" $0 }' | sort -rn | cut -f2-
}

# manifest_rest: the manifest without DIR and its parents.
manifest_rest() {
	_top=$(dir_and_parents)
	printf '%s\n' "$MANIFEST" | while IFS='' read -r path; do
		[ -z "$path" ] || printf '%s\n' "$_top" | grep -Fqx -- "$path" || printf '%s\n' "$path"
	done
}

# remove_dirs LINES: each directory, deepest first, while it is empty; false when the first
# (the install directory) stays.
remove_dirs() {
	while IFS='' read -r path; do
		[ -n "$path" ] && [ -d "$path" ] || continue
		rmdir "$path" 2>/dev/null || { [ "$path" != "$DIR" ]; return; }
	done <<EOF
$1
EOF
	return 0
}

# safe_to_remove PATH: only paths inside the install directory or our own service definitions,
# whatever the manifest says.
safe_to_remove() {
	case $1 in
	"$DIR" | "$DIR"/*) return 0 ;;
	esac
	for file in "$(service_file systemd)" "$(service_file systemd-user)" "$(service_file openrc)" \
		"$(service_file launchd)" "$(service_file rc.d)" "$(rcd_enable_file)"; do
		[ "$1" = "$file" ] && grep -Fq "$MARK" "$1" 2>/dev/null && return 0
	done
	return 1
}

do_uninstall() {
	[ -f "$DIR/install.manifest" ] || die "komari_agent.py is not installed in $DIR: nothing to uninstall (give --install-dir and --install-service-name as at install time)"
	load_manifest
	load_settings
	replaced=''
	if [ -f "$(official_record)/official.conf" ]; then
		replaced=1
		# shellcheck disable=SC1091 # written by stand_down_official
		. "$(official_record)/official.conf"
	fi
	[ -z "$RESTORE_OFFICIAL" ] || [ -n "$replaced" ] || die "no official agent was replaced by install.sh in $DIR: nothing to restore"
	# what an earlier --uninstall kept (state/, the record of the official agent) is all there is
	done_line="Uninstalled."
	dirs=$(dir_and_parents)
	if manifest_rest | grep -Fv -e "$DIR/state" -e "$(official_record)" | grep -q .; then
		say "Uninstalling komari_agent.py from $DIR (service '$NAME')${DRY_RUN:+ [dry run: nothing is changed]}"
	else
		say "komari_agent.py is not installed in $DIR: it was uninstalled before; what that kept is below${DRY_RUN:+ [dry run: nothing is changed]}"
		done_line="Nothing else to uninstall."
		[ -z "$PURGE$RESTORE_OFFICIAL" ] || done_line="Done."
	fi
	[ -n "$SAVED_SERVICE" ] && stop_service "$SAVED_SERVICE"
	was_dir=''
	in_manifest "$DIR" && was_dir=1
	remove_installed # state/ and the record of a replaced official agent stay for now
	if [ -n "$RESTORE_OFFICIAL" ]; then
		restore_official
		MANIFEST=$(printf '%s\n' "$MANIFEST" | grep -Fv "$(official_record)")
		remove "$(official_record)"
	elif [ -n "$replaced" ] && [ "$OFFICIAL_KIND" = process ]; then
		put_back_official
		say "the official agent ($OFFICIAL_FILE) is not started again: to start it as it ran, run this again with --uninstall --restore-official"
	elif [ -n "$replaced" ]; then
		put_back_official
		# the same label as ours, which enabled it
		[ "$OFFICIAL_KIND" != launchd ] || [ -n "$ROOT" ] || run launchctl disable "$(launchd_domain)/$(launchd_label "$OFFICIAL_NAME")"
		say "the official agent's service ($OFFICIAL_FILE) is back in place, stopped and disabled: to start it, run this again with --uninstall --restore-official, or: $(official_start_command)"
	fi
	[ -z "$PURGE" ] || remove_installed purge
	case $SAVED_SERVICE in
	systemd) [ -n "$ROOT" ] || run systemctl daemon-reload ;;
	systemd-user) [ -n "$ROOT" ] || run systemctl --user daemon-reload ;;
	esac
	if manifest_rest | grep -q .; then
		save_manifest # what stays is still ours, for a later --purge
	else
		remove "$DIR/install.manifest"
		MANIFEST=''
	fi
	if [ -d "$DIR/state" ] && in_manifest "$DIR/state"; then
		say "kept $DIR/state (traffic totals, undelivered results): add --purge to remove it too"
	fi
	if [ -z "$MANIFEST" ] && [ -n "$was_dir" ]; then
		if [ -n "$DRY_RUN" ]; then
			say "would remove $DIR if nothing else is left in it"
		else
			remove_dirs "$dirs" || say "kept $DIR: it holds files install.sh did not create"
		fi
	elif [ -z "$was_dir" ]; then
		say "kept $DIR: it was there before install.sh"
	fi
	say "$done_line${DRY_RUN:+ (dry run: nothing was changed)}"
}

# cleanup: at exit, temporary files go; a first install that failed leaves nothing behind.
cleanup() {
	[ -n "$WORK" ] && rm -rf "$WORK"
	[ -n "$DIR" ] && rm -f "$DIR/.requirements.tmp" "$DIR/komari_agent.py.new" "$DIR/install.manifest.tmp"
	[ -z "$FINISHED" ] && [ -z "$DRY_RUN" ] || return 0
	if [ -n "$STOOD_DOWN" ]; then
		FINISHED=1
		roll_back_to_official >/dev/null 2>&1
		printf 'install.sh: the official agent is back as it was\n' >&2
	elif [ -n "$FRESH" ] && [ -d "$DIR" ]; then
		dirs=$(dir_and_parents)
		remove_installed purge 2>/dev/null
		rm -f "$DIR/install.manifest"
		remove_dirs "$dirs" && [ ! -d "$DIR" ] && printf 'install.sh: removed the half-made %s\n' "$DIR" >&2
	fi
	return 0
}

# ---- command line ---------------------------------------------------------------------------

main() {
	ENDPOINT='' TOKEN='' DISCOVERY='' DIR='' DIR_GIVEN='' NAME=komari-agent NAME_GIVEN='' GHPROXY='' VERSION='' SOURCE=''
	PIP_INDEX_URL='' VENV_SYSTEM_SITE='' SERVICE='' NO_SERVICE='' NO_START='' UNINSTALL='' DRY_RUN=''
	AGENT_ARGS='' AGENT_ARGS_GIVEN='' PURGE='' RESTORE_OFFICIAL='' WORK='' FRESH='' FINISHED='' STOOD_DOWN=''
	OFFICIAL_FILE='' OFFICIAL_KIND='' OFFICIAL_PID='' OFFICIAL_DIR='' OFFICIAL_ARGV='' TAKE_OVER='' STOPPED_AT=0
	# Nothing is installed by accident: a first install needs -e and -t, an update at least an
	# option saying where.
	if [ $# -eq 0 ]; then
		usage >&2
		exit 2
	fi
	while [ $# -gt 0 ]; do
		opt=$1
		case $opt in
		--*=*) value=${opt#*=} opt=${opt%%=*} has_value=1 ;;
		*) value=${2-} has_value='' ;;
		esac
		case $opt in
		-e | --endpoint | -t | --token | --install-dir | --install-service-name | --install-ghproxy | \
			--install-version | --source | --pip-index-url | --service | --auto-discovery)
			if [ -z "$has_value" ]; then
				[ $# -ge 2 ] || usage_error "$opt needs a value"
				shift
			fi
			;;
		esac
		case $opt in
		-e | --endpoint) ENDPOINT=$value ;;
		-t | --token) TOKEN=$value ;;
		--auto-discovery) DISCOVERY=$value ;;
		--install-dir) DIR=$value DIR_GIVEN=1 ;;
		--install-service-name) NAME=$value NAME_GIVEN=1 ;;
		--install-ghproxy) GHPROXY=$value ;;
		--install-version) VERSION=$value ;;
		--install-*) warn "unknown install option $1 ignored" ;;
		--source) SOURCE=$value ;;
		--pip-index-url) PIP_INDEX_URL=$value ;;
		--venv-system-site-packages) VENV_SYSTEM_SITE=1 ;;
		--service) SERVICE=$value ;;
		--no-service) NO_SERVICE=1 ;;
		--no-start) NO_START=1 ;;
		--uninstall) UNINSTALL=1 ;;
		--purge) PURGE=1 ;;
		--restore-official) RESTORE_OFFICIAL=1 UNINSTALL=1 ;;
		--take-over-official) TAKE_OVER=1 ;;
		--dry-run) DRY_RUN=1 ;;
		-h | --help) usage; exit 0 ;;
		*)
			AGENT_ARGS="$AGENT_ARGS $(q "$1")"
			AGENT_ARGS_GIVEN=1
			;;
		esac
		shift
	done
	case $SERVICE in
	'' | auto | systemd | systemd-user | openrc | procd | launchd | rc.d | cron) ;;
	*) usage_error "--service must be auto, systemd, systemd-user, openrc, procd, launchd, rc.d or cron, not '$SERVICE'" ;;
	esac
	case $NAME in
	'' | *[!A-Za-z0-9_.@-]*) usage_error "service name '$NAME' may hold only letters, digits and _ . @ -" ;;
	esac

	PY=${KOMARI_PYTHON:-python3}
	ROOT=${KOMARI_INSTALL_ROOT:-}
	ROOT=${ROOT%/}
	if [ -z "$DIR" ]; then
		if is_root; then DIR=/opt/$NAME; else DIR=${XDG_DATA_HOME:-$HOME/.local/share}/$NAME; fi
	fi
	case $DIR in /*) ;; *) DIR=$(pwd)/$DIR ;; esac
	DIR=${DIR%/}
	case $DIR in
	'' | *[!A-Za-z0-9_./@+-]*) usage_error "install directory '$DIR' may hold only letters, digits and _ . / @ + -" ;;
	esac
	DIR=$(at "$DIR")
	[ -n "$SOURCE" ] || SOURCE=${KOMARI_AGENT_URL:-}
	# Run from a checkout: take the komari_agent.py beside this script.
	if [ -z "$SOURCE" ] && [ -f "$0" ] && grep -Fq "$MARK" "$0" 2>/dev/null && [ -f "$(dirname "$0")/komari_agent.py" ]; then
		SOURCE=$(cd "$(dirname "$0")" && pwd)/komari_agent.py
	fi
	[ -n "$SOURCE" ] || SOURCE=$DEFAULT_AGENT_URL
	case $SOURCE in
	http://* | https://* | /*) ;;
	*) SOURCE=$(pwd)/$SOURCE ;;
	esac
	MANIFEST=''
	[ -z "$PURGE" ] || [ -n "$UNINSTALL" ] || usage_error "--purge goes with --uninstall"
	trap cleanup EXIT
	trap 'exit 130' INT TERM HUP
	if [ -n "$UNINSTALL" ]; then do_uninstall; else do_install; fi
}

main "$@"
