"""Hub key material: the batch signing key (Ed25519, ECDSA P-256 or SM2) with its keyring
and rotation, and the hall CA that gives the broker its TLS identity (and, when asked,
devices their client certificates).

Private keys are written 0600 in folders made 0700, and are never logged: functions here
return paths or key objects, and errors name files, not contents.
"""
from __future__ import annotations

import datetime
import ipaddress
import json
import os
import threading

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from hub import PingjiaError
from hub import batch as batchlib
from hub import schemes

# ECDSA P-256: what ESP32 mbedTLS and OpenSSL both handle fast; RSA would cost the
# device seconds per handshake and Ed25519 certificates are not widely supported in TLS.
_CURVE = ec.SECP256R1
CA_DAYS = 3650
LEAF_DAYS = 3650
# A device's clock may be a little behind the hub's when it first checks the certificate.
_BACKDATE = datetime.timedelta(days=1)


class KeysError(PingjiaError):
    """A key or certificate file that is missing, unreadable or of the wrong kind."""


def _private_dir(folder):
    os.makedirs(folder, mode=0o700, exist_ok=True)


def write_secret(path, data):
    """Write bytes readable by the owner only; atomic so a crash never leaves half a key."""
    _private_dir(os.path.dirname(os.path.abspath(path)))
    tmp = path + ".tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.chmod(tmp, 0o600)
    os.replace(tmp, path)


def write_public(path, data):
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        f.write(data)
    os.chmod(tmp, 0o644)
    os.replace(tmp, path)


def _read(path, what):
    try:
        with open(path, "rb") as f:
            return f.read()
    except FileNotFoundError:
        raise KeysError("%s: no %s (run `pingjia hub init`)" % (path, what))
    except OSError as exc:
        raise KeysError("%s: cannot read %s: %s" % (path, what, exc.strerror))


def _private_pem(key):
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _load_private(path, what):
    try:
        return serialization.load_pem_private_key(_read(path, what), password=None)
    except (ValueError, TypeError):
        raise KeysError("%s: not an unencrypted PEM private key" % path) from None


# -- the hub's batch signing keys -----------------------------------------------------------
#
# The active key lives at settings.signing_key_path (whatever its scheme: Ed25519, ECDSA
# P-256 or SM2). Beside it, batch-keys.json is the keyring: the public half of every batch
# key the hub has used, when it came and went, and for a rotated-in key the statement, signed
# by the key before, that introduces it to the province. Old private keys are not kept.

KEYRING_NAME = "batch-keys.json"
CREDENTIALS_NAME = "province-credentials.json"


def keyring_path(signing_key_path):
    return os.path.join(os.path.dirname(os.path.abspath(signing_key_path)), KEYRING_NAME)


def credentials_path(signing_key_path):
    return os.path.join(os.path.dirname(os.path.abspath(signing_key_path)), CREDENTIALS_NAME)


def _now_iso():
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def read_keyring(signing_key_path):
    """The keyring's entries, oldest first ([] when there is none yet)."""
    path = keyring_path(signing_key_path)
    if not os.path.exists(path):
        return []
    try:
        with open(path, encoding="utf-8") as f:
            ring = json.load(f)
        entries = ring["keys"]
        if not isinstance(entries, list) or not all(isinstance(e, dict) and "key_id" in e
                                                    for e in entries):
            raise ValueError("keys must list objects with key_id")
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise KeysError("%s: unreadable keyring: %s" % (path, exc)) from None
    return entries


def _write_keyring(signing_key_path, entries):
    text = json.dumps({"keys": entries}, indent=2, ensure_ascii=False, sort_keys=True)
    _private_dir(os.path.dirname(keyring_path(signing_key_path)))  # it holds private keys too
    write_public(keyring_path(signing_key_path), (text + "\n").encode("utf-8"))


def _entry(private, rotation=None, created=None):
    return {"key_id": schemes.key_id(private), "alg": schemes.scheme_of(private),
            "public_key": schemes.public_pem(private).decode("ascii"),
            "created": created or _now_iso(), "retired": None, "rotation": rotation}


