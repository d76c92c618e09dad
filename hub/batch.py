"""Batches for the province: national record mapping, canonical form, hash chain, Ed25519 signature.

A batch is a JSON object. Its canonical form (what the hash and the signature cover) is the
batch without "sig" and "key_id", serialised with sorted keys, no spaces and UTF-8 text, so
the receiver can rebuild the exact bytes from the parsed JSON. Each batch names the hash of
the one before ("prev"), so deleting or editing a stored batch breaks the chain.
docs/province.md is the specification.
"""
import base64
import binascii
import datetime
import hashlib
import json
import os
import re

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from . import PingjiaError

GENESIS = "0" * 64

# Fields the signature does not cover: they are the signature.
UNSIGNED = ("sig", "key_id")

# Every national record carries these keys (docs/province.md "Record fields").
RECORD_FIELDS = (
    "projectNo", "taskCode", "taskName", "areaCode", "deptCode", "proManager", "proManagerNo",
    "pf", "satisfaction", "evalDetail", "writingEvaluation", "assessTime", "assessNumber",
    "deviceNo", "voteId", "rated",
)

PROFILE_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "profiles")
_PROFILE_NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
_HEX64 = re.compile(r"^[0-9a-f]{64}$")


class BatchError(PingjiaError):
    """A batch or key that cannot be built, serialised or read."""


class ProfileError(BatchError):
    """A jurisdiction profile that is missing or malformed."""


class MappingError(BatchError):
    """A hub vote row that cannot become a national record under the profile."""


# ---------------------------------------------------------------- canonical form and chain

def canonical(batch):
    """The bytes the hash and signature cover: the batch without sig/key_id, sorted, compact."""
    if not isinstance(batch, dict):
        raise BatchError("batch is not a JSON object")
    body = {k: v for k, v in batch.items() if k not in UNSIGNED}
    try:
        text = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False,
                          allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise BatchError("batch is not plain JSON: %s" % exc) from None
    return text.encode("utf-8")


def batch_hash(batch):
    """sha256 hex of the canonical form; the next batch's "prev"."""
    return hashlib.sha256(canonical(batch)).hexdigest()


def make_batch(hub_id, n, prev, records, profile_name, created=None):
    """A new unsigned batch. created: None (now), unix seconds, or an ISO 8601 UTC string."""
    if not isinstance(hub_id, str) or not hub_id:
        raise BatchError("hub id must be a non-empty string")
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        raise BatchError("batch number must be an integer >= 1")
    if not isinstance(prev, str) or not _HEX64.match(prev):
        raise BatchError("prev must be 64 lowercase hex characters")
    if n == 1 and prev != GENESIS:
        raise BatchError("batch 1 must name the genesis hash as prev")
    return {
        "batch_id": "%s-%d" % (hub_id, n),
        "hub": hub_id,
        "n": n,
        "prev": prev,
        "created": _iso_utc(created),
        "profile": profile_name,
        "records": list(records),
    }


def _iso_utc(created):
    if isinstance(created, str):
        return created
    if created is None:
        moment = datetime.datetime.now(datetime.timezone.utc)
    else:
        moment = datetime.datetime.fromtimestamp(created, datetime.timezone.utc)
    return moment.strftime("%Y-%m-%dT%H:%M:%SZ")


# ---------------------------------------------------------------- keys and signatures

def key_id(public_key):
    """First 16 hex of sha256 over the raw 32-byte Ed25519 public key."""
    raw = public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()[:16]


def sign_batch(batch, private_key):
    """A copy of the batch with "sig" (base64 Ed25519 over canonical) and "key_id"."""
    signed = {k: v for k, v in batch.items() if k not in UNSIGNED}
    signature = private_key.sign(canonical(signed))
    signed["sig"] = base64.b64encode(signature).decode("ascii")
    signed["key_id"] = key_id(private_key.public_key())
    return signed


def verify_batch(batch, public_key):
    """True when the batch is signed by this key and unchanged since; never raises on bad input."""
    if not isinstance(batch, dict):
        return False
    sig = batch.get("sig")
    if not isinstance(sig, str) or batch.get("key_id") != key_id(public_key):
        return False
    try:
        signature = base64.b64decode(sig.encode("ascii"), validate=True)
        public_key.verify(signature, canonical(batch))
    except (InvalidSignature, binascii.Error, ValueError, BatchError):
        return False
    return True


def generate_private_key():
    return Ed25519PrivateKey.generate()


def private_pem(private_key):
    return private_key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                     serialization.NoEncryption())


def public_pem(key):
    """PEM of the public half; accepts a private or a public key."""
    if isinstance(key, Ed25519PrivateKey):
        key = key.public_key()
    return key.public_bytes(serialization.Encoding.PEM,
                            serialization.PublicFormat.SubjectPublicKeyInfo)


def load_private_key(pem):
    try:
        key = serialization.load_pem_private_key(pem, password=None)
    except (ValueError, TypeError) as exc:
        raise BatchError("not an unencrypted PEM private key: %s" % exc) from None
    if not isinstance(key, Ed25519PrivateKey):
        raise BatchError("the batch signing key must be Ed25519")
    return key


def load_public_key(pem):
    """An Ed25519 public key from PEM; a private key PEM gives its public half."""
    if b"PRIVATE KEY" in pem:
        return load_private_key(pem).public_key()
    try:
        key = serialization.load_pem_public_key(pem)
    except (ValueError, TypeError) as exc:
        raise BatchError("not a PEM public key: %s" % exc) from None
    if not isinstance(key, Ed25519PublicKey):
        raise BatchError("a trusted hub key must be Ed25519")
    return key


# ---------------------------------------------------------------- profiles

