# Batches for the province: signatures, hash chain, canonical form, national record mapping.
import base64
import copy
import hashlib
import json

import pytest
from cryptography.hazmat.primitives import serialization

from hub import PingjiaError
from hub import batch as B

PROFILE = B.load_profile("national")


def vote_row(**over):
    row = dict(device_id="D0007", seq=42, t=1767196800, kind="v", pid="P9", case_no="GD2026-0001",
               stars=5, reasons=[], cat_ver="gd-2024.1", window="W03", staff_no="10234",
               mac="ab" * 32)
    row.update(over)
    return row


def prompt_row(**over):
    row = dict(task_code="11440100MB2C92145X4442111800001", task_name="不动产登记𠀾",
               dept_code="11440100MB2C92145X", area_code="440100", staff_name="李晓𪚥",
               kind="ji", n_cases=1)
    row.update(over)
    return row


def records():
    return [
        B.map_record(vote_row(), prompt_row(), PROFILE),
        B.map_record(vote_row(seq=43, stars=1, reasons=["S01", "I02"]), prompt_row(), PROFILE),
        B.map_record(vote_row(seq=44, kind="u", stars=0), None, PROFILE),
    ]


def signed_batch(key, n=1, prev=B.GENESIS, recs=None):
    unsigned = B.make_batch("hubA", n, prev, records() if recs is None else recs, "national",
                            created=1767196800)
    return B.sign_batch(unsigned, key)


# ---------------------------------------------------------------- signature

def test_signature_round_trip():
    key = B.generate_private_key()
    batch = signed_batch(key)
    assert B.verify_batch(batch, key.public_key())
    assert base64.b64decode(batch["sig"]) and len(base64.b64decode(batch["sig"])) == 64
    # The signature also survives the wire: JSON out and back in.
    assert B.verify_batch(json.loads(json.dumps(batch)), key.public_key())


def test_signature_rejects_another_key_and_garbage():
    key, other = B.generate_private_key(), B.generate_private_key()
    batch = signed_batch(key)
    assert not B.verify_batch(batch, other.public_key())
    # The right key_id but another key's signature.
    forged = B.sign_batch(batch, other)
    forged["key_id"] = batch["key_id"]
    assert not B.verify_batch(forged, key.public_key())
    for sig in ("", "not base64!", base64.b64encode(b"x" * 64).decode(), None, 7):
        assert not B.verify_batch(dict(batch, sig=sig), key.public_key())
    unsigned = {k: v for k, v in batch.items() if k not in ("sig", "key_id")}
    assert not B.verify_batch(unsigned, key.public_key())
    assert not B.verify_batch("a string", key.public_key())


def test_any_change_in_any_record_breaks_the_signature():
    key = B.generate_private_key()
    batch = signed_batch(key)
    changed = 0
    for i, record in enumerate(batch["records"]):
        for field, value in record.items():
            tampered = copy.deepcopy(batch)
            if isinstance(value, int):
                tampered["records"][i][field] = value + 1
            else:
                tampered["records"][i][field] = value + "x"
            assert not B.verify_batch(tampered, key.public_key()), (i, field)
            # Even the same text with a different type is a different record.
            retyped = copy.deepcopy(batch)
            retyped["records"][i][field] = str(value) if isinstance(value, int) else [value]
            assert not B.verify_batch(retyped, key.public_key()), (i, field)
            changed += 1
    assert changed == 3 * len(B.RECORD_FIELDS)
    for mutate in (lambda b: b["records"].pop(), lambda b: b["records"].reverse(),
                   lambda b: b["records"].append(dict(b["records"][0])),
                   lambda b: b.update(n=2), lambda b: b.update(prev="1" * 64),
                   lambda b: b.update(created="2026-01-01T00:00:01Z"),
                   lambda b: b.update(hub="hubB"), lambda b: b.update(extra=1)):
        tampered = copy.deepcopy(batch)
        mutate(tampered)
        assert not B.verify_batch(tampered, key.public_key())


def test_key_id_is_sha256_of_raw_public_key():
    key = B.generate_private_key()
    raw = key.public_key().public_bytes(serialization.Encoding.Raw,
                                        serialization.PublicFormat.Raw)
    assert B.key_id(key.public_key()) == hashlib.sha256(raw).hexdigest()[:16]
    assert signed_batch(key)["key_id"] == B.key_id(key.public_key())