def _record_active(signing_key_path, private, rotation=None):
    """Put the key in the keyring as the active one and retire every other entry."""
    entries = read_keyring(signing_key_path)
    kid = schemes.key_id(private)
    now = _now_iso()
    if not any(e["key_id"] == kid for e in entries):
        entries.append(_entry(private, rotation, now))
    for entry in entries:
        if entry["key_id"] == kid:
            entry["retired"] = None
        elif not entry.get("retired"):
            entry["retired"] = now
    _write_keyring(signing_key_path, entries)


def _rotations_for(entries, kid):
    """Rotation statements leading to key kid, oldest first (bounded)."""
    by_id = {e["key_id"]: e for e in entries}
    chain, seen = [], set()
    entry = by_id.get(kid)
    while entry is not None and entry.get("rotation") and entry["key_id"] not in seen:
        seen.add(entry["key_id"])
        chain.append(entry["rotation"])
        entry = by_id.get(entry["rotation"].get("by"))
    chain.reverse()
    return tuple(chain[-batchlib.ROTATIONS_MAX:])


def _load_batch_private(path):
    pem = _read(path, "signing key")
    try:
        key = schemes.load_private_pem(pem)
    except schemes.SchemeError:
        raise KeysError("%s: not an unencrypted PEM private key" % path) from None
    if schemes.scheme_of(key) != schemes.ED25519:
        # ECDSA P-256 is also what the hall CA uses: only a key the keyring lists is a batch
        # key, so the CA key (or any stray key) is never taken for one.
        if not any(e.get("key_id") == schemes.key_id(key) for e in read_keyring(path)):
            raise KeysError("%s: not an Ed25519 private key, nor a batch key in %s"
                            % (path, KEYRING_NAME))
    return key


class SigningKey:
    """The hub's batch signing key as a file: signs with whatever key the file holds now.

    `pingjia hub keys rotate` swaps the file atomically; a running forwarder picks the new
    key up at its next batch, together with the rotation statements that introduce it.
    """

    def __init__(self, path):
        self.path = os.path.abspath(path)
        self._lock = threading.Lock()
        self._stamp = None
        self._private = None
        self._rotations = ()
        self._reload()

    def _file_stamp(self):
        try:
            st = os.stat(self.path)
        except OSError:
            return None
        return (st.st_ino, st.st_mtime_ns, st.st_size)

    def _reload(self):
        stamp = self._file_stamp()
        private = _load_batch_private(self.path)
        self._rotations = _rotations_for(read_keyring(self.path), schemes.key_id(private))
        self._private, self._stamp = private, stamp

    def signing_material(self):
        """(private key, rotation statements) as the key file holds them now."""
        with self._lock:
            stamp = self._file_stamp()
            if stamp is not None and stamp != self._stamp:
                try:
                    self._reload()
                except KeysError:
                    pass  # half-replaced or broken: keep signing with the key we have
            return self._private, self._rotations

    @property
    def private_key(self):
        return self.signing_material()[0]

    @property
    def rotations(self):
        return self.signing_material()[1]

    def public_key(self):
        return self.private_key.public_key()

    @property
    def key_id(self):
        return schemes.key_id(self.private_key)

    @property
    def scheme(self):
        return schemes.scheme_of(self.private_key)

    def sign(self, data):
        return schemes.sign(self.private_key, data)

    def __repr__(self):
        return "SigningKey(%s, %s)" % (self.scheme, self.key_id)


def _private(key):
    return key.private_key if isinstance(key, SigningKey) else key


def generate_signing_key(path, force=False, scheme=schemes.DEFAULT_SCHEME):
    """Create the hub's batch signing key at `path` (PKCS8 PEM, 0600) and record it in the
    keyring. With force an existing key is replaced WITHOUT a rotation statement: the
    province must then be given the new public key by hand."""
    if os.path.exists(path) and not force:
        raise KeysError("%s: signing key already exists (use --force to replace it)" % path)
    try:
        key = schemes.generate(scheme)
    except schemes.SchemeError as exc:
        raise KeysError(str(exc)) from None
    # Keyring first: a crash between the two leaves an extra public entry, never a key file
    # the keyring does not vouch for.
    _record_active(path, key)
    write_secret(path, schemes.private_pem(key))
    return SigningKey(path)


