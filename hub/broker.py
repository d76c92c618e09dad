"""The hall's mosquitto: its generated config, per-device identity (password file) and ACL,
and a supervisor that runs it as a child process and restarts it when it dies.

Files live in the broker folder of the hub's data dir (settings.broker_dir):
mosquitto.conf, passwd, acl, persistence/, tls/, mosquitto.log and mosquitto.pid. The
password file is the only place device broker credentials live (as PBKDF2 hashes); the
provisioning code edits it through PasswordFile and then asks a running broker to reload.
"""
from __future__ import annotations

import base64
import fcntl
import hashlib
import hmac
import logging
import os
import secrets
import shutil
import signal
import socket
import subprocess
import threading
import time
from dataclasses import dataclass, field

from hub import PingjiaError

log = logging.getLogger("pingjia.broker")

# mosquitto 2.0 password hashes: `$7$<iterations>$<b64 salt>$<b64 PBKDF2-HMAC-SHA512>`.
# 101 iterations is mosquitto_passwd's own default. Every password here is 32 random
# characters, so the hash does not need to slow a guesser down; a high count would only
# slow every device (re)connect after a broker restart.
PBKDF2_ITERATIONS = 101
_SALT_BYTES = 12
# The hub's persistent session may be offline while the hub restarts; devices resend
# anyway, but a deeper queue spares them the resend.
MAX_QUEUED = 10000
# Uplinks are at most 2 KB (docs/protocol.md); downlinks carry a few bitmaps. Anything far
# bigger is a misbehaving client and must not make the broker buffer it.
MAX_PACKET = 262144
_LOG_KEEP_BYTES = 1 << 20


class BrokerError(PingjiaError):
    """The broker could not be configured, started or reached."""


# -- password file --------------------------------------------------------------------------

def hash_password(password, salt=None, iterations=PBKDF2_ITERATIONS):
    """A mosquitto 2.0 `$7$` password hash."""
    salt = salt if salt is not None else secrets.token_bytes(_SALT_BYTES)
    digest = hashlib.pbkdf2_hmac("sha512", password.encode("utf-8"), salt, iterations)
    return "$7$%d$%s$%s" % (iterations, base64.b64encode(salt).decode("ascii"),
                            base64.b64encode(digest).decode("ascii"))


def verify_password(password, hashed):
    """True when `password` matches a `$7$` hash (other formats never match)."""
    parts = hashed.split("$")
    if len(parts) != 5 or parts[1] != "7":
        return False
    try:
        iterations = int(parts[2])
        salt = base64.b64decode(parts[3], validate=True)
        expected = base64.b64decode(parts[4], validate=True)
    except ValueError:
        return False
    digest = hashlib.pbkdf2_hmac("sha512", password.encode("utf-8"), salt, iterations)
    return hmac.compare_digest(digest, expected)


def _check_user(user):
    if not user or ":" in user or "\n" in user or any(c in user for c in "+#/"):
        raise BrokerError("broker user %r: must be an identifier" % user)


class PasswordFile:
    """mosquitto's password file, edited under an exclusive lock.

        with PasswordFile(path) as pw:
            pw.set("D0001", password)

    Changes are written atomically (0600) when the block ends without an error, so a hub
    and a `pingjia device add` in another process never lose each other's edits.
    """

    def __init__(self, path):
        self.path = path
        self._lock_fd = None
        self._entries = {}
        self._dirty = False

    def __enter__(self):
        os.makedirs(os.path.dirname(os.path.abspath(self.path)), mode=0o700, exist_ok=True)
        self._lock_fd = os.open(self.path + ".lock", os.O_RDWR | os.O_CREAT, 0o600)
        fcntl.flock(self._lock_fd, fcntl.LOCK_EX)
        self._entries = self._read()
        self._dirty = False
        return self

    def __exit__(self, exc_type, exc, tb):
        try:
            if exc_type is None and self._dirty:
                self._write()
        finally:
            fcntl.flock(self._lock_fd, fcntl.LOCK_UN)
            os.close(self._lock_fd)
            self._lock_fd = None

    def _read(self):
        entries = {}
        try:
            with open(self.path, encoding="utf-8") as f:
                for line in f:
                    line = line.strip()
                    if not line or line.startswith("#") or ":" not in line:
                        continue
                    user, hashed = line.split(":", 1)
                    entries[user] = hashed
        except FileNotFoundError:
            pass
        return entries

    def _write(self):
        tmp = self.path + ".tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            for user in sorted(self._entries):
                f.write("%s:%s\n" % (user, self._entries[user]))
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o600)
        os.replace(tmp, self.path)

    def users(self):
        return sorted(self._entries)

    def __contains__(self, user):
        return user in self._entries

    def set(self, user, password):
        _check_user(user)
        self._entries[user] = hash_password(password)
        self._dirty = True

    def ensure(self, user, password):
        """Set `user`'s password unless the stored hash already matches it.
        Returns True when the file changed."""
        hashed = self._entries.get(user)
        if hashed is not None and verify_password(password, hashed):
            return False
        self.set(user, password)
        return True

    def check(self, user, password):
        hashed = self._entries.get(user)
        return hashed is not None and verify_password(password, hashed)

    def remove(self, user):
        """Drop a user; True when it was there."""
        if self._entries.pop(user, None) is None:
            return False
        self._dirty = True
        return True


