"""Cryptography for the province link: batch signature schemes, digests, MACs and SM4.

Three signature schemes, chosen per hub key (the key decides the scheme, never the message):

- ``ed25519``: Ed25519 (RFC 8032), 64-byte signatures; the default.
- ``ecdsa-p256``: ECDSA over NIST P-256 with SHA-256, DER signatures.
- ``sm2-sm3``: SM2 (GB/T 32918) with SM3 and the default user id "1234567812345678", DER
  signatures (GM/T 0009) as OpenSSL writes them. The curve arithmetic is the pure-Python
  `gmssl` package; the SM3 digest, SM4 cipher and HMAC come from `cryptography` (OpenSSL),
  because gmssl's own SM3 is pure Python and a batch can be megabytes. gmssl draws signing
  nonces from `random`, which is not a secure source, so every nonce is passed in from
  `secrets` here.

Keys are `cryptography` key objects for Ed25519 and P-256 and the small SM2PrivateKey /
SM2PublicKey classes below for SM2 (cryptography cannot hold an SM2 key). All three read and
write as PKCS#8 / SubjectPublicKeyInfo PEM, the SM2 ones byte-compatible with OpenSSL's.
docs/province.md "Signature schemes" is the reference.
"""
import binascii
import hashlib
import hmac as std_hmac
import os
import secrets

from cryptography.exceptions import InvalidSignature, InvalidTag, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, padding, serialization
from cryptography.hazmat.primitives import hmac as crypto_hmac
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from gmssl import sm2 as gm_sm2

from . import PingjiaError

ED25519 = "ed25519"
ECDSA_P256 = "ecdsa-p256"
SM2_SM3 = "sm2-sm3"
SCHEMES = (ED25519, ECDSA_P256, SM2_SM3)
DEFAULT_SCHEME = ED25519

MACS = ("hmac-sha256", "hmac-sm3")
DIGESTS = ("sha256", "sm3")
CIPHERS = ("sm4-cbc", "sm4-gcm")
SM4_KEY_BYTES = 16


class SchemeError(PingjiaError):
    """A key, signature or ciphertext this module cannot use."""


# ---------------------------------------------------------------- digests and MACs

def sm3(data):
    digest = hashes.Hash(hashes.SM3())
    digest.update(data)
    return digest.finalize()


def digest_hex(name, data):
    """Lowercase hex of sha256 or sm3 over data."""
    if name == "sha256":
        return hashlib.sha256(data).hexdigest()
    if name == "sm3":
        return sm3(data).hex()
    raise SchemeError("unknown digest %r (one of %s)" % (name, ", ".join(DIGESTS)))


def mac_hex(name, key, data):
    """Lowercase hex HMAC-SHA256 or HMAC-SM3 of data under key (bytes)."""
    if name == "hmac-sha256":
        return std_hmac.new(key, data, hashlib.sha256).hexdigest()
    if name == "hmac-sm3":
        mac = crypto_hmac.HMAC(key, hashes.SM3())
        mac.update(data)
        return mac.finalize().hex()
    raise SchemeError("unknown MAC %r (one of %s)" % (name, ", ".join(MACS)))


def mac_equal(a, b):
    return isinstance(a, str) and isinstance(b, str) and std_hmac.compare_digest(a, b)


# ---------------------------------------------------------------- SM4

def sm4_encrypt(cipher, key, plaintext):
    """(iv or nonce, ciphertext) under a 16-byte SM4 key; GCM appends its 16-byte tag."""
    _check_sm4_key(key)
    if cipher == "sm4-cbc":
        iv = os.urandom(16)
        padder = padding.PKCS7(128).padder()
        padded = padder.update(plaintext) + padder.finalize()
        enc = Cipher(algorithms.SM4(key), modes.CBC(iv)).encryptor()
        return iv, enc.update(padded) + enc.finalize()
    if cipher == "sm4-gcm":
        nonce = os.urandom(12)
        enc = Cipher(algorithms.SM4(key), modes.GCM(nonce)).encryptor()
        body = enc.update(plaintext) + enc.finalize()
        return nonce, body + enc.tag
    raise SchemeError("unknown cipher %r (one of %s)" % (cipher, ", ".join(CIPHERS)))


