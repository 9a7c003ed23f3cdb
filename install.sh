#!/bin/sh
# install.sh: install komari_agent.py with its dependencies as a boot-persistent service.
#
#   curl -fsSL https://…/install.sh | sh -s -- -e https://panel.example.com -t TOKEN [agent flags]
#
# POSIX sh (dash, busybox ash). Takes the official installer's options (-e/-t, --install-dir,
# --install-service-name, --install-ghproxy, --install-version) plus every agent flag, which is
# passed to the service unchanged. Run with --help for the rest. Re-running upgrades in place and
# keeps the settings; --uninstall removes only what this script created.
#
# Everything lives inside main(), called on the last line, so a download cut short runs nothing,
# and every command gets </dev/null so that nothing eats the rest of a script read from a pipe.

# Every file this script writes carries this mark; --uninstall checks for it.
MARK='written by komari_agent.py install.sh'
# Where komari_agent.py comes from when not run from a checkout (KOMARI_AGENT_URL overrides).
DEFAULT_AGENT_URL='https://raw.githubusercontent.com/OWNER/REPO/main/komari_agent.py'
# Same as requirements.txt (a test keeps them equal); used when no requirements.txt is at hand.
REQUIREMENTS='psutil>=5.6
websocket-client>=1.0'

# ---- output -------------------------------------------------------------------------------

say() { printf '%s\n' "$*"; }
warn() { printf 'install.sh: warning: %s\n' "$*" >&2; }
die() { printf 'install.sh: error: %s\n' "$*" >&2; exit 1; }
usage_error() { printf 'install.sh: error: %s (see --help)\n' "$*" >&2; exit 2; }

usage() {
	cat <<'EOF'
Usage: install.sh -e ENDPOINT -t TOKEN [options] [agent flags]
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
  --service KIND                auto (default), systemd, systemd-user, openrc, procd, cron
  --no-service                  install files and dependencies only
  --no-start                    write the service definition but do not enable or start it
  --uninstall                   stop the service and remove what install.sh created
  --dry-run                     print every action, change nothing
  -h, --help                    this text
Any other argument is an agent flag (see komari_agent.py --help) and is passed on unchanged.
Environment: KOMARI_PYTHON (interpreter, default python3), KOMARI_AGENT_URL,
KOMARI_INSTALL_ROOT (prefix for /etc and /var paths, and a crontab file there instead of
crontab(1); no service manager command is run; for tests and images).
EOF
}

# q WORD: WORD single-quoted for sh.
q() { printf "'%s'" "$(printf '%s' "$1" | sed "s/'/'\\\\''/g")"; }

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