def ensure_signing_key(path):
    """The signing key at `path`, created on first use."""
    if os.path.exists(path):
        return load_signing_key(path)
    return generate_signing_key(path)


def load_signing_key(path):
    return SigningKey(path)


def rotate_signing_key(path, hub_id, scheme=None, created=None):
    """Replace the batch signing key with a new one (same scheme unless given), introduced by
    a statement the old key signs. Returns (new SigningKey, statement).

    The chain continues: the next batch is signed by the new key and carries the statement,
    so a province that trusts the old key learns the new one from the batch itself.
    """
    old = SigningKey(path)
    old_private = old.private_key
    try:
        new_private = schemes.generate(scheme or old.scheme)
    except schemes.SchemeError as exc:
        raise KeysError(str(exc)) from None
    statement = batchlib.rotation_statement(hub_id, old_private, new_private, created)
    entries = read_keyring(path)
    if not any(e["key_id"] == old.key_id for e in entries):
        # A key from before keyrings existed: record it so old batches stay checkable.
        entries.append(_entry(old_private))
    entries.append(_entry(new_private, statement))
    _write_keyring(path, entries)
    write_secret(path, schemes.private_pem(new_private))
    _record_active(path, new_private)
    return SigningKey(path), statement


def keyring_public_keys(path):
    """Every batch public key the hub has used, by key_id (the active one included)."""
    keys = {}
    for entry in read_keyring(path):
        try:
            public = schemes.load_public_pem(entry["public_key"])
        except (schemes.SchemeError, KeyError, TypeError):
            raise KeysError("%s: keyring entry %s has no readable public key"
                            % (keyring_path(path), entry.get("key_id"))) from None
        keys[schemes.key_id(public)] = public
    if os.path.exists(path):
        current = _load_batch_private(path).public_key()
        keys[schemes.key_id(current)] = current
    return keys


def public_key_pem(key):
    """PEM of the public half of a signing key (what the province registers)."""
    return schemes.public_pem(_private(key))


def public_key_hex(key):
    return schemes.raw_public(_private(key)).hex()


# -- the hall CA -------------------------------------------------------------------------

class HallTLS:
    """Where one hub keeps its TLS material.

    The CA private key sits with the hub's other keys; what mosquitto reads (CA cert,
    server cert and key) sits in the broker's tls/ folder.
    """

    def __init__(self, keys_dir, tls_dir):
        self.ca_key = os.path.join(keys_dir, "hall-ca.key")
        self.ca_cert = os.path.join(tls_dir, "ca.crt")
        self.server_cert = os.path.join(tls_dir, "server.crt")
        self.server_key = os.path.join(tls_dir, "server.key")

    @classmethod
    def for_settings(cls, settings):
        return cls(settings.keys_dir, settings.tls_dir)

    def exists(self):
        return all(os.path.exists(p) for p in
                   (self.ca_key, self.ca_cert, self.server_cert, self.server_key))

    def ca_pem(self):
        return _read(self.ca_cert, "hall CA certificate").decode("ascii")


def _name(common_name, hall_id):
    return x509.Name([
        x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Pingjia hall %s" % hall_id),
        x509.NameAttribute(NameOID.COMMON_NAME, common_name),
    ])


def _validity(builder, days):
    now = datetime.datetime.now(datetime.timezone.utc)
    return builder.not_valid_before(now - _BACKDATE).not_valid_after(now + datetime.timedelta(days=days))


def _ski(public_key):
    return x509.SubjectKeyIdentifier.from_public_key(public_key)


