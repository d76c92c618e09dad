"""Forwarding: stored votes -> signed, hash-chained batches -> the provincial system.

One batch in flight, always the oldest unaccepted one. A batch is built from unbatched
votes in received order and PERSISTED (batches row + votes.batch_n, one transaction) before
its first send, so after a crash the very same bytes go out again under the same id, and
the province's idempotent answer settles it. Votes are marked forwarded only when the
province answers that it holds them ("accepted" or "duplicate"). docs/hub.md, "Forwarding
contract", is the reference.
"""
import json
import logging
import os
import random
import threading
import time
import urllib.error
import urllib.request

from . import PingjiaError
from . import batch as batchlib
from .store import Store

log = logging.getLogger("pingjia.hub.forward")

BACKOFF_BASE_S = 0.5
IDLE_WAIT_S = 1.0
ERROR_TEXT_MAX = 300


class ProvinceUnreachable(PingjiaError):
    """No HTTP answer from the province: refused, reset, timed out."""


def http_post(url, body, timeout, headers=None):
    """POST a batch; (status, parsed JSON answer or None). Raises ProvinceUnreachable when
    there is no HTTP answer at all. `headers` are the profile's (auth, encryption)."""
    request = urllib.request.Request(url, data=body, method="POST",
                                     headers=dict(headers or {"Content-Type": "application/json"}))
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            status, raw = response.status, response.read()
    except urllib.error.HTTPError as exc:
        status = exc.code
        try:
            raw = exc.read()
        except OSError:
            raw = b""
    except (urllib.error.URLError, OSError, ValueError) as exc:
        raise ProvinceUnreachable(str(getattr(exc, "reason", exc))) from None
    try:
        answer = json.loads(raw.decode("utf-8")) if raw else None
    except (UnicodeDecodeError, ValueError):
        answer = None
    return status, answer


def backoff_s(attempt, cap_s, rng=random.random):
    """Exponential backoff with jitter: a random point in the upper half of
    min(cap, base * 2^(attempt-1)), so many hubs recovering together do not march in step."""
    ceiling = min(cap_s, BACKOFF_BASE_S * (2 ** min(attempt - 1, 30)))
    return ceiling / 2 + rng() * ceiling / 2


