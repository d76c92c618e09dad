# Suspicious votes at the hub (hub/suspicion.py, run by hub/business.Engine on every vote the
# ingest stored): bursts of top ratings at one window, ratings at impossible rates, votes no
# prompt asked for or pressed before their prompt existed, a second record for one prompt.
# Each is flagged, counted and listed for the hall manager; none is deleted, and every one
# still goes to the province.
import pytest

from hub import business, suspicion
from hub.store import Store

W = "W05"


class Hall:
    """A store with a device, prompts and votes written as the ingest would."""

    def __init__(self, path, rules=None):
        self.now = 1741330800   # 2025-03-07 15:00 Beijing
        self.store = Store(path, clock=lambda: self.now)
        with self.store.transaction():
            self.store.conn.execute("INSERT INTO devices (device_id, key_hex, window, retired)"
                                    " VALUES ('D1', '00', ?, 0)", (W,))
        self.engine = business.Engine(self.store, None, clock=lambda: self.now)
        if rules:
            self.engine.checker.rules = dict(self.engine.checker.rules, **rules)
        self.seq = 0

    def prompt(self, case_no="C", kind="ji"):
        with self.store.transaction():
            return self.store.create_prompt("D1", W, case_no, "", "", "", kind, 1, "s1", "")

    def vote(self, pid, stars=5, t=None, kind="v"):
        self.seq += 1
        with self.store.transaction():
            self.store.insert_vote({"d": "D1", "s": self.seq, "t": self.now if t is None else t,
                                    "k": kind, "pid": pid, "case": "C%d" % self.seq,
                                    "stars": stars if kind == "v" else 0,
                                    "rs": ["S01"] if kind == "v" and stars <= 2 else [],
                                    "cv": "nat-2024.1" if kind == "v" and stars <= 2 else "",
                                    "w": W, "sn": "s1", "mac": "ab" * 32})
        return self.seq

    def served(self, stars=5, gap_s=90):
        """One citizen served and rated, gap_s after the one before."""
        self.now += gap_s
        return self.vote(self.prompt("C%d" % (self.seq + 1)), stars)

    def flags(self, kind=None):
        return {(f["seq"], f["kind"]) for f in suspicion.listing(self.store, kind=kind,
                                                                  limit=1000)}

    def vote_flags(self, seq):
        return self.store.vote("D1", seq)["flags"]


@pytest.fixture
def hall(tmp_path):
    hall = Hall(str(tmp_path / "hub.db"))
    yield hall
    hall.store.close()


def test_an_honest_day_at_the_counter_raises_no_flag(hall):
    for i in range(30):
        hall.served(stars=5 if i % 4 else 3, gap_s=200)
    hall.engine.step()
    assert hall.flags() == set()
    assert suspicion.counts(hall.store) == {k: 0 for k in suspicion.KINDS}


def test_a_burst_of_top_ratings_at_one_window_is_flagged_not_deleted(hall):
    for _ in range(9):
        hall.served(stars=5, gap_s=65)
    hall.engine.step()
    assert hall.flags() == set()          # nine within ten minutes: not yet a burst
    tenth = hall.served(stars=5, gap_s=65)
    hall.engine.step()
    burst = hall.flags("burst")
    assert (tenth, "burst") in burst and len(burst) == 10
    assert hall.vote_flags(tenth) == "suspect:burst"
    assert hall.store.conn.execute("SELECT count(*) FROM votes").fetchone()[0] == 10
    assert suspicion.counts(hall.store)["burst"] == 10
    assert hall.store.counters()["suspect_burst"] == 10
    # A later step does not flag them twice.
    hall.engine.step()
    assert suspicion.counts(hall.store)["burst"] == 10


def test_ratings_faster_than_a_counter_can_serve_are_flagged(hall):
    seqs = [hall.served(stars=4, gap_s=10) for _ in range(4)]
    hall.engine.step()
    assert hall.flags("rate") == {(s, "rate") for s in seqs}
    entry = suspicion.listing(hall.store, kind="rate")[0]
    assert entry["window"] == W and entry["vote_id"] == "D1:%d" % entry["seq"]
    assert "4 visits within 60 s" in entry["detail"]


def test_one_visits_several_ratings_count_once_for_the_rate(hall):
    # A per-item visit: four prompts of one visit answered in quick succession.
    hall.now += 100
    with hall.store.transaction():
        hall.store.conn.execute(
            "INSERT INTO visits (id, mode, kind, n_cases, device_id, window, ttl, created_t) "
            "VALUES (7, 'per_item', 'ji', 4, 'D1', ?, 60, ?)", (W, hall.now))
    for i in range(4):
        pid = hall.prompt("PI-%d" % i)
        with hall.store.transaction():
            hall.store.conn.execute(
                "INSERT INTO cases (case_no, kind, visit_id, position, pid, status, created_t)"
                " VALUES (?, 'ji', 7, ?, ?, 'shown', ?)", ("PI-%d" % i, i + 1, pid, hall.now))
        hall.now += 5
        hall.vote(pid, stars=4)
    hall.engine.step()
    assert hall.flags("rate") == set()


def test_votes_no_prompt_asked_for_or_pressed_before_it_are_flagged(hall):
    stray = hall.vote("P999", stars=5)
    pid = hall.prompt("EARLY")
    early = hall.vote(pid, stars=5, t=hall.now - 600)
    again = hall.vote(pid, stars=1)
    hall.engine.step()
    assert hall.flags() == {(stray, "no_prompt"), (early, "before_prompt"),
                            (again, "repeat_pid")}
    assert hall.vote_flags(again) == "suspect:repeat_pid"
    assert [f["kind"] for f in suspicion.listing(hall.store, limit=2)] == ["repeat_pid",
                                                                          "before_prompt"]
    newest = suspicion.listing(hall.store, limit=1)[0]["id"]
    assert len(suspicion.listing(hall.store, before_id=newest)) == 2


def test_unrated_records_and_the_hubs_own_records_are_never_flagged(hall):
    for _ in range(6):
        hall.now += 5
        hall.vote(hall.prompt(), kind="u")
    hall.engine.step()
    assert hall.flags() == set()
    checker = suspicion.Checker(hall.store, dict(hall.engine.checker.rules, rate_max=1),
                                is_derived=lambda device_id: device_id == "D1")
    row = dict(hall.store.conn.execute("SELECT * FROM votes ORDER BY seq DESC").fetchone())
    row.update(kind="v", stars=5)
    assert [k for k, _d, _keys in checker.check(row, hall.store.prompt(row["pid"]))] == []


def test_a_vote_the_flow_cannot_settle_does_not_hold_up_the_ones_after_it(hall, monkeypatch):
    settle = hall.engine._outcome
    broken = hall.served(stars=3, gap_s=200)

    def outcome(vote, now):
        if vote["seq"] == broken:
            raise ValueError("a row the flow does not understand")
        return settle(vote, now)

    monkeypatch.setattr(hall.engine, "_outcome", outcome)
    stray = hall.vote("P-none", stars=5)
    hall.engine.step()
    assert hall.store.counters()["business_errors"] == 1
    assert hall.flags() == {(stray, "no_prompt")}      # the vote after it was still checked
    assert hall.store.get_state("business_vote_rowid") == \
        hall.store.conn.execute("SELECT max(rowid) FROM votes").fetchone()[0]
    hall.engine.step()
    assert hall.store.counters()["business_errors"] == 1
    assert hall.store.conn.execute("SELECT count(*) FROM votes").fetchone()[0] == 2