def test_pem_round_trip_and_bad_pem():
    key = B.generate_private_key()
    again = B.load_private_key(B.private_pem(key))
    public = B.load_public_key(B.public_pem(key))
    assert B.key_id(public) == B.key_id(key.public_key()) == B.key_id(again.public_key())
    assert B.key_id(B.load_public_key(B.private_pem(key))) == B.key_id(public)
    with pytest.raises(B.BatchError):
        B.load_public_key(b"-----BEGIN PUBLIC KEY-----\nnope\n-----END PUBLIC KEY-----\n")
    with pytest.raises(PingjiaError):
        B.load_private_key(b"garbage")


# ---------------------------------------------------------------- canonical form and chain

def test_canonical_form_is_byte_exact():
    batch = {"records": [{"b": 1, "a": "张"}], "n": 1, "batch_id": "h-1", "sig": "s", "key_id": "k"}
    assert B.canonical(batch) == '{"batch_id":"h-1","n":1,"records":[{"a":"张","b":1}]}'.encode()
    assert B.batch_hash(batch) == hashlib.sha256(B.canonical(batch)).hexdigest()


def test_canonical_form_stable_under_key_order_and_json_round_trip():
    batch = B.make_batch("hubA", 1, B.GENESIS, records(), "national", created=0)
    reordered = {k: batch[k] for k in reversed(list(batch))}
    reordered["records"] = [{k: r[k] for k in reversed(list(r))} for r in batch["records"]]
    assert list(reordered) != list(batch)
    assert B.canonical(reordered) == B.canonical(batch)
    pretty = json.dumps(batch, indent=3, ensure_ascii=True)
    assert B.canonical(json.loads(pretty)) == B.canonical(batch)
    # Chinese text, rare characters included, is UTF-8 in the canonical bytes, not \u escapes.
    assert "𠀾".encode("utf-8") in B.canonical(batch)


def test_canonical_refuses_what_json_cannot_carry():
    with pytest.raises(B.BatchError):
        B.canonical({"x": float("nan")})
    with pytest.raises(B.BatchError):
        B.canonical({"x": object()})
    with pytest.raises(B.BatchError):
        B.canonical([1, 2])


def test_hash_chain_links_each_batch_to_the_one_before():
    key = B.generate_private_key()
    chain, prev = [], B.GENESIS
    for n in (1, 2, 3):
        batch = signed_batch(key, n=n, prev=prev, recs=[])
        chain.append(batch)
        prev = B.batch_hash(batch)
    assert chain[0]["prev"] == B.GENESIS
    assert chain[1]["prev"] == B.batch_hash(chain[0])
    assert chain[2]["prev"] == B.batch_hash(chain[1])
    assert len({b["prev"] for b in chain}) == 3
    # The hash is over the signed content only, so re-signing does not move the chain.
    unsigned = {k: v for k, v in chain[1].items() if k not in ("sig", "key_id")}
    assert B.batch_hash(unsigned) == B.batch_hash(chain[1])
    # Editing batch 1 after the fact no longer matches what batch 2 names.
    edited = copy.deepcopy(chain[0])
    edited["created"] = "2000-01-01T00:00:00Z"
    assert B.batch_hash(edited) != chain[1]["prev"]


def test_make_batch_fields():
    batch = B.make_batch("hall-7", 12, "a" * 64, [], "national", created=1767196800)
    assert batch == {"batch_id": "hall-7-12", "hub": "hall-7", "n": 12, "prev": "a" * 64,
                     "created": "2025-12-31T16:00:00Z", "profile": "national", "records": []}
    assert B.make_batch("h", 1, B.GENESIS, [], "national")["created"].endswith("Z")
    for args in (("", 1, B.GENESIS), ("h", 0, B.GENESIS), ("h", 2, "xyz"), ("h", 1, "a" * 64),
                 ("h", True, B.GENESIS)):
        with pytest.raises(B.BatchError):
            B.make_batch(args[0], args[1], args[2], [], "national")


# ---------------------------------------------------------------- record mapping

def test_map_good_vote_every_field():
    record = B.map_record(vote_row(stars=4), prompt_row(), PROFILE)
    assert record == {
        "projectNo": "GD2026-0001",
        "taskCode": "11440100MB2C92145X4442111800001",
        "taskName": "不动产登记𠀾",
        "areaCode": "440100",
        "deptCode": "11440100MB2C92145X",
        "proManager": "李晓𪚥",
        "proManagerNo": "10234",
        "pf": "5",
        "satisfaction": "4",
        "evalDetail": "",
        "writingEvaluation": "",
        "assessTime": "2026-01-01 00:00:00",
        "assessNumber": 1,
        "deviceNo": "D0007",
        "voteId": "D0007:42",
        "rated": 1,
    }