class Forwarder:
    """The forwarding thread. `step()` does one unit of work and is what tests drive."""

    def __init__(self, db_path, hub_id, endpoint, signing_key, profile_name="national",
                 batch_max=200, batch_interval_ms=300, timeout_s=10.0, retry_max_s=60.0,
                 clock=time.time, post=http_post, rng=random.random, credentials=None):
        self.db_path = db_path
        self.hub_id = hub_id
        # The path under the endpoint, auth headers and encryption come from the profile.
        self.base_url = endpoint
        self.credentials = credentials
        self.signing_key = signing_key
        self.profile_name = profile_name
        self.profile = batchlib.load_profile(profile_name)
        self.batch_max = batchlib.batch_limit(self.profile, batch_max)
        self.interval_s = batch_interval_ms / 1000.0
        self.timeout_s = timeout_s
        self.retry_max_s = retry_max_s
        self.clock = clock
        self.post = post
        self.rng = rng
        self.store = None
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread = None
        self._attempt = 0
        self._next_try = 0.0
        self._first_seen = None
        self.last_outcome = None

    @classmethod
    def from_settings(cls, settings, signing_key, **kwargs):
        from .keys import credentials_path

        province = settings.province
        path = credentials_path(settings.signing_key_path)
        if "credentials" not in kwargs and os.path.exists(path):
            kwargs["credentials"] = batchlib.load_credentials(path)
        return cls(settings.db_path, settings.hub.id, province.endpoint, signing_key,
                   profile_name=province.profile, batch_max=province.batch_max,
                   batch_interval_ms=province.batch_interval_ms, timeout_s=province.timeout_s,
                   retry_max_s=province.retry_max_s, **kwargs)

    # -- lifecycle --------------------------------------------------------------------------
    def open(self):
        if self.store is None:
            self.store = Store(self.db_path, clock=self.clock)
        return self

    def start(self):
        self.open()
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="pingjia-forward", daemon=True)
        self._thread.start()

    def stop(self):
        self._stop.set()
        self._wake.set()
        if self._thread:
            self._thread.join(self.timeout_s + 5)
        if self.store:
            self.store.close()
            self.store = None

    def wake(self):
        """New votes are stored: look again now rather than at the next tick."""
        self._wake.set()

    def _run(self):
        while not self._stop.is_set():
            try:
                pause = self.step()
            except Exception:
                log.exception("forwarder: unexpected error")
                pause = 1.0
            if pause > 0:
                self._wake.wait(pause)
                self._wake.clear()

    # -- one unit of work -------------------------------------------------------------------
    def step(self):
        """Send the pending batch or build the next one; returns seconds to wait after."""
        self.open()
        pending = self.store.first_unaccepted_batch()
        if pending is not None:
            now = time.monotonic()
            if now < self._next_try:
                return self._next_try - now
            if self.send(pending):
                self._attempt = 0
                self._next_try = 0.0
                return 0
            self._attempt += 1
            delay = self.retry_max_s if self.store.get_state("chain_error") else \
                backoff_s(self._attempt, self.retry_max_s, self.rng)
            self._next_try = time.monotonic() + delay
            return delay
        count = self.store.unbatched_count()
        if count == 0:
            self._first_seen = None
            return IDLE_WAIT_S
        now = time.monotonic()
        if self._first_seen is None:
            self._first_seen = now
        waited = now - self._first_seen
        if count < self.batch_max and waited < self.interval_s:
            return self.interval_s - waited
        self.build()
        self._first_seen = None
        return 0

    def build(self):
        """Persist the next batch from unbatched votes (received order); its n or None."""
        store = self.open().store
        with store.transaction():
            if store.first_unaccepted_batch() is not None:
                return None  # one batch in flight, never two
            last_n, last_hash = store.last_batch()
            n, prev = last_n + 1, last_hash or batchlib.GENESIS
            rows = store.unbatched_votes(self.batch_max)
            prompts = store.prompts_by_pid([r["pid"] for r in rows])
            records, keys = [], []
            for row in rows:
                prompt = prompts.get(row["pid"])
                if prompt is not None and prompt["device_id"] != row["device_id"]:
                    prompt = None  # a device can only answer its own prompts
                try:
                    records.append(batchlib.map_record(row, prompt, self.profile))
                except batchlib.MappingError as exc:
                    # It can never be sent as it is: keep it out of every batch, count it,
                    # and show it on the status page rather than block the chain.
                    store.hold_vote(row["device_id"], row["seq"], "unmappable")
                    store.count_rejection("unmappable", row["device_id"], None, None)
                    log.error("forwarder: holding back a vote: %s", exc)
                    continue
                keys.append((row["device_id"], row["seq"]))
            if not records:
                return None
            batch = batchlib.make_batch(self.hub_id, n, prev, records, self.profile_name,
                                        created=self.clock())
            signed = batchlib.sign_batch(batch, self.signing_key)
            body = json.dumps(signed, ensure_ascii=False, sort_keys=True, separators=(",", ":"))
            store.save_batch(n, batch["batch_id"], prev, batchlib.batch_hash(batch), body, keys)
        log.info("forwarder: built batch %s with %d records", batch["batch_id"], len(records))
        return n

    def send(self, pending):
        """POST the persisted batch as stored; True when the province settled it."""
        store = self.open().store
        n, batch_id = pending["n"], pending["batch_id"]
        try:
            url, headers, data = batchlib.build_request(
                self.profile, self.base_url, pending["body"].encode("utf-8"), self.credentials)
        except batchlib.CredentialsError as exc:
            return self._failed(n, str(exc))
        try:
            status, answer = self.post(url, data, self.timeout_s, headers)
        except ProvinceUnreachable as exc:
            return self._failed(n, "unreachable: %s" % exc)
        if status == 200 and isinstance(answer, dict) and answer.get("batch_id") == batch_id:
            try:
                self._settle(pending, answer)
            except (TypeError, ValueError, KeyError) as exc:
                return self._failed(n, "unreadable answer: %s" % exc)
            self.last_outcome = "accepted"
            return True
        detail = json.dumps(answer, ensure_ascii=False)[:ERROR_TEXT_MAX] if answer else ""
        if status == 409:
            # The province's chain does not continue from ours (or it holds another body
            # under this id). Building on top would only pile up more of the same: stop,
            # count, shout, and keep offering this batch until someone repairs the chain.
            with store.transaction():
                if not store.get_state("chain_error"):
                    store.bump("chain_errors")
                store.set_state("chain_error", {"batch_id": batch_id, "n": n,
                                                "answer": answer, "at": store.now()})
                store.note_attempt(n, "HTTP 409: %s" % detail)
            log.error("forwarder: province refused the chain at %s: %s", batch_id, detail)
            self.last_outcome = "chain_error"
            return False
        return self._failed(n, "HTTP %d: %s" % (status, detail))

    def _failed(self, n, error):
        with self.store.transaction():
            self.store.note_attempt(n, error[:ERROR_TEXT_MAX])
        log.warning("forwarder: batch %d not delivered: %s", n, error)
        self.last_outcome = "retry"
        return False

    def _settle(self, pending, answer):
        n = pending["n"]
        if not isinstance(answer.get("accepted"), list) or \
                not isinstance(answer.get("duplicate"), list):
            raise ValueError("accepted and duplicate must be lists")
        held = set(answer["accepted"]) | set(answer["duplicate"])
        refused = {}
        for item in answer.get("rejected") or []:
            if not isinstance(item, dict):
                raise ValueError("rejected must list objects")
            refused[str(item.get("id"))] = str(item.get("reason"))[:64]
        store = self.store
        with store.transaction():
            rows = store.conn.execute("SELECT device_id, seq FROM votes WHERE batch_n = ?",
                                      (n,)).fetchall()
            forwarded, flagged = [], []
            for device_id, seq in rows:
                vote_id = "%s:%s" % (device_id, seq)
                if vote_id in held:
                    forwarded.append((device_id, seq))
                    continue
                # Refused or not mentioned: the province does not hold it. It stays in this
                # batch (resending it would break the chain), flagged and counted.
                reason = "province_rejected" if vote_id in refused else "province_silent"
                flag = reason + (":" + refused[vote_id] if vote_id in refused else "")
                flagged.append(((device_id, seq), flag))
                store.count_rejection(reason, device_id, None, None)
            store.accept_batch(n, answer, forwarded, flagged)
            store.note_attempt(n, None)
            store.set_state("province_last_success", store.now())
            store.del_state("chain_error")
        if flagged:
            log.error("forwarder: province did not take %d records of batch %s",
                      len(flagged), pending["batch_id"])
