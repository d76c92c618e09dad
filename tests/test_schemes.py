# Signature schemes, 国密 primitives, the keyring and key rotation: every scheme signs and
# verifies batches, SM2 agrees with OpenSSL byte for byte, keys rotate without breaking the
# chain and the province learns the new key from the chain itself.
import base64
import copy
import hashlib
import json
import os
import shutil
import sqlite3
import subprocess
import urllib.error
import urllib.request

import pytest
from click.testing import CliRunner
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from conftest import free_port, wait_port
from hub import batch as B
from hub import keys as K
from hub import schemes as S
from hub.cli import cli
from hub.settings import write_default
from simulator import province as P

MESSAGE = "好差评 batch 𠀾".encode("utf-8")


def test_every_scheme_signs_and_verifies_and_rejects_changes():
    for scheme in S.SCHEMES:
        key = S.generate(scheme)
        other = S.generate(scheme)
        signature = S.sign(key, MESSAGE)
        assert S.verify(key.public_key(), signature, MESSAGE), scheme
        assert S.verify(key, signature, MESSAGE), scheme  # a private key verifies too
        assert not S.verify(key.public_key(), signature, MESSAGE + b"x"), scheme
        assert not S.verify(other.public_key(), signature, MESSAGE), scheme
        flipped = bytes([signature[0] ^ 1]) + signature[1:]
        assert not S.verify(key.public_key(), flipped, MESSAGE), scheme
        for garbage in (b"", b"\x30\x00", b"x" * 64, b"\x30" + bytes(80), "text", None):
            assert not S.verify(key.public_key(), garbage, MESSAGE), (scheme, garbage)
        assert S.scheme_of(key) == S.scheme_of(key.public_key()) == scheme


def test_signature_encodings_are_the_standard_ones():
    ed = S.sign(S.generate(S.ED25519), MESSAGE)
    assert len(ed) == 64
    for scheme in (S.ECDSA_P256, S.SM2_SM3):
        der = S.sign(S.generate(scheme), MESSAGE)
        r, s = S._parse_der_pair(der)
        assert der[0] == 0x30 and 0 < r and 0 < s
        assert S._der_pair(r, s) == der


def test_sm2_rejects_out_of_range_and_non_minimal_signatures():
    key = S.generate(S.SM2_SM3)
    r, s = S._parse_der_pair(S.sign(key, MESSAGE))
    n = S._N
    for bad_r, bad_s in ((0, s), (r, 0), (r + n, s), (r, s + n), (n, s)):
        assert not S.verify(key.public_key(), S._der_pair(bad_r, bad_s), MESSAGE)
    # A padded INTEGER (non-minimal DER) is refused even though the numbers are right.
    body = S._tlv(0x02, b"\x00" + r.to_bytes(32, "big")) if r >> 255 == 0 else None
    if body is not None:
        padded = S._tlv(0x30, body + S._der_int(s))
        assert not S.verify(key.public_key(), padded, MESSAGE)


def test_key_ids_and_pem_round_trip_for_every_scheme():
    for scheme in S.SCHEMES:
        key = S.generate(scheme)
        raw = S.raw_public(key)
        assert len(raw) == (32 if scheme == S.ED25519 else 65)
        assert S.key_id(key) == S.key_id(key.public_key()) == hashlib.sha256(raw).hexdigest()[:16]
        again = S.load_private_pem(S.private_pem(key))
        public = S.load_public_pem(S.public_pem(key))
        assert S.key_id(again) == S.key_id(public) == S.key_id(key)
        assert S.key_id(S.load_public_pem(S.private_pem(key))) == S.key_id(key)
        assert S.verify(public, S.sign(again, MESSAGE), MESSAGE)
    with pytest.raises(S.SchemeError):
        S.load_public_pem(b"-----BEGIN PUBLIC KEY-----\nMAA=\n-----END PUBLIC KEY-----\n")
    with pytest.raises(S.SchemeError):
        S.load_private_pem(b"not a key")