detect_service() {
	if ! is_root; then
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

# fetch URL DEST: curl, else wget, else Python itself.
fetch() {
	if [ -n "$DRY_RUN" ]; then say "would download $1 to $2"; return 0; fi
	if have curl; then
		curl -fsSL --retry 2 --connect-timeout 20 -o "$2" "$1" </dev/null
	elif have wget; then
		wget -q -T 20 -O "$2" "$1" </dev/null
	else
		"$PY" -c 'import sys, urllib.request; open(sys.argv[2], "wb").write(urllib.request.urlopen(sys.argv[1], timeout=20).read())' "$1" "$2" </dev/null
	fi
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
	say "==> installing psutil and websocket-client"
	deps_venv || { requirements_met "$PY" && RUN_PYTHON=$PY RUN_PYTHONPATH='' DEPS="already installed for $PY"; } ||
		deps_distro || deps_target ||
		die "could not install psutil and websocket-client for $PY: install python3-venv (Debian/Ubuntu), or the distribution's python3-psutil and python3-websocket packages, or pip, then run this again"
	say "dependencies: $DEPS"
}

# ---- files in the install directory ---------------------------------------------------------

install_agent_file() {
	if [ -f "$SOURCE" ]; then
		say "==> installing komari_agent.py from $SOURCE"
		[ -n "$DRY_RUN" ] && { say "would copy $SOURCE to $DIR/komari_agent.py"; return 0; }
		cp "$SOURCE" "$DIR/komari_agent.py.new" || die "cannot copy $SOURCE"
	else
		url=$(with_ghproxy "$SOURCE")
		say "==> downloading komari_agent.py from $url"
		[ -n "$DRY_RUN" ] && { fetch "$url" "$DIR/komari_agent.py"; return 0; }
		fetch "$url" "$DIR/komari_agent.py.new" || { rm -f "$DIR/komari_agent.py.new"; die "download failed: $url"; }
	fi
	# A proxy's error page must not replace a working agent.
	if ! grep -q 'Komari' "$DIR/komari_agent.py.new" ||
		! "$PY" -c 'import ast, sys; ast.parse(open(sys.argv[1], "rb").read())' "$DIR/komari_agent.py.new" </dev/null 2>/dev/null; then
		rm -f "$DIR/komari_agent.py.new"
		die "$SOURCE is not komari_agent.py"
	fi
	claim "$DIR/komari_agent.py"
	chmod 0644 "$DIR/komari_agent.py.new" && mv -f "$DIR/komari_agent.py.new" "$DIR/komari_agent.py"
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

write_launcher() {
	claim "$DIR/run-agent.sh"
	{
		printf '#!/bin/sh\n# %s: starts the agent. Re-run install.sh to change the flags.\n' "$MARK"
		printf 'cd %s || exit 1\n' "$(q "$DIR")"
		[ -n "$RUN_PYTHONPATH" ] && printf 'PYTHONPATH=%s\nexport PYTHONPATH\n' "$(q "$RUN_PYTHONPATH")"
		printf 'exec %s %s --config %s --state-dir %s%s "$@"\n' "$(q "$RUN_PYTHON")" "$(q "$DIR/komari_agent.py")" \
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

unit_dir_user() { printf '%s/systemd/user' "${XDG_CONFIG_HOME:-$HOME/.config}"; }

service_file() {
	case $1 in
	systemd) printf '%s/etc/systemd/system/%s.service' "$ROOT" "$NAME" ;;
	systemd-user) printf '%s/%s.service' "$(unit_dir_user)" "$NAME" ;;
	openrc | procd) printf '%s/etc/init.d/%s' "$ROOT" "$NAME" ;;
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
Environment=PYTHONUNBUFFERED=1
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

depend() {
	need net
	after firewall
}
EOF
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

# crontab_write: the crontab gets stdin. It is read whole before anything is
# written, because stdin is usually a pipe from crontab_read of the same file.
crontab_write() {
	_crontab=$(cat)
	if [ -n "$DRY_RUN" ]; then
		say "would set the crontab to:"
		printf '%s\n' "$_crontab" | sed 's/^/    | /'
	elif [ -n "$ROOT" ]; then
		mkdir -p "$(dirname "$(crontab_file)")" &&
			printf '%s\n' "$_crontab" >"$(crontab_file).new" && mv -f "$(crontab_file).new" "$(crontab_file)"
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
	if [ -e "$file" ] && ! grep -Fq "$MARK" "$file"; then
		warn "replacing $file, which install.sh did not write"
	fi
	claim_parents "$file"
	case $SERVICE in
	systemd) own "$file"; systemd_unit multi-user.target | write_file "$file" 0644 ;;
	systemd-user) own "$file"; systemd_unit default.target | write_file "$file" 0644 ;;
	openrc) own "$file"; openrc_script | write_file "$file" 0755 ;;
	procd) own "$file"; procd_script | write_file "$file" 0755 ;;
	cron)
		claim "$file"
		claim "$DIR/keepalive.pid"
		claim "$DIR/agent.log"
		claim "$DIR/agent.log.1"
		keepalive_script | write_file "$file" 0755
		if [ -z "$ROOT" ] && ! have crontab; then
			warn "no crontab command: the agent starts now but not at boot; add '/bin/sh $file &' to a boot script (/etc/rc.local)"
		else
			{ crontab_without_ours; cron_line; } | crontab_write ||
				warn "could not add the @reboot entry to the crontab: the agent starts now but not at boot"
		fi
		;;
	*) usage_error "unknown service kind $SERVICE" ;;
	esac
	if [ -n "$NO_START" ]; then
		say "not enabled or started (--no-start)"
		return 0
	fi
	if [ -n "$ROOT" ] && [ "$SERVICE" != cron ]; then
		say "not enabled or started: KOMARI_INSTALL_ROOT is set"
		return 0
	fi
	case $SERVICE in
	systemd)
		run systemctl daemon-reload
		run systemctl enable "$NAME.service"
		run systemctl restart "$NAME.service"
		LOGS="journalctl -u $NAME -f"
		;;
	systemd-user)
		run systemctl --user daemon-reload
		run systemctl --user enable "$NAME.service"
		run systemctl --user restart "$NAME.service"
		LOGS="journalctl --user -u $NAME -f"
		linger_hint
		;;
	openrc)
		run rc-update add "$NAME" default
		run rc-service "$NAME" restart
		LOGS="tail -f /var/log/$NAME.log"
		;;
	procd)
		run "$file" enable
		run "$file" restart
		LOGS="logread -f -e komari"
		;;
	cron)
		stop_keepalive
		start_keepalive
		LOGS="tail -f $DIR/agent.log"
		;;
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
	cron)
		stop_keepalive
		if { [ -n "$ROOT" ] || have crontab; } && crontab_read | grep -Fq "# $MARK: $NAME"; then
			crontab_without_ours | crontab_write
		fi
		;;
	esac
	return 0
}

