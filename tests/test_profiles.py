# Province profiles are data: every shipped profile maps and reads back records, and every
# profile x signature scheme round-trips through the reference receiver over real HTTP with
# the profile's own path, authentication and encryption. Adding a province is adding a file
# (the worked example in docs/province.md is the file used here).
import hashlib
import json
import os
import re
import subprocess
import sys
import time
import urllib.error
import urllib.request

import pytest

from conftest import ROOT, free_port, wait_port
from hub import batch as B
from hub import schemes as S
from simulator import province as P

T0 = 1767225600  # 2026-01-01 08:00:00 +08:00, a Thursday

PROMPTS = {
    "P1": dict(task_code="11440100MB2C92145X4442111800001", task_name="不动产登记𠀾",
               dept_code="11440100MB2C92145X", area_code="440100", staff_name="李晓𪚥"),
    "P2": dict(task_code="11440100MB2C92145X4442111800002", task_name="户籍迁移",
               dept_code="11440100MB2C92145Y", area_code="440100", staff_name="王芳"),
}


def vote_rows(device="D0001", start=1):
    rows = []
    for i, (stars, reasons, kind, pid) in enumerate((
            (5, [], "v", "P1"), (4, [], "v", "P2"), (3, [], "v", "P1"),
            (2, ["S01"], "v", "P2"), (1, ["I02", "S04"], "v", "P1"), (0, [], "u", "P2"))):
        rows.append(dict(device_id=device, seq=start + i, t=T0 + 60 * i, kind=kind, pid=pid,
                         case_no="GD2026-%04d" % (start + i), stars=stars, reasons=reasons,
                         window="W0%d" % (1 + i % 2), staff_no="1023%d" % (i % 2)))
    return rows


def records_for(profile, device="D0001", start=1):
    return [B.map_record(row, PROMPTS[row["pid"]], profile) for row in vote_rows(device, start)]


def credentials_for(hub_id):
    return {"hub": hub_id, "token": "tok-" + hub_id, "app_key": "ak-" + hub_id,
            "app_secret": "secret-" + hub_id,
            "sm4_key": hashlib.sha256(hub_id.encode()).hexdigest()[:32]}