def test_ed25519_key_id_is_unchanged_from_before_schemes_existed():
    key = S.generate(S.ED25519)
    raw = key.public_key().public_bytes(serialization.Encoding.Raw,
                                        serialization.PublicFormat.Raw)
    assert B.key_id(key.public_key()) == hashlib.sha256(raw).hexdigest()[:16]


def test_other_curves_are_not_batch_keys():
    from cryptography.hazmat.primitives.asymmetric import ec

    p384 = ec.generate_private_key(ec.SECP384R1())
    with pytest.raises(S.SchemeError):
        S.scheme_of(p384)
    pem = p384.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())
    with pytest.raises(S.SchemeError):
        S.load_private_pem(pem)


def test_sm2_public_key_must_lie_on_the_curve():
    key = S.generate(S.SM2_SM3).public_key()
    with pytest.raises(S.SchemeError):
        S.SM2PublicKey(key.x, (key.y + 1) % S._P)
    with pytest.raises(S.SchemeError):
        S.SM2PublicKey.from_raw(b"\x02" + key.raw()[1:])
    assert S.SM2PublicKey.from_raw(key.raw()) == key


def test_sm2_keys_whose_point_starts_with_zero_or_four_digits_survive():
    # gmssl would lstrip("04") such a point; ours must still sign and verify.
    for _ in range(400):
        key = S.generate(S.SM2_SM3)
        if key.public_key().raw()[1:2].hex()[0] in "04":
            break
    assert S.verify(key.public_key(), S.sign(key, MESSAGE), MESSAGE)


def _openssl_sm2():
    openssl = shutil.which("openssl")
    if not openssl:
        pytest.skip("no openssl command")
    probe = subprocess.run([openssl, "genpkey", "-algorithm", "SM2"], capture_output=True)
    if probe.returncode:
        pytest.skip("this openssl has no SM2")
    return openssl


def test_sm2_signatures_and_key_files_interoperate_with_openssl(tmp_path):
    openssl = _openssl_sm2()
    message = tmp_path / "m"
    message.write_bytes(MESSAGE)
    # OpenSSL key and signature -> verified here.
    subprocess.run([openssl, "genpkey", "-algorithm", "SM2", "-out", str(tmp_path / "k.pem")],
                   check=True, capture_output=True)
    subprocess.run([openssl, "pkey", "-in", str(tmp_path / "k.pem"), "-pubout", "-out",
                    str(tmp_path / "p.pem")], check=True, capture_output=True)
    subprocess.run([openssl, "pkeyutl", "-sign", "-inkey", str(tmp_path / "k.pem"), "-rawin",
                    "-digest", "sm3", "-pkeyopt", "distid:1234567812345678", "-in", str(message),
                    "-out", str(tmp_path / "sig")], check=True, capture_output=True)
    public = S.load_public_pem((tmp_path / "p.pem").read_bytes())
    private = S.load_private_pem((tmp_path / "k.pem").read_bytes())
    assert private.public_key() == public
    assert S.private_pem(private) == (tmp_path / "k.pem").read_bytes()
    assert S.verify(public, (tmp_path / "sig").read_bytes(), MESSAGE)
    assert not S.verify(public, (tmp_path / "sig").read_bytes(), MESSAGE + b"!")
    # Our key and signature -> verified by OpenSSL.
    ours = S.generate(S.SM2_SM3)
    (tmp_path / "ours.pem").write_bytes(S.public_pem(ours))
    (tmp_path / "ours.sig").write_bytes(S.sign(ours, MESSAGE))
    done = subprocess.run([openssl, "pkeyutl", "-verify", "-pubin", "-inkey",
                           str(tmp_path / "ours.pem"), "-rawin", "-digest", "sm3", "-pkeyopt",
                           "distid:1234567812345678", "-in", str(message), "-sigfile",
                           str(tmp_path / "ours.sig")], capture_output=True, text=True)
    assert done.returncode == 0 and "Verified Successfully" in done.stdout
    (tmp_path / "ours.key").write_bytes(S.private_pem(ours))
    derived = subprocess.run([openssl, "pkey", "-in", str(tmp_path / "ours.key"), "-pubout"],
                             check=True, capture_output=True).stdout
    assert derived == S.public_pem(ours)


