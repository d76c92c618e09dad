"""Batches for the province: canonical form, hash chain, signatures, profiles and the wire.

A batch is a JSON object. Its canonical form (what the hash and the signature cover) is the
batch without its signature envelope ("sig", "key_id", "alg", "rotations"), serialised with
sorted keys, no spaces and UTF-8 text, so the receiver can rebuild the exact bytes from the
parsed JSON. Each batch names the hash of the one before ("prev"), so deleting or editing a
stored batch breaks the chain. The envelope says which hub key signed it (any scheme of
hub/schemes.py) and, after a key rotation, carries the statements, each signed by the key
before, that introduce the new key.

Profiles are data (hub/profiles/<name>.json): record field names, code tables, time format,
endpoint path, batch size, request authentication, accepted signature schemes and payload
encryption. map_record writes a record in a profile's terms and national_form reads one back.
docs/province.md is the specification.
"""
import base64
import binascii
import datetime
import hashlib
import json
import os
import re
import secrets
import time
import urllib.parse

from . import PingjiaError
from . import schemes

GENESIS = "0" * 64

# Fields the signature does not cover: they are the signature and what names its key.
UNSIGNED = ("sig", "key_id", "alg", "rotations")

# Every national record carries these keys (docs/province.md "Record fields").
RECORD_FIELDS = (
    "projectNo", "taskCode", "taskName", "areaCode", "deptCode", "proManager", "proManagerNo",
    "pf", "satisfaction", "evalDetail", "writingEvaluation", "assessTime", "assessNumber",
    "deviceNo", "voteId", "rated",
)
# Sent only by profiles that name a field for them.
OPTIONAL_FIELDS = ("windowNo",)

NATIONAL_TIME = "%Y-%m-%d %H:%M:%S"
TIME_FORMATS_SPECIAL = ("iso8601", "epoch_ms")
DEFAULT_PATH = "/batches"
AUTH_TYPES = ("none", "token", "app_key")
# A rotation path longer than this is not carried in every batch: rotations are rare, and a
# province that missed more than this many keys needs its operator anyway.
ROTATIONS_MAX = 16

PROFILE_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "profiles")
_PROFILE_NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
_HEX64 = re.compile(r"^[0-9a-f]{64}$")
_PATH = re.compile(r"^(/[A-Za-z0-9._-]+)+$")
_HEADER = re.compile(r"^[A-Za-z0-9-]{1,64}$")
_TIME_DIRECTIVES = re.compile(r"%(.)")

APP_KEY_HEADERS = {"app_key": "X-App-Key", "timestamp": "X-Timestamp", "nonce": "X-Nonce",
                   "digest": "X-Content-Digest", "signature": "X-Signature"}


class BatchError(PingjiaError):
    """A batch or key that cannot be built, serialised or read."""


class ProfileError(BatchError):
    """A jurisdiction profile that is missing or malformed."""


class MappingError(BatchError):
    """A hub vote row that cannot become a record under the profile."""


class CredentialsError(BatchError):
    """Province credentials that are missing, unreadable or lack what the profile needs."""


# ---------------------------------------------------------------- canonical form and chain

def _json_bytes(obj):
    try:
        text = json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False,
                          allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise BatchError("batch is not plain JSON: %s" % exc) from None
    return text.encode("utf-8")


def canonical(batch):
    """The bytes the hash and signature cover: the batch without its envelope, sorted, compact."""
    if not isinstance(batch, dict):
        raise BatchError("batch is not a JSON object")
    return _json_bytes({k: v for k, v in batch.items() if k not in UNSIGNED})


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
    """First 16 hex of sha256 over the raw public key (Ed25519: 32 bytes; P-256, SM2: 04||x||y)."""
    try:
        return schemes.key_id(public_key)
    except schemes.SchemeError as exc:
        raise BatchError(str(exc)) from None


def _signing_material(key):
    # A hub.keys.SigningKey knows its rotation statements and follows a rotated key file;
    # a bare private key object signs alone.
    material = getattr(key, "signing_material", None)
    if material is not None:
        return material()
    return key, ()