def create_ca(tls, hall_id, force=False):
    """A self-signed hall CA; returns (key, cert)."""
    if os.path.exists(tls.ca_key) and not force:
        raise KeysError("%s: hall CA already exists (use --force to replace it)" % tls.ca_key)
    key = ec.generate_private_key(_CURVE())
    name = _name("Pingjia hall CA %s" % hall_id, hall_id)
    builder = (x509.CertificateBuilder()
               .subject_name(name).issuer_name(name)
               .public_key(key.public_key())
               .serial_number(x509.random_serial_number())
               .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
               .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                            content_commitment=False, key_encipherment=False,
                                            data_encipherment=False, key_agreement=False,
                                            encipher_only=False, decipher_only=False), critical=True)
               .add_extension(_ski(key.public_key()), critical=False))
    cert = _validity(builder, CA_DAYS).sign(key, hashes.SHA256())
    write_secret(tls.ca_key, _private_pem(key))
    write_public(tls.ca_cert, cert.public_bytes(serialization.Encoding.PEM))
    return key, cert


def load_ca(tls):
    key = _load_private(tls.ca_key, "hall CA key")
    try:
        cert = x509.load_pem_x509_certificate(_read(tls.ca_cert, "hall CA certificate"))
    except ValueError:
        raise KeysError("%s: not a PEM certificate" % tls.ca_cert) from None
    return key, cert


def _leaf(ca_key, ca_cert, common_name, hall_id, usage, sans=None):
    key = ec.generate_private_key(_CURVE())
    builder = (x509.CertificateBuilder()
               .subject_name(_name(common_name, hall_id))
               .issuer_name(ca_cert.subject)
               .public_key(key.public_key())
               .serial_number(x509.random_serial_number())
               .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
               .add_extension(x509.KeyUsage(digital_signature=True, key_encipherment=False,
                                            key_agreement=True, content_commitment=False,
                                            data_encipherment=False, key_cert_sign=False,
                                            crl_sign=False, encipher_only=False,
                                            decipher_only=False), critical=True)
               .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
               .add_extension(_ski(key.public_key()), critical=False)
               .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
                              critical=False))
    if sans:
        builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
    cert = _validity(builder, LEAF_DAYS).sign(ca_key, hashes.SHA256())
    return key, cert


def _san_entries(hosts):
    entries, seen = [], set()
    for host in hosts:
        if not host or host in seen or host in ("0.0.0.0", "::"):
            continue
        seen.add(host)
        try:
            entries.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            entries.append(x509.DNSName(host))
    return entries


def server_hosts(settings, extra=()):
    """Names the broker's certificate covers: loopback, the configured host, extras."""
    return ["127.0.0.1", "localhost", settings.broker.host] + list(extra)


def issue_server_cert(tls, hall_id, hosts):
    """Sign a broker certificate for `hosts` (IP addresses and DNS names) with the hall CA."""
    ca_key, ca_cert = load_ca(tls)
    key, cert = _leaf(ca_key, ca_cert, "Pingjia broker %s" % hall_id, hall_id,
                      ExtendedKeyUsageOID.SERVER_AUTH, _san_entries(hosts))
    write_secret(tls.server_key, _private_pem(key))
    write_public(tls.server_cert, cert.public_bytes(serialization.Encoding.PEM))
    return cert


def ensure_hall_tls(settings, extra_hosts=(), force=False):
    """The hall CA and broker certificate for these settings, created when missing.
    With force, both are replaced (devices then need the new CA)."""
    tls = HallTLS.for_settings(settings)
    if force or not os.path.exists(tls.ca_key):
        create_ca(tls, settings.hub.id, force=True)
        issue_server_cert(tls, settings.hub.id, server_hosts(settings, extra_hosts))
    elif not (os.path.exists(tls.server_cert) and os.path.exists(tls.server_key)):
        issue_server_cert(tls, settings.hub.id, server_hosts(settings, extra_hosts))
    return tls


def issue_client_cert(settings, device_id):
    """A client certificate for one device, CN = device id, signed by the hall CA.
    Returns (cert_pem, key_pem) as text; the hub keeps no copy of the device's key."""
    tls = HallTLS.for_settings(settings)
    ca_key, ca_cert = load_ca(tls)
    key, cert = _leaf(ca_key, ca_cert, device_id, settings.hub.id, ExtendedKeyUsageOID.CLIENT_AUTH)
    return (cert.public_bytes(serialization.Encoding.PEM).decode("ascii"),
            _private_pem(key).decode("ascii"))