def test_sm3_and_hmac_sm3_known_answers():
    # GB/T 32905-2016 appendix A.1.
    assert S.sm3(b"abc").hex() == \
        "66c7f0f462eeedd9d1f2d46bdc10e4e24167c4875cf2f7a2297da02b8f4ba8e0"
    assert S.digest_hex("sm3", b"abc") == S.sm3(b"abc").hex()
    assert S.digest_hex("sha256", b"abc") == hashlib.sha256(b"abc").hexdigest()
    # HMAC-SM3 by its definition (RFC 2104 with a 64-byte block).
    key, data = b"k" * 20, b"message"
    block = key.ljust(64, b"\0")
    inner = S.sm3(bytes(b ^ 0x36 for b in block) + data)
    expected = S.sm3(bytes(b ^ 0x5C for b in block) + inner).hex()
    assert S.mac_hex("hmac-sm3", key, data) == expected
    assert S.mac_hex("hmac-sha256", key, data) != expected
    with pytest.raises(S.SchemeError):
        S.mac_hex("hmac-md5", key, data)


def test_sm4_matches_the_standard_vector_and_round_trips():
    # GB/T 32907-2016 example 1: one block, so CBC with a zero IV is the plain block cipher.
    key = bytes.fromhex("0123456789abcdeffedcba9876543210")
    expected = bytes.fromhex("681edf34d206965e86b3e94f536e4246")
    padded_ciphertext = Cipher(algorithms.SM4(key), modes.CBC(bytes(16))).encryptor()
    block = padded_ciphertext.update(key) + padded_ciphertext.finalize()
    assert block == expected
    assert S.sm4_decrypt("sm4-cbc", key, bytes(16), block + _sm4_block(key, block)) == key
    for cipher in S.CIPHERS:
        iv, ciphertext = S.sm4_encrypt(cipher, key, MESSAGE)
        assert S.sm4_decrypt(cipher, key, iv, ciphertext) == MESSAGE
        iv2, ciphertext2 = S.sm4_encrypt(cipher, key, MESSAGE)
        assert iv2 != iv and ciphertext2 != ciphertext  # fresh IV each time
        with pytest.raises(S.SchemeError):
            S.sm4_decrypt(cipher, bytes(16), iv, ciphertext)
    iv, ciphertext = S.sm4_encrypt("sm4-gcm", key, MESSAGE)
    with pytest.raises(S.SchemeError):
        S.sm4_decrypt("sm4-gcm", key, iv, bytes([ciphertext[0] ^ 1]) + ciphertext[1:])
    with pytest.raises(S.SchemeError):
        S.sm4_encrypt("sm4-cbc", b"short", MESSAGE)


def _sm4_block(key, previous):
    # The PKCS#7 padding block that follows a whole block, chained on `previous`.
    enc = Cipher(algorithms.SM4(key), modes.ECB()).encryptor()
    return enc.update(bytes(a ^ 16 for a in previous)) + enc.finalize()


# ---------------------------------------------------------------- batches under each scheme

def _records():
    profile = B.load_profile("national")
    row = dict(device_id="D0001", seq=1, t=1767196800, kind="v", pid="P1", case_no="C1",
               stars=5, reasons=[], window="W01", staff_no="7")
    return [B.map_record(row, None, profile)]


def test_sign_batch_names_scheme_and_key_and_keeps_the_hash():
    unsigned = B.make_batch("hub", 1, B.GENESIS, _records(), "national", created=0)
    digest = B.batch_hash(unsigned)
    for scheme in S.SCHEMES:
        key = B.generate_private_key(scheme)
        signed = B.sign_batch(unsigned, key)
        assert signed["alg"] == scheme and signed["key_id"] == B.key_id(key.public_key())
        assert B.verify_batch(signed, key.public_key())
        assert B.verify_batch(json.loads(json.dumps(signed)), key.public_key())
        # The envelope is outside the hash: any scheme, same chain.
        assert B.batch_hash(signed) == digest
        assert not B.verify_batch(dict(signed, alg="ed25519" if scheme != "ed25519"
                                       else "sm2-sm3"), key.public_key())
        tampered = copy.deepcopy(signed)
        tampered["records"][0]["satisfaction"] = "1"
        assert not B.verify_batch(tampered, key.public_key())