def sign_batch(batch, private_key):
    """A copy of the batch with "sig" (base64 over canonical), "key_id", "alg" and, when the
    key was introduced by rotation, "rotations". private_key is a key of any scheme or a
    hub.keys.SigningKey."""
    private, rotations = _signing_material(private_key)
    signed = {k: v for k, v in batch.items() if k not in UNSIGNED}
    try:
        signature = schemes.sign(private, canonical(signed))
        signed["key_id"] = schemes.key_id(private)
        signed["alg"] = schemes.scheme_of(private)
    except schemes.SchemeError as exc:
        raise BatchError(str(exc)) from None
    signed["sig"] = base64.b64encode(signature).decode("ascii")
    if rotations:
        signed["rotations"] = [dict(r) for r in rotations][-ROTATIONS_MAX:]
    return signed


def verify_batch(batch, public_key):
    """True when the batch is signed by this key and unchanged since; never raises on bad input."""
    if not isinstance(batch, dict):
        return False
    sig = batch.get("sig")
    try:
        if not isinstance(sig, str) or batch.get("key_id") != schemes.key_id(public_key):
            return False
        alg = batch.get("alg", schemes.ED25519)
        if alg != schemes.scheme_of(public_key):
            return False
        signature = base64.b64decode(sig.encode("ascii"), validate=True)
        return schemes.verify(public_key, signature, canonical(batch))
    except (binascii.Error, ValueError, BatchError, schemes.SchemeError):
        return False


def generate_private_key(scheme=schemes.DEFAULT_SCHEME):
    try:
        return schemes.generate(scheme)
    except schemes.SchemeError as exc:
        raise BatchError(str(exc)) from None


def private_pem(private_key):
    return schemes.private_pem(_signing_material(private_key)[0])


def public_pem(key):
    """PEM of the public half; accepts a private or a public key of any scheme."""
    return schemes.public_pem(_signing_material(key)[0])


def load_private_key(pem):
    try:
        return schemes.load_private_pem(pem)
    except schemes.SchemeError as exc:
        raise BatchError("batch signing key: %s" % exc) from None


def load_public_key(pem):
    """A hub public key (Ed25519, P-256 or SM2) from PEM; a private key PEM gives its public
    half."""
    try:
        return schemes.load_public_pem(pem)
    except schemes.SchemeError as exc:
        raise BatchError("trusted hub key: %s" % exc) from None


# ---------------------------------------------------------------- key rotation statements

def rotation_statement(hub_id, old_key, new_key, created=None):
    """The statement, signed by the old key, that the hub signs with new_key from now on."""
    old_private = _signing_material(old_key)[0]
    new_public = schemes.public_of(_signing_material(new_key)[0])
    body = {
        "type": "key_rotation",
        "hub": hub_id,
        "key_id": schemes.key_id(new_public),
        "alg": schemes.scheme_of(new_public),
        "public_key": schemes.public_pem(new_public).decode("ascii"),
        "by": schemes.key_id(old_private),
        "by_alg": schemes.scheme_of(old_private),
        "created": _iso_utc(created),
    }
    body["sig"] = base64.b64encode(schemes.sign(old_private, _json_bytes(body))).decode("ascii")
    return body


def check_rotation(statement, hub_id, signer):
    """The new public key a rotation statement introduces when `signer` (the public key it
    names in "by") signed it for this hub; None for anything else. Never raises."""
    if not isinstance(statement, dict) or statement.get("type") != "key_rotation":
        return None
    try:
        if statement.get("hub") != hub_id or statement.get("by") != schemes.key_id(signer) \
                or statement.get("by_alg") != schemes.scheme_of(signer):
            return None
        body = {k: v for k, v in statement.items() if k != "sig"}
        sig = base64.b64decode(str(statement.get("sig", "")).encode("ascii"), validate=True)
        if not schemes.verify(signer, sig, _json_bytes(body)):
            return None
        new_public = schemes.load_public_pem(str(statement.get("public_key", "")))
        if schemes.key_id(new_public) != statement.get("key_id") or \
                schemes.scheme_of(new_public) != statement.get("alg"):
            return None
        return new_public
    except (binascii.Error, ValueError, BatchError, schemes.SchemeError):
        return None