def sm4_decrypt(cipher, key, iv, ciphertext):
    """The plaintext, or SchemeError when the key, padding or GCM tag is wrong."""
    _check_sm4_key(key)
    try:
        if cipher == "sm4-cbc":
            if len(iv) != 16 or not ciphertext or len(ciphertext) % 16:
                raise SchemeError("SM4-CBC needs a 16-byte iv and whole blocks")
            dec = Cipher(algorithms.SM4(key), modes.CBC(iv)).decryptor()
            padded = dec.update(ciphertext) + dec.finalize()
            unpadder = padding.PKCS7(128).unpadder()
            return unpadder.update(padded) + unpadder.finalize()
        if cipher == "sm4-gcm":
            if len(iv) != 12 or len(ciphertext) < 16:
                raise SchemeError("SM4-GCM needs a 12-byte nonce and a 16-byte tag")
            dec = Cipher(algorithms.SM4(key), modes.GCM(iv, ciphertext[-16:])).decryptor()
            return dec.update(ciphertext[:-16]) + dec.finalize()
    except (ValueError, InvalidTag):
        raise SchemeError("%s: ciphertext does not decrypt under this key" % cipher) from None
    raise SchemeError("unknown cipher %r (one of %s)" % (cipher, ", ".join(CIPHERS)))


def _check_sm4_key(key):
    if not isinstance(key, bytes) or len(key) != SM4_KEY_BYTES:
        raise SchemeError("an SM4 key is 16 bytes (32 hex digits)")


# ---------------------------------------------------------------- SM2 keys

_SM2 = gm_sm2.default_ecc_table
_P = int(_SM2["p"], 16)
_A = int(_SM2["a"], 16)
_B = int(_SM2["b"], 16)
_N = int(_SM2["n"], 16)
_G = _SM2["g"]
# GB/T 35276 default signer id; OpenSSL uses the same when none is given.
SM2_DEFAULT_ID = b"1234567812345678"

# DER object identifiers: id-ecPublicKey, the SM2 curve.
_OID_EC_PUBLIC_KEY = bytes.fromhex("06072a8648ce3d0201")
_OID_SM2 = bytes.fromhex("06082a811ccf5501822d")


class SM2PublicKey:
    """An SM2 public key: a point on the SM2 curve, checked when built."""

    def __init__(self, x, y):
        if not (isinstance(x, int) and isinstance(y, int) and 0 <= x < _P and 0 <= y < _P):
            raise SchemeError("SM2 public key coordinates out of range")
        if (y * y - (x * x * x + _A * x + _B)) % _P != 0:
            raise SchemeError("SM2 public key is not a point on the SM2 curve")
        self.x, self.y = x, y

    @classmethod
    def from_raw(cls, raw):
        """From the 65-byte uncompressed point 04||x||y."""
        if not isinstance(raw, bytes) or len(raw) != 65 or raw[0] != 4:
            raise SchemeError("an SM2 public key is the 65-byte uncompressed point 04||x||y")
        return cls(int.from_bytes(raw[1:33], "big"), int.from_bytes(raw[33:], "big"))

    def raw(self):
        return b"\x04" + self.x.to_bytes(32, "big") + self.y.to_bytes(32, "big")

    def _xy_hex(self):
        return self.raw()[1:].hex()

    def __eq__(self, other):
        return isinstance(other, SM2PublicKey) and (self.x, self.y) == (other.x, other.y)

    def __hash__(self):
        return hash((self.x, self.y))

    def __repr__(self):
        return "SM2PublicKey(%s)" % key_id(self)


class SM2PrivateKey:
    """An SM2 private scalar d in [1, n-2]; repr never shows it."""

    def __init__(self, d):
        if not isinstance(d, int) or not 1 <= d <= _N - 2:
            raise SchemeError("SM2 private key out of range")
        self._d = d
        point = _engine("", "")._kg(d, _G)
        self._public = SM2PublicKey(int(point[:64], 16), int(point[64:], 16))

    @classmethod
    def generate(cls):
        return cls(secrets.randbelow(_N - 2) + 1)

    def public_key(self):
        return self._public

    def private_value(self):
        return self._d

    def __repr__(self):
        return "SM2PrivateKey(%s)" % key_id(self._public)