# ---------------------------------------------------------------- keyring and rotation

def test_keyring_generate_load_and_the_hall_ca_is_not_a_batch_key(tmp_path):
    for scheme in S.SCHEMES:
        path = str(tmp_path / scheme / "keys" / "hub.pem")
        key = K.generate_signing_key(path, scheme=scheme)
        again = K.load_signing_key(path)
        assert again.scheme == scheme and again.key_id == key.key_id
        assert os.stat(path).st_mode & 0o777 == 0o600
        ring = K.read_keyring(path)
        assert [e["key_id"] for e in ring] == [key.key_id] and ring[0]["retired"] is None
        assert len(K.public_key_hex(key)) == (64 if scheme == "ed25519" else 130)
    # A P-256 key the keyring does not list (the hall CA's, say) is refused.
    settings = write_default(str(tmp_path / "hall" / "hub.toml"), broker={"tls_port": 8883})
    K.ensure_signing_key(settings.signing_key_path)
    tls = K.ensure_hall_tls(settings)
    with pytest.raises(K.KeysError, match="not an Ed25519 private key"):
        K.load_signing_key(tls.ca_key)


def test_rotation_statement_is_signed_by_the_old_key_and_binds_the_hub(tmp_path):
    path = str(tmp_path / "keys" / "hub.pem")
    old = K.generate_signing_key(path, scheme="ed25519")
    old_public = old.public_key()
    new, statement = K.rotate_signing_key(path, "hall-7", scheme="sm2-sm3")
    assert new.scheme == "sm2-sm3" and statement["by"] == S.key_id(old_public)
    assert B.check_rotation(statement, "hall-7", old_public) is not None
    assert S.key_id(B.check_rotation(statement, "hall-7", old_public)) == new.key_id
    assert B.check_rotation(statement, "hall-8", old_public) is None
    assert B.check_rotation(statement, "hall-7", new.public_key()) is None
    for field, value in (("key_id", "0" * 16), ("public_key", S.public_pem(S.generate()).decode()),
                         ("created", "2000-01-01T00:00:00Z")):
        assert B.check_rotation(dict(statement, **{field: value}), "hall-7", old_public) is None
    # The old private key is gone; the keyring keeps both public halves.
    assert K.load_signing_key(path).key_id == new.key_id
    ring = {e["key_id"]: e for e in K.read_keyring(path)}
    assert ring[S.key_id(old_public)]["retired"] and ring[new.key_id]["retired"] is None
    assert set(K.keyring_public_keys(path)) == {S.key_id(old_public), new.key_id}
    assert not [f for f in os.listdir(os.path.dirname(path)) if f.endswith(".tmp")]


def test_a_held_signing_key_follows_the_rotated_file_with_its_statements(tmp_path):
    path = str(tmp_path / "keys" / "hub.pem")
    held = K.generate_signing_key(path)
    first = held.key_id
    b1 = B.sign_batch(B.make_batch("h", 1, B.GENESIS, [], "national", created=0), held)
    assert b1["key_id"] == first and "rotations" not in b1
    K.rotate_signing_key(path, "h", scheme="ecdsa-p256")
    K.rotate_signing_key(path, "h", scheme="sm2-sm3")
    b2 = B.sign_batch(B.make_batch("h", 2, B.batch_hash(b1), [], "national", created=0), held)
    assert b2["alg"] == "sm2-sm3" and b2["key_id"] != first
    # Both statements ride along, oldest first, so a province that knows only the first
    # key can follow the whole path.
    assert [r["by"] for r in b2["rotations"]][0] == first and len(b2["rotations"]) == 2
    learned = B.learn_rotations(b2, {first: S.load_public_pem(
        K.read_keyring(path)[0]["public_key"])}.get)
    assert [kid for kid, _, _ in learned][-1] == b2["key_id"]