def learn_rotations(batch, known):
    """Keys a batch's rotation statements introduce, in order: [(key_id, public, by_key_id)].

    known(key_id) -> public key or None gives the keys already trusted for the batch's hub;
    each statement must be signed by one of them or by a key learned earlier in the list.
    Statements that do not verify are skipped: they introduce nothing.
    """
    learned, local = [], {}
    rotations = batch.get("rotations") if isinstance(batch, dict) else None
    if not isinstance(rotations, list):
        return learned
    for statement in rotations[:ROTATIONS_MAX]:
        if not isinstance(statement, dict):
            continue
        by = statement.get("by")
        signer = local.get(by) if isinstance(by, str) else None
        if signer is None and isinstance(by, str):
            signer = known(by)
        if signer is None:
            continue
        public = check_rotation(statement, batch.get("hub"), signer)
        if public is None:
            continue
        kid = schemes.key_id(public)
        local[kid] = public
        learned.append((kid, public, by))
    return learned


class ChainKeys:
    """The keys one hub's chain may be signed with, followed batch by batch in order.

    trusted(key_id) -> public key or None gives the keys vouched for from outside (a keyring,
    a trust folder). learn() adds the keys a batch's rotation statements introduce; signed()
    records that a key signed an intact batch, which retires every key on its rotation path.
    """

    def __init__(self, hub, trusted):
        self.hub, self._trusted = hub, trusted
        self.learned, self.by, self.retired = {}, {}, {}

    def get(self, kid):
        return self._trusted(kid) or self.learned.get(kid)

    def learn(self, rotations):
        for kid, public, by in learn_rotations({"hub": self.hub, "rotations": rotations},
                                               self.get):
            if kid not in self.learned:
                self.learned[kid], self.by[kid] = public, by

    def signed(self, kid, batch_id):
        seen = set()
        while kid in self.by and kid not in seen:
            seen.add(kid)
            kid = self.by[kid]
            self.retired.setdefault(kid, batch_id)


# ---------------------------------------------------------------- profiles

def profile_path(name_or_path):
    if _PROFILE_NAME.match(name_or_path) and not os.path.exists(name_or_path):
        return os.path.join(PROFILE_DIR, name_or_path + ".json")
    return name_or_path


def load_profile(name_or_path):
    """A profile by name (hub/profiles/<name>.json) or by path to a JSON file, checked."""
    path = profile_path(name_or_path)
    try:
        with open(path, encoding="utf-8") as f:
            profile = json.load(f)
    except FileNotFoundError:
        raise ProfileError("no profile %r" % name_or_path) from None
    except (OSError, ValueError) as exc:
        raise ProfileError("profile %r unreadable: %s" % (name_or_path, exc)) from None
    _check_profile(profile, name_or_path)
    return profile


def shipped_profiles():
    """Every profile in hub/profiles/, by name."""
    out = {}
    for entry in sorted(os.listdir(PROFILE_DIR)):
        if entry.endswith(".json"):
            profile = load_profile(os.path.join(PROFILE_DIR, entry))
            out[profile["name"]] = profile
    return out