def _engine(private_hex, xy_hex):
    # gmssl strips a leading "04" from a public key with str.lstrip, which also eats any
    # 0 or 4 digits that follow; set the point afterwards so no key is ever mangled.
    engine = gm_sm2.CryptSM2(private_key=private_hex, public_key="")
    engine.public_key = xy_hex
    return engine


def _sm2_e(public, data):
    """e = SM3(Z || M), Z = SM3(ENTL || ID || a || b || xG || yG || xA || yA)."""
    entl = (len(SM2_DEFAULT_ID) * 8).to_bytes(2, "big")
    z = sm3(entl + SM2_DEFAULT_ID + bytes.fromhex(_SM2["a"]) + bytes.fromhex(_SM2["b"])
            + bytes.fromhex(_G) + public.raw()[1:])
    return sm3(z + data)


def _sm2_sign(private, data):
    public = private.public_key()
    e = _sm2_e(public, data)
    engine = _engine("%064x" % private.private_value(), public._xy_hex())
    while True:
        k = secrets.randbelow(_N - 1) + 1
        rs = engine.sign(e, "%064x" % k)
        if rs is not None:  # r = 0, r + k = n or s = 0: draw another nonce
            return _der_pair(int(rs[:64], 16), int(rs[64:], 16))


def _sm2_verify(public, signature, data):
    pair = _parse_der_pair(signature)
    if pair is None:
        return False
    r, s = pair
    if not (1 <= r < _N and 1 <= s < _N):
        return False
    try:
        return bool(_engine("", public._xy_hex()).verify("%064x%064x" % (r, s),
                                                        _sm2_e(public, data)))
    except (TypeError, ValueError, IndexError):
        # gmssl cannot finish on a degenerate sum of points; such a signature is invalid.
        return False


# ---------------------------------------------------------------- a little DER