def load_profile(name_or_path):
    """A profile by name (hub/profiles/<name>.json) or by path to a JSON file, checked."""
    if _PROFILE_NAME.match(name_or_path) and not os.path.exists(name_or_path):
        path = os.path.join(PROFILE_DIR, name_or_path + ".json")
    else:
        path = name_or_path
    try:
        with open(path, encoding="utf-8") as f:
            profile = json.load(f)
    except FileNotFoundError:
        raise ProfileError("no profile %r" % name_or_path) from None
    except (OSError, ValueError) as exc:
        raise ProfileError("profile %r unreadable: %s" % (name_or_path, exc)) from None
    _check_profile(profile, name_or_path)
    return profile


def _check_profile(profile, label):
    def bad(why):
        raise ProfileError("profile %r: %s" % (label, why))

    if not isinstance(profile, dict):
        bad("not a JSON object")
    for key in ("name", "pf", "satisfaction", "indicators", "utc_offset_minutes"):
        if key not in profile:
            bad("missing %r" % key)
    if not isinstance(profile["pf"], str) or not profile["pf"]:
        bad("pf must be a non-empty code string")
    table = profile["satisfaction"]
    if not isinstance(table, dict) or sorted(table) != ["1", "2", "3", "4", "5"]:
        bad("satisfaction must map each of the stars 1..5")
    if not all(isinstance(code, str) and code for code in table.values()):
        bad("satisfaction codes must be non-empty strings")
    indicators = profile["indicators"]
    if not isinstance(indicators, dict) or not isinstance(indicators.get("codes"), dict):
        bad("indicators.codes must be an object")
    if indicators.get("unknown", "keep") not in ("keep", "reject"):
        bad("indicators.unknown must be keep or reject")
    offset = profile["utc_offset_minutes"]
    if not isinstance(offset, int) or isinstance(offset, bool) or not -840 <= offset <= 840:
        bad("utc_offset_minutes must be an integer within +-14 hours")
    bad_max = profile.get("bad_max_stars", 2)
    if not isinstance(bad_max, int) or not 0 <= bad_max <= 5:
        bad("bad_max_stars must be 0..5")


# ---------------------------------------------------------------- vote row -> national record

def assess_time(t, profile):
    """Unix seconds as "yyyy-MM-dd HH:mm:ss" in the profile's fixed UTC offset."""
    zone = datetime.timezone(datetime.timedelta(minutes=profile["utc_offset_minutes"]))
    return datetime.datetime.fromtimestamp(t, zone).strftime("%Y-%m-%d %H:%M:%S")


def map_record(vote_row, prompt_row, profile):
    """One hub vote (or unrated record) as a national 好差评 record.

    The device knows nothing of the citizen, so the record carries no evaluator identity.
    """
    vote_id = "%s:%s" % (vote_row["device_id"], vote_row["seq"])
    kind = vote_row["kind"]
    stars = vote_row["stars"]
    reasons = _reason_list(vote_row.get("reasons"), vote_id)
    if kind == "v":
        if not isinstance(stars, int) or isinstance(stars, bool) or not 1 <= stars <= 5:
            raise MappingError("vote %s: stars %r out of 1..5" % (vote_id, stars))
        bad = stars <= profile.get("bad_max_stars", 2)
        if bad and not reasons:
            raise MappingError("vote %s: a bad rating without a reason" % vote_id)
        if not bad and reasons:
            raise MappingError("vote %s: a good rating with reasons" % vote_id)
        rated = 1
        satisfaction = profile["satisfaction"][str(stars)]
        eval_detail = ",".join(_indicator(code, profile, vote_id) for code in reasons)
    elif kind == "u":
        # Reported as "service completed, not rated on site" so the province applies its
        # own default-rating rule; the hub never invents a rating.
        rated = 0
        satisfaction = ""
        eval_detail = ""
    else:
        raise MappingError("vote %s: unknown kind %r" % (vote_id, kind))
    prompt = prompt_row or {}
    return {
        "projectNo": vote_row.get("case_no") or "",
        "taskCode": prompt.get("task_code") or "",
        "taskName": prompt.get("task_name") or "",
        "areaCode": prompt.get("area_code") or "",
        "deptCode": prompt.get("dept_code") or "",
        "proManager": prompt.get("staff_name") or "",
        "proManagerNo": vote_row.get("staff_no") or "",
        "pf": profile["pf"],
        "satisfaction": satisfaction,
        "evalDetail": eval_detail,
        "writingEvaluation": "",
        "assessTime": assess_time(vote_row["t"], profile),
        "assessNumber": profile.get("assess_number", 1),
        "deviceNo": vote_row["device_id"],
        "voteId": vote_id,
        "rated": rated,
    }


def _reason_list(reasons, vote_id):
    # The hub store may keep reasons as a list, JSON text or a comma-joined string.
    if reasons is None or reasons == "":
        return []
    if isinstance(reasons, str):
        if reasons.startswith("["):
            try:
                reasons = json.loads(reasons)
            except ValueError:
                raise MappingError("vote %s: unreadable reasons" % vote_id) from None
        else:
            reasons = reasons.split(",")
    if not isinstance(reasons, (list, tuple)) or not all(isinstance(r, str) and r for r in reasons):
        raise MappingError("vote %s: reasons must be a list of codes" % vote_id)
    return list(reasons)


def _indicator(code, profile, vote_id):
    indicators = profile["indicators"]
    mapped = indicators["codes"].get(code)
    if mapped is not None:
        return mapped
    if indicators.get("unknown", "keep") == "reject":
        raise MappingError("vote %s: reason %r has no provincial indicator code" % (vote_id, code))
    return code