def _check_profile(profile, label):
    def bad(why):
        raise ProfileError("profile %r: %s" % (label, why))

    if not isinstance(profile, dict):
        bad("not a JSON object")
    for key in ("name", "pf", "satisfaction", "indicators", "utc_offset_minutes"):
        if key not in profile:
            bad("missing %r" % key)
    if not isinstance(profile["name"], str) or not _PROFILE_NAME.match(profile["name"]):
        bad("name must be 1-64 of A-Z a-z 0-9 _ -")
    if not isinstance(profile["pf"], str) or not profile["pf"]:
        bad("pf must be a non-empty code string")
    table = profile["satisfaction"]
    if not isinstance(table, dict) or sorted(table) != ["1", "2", "3", "4", "5"]:
        bad("satisfaction must map each of the stars 1..5")
    if not all(isinstance(code, str) and code for code in table.values()):
        bad("satisfaction codes must be non-empty strings")
    if len(set(table.values())) != 5:
        bad("satisfaction codes must differ, or a record could not be read back")
    indicators = profile["indicators"]
    if not isinstance(indicators, dict) or not isinstance(indicators.get("codes"), dict):
        bad("indicators.codes must be an object")
    if indicators.get("unknown", "keep") not in ("keep", "reject"):
        bad("indicators.unknown must be keep or reject")
    separator = indicators.get("separator", ",")
    if not isinstance(separator, str) or len(separator) != 1 or separator.isalnum():
        bad("indicators.separator must be one punctuation character")
    if not all(isinstance(v, str) and v and separator not in v
               for v in indicators["codes"].values()):
        bad("indicator codes must be non-empty strings without the separator")
    offset = profile["utc_offset_minutes"]
    if not isinstance(offset, int) or isinstance(offset, bool) or not -840 <= offset <= 840:
        bad("utc_offset_minutes must be an integer within +-14 hours")
    bad_max = profile.get("bad_max_stars", 2)
    if not isinstance(bad_max, int) or not 0 <= bad_max <= 5:
        bad("bad_max_stars must be 0..5")
    _check_fields(profile.get("fields", {}), bad)
    _check_time_format(profile.get("time_format", NATIONAL_TIME), bad)
    _check_transport(profile, bad)


def _check_fields(fields, bad):
    if not isinstance(fields, dict):
        bad("fields must map national field names to provincial ones")
    for national, provincial in fields.items():
        if national not in RECORD_FIELDS + OPTIONAL_FIELDS:
            bad("fields: %r is not a record field" % national)
        if not isinstance(provincial, str) or not re.match(r"^[A-Za-z_][A-Za-z0-9_]{0,63}$",
                                                          provincial):
            bad("fields: %r must map to an identifier" % national)
    names = [fields.get(f, f) for f in RECORD_FIELDS] + \
        [fields[f] for f in OPTIONAL_FIELDS if f in fields]
    if len(set(names)) != len(names):
        bad("fields: two record fields would share a name")


def _check_time_format(fmt, bad):
    if fmt in TIME_FORMATS_SPECIAL:
        return
    if not isinstance(fmt, str) or not fmt:
        bad("time_format must be a strftime pattern, iso8601 or epoch_ms")
    directives = _TIME_DIRECTIVES.findall(fmt)
    if sorted(directives) != sorted("YmdHMS"):
        bad("time_format must use each of %Y %m %d %H %M %S once and nothing else")


def _check_transport(profile, bad):
    endpoint = profile.get("endpoint", {})
    if not isinstance(endpoint, dict) or not _PATH.match(endpoint.get("path", DEFAULT_PATH)) \
            or ".." in endpoint.get("path", DEFAULT_PATH):
        bad("endpoint.path must be a URL path such as /batches")
    batch_max = profile.get("batch_max")
    if batch_max is not None and (not isinstance(batch_max, int) or isinstance(batch_max, bool)
                                  or not 1 <= batch_max <= 10000):
        bad("batch_max must be 1..10000")
    auth = profile.get("auth", {"type": "none"})
    if not isinstance(auth, dict) or auth.get("type", "none") not in AUTH_TYPES:
        bad("auth.type must be one of %s" % ", ".join(AUTH_TYPES))
    if auth.get("type") == "token":
        if not _HEADER.match(str(auth.get("header", "Authorization"))) or \
                not isinstance(auth.get("prefix", "Bearer "), str):
            bad("auth.header must be a header name and auth.prefix a string")
    if auth.get("type") == "app_key":
        if auth.get("mac", "hmac-sha256") not in schemes.MACS:
            bad("auth.mac must be one of %s" % ", ".join(schemes.MACS))
        if auth.get("digest", "sha256") not in schemes.DIGESTS:
            bad("auth.digest must be one of %s" % ", ".join(schemes.DIGESTS))
        headers = auth.get("headers", {})
        if not isinstance(headers, dict) or not set(headers) <= set(APP_KEY_HEADERS) or \
                not all(isinstance(h, str) and _HEADER.match(h) for h in headers.values()):
            bad("auth.headers may rename %s to header names" % ", ".join(APP_KEY_HEADERS))
        skew = auth.get("max_skew_s", 300)
        if not isinstance(skew, int) or isinstance(skew, bool) or not 1 <= skew <= 86400:
            bad("auth.max_skew_s must be 1..86400")
    signature = profile.get("signature", {})
    accepted = signature.get("schemes", list(schemes.SCHEMES)) \
        if isinstance(signature, dict) else None
    if not isinstance(accepted, list) or not accepted or \
            not all(s in schemes.SCHEMES for s in accepted):
        bad("signature.schemes must list some of %s" % ", ".join(schemes.SCHEMES))
    encryption = profile.get("encryption")
    if encryption is not None and (not isinstance(encryption, dict)
                                   or encryption.get("cipher") not in schemes.CIPHERS):
        bad("encryption must be null or {\"cipher\": one of %s}" % ", ".join(schemes.CIPHERS))