def _der_len(n):
    if n < 0x80:
        return bytes([n])
    body = n.to_bytes((n.bit_length() + 7) // 8, "big")
    return bytes([0x80 | len(body)]) + body


def _tlv(tag, body):
    return bytes([tag]) + _der_len(len(body)) + body


def _der_int(value):
    body = value.to_bytes(value.bit_length() // 8 + 1, "big")
    return _tlv(0x02, body)


def _der_pair(r, s):
    return _tlv(0x30, _der_int(r) + _der_int(s))


def _read_tlv(data, pos):
    """(tag, body, next position); raises ValueError on anything malformed."""
    if pos + 2 > len(data):
        raise ValueError("truncated")
    tag, first = data[pos], data[pos + 1]
    pos += 2
    if first < 0x80:
        length = first
    else:
        count = first & 0x7F
        if count == 0 or count > 4 or pos + count > len(data):
            raise ValueError("bad length")
        length = int.from_bytes(data[pos:pos + count], "big")
        if length < 0x80:
            raise ValueError("non-minimal length")
        pos += count
    if pos + length > len(data):
        raise ValueError("truncated")
    return tag, data[pos:pos + length], pos + length


def _read_all(data):
    out, pos = [], 0
    while pos < len(data):
        tag, body, pos = _read_tlv(data, pos)
        out.append((tag, body))
    return out


def _parse_der_int(body):
    if not body or (body[0] & 0x80) or (len(body) > 1 and body[0] == 0 and not body[1] & 0x80):
        raise ValueError("not a minimal positive INTEGER")
    return int.from_bytes(body, "big")


def _parse_der_pair(signature):
    """(r, s) from a strict DER SEQUENCE of two INTEGERs, else None."""
    try:
        tag, body, end = _read_tlv(signature, 0)
        if tag != 0x30 or end != len(signature):
            return None
        items = _read_all(body)
        if len(items) != 2 or any(t != 0x02 for t, _ in items):
            return None
        return _parse_der_int(items[0][1]), _parse_der_int(items[1][1])
    except (ValueError, TypeError):
        return None


def _sm2_algorithm():
    return _tlv(0x30, _OID_EC_PUBLIC_KEY + _OID_SM2)


def _sm2_spki(public):
    return _tlv(0x30, _sm2_algorithm() + _tlv(0x03, b"\x00" + public.raw()))


def _sm2_pkcs8(private):
    ec_private = _tlv(0x30, _der_int(1) + _tlv(0x04, private.private_value().to_bytes(32, "big"))
                      + _tlv(0xA1, _tlv(0x03, b"\x00" + private.public_key().raw())))
    return _tlv(0x30, _der_int(0) + _sm2_algorithm() + _tlv(0x04, ec_private))


def _sm2_from_spki(der):
    tag, body, end = _read_tlv(der, 0)
    items = _read_all(body) if tag == 0x30 and end == len(der) else []
    if len(items) != 2 or items[0] != (0x30, _OID_EC_PUBLIC_KEY + _OID_SM2) \
            or items[1][0] != 0x03 or items[1][1][:1] != b"\x00":
        raise ValueError("not an SM2 SubjectPublicKeyInfo")
    return SM2PublicKey.from_raw(items[1][1][1:])


def _sm2_from_pkcs8(der):
    tag, body, end = _read_tlv(der, 0)
    items = _read_all(body) if tag == 0x30 and end == len(der) else []
    if len(items) < 3 or items[0] != (0x02, b"\x00") \
            or items[1] != (0x30, _OID_EC_PUBLIC_KEY + _OID_SM2) or items[2][0] != 0x04:
        raise ValueError("not an SM2 PKCS#8 key")
    tag, inner, end = _read_tlv(items[2][1], 0)
    fields = _read_all(inner) if tag == 0x30 and end == len(items[2][1]) else []
    if len(fields) < 2 or fields[0] != (0x02, b"\x01") or fields[1][0] != 0x04 \
            or len(fields[1][1]) != 32:
        raise ValueError("not an SM2 ECPrivateKey")
    key = SM2PrivateKey(int.from_bytes(fields[1][1], "big"))
    for field_tag, field_body in fields[2:]:
        if field_tag == 0xA1:
            bit_tag, bits, _ = _read_tlv(field_body, 0)
            if bit_tag != 0x03 or SM2PublicKey.from_raw(bits[1:]) != key.public_key():
                raise ValueError("SM2 key file's public point does not match its private key")
    return key


def _pem(label, der):
    text = binascii.b2a_base64(der, newline=False).decode("ascii")
    lines = [text[i:i + 64] for i in range(0, len(text), 64)]
    return ("-----BEGIN %s-----\n%s\n-----END %s-----\n" % (label, "\n".join(lines), label)) \
        .encode("ascii")


def _unpem(pem, label):
    text = pem.decode("ascii", "replace") if isinstance(pem, bytes) else pem
    begin, end = "-----BEGIN %s-----" % label, "-----END %s-----" % label
    start = text.find(begin)
    stop = text.find(end, start + 1)
    if start < 0 or stop < 0:
        raise ValueError("no %s block" % label)
    body = "".join(text[start + len(begin):stop].split())
    return binascii.a2b_base64(body)


# ---------------------------------------------------------------- one API over the three

def scheme_of(key):
    """The scheme name of a private or public key object."""
    if isinstance(key, (Ed25519PrivateKey, Ed25519PublicKey)):
        return ED25519
    if isinstance(key, (ec.EllipticCurvePrivateKey, ec.EllipticCurvePublicKey)) \
            and isinstance(key.curve, ec.SECP256R1):
        return ECDSA_P256
    if isinstance(key, (SM2PrivateKey, SM2PublicKey)):
        return SM2_SM3
    raise SchemeError("not a batch signing key (Ed25519, ECDSA P-256 or SM2)")


def check_scheme(name):
    if name not in SCHEMES:
        raise SchemeError("unknown signature scheme %r (one of %s)" % (name, ", ".join(SCHEMES)))
    return name


def is_private(key):
    return isinstance(key, (Ed25519PrivateKey, ec.EllipticCurvePrivateKey, SM2PrivateKey))


def public_of(key):
    """The public half of a private key; a public key is returned as it is."""
    scheme_of(key)
    return key.public_key() if is_private(key) else key


def generate(scheme=DEFAULT_SCHEME):
    check_scheme(scheme)
    if scheme == ED25519:
        return Ed25519PrivateKey.generate()
    if scheme == ECDSA_P256:
        return ec.generate_private_key(ec.SECP256R1())
    return SM2PrivateKey.generate()


def raw_public(key):
    """Ed25519: the 32-byte key; P-256 and SM2: the 65-byte uncompressed point."""
    public = public_of(key)
    scheme = scheme_of(public)
    if scheme == ED25519:
        return public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    if scheme == ECDSA_P256:
        return public.public_bytes(serialization.Encoding.X962,
                                   serialization.PublicFormat.UncompressedPoint)
    return public.raw()


def key_id(key):
    """First 16 hex digits of sha256 over raw_public: how a batch names its key."""
    return hashlib.sha256(raw_public(key)).hexdigest()[:16]


def sign(private_key, data):
    """The scheme's signature over data (bytes)."""
    scheme = scheme_of(private_key)
    if not is_private(private_key):
        raise SchemeError("signing needs a private key")
    if scheme == ED25519:
        return private_key.sign(data)
    if scheme == ECDSA_P256:
        return private_key.sign(data, ec.ECDSA(hashes.SHA256()))
    return _sm2_sign(private_key, data)


def verify(public_key, signature, data):
    """True when signature is this key's over data; False for anything else, never raises."""
    try:
        public = public_of(public_key)
        scheme = scheme_of(public)
    except SchemeError:
        return False
    if not isinstance(signature, bytes) or not isinstance(data, bytes):
        return False
    try:
        if scheme == ED25519:
            public.verify(signature, data)
            return True
        if scheme == ECDSA_P256:
            public.verify(signature, data, ec.ECDSA(hashes.SHA256()))
            return True
    except (InvalidSignature, ValueError):
        return False
    return _sm2_verify(public, signature, data)


def private_pem(key):
    """PKCS#8 PEM, unencrypted (the file holding it is 0600)."""
    if isinstance(key, SM2PrivateKey):
        return _pem("PRIVATE KEY", _sm2_pkcs8(key))
    if not is_private(key):
        raise SchemeError("not a private key")
    scheme_of(key)
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def public_pem(key):
    """SubjectPublicKeyInfo PEM of the public half; accepts a private or a public key."""
    public = public_of(key)
    if isinstance(public, SM2PublicKey):
        return _pem("PUBLIC KEY", _sm2_spki(public))
    return public.public_bytes(serialization.Encoding.PEM,
                               serialization.PublicFormat.SubjectPublicKeyInfo)


def load_private_pem(pem):
    """A private key of any of the three schemes from unencrypted PKCS#8 (or SEC1) PEM."""
    if isinstance(pem, str):
        pem = pem.encode("ascii", "replace")
    try:
        key = serialization.load_pem_private_key(pem, password=None)
    except UnsupportedAlgorithm:
        try:
            key = _sm2_from_pkcs8(_unpem(pem, "PRIVATE KEY"))
        except (ValueError, binascii.Error, SchemeError) as exc:
            raise SchemeError("unsupported private key: %s" % exc) from None
    except (ValueError, TypeError) as exc:
        raise SchemeError("not an unencrypted PEM private key: %s" % exc) from None
    scheme_of(key)
    return key


def load_public_pem(pem):
    """A public key of any scheme from PEM; a private key PEM gives its public half."""
    if isinstance(pem, str):
        pem = pem.encode("ascii", "replace")
    if b"PRIVATE KEY" in pem:
        return public_of(load_private_pem(pem))
    try:
        key = serialization.load_pem_public_key(pem)
    except UnsupportedAlgorithm:
        try:
            key = _sm2_from_spki(_unpem(pem, "PUBLIC KEY"))
        except (ValueError, binascii.Error, SchemeError) as exc:
            raise SchemeError("unsupported public key: %s" % exc) from None
    except (ValueError, TypeError) as exc:
        raise SchemeError("not a PEM public key: %s" % exc) from None
    scheme_of(key)
    return key