# ---- install and uninstall ------------------------------------------------------------------

do_install() {
	check_python
	load_settings
	# Agent flags given now replace the saved ones; none given keeps them.
	[ -n "$AGENT_ARGS_GIVEN" ] || AGENT_ARGS=$SAVED_AGENT_ARGS
	[ -n "$GHPROXY" ] || GHPROXY=$SAVED_GHPROXY
	[ -n "$PIP_INDEX_URL" ] || PIP_INDEX_URL=$SAVED_PIP_INDEX_URL
	[ -n "$VENV_SYSTEM_SITE" ] || VENV_SYSTEM_SITE=$SAVED_VENV_SYSTEM_SITE
	if [ -z "$SERVICE" ]; then SERVICE=${SAVED_SERVICE:-auto}; fi
	[ "$SERVICE" = auto ] && SERVICE=$(detect_service)
	[ -n "$NO_SERVICE" ] && SERVICE=none
	if [ -n "$VERSION" ]; then say "note: --install-version $VERSION ignored: komari_agent.py comes from $SOURCE"; fi
	if [ -z "$ENDPOINT" ] || { [ -z "$TOKEN" ] && [ -z "$DISCOVERY" ]; }; then
		config_has_credentials || usage_error "-e ENDPOINT and -t TOKEN are needed (no earlier install in $DIR to take them from)"
	fi
	REQ_FILE=$(dirname "$SOURCE")/requirements.txt
	[ -f "$SOURCE" ] && [ -f "$REQ_FILE" ] || REQ_FILE=$DIR/.requirements.tmp
	what="as service '$NAME' ($SERVICE)"
	[ "$SERVICE" = none ] && what="without a service (--no-service)"
	say "Installing komari_agent.py into $DIR $what${DRY_RUN:+ [dry run: nothing is changed]}"
	load_manifest
	claim "$DIR"
	make_dir "$DIR"
	save_manifest
	# a failed run leaves no temporary file behind
	[ -n "$DRY_RUN" ] || trap 'rm -f "$DIR/.requirements.tmp" "$DIR/komari_agent.py.new"' EXIT
	install_agent_file
	if [ "$REQ_FILE" = "$DIR/.requirements.tmp" ] && [ -z "$DRY_RUN" ]; then
		printf '%s\n' "$REQUIREMENTS" >"$REQ_FILE"
	fi
	install_dependencies
	rm -f "$DIR/.requirements.tmp"
	if [ -z "$DRY_RUN" ]; then
		PYTHONPATH=$RUN_PYTHONPATH "$RUN_PYTHON" "$DIR/komari_agent.py" --version </dev/null >/dev/null 2>&1 ||
			die "the installed agent does not start: try $RUN_PYTHON $DIR/komari_agent.py --version"
	fi
	claim "$DIR/config.json"
	(umask 077 && write_config) || exit 1
	claim "$DIR/state"
	make_dir "$DIR/state"
	write_launcher
	LOGS=''
	if [ -n "$NO_SERVICE" ]; then
		SERVICE=$SAVED_SERVICE # --no-service is about this run, not a setting to keep
		say "no service installed (--no-service); start the agent with: $DIR/run-agent.sh"
	else
		install_service
	fi
	write_settings
	save_manifest
	say "Done.${LOGS:+ Logs: $LOGS}"
	say "Upgrade: run the same command again. Uninstall: add --uninstall${DIR_GIVEN:+ --install-dir $DIR}${NAME_GIVEN:+ --install-service-name $NAME}."
}