# ---------------------------------------------------------------- rotation at the province

class Receiver:
    def __init__(self, tmp_path, trusted, **options):
        self.db_path = str(tmp_path / "province.db")
        self.store = P.ProvinceStore(self.db_path)
        self.port = free_port()
        self.server = P.ThreadedReceiver(self.store, trusted, port=self.port, **options).start()
        wait_port(self.port)

    def post(self, batch):
        request = urllib.request.Request(
            "http://127.0.0.1:%d/api/v1/batches" % self.port,
            data=json.dumps(batch, ensure_ascii=False).encode("utf-8"), method="POST",
            headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=30) as response:
                return response.status, json.loads(response.read())
        except urllib.error.HTTPError as exc:
            return exc.code, json.loads(exc.read())

    def stop(self):
        self.server.stop()
        self.store.close()


def _vote(seq):
    row = dict(device_id="D0001", seq=seq, t=1767196800 + seq, kind="v", pid="P%d" % seq,
               case_no="C%d" % seq, stars=5, reasons=[], window="W01", staff_no="7")
    return B.map_record(row, None, B.load_profile("national"))


def test_the_province_learns_a_rotated_key_from_the_chain_and_retires_the_old(tmp_path):
    path = str(tmp_path / "keys" / "hub.pem")
    key = K.generate_signing_key(path, scheme="ed25519")
    first_public = key.public_key()
    receiver = Receiver(tmp_path, [first_public])   # the province knows only the first key
    try:
        prev, chain = B.GENESIS, []

        def send(n, signer):
            nonlocal prev
            signed = B.sign_batch(B.make_batch("hall-7", n, prev, [_vote(n)], "national",
                                               created=0), signer)
            status, answer = receiver.post(signed)
            if status == 200:
                prev = B.batch_hash(signed)
                chain.append(signed)
            return status, answer, signed

        assert send(1, key)[0] == 200
        old_private = key.private_key
        K.rotate_signing_key(path, "hall-7", scheme="sm2-sm3")
        status, answer, signed = send(2, key)
        assert status == 200, answer
        assert signed["alg"] == "sm2-sm3" and signed["rotations"][0]["by"] == B.key_id(first_public)
        K.rotate_signing_key(path, "hall-7", scheme="ecdsa-p256")
        assert send(3, key)[0] == 200
        # The old keys are retired for this hub: a batch they sign is refused even though the
        # first one is still in the trusted set.
        status, answer, _ = send(4, old_private)
        assert status == 401 and "retired" in answer["detail"]
        assert send(4, key)[0] == 200
        stats = receiver.store.stats()
        assert stats["batches"] == 4 and receiver.store.counter("learned_keys") == 2
        # A statement signed by a key the province never trusted introduces nothing.
        stranger = S.generate("ed25519")
        forged_new = S.generate("ed25519")
        forged = B.sign_batch(B.make_batch("hall-7", 5, prev, [_vote(5)], "national",
                                           created=0), forged_new)
        forged["rotations"] = [B.rotation_statement("hall-7", stranger, forged_new)]
        status, answer = receiver.post(forged)
        assert (status, answer["detail"]) == (401, "unknown key")
        report = P.verify_store(receiver.store)
        assert report["ok"], report["problems"]
    finally:
        receiver.stop()
    # verify learns from the chain, not from the learned_keys table: emptying it changes
    # nothing; deleting the batch that introduced a key still leaves later batches checkable
    # (every batch signed by a rotated key carries its statements).
    conn = sqlite3.connect(str(tmp_path / "province.db"))
    conn.execute("DELETE FROM learned_keys")
    conn.execute("DELETE FROM batches WHERE batch_id = 'hall-7-2'")
    conn.execute("DELETE FROM records WHERE batch_id = 'hall-7-2'")
    conn.commit()
    conn.close()
    store = P.ProvinceStore(str(tmp_path / "province.db"))
    try:
        report = P.verify_store(store)
    finally:
        store.close()
    assert [(p["problem"], p["batch_id"]) for p in report["problems"]] == \
        [("missing", "hall-7-2")]


