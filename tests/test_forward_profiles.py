# The running forwarder speaks each shipped province profile's own transport: its endpoint
# path, its authentication (token or signed requests), its SM4 payload encryption and a
# signature scheme the profile accepts — against the reference receiver, which enforces them.
import hashlib
import os
import time

import pytest

from conftest import free_port, wait_port
from firmware.evaluator import codec
from hub import batch as B
from hub import schemes as S
from hub.forward import Forwarder
from hub.ingest import Ingestor, Uplink
from hub.store import Store
from simulator import province as P

KEY = bytes(range(32))
PROFILES = ("national", "zhejiang", "guangdong")


def _credentials(hub_id):
    return {"hub": hub_id, "token": "tok-" + hub_id, "app_key": "ak-" + hub_id,
            "app_secret": "secret-" + hub_id,
            "sm4_key": hashlib.sha256(hub_id.encode()).hexdigest()[:32]}


def _store_votes(path, n):
    store = Store(path)
    store.conn.execute("INSERT INTO devices (device_id, key_hex, created_at) VALUES (?, ?, ?)",
                       ("D0001", KEY.hex(), "2026-01-01T00:00:00Z"))
    store.conn.commit()
    ups = []
    for seq in range(1, n + 1):
        stars = 1 + seq % 5
        vote = codec.make_vote(KEY, "D0001", seq, 1763712000 + seq, "v", "P%d" % seq,
                               "C-%d" % seq, stars, ["S01"] if stars <= 2 else [], "nat-1",
                               "W01", "7")
        ups.append(Uplink("pj/D0001/up/vote", codec.encode_vote(vote), 0, 1, 0))
    assert Ingestor(store).handle_group(ups).stored == n
    return store


@pytest.mark.parametrize("profile_name", PROFILES)
def test_forwarder_delivers_through_the_profiles_own_transport(tmp_path, profile_name):
    profile = B.load_profile(profile_name)
    scheme = profile.get("signature", {}).get("schemes", ["ed25519"])[0]
    key = S.generate(scheme)
    hub_id = "hall-" + profile_name
    store = _store_votes(str(tmp_path / "hub.db"), 7)
    receiver_store = P.ProvinceStore(os.path.join(str(tmp_path), "province.db"))
    port = free_port()
    server = P.ThreadedReceiver(receiver_store, [key.public_key()], port=port,
                                profiles=P.Profiles.load(),
                                clients=P.Clients([_credentials(hub_id)])).start()
    wait_port(port)
    base = "http://127.0.0.1:%d/api/v1" % port
    try:
        fw = Forwarder(store.path, hub_id, base, key, profile_name=profile_name,
                       batch_max=3, batch_interval_ms=0, retry_max_s=0.2,
                       credentials=_credentials(hub_id))
        for _ in range(100):
            if store.conn.execute("SELECT count(*) FROM votes WHERE forwarded_at IS NULL"
                                  ).fetchone()[0] == 0:
                break
            pause = fw.step()
            if pause:
                time.sleep(min(pause, 0.1))
        fw.stop()
        assert store.conn.execute("SELECT count(*) FROM votes WHERE forwarded_at IS NOT NULL"
                                  ).fetchone()[0] == 7
        stats = receiver_store.db.execute("SELECT count(*) FROM records").fetchone()[0]
        assert stats == 7
        assert P.verify_store(receiver_store)["ok"]
    finally:
        server.stop()
        receiver_store.close()
        store.close()


def test_forwarder_without_credentials_is_refused_by_a_province_that_wants_them(tmp_path):
    key = S.generate("ed25519")
    store = _store_votes(str(tmp_path / "hub.db"), 2)
    receiver_store = P.ProvinceStore(os.path.join(str(tmp_path), "province.db"))
    port = free_port()
    server = P.ThreadedReceiver(receiver_store, [key.public_key()], port=port,
                                profiles=P.Profiles.load(),
                                clients=P.Clients([_credentials("hall-z")])).start()
    wait_port(port)
    try:
        fw = Forwarder(store.path, "hall-z", "http://127.0.0.1:%d/api/v1" % port, key,
                       profile_name="zhejiang", batch_interval_ms=0, retry_max_s=0.2)
        fw.build()
        fw.step()
        fw.stop()
        assert store.conn.execute("SELECT count(*) FROM votes WHERE forwarded_at IS NOT NULL"
                                  ).fetchone()[0] == 0
        assert receiver_store.db.execute("SELECT count(*) FROM records").fetchone()[0] == 0
    finally:
        server.stop()
        receiver_store.close()
        store.close()