# -- generated files ----------------------------------------------------------------------

@dataclass(frozen=True)
class BrokerFiles:
    """Paths of everything the broker reads or writes, all under settings.broker_dir."""
    dir: str
    conf: str
    passwd: str
    acl: str
    persistence: str
    log: str
    pid: str
    tls_dir: str

    @classmethod
    def for_settings(cls, settings):
        d = settings.broker_dir
        return cls(dir=d, conf=os.path.join(d, "mosquitto.conf"), passwd=os.path.join(d, "passwd"),
                   acl=os.path.join(d, "acl"), persistence=os.path.join(d, "persistence"),
                   log=os.path.join(d, "mosquitto.log"), pid=os.path.join(d, "mosquitto.pid"),
                   tls_dir=settings.tls_dir)


def acl_text(hub_user):
    """Topic rights: each device its own `pj/<id>/…` subtree, the hub every device's."""
    return (
        "# Generated by pingjia from hub.toml; edits are overwritten.\n"
        "# A device (username = device id) writes only its uplink and reads only its downlink.\n"
        "pattern write pj/%u/up/#\n"
        "pattern read pj/%u/dn/#\n"
        "\n"
        "# The hub reads every uplink and writes every downlink. Nobody else gets anything.\n"
        "user " + hub_user + "\n"
        "topic read pj/+/up/#\n"
        "topic write pj/+/dn/#\n"
    )


def config_text(settings, files, run_as_root=None):
    """mosquitto.conf for these settings (mosquitto 2.0 syntax)."""
    if run_as_root is None:
        run_as_root = hasattr(os, "geteuid") and os.geteuid() == 0
    b = settings.broker
    lines = [
        "# Generated by pingjia from %s; edits are overwritten." % (settings.source or "hub settings"),
        "per_listener_settings false",
        "allow_anonymous false",
        "password_file " + files.passwd,
        "acl_file " + files.acl,
        "persistence true",
        # mosquitto wants the trailing separator on this one.
        "persistence_location " + files.persistence + os.sep,
        "autosave_interval 30",
        "max_queued_messages %d" % MAX_QUEUED,
        "max_packet_size %d" % MAX_PACKET,
        "log_dest stderr",
        "log_type error",
        "log_type warning",
        "log_type notice",
        "log_type information",
        "connection_messages true",
    ]
    if run_as_root:
        # As root mosquitto would otherwise switch to user `mosquitto`, which cannot read
        # the 0600 password file and keys the hub wrote.
        lines.append("user root")
    lines += ["", "# The hall LAN / loopback, plain MQTT.", "listener %d %s" % (b.port, b.host)]
    if b.tls_port:
        lines += [
            "", "# TLS with the hall CA.",
            "listener %d %s" % (b.tls_port, b.host),
            "cafile " + os.path.join(files.tls_dir, "ca.crt"),
            "certfile " + os.path.join(files.tls_dir, "server.crt"),
            "keyfile " + os.path.join(files.tls_dir, "server.key"),
            "tls_version tlsv1.2",
            "require_certificate " + ("true" if b.require_client_cert else "false"),
        ]
    return "\n".join(lines) + "\n"


def write_broker_files(settings):
    """Write mosquitto.conf and acl, and make the password file hold the hub's identity.
    Device entries in the password file are left as they are."""
    b = settings.broker
    if not b.hub_password:
        raise BrokerError("broker.hub_password is empty: run `pingjia hub init`")
    files = BrokerFiles.for_settings(settings)
    os.makedirs(files.dir, mode=0o700, exist_ok=True)
    os.makedirs(files.persistence, mode=0o700, exist_ok=True)
    if b.tls_port:
        from hub.keys import ensure_hall_tls
        ensure_hall_tls(settings)
    _write_text(files.acl, acl_text(b.hub_user), 0o600)
    _write_text(files.conf, config_text(settings, files), 0o600)
    with PasswordFile(files.passwd) as pw:
        pw.ensure(b.hub_user, b.hub_password)
    return files


def _write_text(path, text, mode):
    tmp = path + ".tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(text)
    os.chmod(tmp, mode)
    os.replace(tmp, path)


def find_mosquitto():
    found = shutil.which("mosquitto")
    if found:
        return found
    for candidate in ("/usr/sbin/mosquitto", "/usr/local/sbin/mosquitto"):
        if os.access(candidate, os.X_OK):
            return candidate
    raise BrokerError("mosquitto not found: install the mosquitto package")


