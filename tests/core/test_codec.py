# Wire codec against the shared test vectors; runs under CPython and MicroPython.
import json

from evaluator import codec


def _load(name):
    with open("tests/vectors/" + name) as f:
        return json.load(f)


def test_every_vector_vote_has_the_canonical_form_and_mac_of_the_spec():
    for case in _load("votes.json")["votes"]:
        vote = codec.decode_vote(case["payload"].encode())
        assert codec.canonical(vote).decode() == case["canonical"]
        assert codec.verify_vote(codec.from_hex(case["key"]), vote)
        rebuilt = codec.make_vote(
            codec.from_hex(case["key"]), vote["d"], vote["s"], vote["t"], vote["k"],
            vote["pid"], vote["case"], vote["stars"], vote["rs"], vote["cv"], vote["w"], vote["sn"])
        assert rebuilt["mac"] == case["mac"]


def test_malformed_payloads_are_rejected_with_the_named_reason():
    for case in _load("bad_votes.json")["payloads"]:
        try:
            codec.decode_vote(case["payload"].encode())
        except codec.CodecError as exc:
            assert case["reason"] in str(exc), (case["reason"], str(exc))
        else:
            raise AssertionError("accepted: " + case["payload"])


def test_forged_votes_do_not_verify():
    data = _load("forged_votes.json")
    key = codec.from_hex(data["key"])
    for payload in data["payloads"]:
        assert not codec.verify_vote(key, codec.decode_vote(payload.encode()))


def test_a_vote_signed_with_another_devices_key_does_not_verify():
    vote = codec.make_vote(b"k" * 32, "D1", 1, 5, "v", "P", "", 4, [], "", "", "")
    assert codec.verify_vote(b"k" * 32, vote)
    assert not codec.verify_vote(b"j" * 32, vote)


def test_hmac_matches_rfc4231_case_2():
    mac = codec.hmac_sha256(b"Jefe", b"what do ya want for nothing?")
    assert codec.to_hex(mac) == "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"


def test_oversized_payload_is_rejected_before_parsing():
    try:
        codec.decode_json(b"{" + b" " * codec.MAX_UPLINK + b"}")
    except codec.CodecError as exc:
        assert "too large" in str(exc)
    else:
        raise AssertionError("accepted")


def test_ack_round_trips_and_rejects_negative():
    assert codec.decode_ack(codec.encode_ack(42)) == 42
    try:
        codec.decode_ack(b'{"s": -1}')
    except codec.CodecError:
        pass
    else:
        raise AssertionError("accepted")