# safe_to_remove PATH: only paths inside the install directory or our own service definitions,
# whatever the manifest says.
safe_to_remove() {
	case $1 in
	"$DIR" | "$DIR"/*) return 0 ;;
	esac
	for kind in systemd systemd-user openrc procd; do
		[ "$1" = "$(service_file "$kind")" ] && grep -Fq "$MARK" "$1" 2>/dev/null && return 0
	done
	return 1
}

do_uninstall() {
	[ -f "$DIR/install.manifest" ] || die "nothing installed by install.sh in $DIR (give --install-dir and --install-service-name as at install time)"
	load_manifest
	load_settings
	say "Uninstalling komari_agent.py from $DIR (service '$NAME')${DRY_RUN:+ [dry run: nothing is changed]}"
	[ -n "$SAVED_SERVICE" ] && stop_service "$SAVED_SERVICE"
	# Deepest paths first, so a directory is empty by the time it comes.
	printf '%s\n' "$MANIFEST" | awk 'NF { print length($0) "\t" $0 }' | sort -rn | cut -f2- | {
		while IFS='' read -r path; do
			if [ "$path" = "$DIR" ]; then
				: # last, and only when empty
			elif safe_to_remove "$path"; then
				remove "$path"
			elif [ -d "$path" ] && [ ! -L "$path" ]; then
				# a directory made for a service definition: only if nothing else is in it
				if [ -n "$DRY_RUN" ]; then say "would remove $path if empty"; else rmdir "$path" 2>/dev/null; fi
			elif [ -e "$path" ]; then
				warn "not removing $path: not a file install.sh wrote"
			fi
		done
	}
	case $SAVED_SERVICE in
	systemd) [ -n "$ROOT" ] || run systemctl daemon-reload ;;
	systemd-user) [ -n "$ROOT" ] || run systemctl --user daemon-reload ;;
	esac
	remove "$DIR/install.manifest"
	if in_manifest "$DIR"; then
		if [ -n "$DRY_RUN" ]; then
			say "would remove $DIR if nothing else is left in it"
		else
			rmdir "$DIR" 2>/dev/null || say "kept $DIR: it holds files install.sh did not create"
		fi
	else
		say "kept $DIR: it was there before install.sh"
	fi
	say "Uninstalled.${DRY_RUN:+ (dry run: nothing was changed)}"
}

# ---- command line ---------------------------------------------------------------------------

main() {
	ENDPOINT='' TOKEN='' DISCOVERY='' DIR='' DIR_GIVEN='' NAME=komari-agent NAME_GIVEN='' GHPROXY='' VERSION='' SOURCE=''
	PIP_INDEX_URL='' VENV_SYSTEM_SITE='' SERVICE='' NO_SERVICE='' NO_START='' UNINSTALL='' DRY_RUN=''
	AGENT_ARGS='' AGENT_ARGS_GIVEN=''
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
	'' | auto | systemd | systemd-user | openrc | procd | cron) ;;
	*) usage_error "--service must be auto, systemd, systemd-user, openrc, procd or cron, not '$SERVICE'" ;;
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
	if [ -n "$UNINSTALL" ]; then do_uninstall; else do_install; fi
}

main "$@"