# Accessors with the defaults a profile may leave out (older profiles have none of these).

def profile_fields(profile):
    """national field name -> the profile's name for it (optional fields only when named)."""
    fields = profile.get("fields", {})
    out = {f: fields.get(f, f) for f in RECORD_FIELDS}
    out.update({f: fields[f] for f in OPTIONAL_FIELDS if f in fields})
    return out


def endpoint_path(profile):
    return profile.get("endpoint", {}).get("path", DEFAULT_PATH)


def auth_type(profile):
    return profile.get("auth", {}).get("type", "none")


def accepted_schemes(profile):
    return list(profile.get("signature", {}).get("schemes", schemes.SCHEMES))


def preferred_scheme(profile):
    return accepted_schemes(profile)[0]


def encryption_cipher(profile):
    encryption = profile.get("encryption")
    return encryption["cipher"] if encryption else None


def batch_limit(profile, configured):
    """The batch size to use: the hub's setting, capped by the profile's batch_max."""
    limit = profile.get("batch_max")
    return configured if limit is None else min(configured, limit)


# ---------------------------------------------------------------- times

def _zone(profile):
    return datetime.timezone(datetime.timedelta(minutes=profile["utc_offset_minutes"]))


def assess_time(t, profile):
    """Unix seconds as "yyyy-MM-dd HH:mm:ss" in the profile's fixed UTC offset."""
    return datetime.datetime.fromtimestamp(t, _zone(profile)).strftime(NATIONAL_TIME)


def format_time(t, profile):
    """Unix seconds in the profile's time_format."""
    fmt = profile.get("time_format", NATIONAL_TIME)
    if fmt == "epoch_ms":
        return int(t) * 1000
    moment = datetime.datetime.fromtimestamp(t, _zone(profile))
    if fmt == "iso8601":
        return moment.isoformat(timespec="seconds")
    return moment.strftime(fmt)