# ---------------------------------------------------------------- the keys commands

def _hall(tmp_path, profile="national"):
    settings = write_default(str(tmp_path / "hub.toml"), hub={"id": "hall-9"},
                             province={"profile": profile})
    return settings, {"PINGJIA_CONFIG": settings.source}


def _run(env, *args, code=0):
    result = CliRunner().invoke(cli, list(args), env=env, catch_exceptions=False)
    assert result.exit_code == code, result.output
    return result.output


def test_keys_commands_generate_list_rotate_export(tmp_path):
    settings, env = _hall(tmp_path, profile="guangdong")
    made = json.loads(_run(env, "hub", "keys", "generate", "--json"))
    assert made["alg"] == "sm2-sm3"        # the profile's preferred scheme
    result = CliRunner().invoke(cli, ["hub", "keys", "generate"], env=env)
    assert result.exit_code != 0 and "rotate" in str(result.exception or result.output)
    result = CliRunner().invoke(cli, ["hub", "keys", "rotate", "--scheme", "ed25519"], env=env)
    assert result.exit_code != 0   # guangdong-style accepts SM2 only
    rotated = json.loads(_run(env, "hub", "keys", "rotate", "--json"))
    assert rotated["rotated_from"] == made["key_id"] and rotated["alg"] == "sm2-sm3"
    listed = json.loads(_run(env, "hub", "keys", "list", "--json"))
    assert [(e["key_id"], e["active"]) for e in listed] == \
        [(made["key_id"], False), (rotated["key_id"], True)]
    assert listed[1]["rotated_from"] == made["key_id"] and listed[0]["retired"]
    text = _run(env, "hub", "keys", "list")
    assert "* " + rotated["key_id"] in text
    pem = _run(env, "hub", "keys", "export-public")
    assert B.key_id(B.load_public_key(pem.encode())) == rotated["key_id"]
    out = tmp_path / "all.pem"
    _run(env, "hub", "keys", "export-public", "--all", "--out", str(out))
    assert out.read_text().count("BEGIN PUBLIC KEY") == 2
    assert "PRIVATE" not in out.read_text()


def test_keys_credentials_are_installed_private_and_checked(tmp_path):
    settings, env = _hall(tmp_path, profile="guangdong")
    shown = json.loads(_run(env, "hub", "keys", "credentials", "--json"))
    assert shown["set"] == [] and shown["missing"] == ["app_key", "app_secret", "sm4_key"]
    issued = tmp_path / "issued.json"
    issued.write_text(json.dumps({"app_key": "ak-9", "app_secret": "s3cret",
                                  "sm4_key": "00" * 16}))
    shown = json.loads(_run(env, "hub", "keys", "credentials", str(issued), "--json"))
    assert shown["missing"] == [] and shown["set"] == ["app_key", "app_secret", "sm4_key"]
    target = K.credentials_path(settings.signing_key_path)
    assert os.stat(target).st_mode & 0o777 == 0o600
    assert "s3cret" not in _run(env, "hub", "keys", "credentials")
    issued.write_text(json.dumps({"sm4_key": "abc"}))
    result = CliRunner().invoke(cli, ["hub", "keys", "credentials", str(issued)], env=env)
    assert result.exit_code != 0 and "32 hex" in str(result.exception)


def test_keys_survive_a_rotation_in_base64_envelopes():
    # Statements and signatures are plain JSON: they survive a trip through any JSON codec.
    old, new = S.generate("sm2-sm3"), S.generate("ecdsa-p256")
    statement = B.rotation_statement("h", old, new)
    assert base64.b64decode(statement["sig"])
    again = json.loads(json.dumps(statement, ensure_ascii=True, indent=1))
    assert B.check_rotation(again, "h", old.public_key()) is not None