def post(url, headers, data):
    request = urllib.request.Request(url, data=data, method="POST", headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def send(base, profile, signed, credentials, **kw):
    body = json.dumps(signed, ensure_ascii=False, sort_keys=True,
                      separators=(",", ":")).encode("utf-8")
    url, headers, data = B.build_request(profile, base, body, credentials, **kw)
    return post(url, headers, data)


class Receiver:
    def __init__(self, folder, trusted, profiles, clients):
        self.store = P.ProvinceStore(os.path.join(folder, "province.db"))
        self.port = free_port()
        self.server = P.ThreadedReceiver(self.store, trusted, port=self.port, profiles=profiles,
                                         clients=clients).start()
        wait_port(self.port)
        self.base = "http://127.0.0.1:%d/api/v1" % self.port

    def get(self, path):
        with urllib.request.urlopen(self.base + path, timeout=30) as response:
            return json.loads(response.read())

    def stop(self):
        self.server.stop()
        self.store.close()


# ---------------------------------------------------------------- the shipped profiles

def test_shipped_profiles_differ_as_provinces_do():
    profiles = B.shipped_profiles()
    assert set(profiles) >= {"national", "zhejiang", "guangdong"}
    for name in ("zhejiang", "guangdong"):
        assert "-style" in profiles[name]["description"]
        assert "not an official specification" in profiles[name]["description"]
    names = {n: B.profile_fields(p) for n, p in profiles.items()}
    for field in ("projectNo", "satisfaction", "assessTime", "voteId"):
        assert len({names[n][field] for n in ("national", "zhejiang", "guangdong")}) == 3
    assert "windowNo" not in names["national"] and names["guangdong"]["windowNo"] == "CKBH"
    # Code tables differ: channel codes, satisfaction numbering, indicator codes.
    assert len({profiles[n]["pf"] for n in ("national", "zhejiang", "guangdong")}) == 3
    assert profiles["guangdong"]["satisfaction"]["5"] == "1"          # GB/T 39046 order
    assert profiles["zhejiang"]["satisfaction"]["5"] == "5"
    assert profiles["zhejiang"]["indicators"]["codes"]["S01"] != \
        profiles["guangdong"]["indicators"]["codes"]["S01"]
    # Transport and cryptography differ too.
    assert {B.endpoint_path(p) for p in profiles.values()} >= \
        {"/batches", "/open/evaluation/records", "/hcp/evaluations/batch"}
    assert [B.auth_type(profiles[n]) for n in ("national", "zhejiang", "guangdong")] == \
        ["token", "app_key", "app_key"]
    assert B.accepted_schemes(profiles["guangdong"]) == ["sm2-sm3"]
    assert B.encryption_cipher(profiles["guangdong"]) == "sm4-cbc"
    assert B.batch_limit(profiles["guangdong"], 200) == 100
    assert B.batch_limit(profiles["national"], 200) == 200


def test_every_profile_maps_and_reads_back_to_the_same_rating():
    national = B.load_profile("national")
    for name, profile in B.shipped_profiles().items():
        for row in vote_rows():
            prompt = PROMPTS[row["pid"]]
            record = B.map_record(row, prompt, profile)
            assert P.check_record(record, profile) is None, (name, record)
            back = B.national_form(record, profile)
            plain = B.map_record(row, prompt, national)
            for field in B.RECORD_FIELDS:
                if field == "pf":
                    assert back[field] == profile["pf"]
                elif field == "evalDetail":
                    codes = profile["indicators"]["codes"]
                    assert back[field] == ",".join(codes.get(c, c) for c in row["reasons"])
                else:
                    assert back[field] == plain[field], (name, field)
            if "windowNo" in B.profile_fields(profile):
                assert back["windowNo"] == row["window"]


def test_guangdong_style_record_in_its_own_words():
    profile = B.load_profile("guangdong")
    row = vote_rows()[4]                       # 1 star, reasons I02 + S04
    record = B.map_record(row, PROMPTS["P1"], profile)
    assert record["MYD"] == "5" and record["PJZB"] == "GD-SX-02|GD-RY-04"
    assert record["PJSJ"] == "20260101080400" and record["PJQD"] == "05"
    assert record["SXMC"] == "不动产登记𠀾" and record["CKBH"] == "W01"
    assert "satisfaction" not in record and "voteId" not in record
    zhejiang = B.map_record(row, PROMPTS["P1"], B.load_profile("zhejiang"))
    assert zhejiang["evaluateTime"] == "2026-01-01T08:04:00+08:00"
    assert zhejiang["evaluateReasons"] == "A0102;B0102" and zhejiang["channel"] == "06"
    # A reason the province has no code for is refused, not sent raw.
    with pytest.raises(B.MappingError):
        B.map_record(dict(row, reasons=["X99"]), None, profile)


def test_record_checks_name_the_profiles_fields():
    profile = B.load_profile("guangdong")
    good = B.map_record(vote_rows()[0], PROMPTS["P1"], profile)
    bad = B.map_record(vote_rows()[4], PROMPTS["P1"], profile)
    cases = [
        ({k: v for k, v in good.items() if k != "MYD"}, "missing_MYD"),
        (dict(good, PJSJ="2026-01-01 08:00:00"), "bad_PJSJ"),
        (dict(good, PJSJ="2026011808000"), "bad_PJSJ"),
        (dict(good, MYD="9"), "satisfaction_range"),
        (dict(bad, PJZB=""), "evalDetail_required"),
        (dict(good, SFPJ=0), "unrated_with_satisfaction"),
        (dict(good, PJBS="no-colon"), "bad_PJBS"),
        (dict(good, CKBH=7), "bad_CKBH"),
    ]
    for record, reason in cases:
        assert P.check_record(record, profile) == reason, record
    zhejiang = B.load_profile("zhejiang")
    record = B.map_record(vote_rows()[0], None, zhejiang)
    assert P.check_record(dict(record, evaluateTime="2026-01-01T08:00:00"), zhejiang) == \
        "bad_evaluateTime"                     # no offset: which day was it?
    assert P.check_record(record, zhejiang) is None


def test_time_formats_format_and_parse_exactly():
    base = B.load_profile("national")
    for fmt, text in (("%Y-%m-%d %H:%M:%S", "2026-01-01 08:00:00"),
                      ("%Y%m%d%H%M%S", "20260101080000"),
                      ("%Y/%m/%d %H:%M:%S", "2026/01/01 08:00:00"),
                      ("iso8601", "2026-01-01T08:00:00+08:00"),
                      ("epoch_ms", T0 * 1000)):
        profile = dict(base, time_format=fmt)
        assert B.format_time(T0, profile) == text
        assert B.parse_time(text, profile) == T0
    iso = dict(base, time_format="iso8601")
    assert B.parse_time("2026-01-01T00:00:00Z", iso) == T0
    assert B.parse_time("2026-01-01T08:00:00", iso) is None
    assert B.parse_time("2026/1/1 8:00:00", dict(base, time_format="%Y/%m/%d %H:%M:%S")) is None
    assert B.parse_time(T0 * 1000 + 1, dict(base, time_format="epoch_ms")) is None
    assert B.parse_time(True, dict(base, time_format="epoch_ms")) is None


def test_malformed_profiles_are_refused_with_the_reason(tmp_path):
    base = B.load_profile("national")
    changes = [
        ({"fields": {"nope": "x"}}, "not a record field"),
        ({"fields": {"projectNo": "pf"}}, "share a name"),
        ({"fields": {"projectNo": "has space"}}, "identifier"),
        ({"time_format": "%Y-%m-%d"}, "time_format"),
        ({"auth": {"type": "password"}}, "auth.type"),
        ({"auth": {"type": "app_key", "mac": "hmac-md5"}}, "auth.mac"),
        ({"auth": {"type": "app_key", "headers": {"secret": "X-S"}}}, "auth.headers"),
        ({"signature": {"schemes": ["rsa"]}}, "signature.schemes"),
        ({"signature": {"schemes": []}}, "signature.schemes"),
        ({"encryption": {"cipher": "aes"}}, "encryption"),
        ({"endpoint": {"path": "/a/../b"}}, "endpoint.path"),
        ({"endpoint": {"path": "batches"}}, "endpoint.path"),
        ({"indicators": {"codes": {}, "separator": "a"}}, "separator"),
        ({"indicators": {"codes": {"S01": "x,y"}}}, "separator"),
        ({"satisfaction": {"5": "1", "4": "1", "3": "3", "2": "4", "1": "5"}}, "differ"),
        ({"batch_max": 0}, "batch_max"),
        ({"name": "has space"}, "name"),
    ]
    for change, words in changes:
        path = tmp_path / "p.json"
        path.write_text(json.dumps(dict(base, **change)), encoding="utf-8")
        with pytest.raises(B.ProfileError, match=re.escape(words)):
            B.load_profile(str(path))


# ---------------------------------------------------------------- through the receiver

def _variants(folder, profiles):
    """The shipped profiles, each accepting every scheme, as files the receiver loads."""
    paths = []
    for name, profile in profiles.items():
        variant = dict(profile, signature={"schemes": list(S.SCHEMES)})
        path = os.path.join(folder, name + ".json")
        with open(path, "w", encoding="utf-8") as f:
            json.dump(variant, f, ensure_ascii=False)
        paths.append(path)
    return paths


def test_every_profile_and_scheme_round_trips_through_the_receiver(tmp_path):
    shipped = {n: B.load_profile(n) for n in ("national", "zhejiang", "guangdong")}
    profiles = P.Profiles.load(_variants(str(tmp_path), shipped))
    hubs, keys = [], []
    for name in shipped:
        for scheme in S.SCHEMES:
            hubs.append(("h-%s-%s" % (name, scheme), name, scheme))
            keys.append(S.generate(scheme))
    clients = P.Clients([credentials_for(hub) for hub, _, _ in hubs])
    receiver = Receiver(str(tmp_path), [k.public_key() for k in keys], profiles, clients)
    try:
        for (hub, name, scheme), key in zip(hubs, keys):
            profile = profiles.by_name[name]
            prev = B.GENESIS
            for n in (1, 2):
                records = records_for(profile, device="D-" + hub, start=1 + 6 * (n - 1))
                signed = B.sign_batch(B.make_batch(hub, n, prev, records, name,
                                                   created=T0), key)
                status, answer = send(receiver.base, profile, signed, credentials_for(hub))
                assert status == 200, (hub, answer)
                assert len(answer["accepted"]) == 6 and not answer["rejected"], answer
                prev = B.batch_hash(signed)
            # What the province stored reads in the profile's own words.
        page = receiver.get("/records?limit=10000")
        assert len(page["records"]) == len(hubs) * 12
        by_hub = {}
        for record in page["records"]:
            by_hub.setdefault(record["batch_id"].rsplit("-", 1)[0], []).append(record)
        for hub, name, _ in hubs:
            fields = B.profile_fields(profiles.by_name[name])
            assert all(fields["satisfaction"] in r for r in by_hub[hub])
        stats = receiver.get("/stats")
        assert stats["batches"] == len(hubs) * 2 and stats["votes"] == len(hubs) * 10
        assert stats["unrated"] == len(hubs) * 2
        assert stats["bad_signatures"] == stats["auth_failures"] == stats["rejected"] == 0
        # Satisfaction is stored as stars whatever the numbering: 5 stars is 5 everywhere.
        levels = dict(receiver.store.db.execute(
            "SELECT vote_id, satisfaction FROM records WHERE vote_id LIKE 'D-h-guangdong-%:1'"))
        assert set(levels.values()) == {5}
        report = P.verify_store(receiver.store)
        assert report["ok"], report["problems"][:3]
    finally:
        receiver.stop()


@pytest.fixture
def shipped_receiver(tmp_path):
    hubs = ("hall-n", "hall-z", "hall-g")
    keys = {"hall-n": S.generate("ed25519"), "hall-z": S.generate("ecdsa-p256"),
            "hall-g": S.generate("sm2-sm3")}
    clients = P.Clients([credentials_for(h) for h in hubs])
    receiver = Receiver(str(tmp_path), [k.public_key() for k in keys.values()],
                        P.Profiles.load(), clients)
    receiver.keys = keys
    yield receiver
    receiver.stop()


def _first_batch(hub, profile_name, key, n=1, prev=B.GENESIS):
    profile = B.load_profile(profile_name)
    return profile, B.sign_batch(B.make_batch(hub, n, prev, records_for(profile, "D-" + hub),
                                              profile_name, created=T0), key)


def test_shipped_profiles_enforce_their_transport(shipped_receiver):
    r = shipped_receiver
    base = r.base
    # Guangdong-style: SM2 only, SM4 required, HMAC-SM3 signed requests.
    profile, signed = _first_batch("hall-g", "guangdong", S.generate("ed25519"))
    status, answer = send(base, profile, signed, credentials_for("hall-g"))
    assert (status, answer["error"]) == (401, "signature") and "does not accept" in \
        answer["detail"]
    profile, signed = _first_batch("hall-g", "guangdong", r.keys["hall-g"])
    plain = dict(profile, encryption=None)
    status, answer = send(base, plain, signed, credentials_for("hall-g"))
    assert (status, answer["error"]) == (400, "encryption")
    wrong_key = dict(credentials_for("hall-g"), sm4_key="11" * 16)
    assert send(base, profile, signed, wrong_key)[0] == 400
    status, answer = send(base, profile, signed, credentials_for("hall-g"))
    assert status == 200 and len(answer["accepted"]) == 6
    # Zhejiang-style: app key + HMAC-SHA256 with timestamp and nonce.
    profile, signed = _first_batch("hall-z", "zhejiang", r.keys["hall-z"])
    creds = credentials_for("hall-z")
    bad_secret = dict(creds, app_secret="guess")
    status, answer = send(base, profile, signed, bad_secret)
    assert (status, answer["error"]) == (401, "auth") and "signature" in answer["detail"]
    status, answer = send(base, profile, signed, creds, now=lambda: time.time() - 1000)
    assert status == 401 and "timestamp" in answer["detail"]
    body = json.dumps(signed, ensure_ascii=False).encode("utf-8")
    url, headers, data = B.build_request(profile, base, body, creds)
    status, answer = post(url, headers, data + b" ")    # same JSON, other bytes
    assert status == 401 and "digest" in answer["detail"]
    assert post(url, headers, data)[0] == 200
    status, answer = post(url, headers, data)              # the very same request again
    assert status == 401 and "replayed" in answer["detail"]
    # Another hub's credentials cannot speak for this hub.
    profile, signed = _first_batch("hall-z", "zhejiang", r.keys["hall-z"], n=2,
                                   prev=B.batch_hash(signed))
    status, answer = send(base, profile, signed, credentials_for("hall-g"))
    assert (status, answer["error"]) == (403, "hub")
    # National: a bearer token.
    profile, signed = _first_batch("hall-n", "national", r.keys["hall-n"])
    url, headers, _ = B.build_request(profile, base, b"{}", None)   # none installed
    assert "Authorization" not in headers and url == base + "/batches"
    status, answer = send(base, profile, signed, None)
    assert (status, answer["error"]) == (401, "auth")
    status, answer = send(base, profile, signed, dict(creds, token="forged"))
    assert (status, answer["detail"]) == (401, "unknown token")
    # A batch posted to another profile's path is refused as such.
    status, answer = send(base, dict(profile, endpoint={"path": "/open/evaluation/records"},
                                     auth=B.load_profile("zhejiang")["auth"]),
                          signed, credentials_for("hall-n"))
    assert status in (400, 401)
    assert send(base, profile, signed, credentials_for("hall-n"))[0] == 200
    with pytest.raises(B.CredentialsError, match="token"):
        B.build_request(profile, base, b"{}", {"app_key": "x"})
    with pytest.raises(B.CredentialsError, match="sm4_key"):     # never sent in the clear
        B.build_request(B.load_profile("guangdong"), base, b"{}", None)
    stats = r.get("/stats")
    assert stats["batches"] == 3 and stats["auth_failures"] >= 7 and stats["records"] == 18
    assert P.verify_store(r.store)["ok"]


# ---------------------------------------------------------------- adding a province

def worked_example():
    """The profile file docs/province.md gives as its worked example."""
    with open(os.path.join(ROOT, "docs", "province.md"), encoding="utf-8") as f:
        text = f.read()
    marker = text.index("<!-- worked example: shandong.json -->")
    block = re.search(r"```json\n(.*?)\n```", text[marker:], re.S)
    return json.loads(block.group(1))


def test_adding_a_province_is_adding_a_file(tmp_path):
    example = worked_example()
    path = tmp_path / "shandong.json"
    path.write_text(json.dumps(example, ensure_ascii=False), encoding="utf-8")
    profile = B.load_profile(str(path))                   # the hub reads it by path
    assert profile["name"] == "shandong"
    key = S.generate(B.preferred_scheme(profile))
    receiver = Receiver(str(tmp_path), [key.public_key()], P.Profiles.load([str(path)]),
                        P.Clients([credentials_for("hall-sd")]))
    try:
        records = records_for(profile, "D-sd")
        signed = B.sign_batch(B.make_batch("hall-sd", 1, B.GENESIS, records, "shandong",
                                           created=T0), key)
        status, answer = send(receiver.base, profile, signed, credentials_for("hall-sd"))
        assert status == 200 and len(answer["accepted"]) == 6, answer
        stored = receiver.get("/records")["records"]
        fields = B.profile_fields(profile)
        assert {fields["satisfaction"], fields["assessTime"], fields["windowNo"]} <= \
            set(stored[0])
        assert P.verify_store(receiver.store)["ok"]
    finally:
        receiver.stop()
    # The record the worked example shows, as the hub really writes it.
    record = B.map_record(vote_rows("D-sd")[4], PROMPTS["P1"], profile)
    shown = {"project_no": "GD2026-0005", "satisfaction": "1", "reasons": "SD102|SD204",
             "eval_time": "2026/01/01 08:04:00", "channel": "07", "window_no": "W01",
             "eval_id": "D-sd:5", "rated": 1}
    assert {k: record[k] for k in shown} == shown


def test_province_cli_serves_an_added_profile_with_clients(tmp_path):
    path = tmp_path / "shandong.json"
    path.write_text(json.dumps(worked_example(), ensure_ascii=False), encoding="utf-8")
    profile = B.load_profile(str(path))
    key = S.generate("sm2-sm3")
    (tmp_path / "hub.pem").write_bytes(S.public_pem(key))
    (tmp_path / "clients.json").write_text(json.dumps({"clients": [credentials_for("hall-sd")]}))
    port = free_port()
    db = str(tmp_path / "p.db")
    cmd = [sys.executable, "-c", "from hub.cli import main; main()", "province"]
    proc = subprocess.Popen(cmd + ["serve", "--port", str(port), "--db", db, "--trust",
                                   str(tmp_path / "hub.pem"), "--profile", str(path),
                                   "--clients", str(tmp_path / "clients.json")],
                            cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        wait_port(port, timeout=30)
        signed = B.sign_batch(B.make_batch("hall-sd", 1, B.GENESIS, records_for(profile),
                                           "shandong", created=T0), key)
        base = "http://127.0.0.1:%d/api/v1" % port
        assert send(base, profile, signed, credentials_for("hall-sd"))[0] == 200
    finally:
        proc.terminate()
        proc.wait(30)
    done = subprocess.run(cmd + ["verify", "--db", db], cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0 and done.stdout.startswith("OK"), done.stdout + done.stderr