def test_map_carries_no_evaluator_identity():
    for record in records():
        assert set(record) == set(B.RECORD_FIELDS)
        assert "mac" not in json.dumps(record)


def test_map_satisfaction_table_five_is_very_satisfied():
    for stars in (1, 2, 3, 4, 5):
        reasons = ["S01"] if stars <= 2 else []
        assert B.map_record(vote_row(stars=stars, reasons=reasons), None, PROFILE)[
            "satisfaction"] == str(stars)


def test_map_reversed_table_for_gbt39046(tmp_path):
    profile = dict(PROFILE, name="gbt", satisfaction={"5": "1", "4": "2", "3": "3", "2": "4",
                                                      "1": "5"})
    path = tmp_path / "gbt.json"
    path.write_text(json.dumps(profile), encoding="utf-8")
    loaded = B.load_profile(str(path))
    assert B.map_record(vote_row(stars=5), None, loaded)["satisfaction"] == "1"
    assert B.map_record(vote_row(stars=1, reasons=["S01"]), None, loaded)["satisfaction"] == "5"


def test_map_bad_rating_reasons_through_indicator_table():
    profile = copy.deepcopy(PROFILE)
    profile["indicators"]["codes"] = {"S01": "0201", "I02": "0102"}
    record = B.map_record(vote_row(stars=2, reasons=["S01", "I02", "X9"]), None, profile)
    assert record["evalDetail"] == "0201,0102,X9"
    assert record["satisfaction"] == "2" and record["rated"] == 1
    # Reasons stored as JSON text or comma-joined map the same.
    for stored in ('["S01","I02"]', "S01,I02"):
        assert B.map_record(vote_row(stars=1, reasons=stored), None, profile)[
            "evalDetail"] == "0201,0102"
    profile["indicators"]["unknown"] = "reject"
    with pytest.raises(B.MappingError):
        B.map_record(vote_row(stars=2, reasons=["X9"]), None, profile)


def test_map_unrated_record_reports_not_rated():
    record = B.map_record(vote_row(kind="u", stars=0, reasons=[]), prompt_row(), PROFILE)
    assert record["rated"] == 0
    assert record["satisfaction"] == ""
    assert record["evalDetail"] == ""
    assert record["voteId"] == "D0007:42"
    assert record["taskName"] == "不动产登记𠀾"


def test_map_without_prompt_leaves_task_fields_empty():
    record = B.map_record(vote_row(case_no="", staff_no=""), None, PROFILE)
    for field in ("projectNo", "taskCode", "taskName", "areaCode", "deptCode", "proManager",
                  "proManagerNo"):
        assert record[field] == ""


def test_map_refuses_bad_ratings_that_break_the_rules():
    for row in (vote_row(stars=2, reasons=[]), vote_row(stars=1, reasons=None),
                vote_row(stars=0), vote_row(stars=6), vote_row(stars="5"), vote_row(stars=True),
                vote_row(stars=4, reasons=["S01"]), vote_row(kind="x"),
                vote_row(stars=1, reasons="[bad json")):
        with pytest.raises(B.MappingError):
            B.map_record(row, None, PROFILE)


def test_assess_time_in_plus_eight():
    # 2025-12-31 16:00:00 UTC is already New Year's Day in Beijing.
    assert B.map_record(vote_row(t=1767196800), None, PROFILE)["assessTime"] == \
        "2026-01-01 00:00:00"
    assert B.map_record(vote_row(t=1767196799), None, PROFILE)["assessTime"] == \
        "2025-12-31 23:59:59"
    assert B.assess_time(0, PROFILE) == "1970-01-01 08:00:00"
    assert B.assess_time(0, dict(PROFILE, utc_offset_minutes=0)) == "1970-01-01 00:00:00"


# ---------------------------------------------------------------- profiles

def test_profile_errors_are_typed(tmp_path):
    with pytest.raises(B.ProfileError):
        B.load_profile("no-such-profile")
    broken = tmp_path / "broken.json"
    broken.write_text("{not json", encoding="utf-8")
    with pytest.raises(B.ProfileError):
        B.load_profile(str(broken))
    for change in ({"satisfaction": {"5": "5"}}, {"pf": 5}, {"utc_offset_minutes": "8"},
                   {"indicators": {"codes": {}, "unknown": "drop"}}):
        path = tmp_path / "p.json"
        path.write_text(json.dumps(dict(PROFILE, **change)), encoding="utf-8")
        with pytest.raises(B.ProfileError):
            B.load_profile(str(path))
    assert PROFILE["name"] == "national" and PROFILE["pf"] == "5"