def parse_time(value, profile):
    """Unix seconds from a value in the profile's time_format; None when it is not one."""
    fmt = profile.get("time_format", NATIONAL_TIME)
    try:
        if fmt == "epoch_ms":
            if not isinstance(value, int) or isinstance(value, bool) or value < 0 \
                    or value % 1000:
                return None
            return value // 1000
        if not isinstance(value, str):
            return None
        if fmt == "iso8601":
            moment = datetime.datetime.fromisoformat(value)
            if moment.tzinfo is None or not re.match(
                    r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(Z|[+-]\d{2}:\d{2})$", value):
                return None
        else:
            moment = datetime.datetime.strptime(value, fmt).replace(tzinfo=_zone(profile))
            if moment.strftime(fmt) != value:
                return None  # strptime accepts unpadded digits; the wire form is exact
        return int(moment.timestamp())
    except (ValueError, OverflowError):
        return None


# ---------------------------------------------------------------- vote row -> record

def map_record(vote_row, prompt_row, profile):
    """One hub vote (or unrated record) as a 好差评 record in the profile's terms.

    The device knows nothing of the citizen, so the record carries no evaluator identity.
    """
    vote_id = "%s:%s" % (vote_row["device_id"], vote_row["seq"])
    kind = vote_row["kind"]
    stars = vote_row["stars"]
    reasons = _reason_list(vote_row.get("reasons"), vote_id)
    separator = profile["indicators"].get("separator", ",")
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
        eval_detail = separator.join(_indicator(code, profile, vote_id) for code in reasons)
    elif kind == "u":
        # Reported as "service completed, not rated on site" so the province applies its
        # own default-rating rule; the hub never invents a rating.
        rated = 0
        satisfaction = ""
        eval_detail = ""
    else:
        raise MappingError("vote %s: unknown kind %r" % (vote_id, kind))
    prompt = prompt_row or {}
    record = {
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
        "assessTime": format_time(vote_row["t"], profile),
        "assessNumber": profile.get("assess_number", 1),
        "deviceNo": vote_row["device_id"],
        "voteId": vote_id,
        "rated": rated,
    }
    if "windowNo" in profile.get("fields", {}):
        record["windowNo"] = vote_row.get("window") or ""
    return _rename(record, profile)


def _rename(record, profile):
    fields = profile.get("fields")
    if not fields:
        return record
    return {fields.get(name, name): value for name, value in record.items()}


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


# ---------------------------------------------------------------- record -> national form

def national_form(record, profile):
    """A record in the profile's terms read back into national terms.

    Field names become national, satisfaction the star count as "1".."5" (5 = 非常满意,
    whatever the profile's numbering), evalDetail comma-joined, assessTime
    "yyyy-MM-dd HH:mm:ss" in the profile's offset. A value that cannot be read back is left
    as it came (or None for a time), so the national record checks name what is wrong; a
    field that is missing stays missing. National records come back unchanged.
    """
    if not isinstance(record, dict):
        return record
    fields = profile_fields(profile)
    back = {provincial: national for national, provincial in fields.items()}
    # A field the profile does not define is not part of the record.
    out = {back[name]: value for name, value in record.items() if name in back}
    table = profile["satisfaction"]
    if not (table == {s: s for s in table}) and "satisfaction" in out:
        stars = {code: s for s, code in table.items()}
        value = out["satisfaction"]
        key = str(value) if isinstance(value, int) and not isinstance(value, bool) else value
        if isinstance(key, str) and key in stars:
            out["satisfaction"] = stars[key]
    separator = profile["indicators"].get("separator", ",")
    if separator != "," and isinstance(out.get("evalDetail"), str):
        out["evalDetail"] = ",".join(out["evalDetail"].split(separator)) \
            if out["evalDetail"] else ""
    if profile.get("time_format", NATIONAL_TIME) != NATIONAL_TIME and "assessTime" in out:
        t = parse_time(out["assessTime"], profile)
        out["assessTime"] = None if t is None else assess_time(t, profile)
    return out


def missing_field_name(reason, profile):
    """A record check reason ("missing_projectNo") in the profile's field names."""
    for prefix in ("missing_", "bad_"):
        if reason.startswith(prefix):
            national = reason[len(prefix):]
            return prefix + profile_fields(profile).get(national, national)
    return reason


def record_time(national, profile):
    """Unix seconds of a national-form record's assessTime (None when unreadable)."""
    value = national.get("assessTime")
    if not isinstance(value, str):
        return None
    try:
        moment = datetime.datetime.strptime(value, NATIONAL_TIME).replace(tzinfo=_zone(profile))
    except ValueError:
        return None
    return int(moment.timestamp())


# ---------------------------------------------------------------- the wire

def load_credentials(path):
    """The province credentials a hub was issued, from a JSON file: any of token, app_key,
    app_secret, sm4_key (32 hex digits)."""
    try:
        with open(path, encoding="utf-8") as f:
            credentials = json.load(f)
    except FileNotFoundError:
        raise CredentialsError("%s: no province credentials file" % path) from None
    except (OSError, ValueError) as exc:
        raise CredentialsError("%s: unreadable credentials: %s" % (path, exc)) from None
    return check_credentials(credentials, path)


def check_credentials(credentials, label="credentials"):
    if not isinstance(credentials, dict):
        raise CredentialsError("%s: not a JSON object" % label)
    for key, value in credentials.items():
        if key not in ("token", "app_key", "app_secret", "sm4_key", "hub"):
            raise CredentialsError("%s: unknown key %r" % (label, key))
        if not isinstance(value, str) or not value:
            raise CredentialsError("%s: %s must be a non-empty string" % (label, key))
    if "sm4_key" in credentials:
        try:
            if len(bytes.fromhex(credentials["sm4_key"])) != schemes.SM4_KEY_BYTES:
                raise ValueError
        except ValueError:
            raise CredentialsError("%s: sm4_key must be 32 hex digits" % label) from None
    return credentials


def needed_credentials(profile):
    """The credential names the profile's transport needs."""
    needed = {"none": [], "token": ["token"], "app_key": ["app_key", "app_secret"]}[
        auth_type(profile)]
    if encryption_cipher(profile):
        needed.append("sm4_key")
    return needed


def build_request(profile, base_url, body, credentials=None, now=time.time, nonce=None):
    """(url, headers, data) for POSTing one stored batch body (bytes) under the profile:
    the profile's endpoint path under base_url, SM4 payload encryption when the profile asks
    for it, and the profile's authentication headers over the exact bytes sent.

    credentials None means the hub has none installed: the request then goes without
    authentication (an open receiver takes it; a real province answers 401, which the hub's
    status shows). A profile that encrypts is never sent in the clear: without its sm4_key
    this raises CredentialsError, as it does for anything a given credentials dict lacks.
    """
    anonymous = credentials is None
    credentials = credentials or {}
    missing = [name for name in needed_credentials(profile) if not credentials.get(name)
               and not (anonymous and name != "sm4_key")]
    if missing:
        raise CredentialsError("profile %s needs province credentials: %s"
                               % (profile["name"], ", ".join(missing)))
    url = base_url.rstrip("/") + endpoint_path(profile)
    data = body
    cipher = encryption_cipher(profile)
    if cipher:
        iv, ciphertext = schemes.sm4_encrypt(cipher, bytes.fromhex(credentials["sm4_key"]), body)
        data = _json_bytes({"encrypted": {
            "cipher": cipher,
            "iv": base64.b64encode(iv).decode("ascii"),
            "data": base64.b64encode(ciphertext).decode("ascii")}})
    headers = {"Content-Type": "application/json; charset=utf-8"}
    auth = profile.get("auth", {})
    kind = "none" if anonymous else auth_type(profile)
    if kind == "token":
        headers[auth.get("header", "Authorization")] = auth.get("prefix", "Bearer ") + \
            credentials["token"]
    elif kind == "app_key":
        names = dict(APP_KEY_HEADERS, **auth.get("headers", {}))
        timestamp = str(int(now() * 1000))
        nonce = nonce or secrets.token_hex(16)
        digest = schemes.digest_hex(auth.get("digest", "sha256"), data)
        path = urllib.parse.urlsplit(url).path
        headers[names["app_key"]] = credentials["app_key"]
        headers[names["timestamp"]] = timestamp
        headers[names["nonce"]] = nonce
        headers[names["digest"]] = digest
        headers[names["signature"]] = request_signature(
            auth.get("mac", "hmac-sha256"), credentials["app_secret"], "POST", path, timestamp,
            nonce, digest)
    return url, headers, data


def request_signature(mac, secret, method, path, timestamp, nonce, digest):
    """The app-key request signature: hex MAC under the app secret over
    METHOD \\n path \\n timestamp \\n nonce \\n body digest."""
    text = "\n".join((method.upper(), path, timestamp, nonce, digest))
    return schemes.mac_hex(mac, secret.encode("utf-8"), text.encode("utf-8"))


def decrypt_body(data, sm4_key_hex):
    """The plain body of an {"encrypted": …} request body; raises BatchError when it is not one
    or does not decrypt under the key."""
    try:
        envelope = json.loads(data.decode("utf-8"))["encrypted"]
        cipher = envelope["cipher"]
        iv = base64.b64decode(envelope["iv"], validate=True)
        ciphertext = base64.b64decode(envelope["data"], validate=True)
    except (UnicodeDecodeError, ValueError, KeyError, TypeError, binascii.Error):
        raise BatchError("not an encrypted body") from None
    try:
        return schemes.sm4_decrypt(cipher, bytes.fromhex(sm4_key_hex), iv, ciphertext)
    except schemes.SchemeError as exc:
        raise BatchError(str(exc)) from None