# -- a broker started by an earlier hub process ----------------------------------------------

def _pid_is_our_broker(pid, conf):
    """True when `pid` is a live mosquitto running with our config file."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    try:
        with open("/proc/%d/cmdline" % pid, "rb") as f:
            argv = f.read().split(b"\0")
    except OSError:
        return False  # no /proc: do not risk signalling a stranger
    return any(a.endswith(b"mosquitto") for a in argv[:1]) and conf.encode() in argv


def running_pid(settings):
    """The pid of the supervised broker for these settings, if one is running
    (in this process or another), else None."""
    files = BrokerFiles.for_settings(settings)
    try:
        with open(files.pid) as f:
            pid = int(f.read().strip() or 0)
    except (OSError, ValueError):
        return None
    if pid > 0 and _pid_is_our_broker(pid, files.conf):
        return pid
    return None


def reload_running(settings):
    """SIGHUP a running supervised broker so it re-reads password file and ACL.
    Returns True when a broker was signalled."""
    if settings.broker.mode != "supervise":
        return False
    pid = running_pid(settings)
    if pid is None:
        return False
    try:
        os.kill(pid, signal.SIGHUP)
    except ProcessLookupError:
        return False
    log.info("broker %d reloaded", pid)
    return True


def _connect_host(host):
    return "127.0.0.1" if host in ("0.0.0.0", "", "*") else ("::1" if host == "::" else host)


def _accepts(host, port):
    try:
        with socket.create_connection((host, port), timeout=0.5):
            return True
    except OSError:
        return False


@dataclass(frozen=True)
class Endpoint:
    """How a client (the hub's ingest, a test) reaches the broker as the hub user."""
    host: str
    port: int
    tls_port: int
    ca_file: str | None
    username: str
    password: str = field(repr=False)


class Broker:
    """The hall's mosquitto as a supervised child process.

    In `external` mode there is no child: start/stop/reload do nothing and `endpoint`
    just carries the connection details from the settings.
    """

    def __init__(self, settings, mosquitto=None, start_timeout=10.0):
        self.settings = settings
        self.files = BrokerFiles.for_settings(settings)
        self.external = settings.broker.mode == "external"
        self._mosquitto = mosquitto
        self.start_timeout = start_timeout
        self.proc = None
        self.restarts = 0
        self._wanted = False  # start() called and stop() not yet: the supervisor restarts
        self._lock = threading.RLock()
        self._stopping = threading.Event()
        self._watcher = None
        self._log_file = None
        self._owner_fd = None

    @property
    def endpoint(self):
        b = self.settings.broker
        ca = os.path.join(self.files.tls_dir, "ca.crt") if b.tls_port else None
        return Endpoint(_connect_host(b.host), b.port, b.tls_port, ca, b.hub_user, b.hub_password)

    @property
    def pid(self):
        proc = self.proc
        return proc.pid if proc is not None and proc.poll() is None else None

    def is_running(self):
        if self.external:
            return _accepts(self.endpoint.host, self.endpoint.port)
        with self._lock:
            return self.proc is not None and self.proc.poll() is None

    # -- lifecycle ------------------------------------------------------------------------
    def start(self):
        """Write the config and start mosquitto; returns once its listeners accept."""
        if self.external:
            return
        with self._lock:
            self._stopping.clear()
            if self.proc is not None and self.proc.poll() is None:
                return
            self._claim()
            try:
                write_broker_files(self.settings)
                self._spawn()
            except BaseException:
                self._release()
                raise
            self._wanted = True

    def _claim(self):
        # One supervisor per broker folder. The kernel drops the lock when its holder dies,
        # however it dies, so a killed hub never blocks its successor, while two live hubs
        # on one data dir fail fast instead of killing each other's broker in turn.
        if self._owner_fd is not None:
            return
        os.makedirs(self.files.dir, mode=0o700, exist_ok=True)
        fd = os.open(os.path.join(self.files.dir, "supervisor.lock"), os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise BrokerError("%s: another hub process supervises this broker" % self.files.dir)
        self._owner_fd = fd

    def _release(self):
        if self._owner_fd is not None:
            os.close(self._owner_fd)
            self._owner_fd = None

    def _spawn(self):
        self._stop_stale()
        ep = self.endpoint
        ports = [ep.port] + ([ep.tls_port] if ep.tls_port else [])
        for port in ports:
            if _accepts(ep.host, port):
                raise BrokerError("port %d is already in use on %s" % (port, ep.host))
        self._open_log()
        self.proc = subprocess.Popen(
            [self._mosquitto or find_mosquitto(), "-c", self.files.conf],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=self._log_file,
            # Its own session: a Ctrl-C meant for the hub must not kill the broker before
            # the hub has shut down cleanly; the hub stops it last.
            start_new_session=True)
        _write_text(self.files.pid, "%d\n" % self.proc.pid, 0o644)
        deadline = time.monotonic() + self.start_timeout
        pending = list(ports)
        while pending:
            if self.proc.poll() is not None:
                code = self.proc.returncode
                self.proc = None
                raise BrokerError("mosquitto exited with %s at start: %s" % (code, self._log_tail()))
            if _accepts(ep.host, pending[0]):
                pending.pop(0)
                continue
            if time.monotonic() > deadline:
                self._kill()
                raise BrokerError("mosquitto did not listen on port %d within %.0f s"
                                  % (pending[0], self.start_timeout))
            time.sleep(0.05)
        log.info("broker %d listening on %s:%d%s", self.proc.pid, ep.host, ep.port,
                 " and TLS %d" % ep.tls_port if ep.tls_port else "")

    def _stop_stale(self):
        # A hub killed hard leaves its mosquitto behind holding the ports; the new hub
        # takes over by stopping it (its persistence keeps the queued messages).
        pid = running_pid(self.settings)
        if pid is None or (self.proc is not None and pid == self.proc.pid):
            return
        log.warning("stopping broker %d left by an earlier hub process", pid)
        _terminate_pid(pid)

    def _open_log(self):
        if self._log_file is not None:
            self._log_file.close()
        try:
            if os.path.getsize(self.files.log) > _LOG_KEEP_BYTES:
                os.replace(self.files.log, self.files.log + ".1")
        except OSError:
            pass
        self._log_file = open(self.files.log, "ab")

    def _log_tail(self):
        try:
            with open(self.files.log, "rb") as f:
                f.seek(max(0, os.path.getsize(self.files.log) - 400))
                lines = f.read().decode("utf-8", "replace").strip().splitlines()
            return lines[-1] if lines else "(no log)"
        except OSError:
            return "(no log)"

    def _kill(self):
        proc = self.proc
        self.proc = None
        if proc is None:
            return
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)

    def stop(self, timeout=10.0):
        """Stop supervision and the broker (SIGTERM, then SIGKILL after `timeout`)."""
        self._stopping.set()
        self._wanted = False
        watcher = self._watcher
        if watcher is not None and watcher is not threading.current_thread():
            watcher.join(timeout)
        self._watcher = None
        if self.external:
            return
        with self._lock:
            proc = self.proc
            self.proc = None
            if proc is not None and proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(timeout)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait(5)
            try:
                os.unlink(self.files.pid)
            except FileNotFoundError:
                pass
            if self._log_file is not None:
                self._log_file.close()
                self._log_file = None
            self._release()

    def reload(self):
        """SIGHUP: mosquitto re-reads the password file and ACL; connected clients whose
        credentials still hold stay connected. Returns True when a broker was signalled."""
        if self.external:
            return False
        with self._lock:
            if self.proc is None or self.proc.poll() is not None:
                return False
            _write_text(self.files.acl, acl_text(self.settings.broker.hub_user), 0o600)
            self.proc.send_signal(signal.SIGHUP)
            return True

    # -- supervision ---------------------------------------------------------------------
    def supervise(self, interval=0.5):
        """Watch the broker from a daemon thread and restart it whenever it dies."""
        if self.external or (self._watcher is not None and self._watcher.is_alive()):
            return
        self._stopping.clear()
        self._watcher = threading.Thread(target=self._watch, args=(interval,),
                                         name="pingjia-broker-supervisor", daemon=True)
        self._watcher.start()

    def _watch(self, interval):
        backoff = interval
        while not self._stopping.wait(backoff):
            with self._lock:
                if self._stopping.is_set():
                    return
                proc = self.proc
                if not self._wanted:
                    continue
                if proc is not None and proc.poll() is None:
                    backoff = interval
                    continue
                if proc is not None:
                    log.warning("broker %d exited with %s; restarting", proc.pid, proc.returncode)
                try:
                    self._spawn()
                    self.restarts += 1
                    backoff = interval
                except (BrokerError, OSError) as exc:
                    # Keep trying, but not in a tight loop (a port held by someone else).
                    log.error("broker restart failed: %s", exc)
                    backoff = min(backoff * 2, 10.0)


def _terminate_pid(pid, timeout=5.0):
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if _gone(pid):
            return
        time.sleep(0.05)
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def _gone(pid):
    """True once `pid` has exited. A zombie counts as gone: it holds no port, and its
    parent (perhaps an init that never reaps) may keep it around."""
    try:
        if os.waitpid(pid, os.WNOHANG)[0] == pid:
            return True
    except ChildProcessError:
        pass  # not our child
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    try:
        with open("/proc/%d/stat" % pid) as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"
    except (OSError, IndexError):
        return False
