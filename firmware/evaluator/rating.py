# The rating state machine: what the counter screen shows and which record a key press makes.
# Pure logic, portable (MicroPython and CPython): time comes in as `now` in milliseconds, the
# screen is drawn from view(), and a record goes out to the app, which signs it, makes it
# durable in the journal and only then reports back with saved(): "thank you" never shows
# for a vote that is not on flash (DESIGN.md guarantee 1). docs/rating.md is the reference.
# The reasons screen lives in reasons.py and the downlink checks in downlink.py (small
# modules also compile from source inside a 64 KB heap, for boards loaded with .py files).
from . import codec
from .downlink import KIND_CN_ACC, check_catalogue, check_context, check_prompt, is_int
from .reasons import (BACK, SUBMIT, FALLBACK_CODES, FALLBACK_CV,  # noqa: F401
                      HINT_MAX_REASONS, HINT_NEED_REASON, KEY_BACK, KEY_DOWN, KEY_SUBMIT,
                      KEY_TOGGLE, KEY_UP, Reasons, fallback)

try:
    from time import ticks_diff as _ticks_diff  # MicroPython: `now` is time.ticks_ms(), which wraps
except ImportError:  # CPython: a monotonic millisecond count never wraps
    def _ticks_diff(a, b):  # type: ignore[no-redef]
        return a - b

OFF = "OFF"  # nobody signed in at the window: 暂停服务
IDLE = "IDLE"  # window, staff name and 工号 shown, waiting for a service to finish
PROMPT = "PROMPT"  # item, case number and staff shown; asks for 1..5 stars
REASONS = "REASONS"  # a bad rating: the citizen chooses at least one reason
SAVING = "SAVING"  # a record is with the app, waiting for the durable journal write
THANKS = "THANKS"  # 谢谢您的评价, only after the record is durable
FULL = "FULL"  # the journal has no room: ratings refused, the QR fallback shown

ANSWERED_MEMORY = 16  # prompt ids remembered as answered (one prompt, one record)


def __getattr__(name):
    # FALLBACK_REASONS (reasons.py) is built on request, not kept on the device's heap.
    if name == "FALLBACK_REASONS":
        return tuple(fallback())
    raise AttributeError(name)


class Rating:
    """One counter's rating flow; see docs/rating.md for states, keys and the view dict."""

    def __init__(self, prompt_timeout_ms=60000, reasons_timeout_ms=60000, thanks_ms=3000,
                 rapid_ms=300, per_page=3, diff=None):
        self.prompt_timeout_ms = prompt_timeout_ms
        self.reasons_timeout_ms = reasons_timeout_ms
        self.thanks_ms = thanks_ms
        self.rapid_ms = rapid_ms
        self.per_page = per_page  # reasons the screen lists at once (view "page"/"pages")
        self._diff = diff or _ticks_diff
        self.state = OFF
        self.ctx = None  # the last accepted `ctx` downlink
        self.cat = None  # the last accepted `cat` downlink
        self.full = False  # the app says the journal has no room
        self.qr = None  # QR fallback bitmap for FULL, set by the app from its config
        self.prompt = None  # the prompt on screen (PROMPT, REASONS, SAVING)
        self._served = None  # ctx when the prompt was shown: the staff who served
        self._ttl_ms = prompt_timeout_ms
        self.stars = 0  # 1 or 2 while reasons are chosen; the record's stars in SAVING and THANKS
        self.reasons = Reasons()
        self._kind = ""  # kind of the record in SAVING
        self._since = 0  # when the running timeout started
        self._now = 0
        self._last_press = None
        self._answered = [""] * ANSWERED_MEMORY  # ring of prompt ids with a durable record
        self._answered_next = 0
        # Counters (DESIGN.md guarantee 5: nothing is dropped silently).
        self.misuse = 0  # presses that made nothing: wrong state or too rapid
        self.rapid = 0  # presses closer than rapid_ms to the one before
        self.votes = 0  # durable votes (k "v")
        self.unrated = 0  # durable unrated records (k "u")
        self.refused = 0  # records the app could not make durable (saved(False))
        self.bad = 0  # malformed ctx/cat/prompt and refused duplicate prompts
        self.why = ""  # reason of the last refusal, for logs (no personal data)
        self.changes = 0  # bumps whenever the state changes (view() compares equal otherwise)

    # ---- downlinks ----------------------------------------------------------------------
    def set_context(self, ctx: dict) -> bool:
        """Who is signed in at the window. Returns False (counted) for a malformed ctx."""
        if not self._valid(check_context, ctx):
            return False
        self.ctx = ctx
        # A prompt on screen keeps the staff it was shown with; the new context takes over
        # once the citizen is done.
        if self.state in (OFF, IDLE):
            self._rest()
        self.changes += 1
        return True

    def set_catalogue(self, cat: dict) -> bool:
        """The bad-rating indicator catalogue. Returns False (counted) for a malformed one."""
        if not self._valid(check_catalogue, cat):
            return False
        # Reasons on screen stay as they are; the new catalogue applies from the next bad rating.
        self.cat = cat
        return True

    def offer(self, prompt: dict, now: int) -> str:
        """A rating prompt: "shown", "busy", "full" or "bad" (malformed or already answered)."""
        self._now = now
        if self.state == THANKS:
            self._expire(now)
        if not self._valid(check_prompt, prompt):
            return "bad"
        pid = prompt["pid"]
        state = self.state
        shown = self.prompt
        if state in (PROMPT, REASONS) and shown is not None and shown["pid"] == pid:
            return "shown"  # a QoS 1 redelivery of the prompt on screen: nothing changes
        if state == FULL or (self.full and state in (OFF, IDLE)):
            self.why = "full"
            return "full"
        if state not in (OFF, IDLE):
            self.why = "busy"
            return "busy"
        if pid in self._answered:
            self.bad += 1
            self.why = "pid: already answered"
            return "bad"
        self.prompt = prompt
        self._served = self.ctx
        ttl = prompt.get("ttl")
        self._ttl_ms = ttl * 1000 if ttl else self.prompt_timeout_ms
        self._enter(PROMPT, now)
        return "shown"

    def set_full(self, flag: bool) -> None:
        """The app's journal has no room (True) or room again (False)."""
        self.full = bool(flag)
        if self.full and self.state in (OFF, IDLE):
            self._enter(FULL, self._now)
        elif not self.full and self.state == FULL:
            self._rest()

    # ---- the citizen --------------------------------------------------------------------
    def press(self, stars: int, now: int) -> dict | None:
        """Key `stars` (1..5) went down. Returns a record for the app to save, or None."""
        if not is_int(stars) or not 1 <= stars <= 5:
            raise ValueError("stars: not 1..5")
        self._now = now
        record = self._expire(now)
        last = self._last_press
        self._last_press = now
        if record is not None:
            self.misuse += 1  # the prompt had already timed out: the press came too late
            return record
        if last is not None and self._diff(now, last) < self.rapid_ms:
            # Bounce, a palm on the keys or a child drumming: never a vote, never a soft key.
            self.rapid += 1
            self.misuse += 1
            return None
        state = self.state
        if state == PROMPT:
            if stars >= 3:
                return self._finish(codec.KIND_VOTE, stars, [], "", now)
            self.stars = stars
            self.reasons.open(self.cat, self._staff_only())
            self._enter(REASONS, now)
            return None
        if state == REASONS:
            action = self.reasons.key(stars)
            if action == SUBMIT:
                return self._finish(codec.KIND_VOTE, self.stars, self.reasons.codes(),
                                    self.reasons.cv, now)
            if action == BACK:
                self.stars = 0
                self.reasons.close()
                self._enter(PROMPT, now)  # the prompt's ttl starts again
                return None
            self._enter(REASONS, now)  # the REASONS timeout measures inactivity
            return None
        self.misuse += 1
        return None

    # ---- the app ------------------------------------------------------------------------
    def saved(self, ok: bool, now: int) -> bool:
        """The app's journal write for the record in SAVING: ok -> THANKS, not ok -> FULL."""
        prompt = self.prompt
        if self.state != SAVING or prompt is None:
            return False  # nothing was handed out: an app bug, ignored
        self._now = now
        unrated = self._kind == codec.KIND_UNRATED
        if ok:
            self._answered[self._answered_next] = prompt["pid"]
            self._answered_next = (self._answered_next + 1) % ANSWERED_MEMORY
            if unrated:
                self.unrated += 1
            else:
                self.votes += 1
        else:
            # Not on flash, so not answered: the hub may offer the prompt again later.
            self.refused += 1
            self.full = True
        self.prompt = None
        self._served = None
        self.reasons.close()
        if ok and not unrated:
            self._enter(THANKS, now)
        else:
            self._rest()  # FULL after a refusal; nobody to thank for an unrated record
        return True

    def tick(self, now: int) -> dict | None:
        """Timeouts. Returns the unrated record of a prompt nobody answered, or None."""
        self._now = now
        return self._expire(now)

    def _expire(self, now):
        state = self.state
        elapsed = self._diff(now, self._since)
        if state == THANKS and elapsed >= self.thanks_ms:
            self._rest()
        elif ((state == PROMPT and elapsed >= self._ttl_ms)
              or (state == REASONS and elapsed >= self.reasons_timeout_ms)):
            # A bad rating without a reason is not a valid vote, so an abandoned reasons
            # screen ends as "unrated" too; the hub's default-rating rule applies to it.
            return self._finish(codec.KIND_UNRATED, 0, [], "", now)
        return None

    def _finish(self, kind, stars, codes, cv, now):
        served = self._served or {}
        prompt = self.prompt or {}  # never None here: only PROMPT and REASONS finish
        self._kind = kind
        self.stars = stars
        self._enter(SAVING, now)
        return {"k": kind, "pid": prompt["pid"], "case": prompt.get("case", ""), "stars": stars,
                "rs": codes, "cv": cv, "w": served.get("w", ""), "sn": served.get("sn", ""),
                "t_ms": now}

    # ---- the screen ---------------------------------------------------------------------
    def view(self) -> dict:
        """What the screen must show now; keys documented in docs/rating.md."""
        state = self.state
        busy = state in (PROMPT, REASONS, SAVING)
        left_s = None
        if state == PROMPT or state == REASONS:
            limit = self._ttl_ms if state == PROMPT else self.reasons_timeout_ms
            left = limit - self._diff(self._now, self._since)
            left_s = (left + 999) // 1000 if left > 0 else 0
        r = self.reasons  # closed (empty) outside REASONS
        per_page = self.per_page
        return {
            "state": state,
            "ctx": self._served if busy else self.ctx,
            "prompt": self.prompt if busy else None,
            "stars": self.stars,
            "staff_only": busy and self._staff_only(),
            "reasons": r.entries,
            "cv": r.cv,
            "cursor": r.cursor,
            "selected": r.codes(),
            "page": r.cursor // per_page,
            "pages": (len(r.entries) + per_page - 1) // per_page,
            "per_page": per_page,
            "hint": r.hint,
            "left_s": left_s,
            "full": self.full,
            "qr": self.qr,
        }

    # ---- helpers ------------------------------------------------------------------------
    def _staff_only(self):
        return self.prompt is not None and self.prompt.get("kind") == KIND_CN_ACC

    def _valid(self, check, msg):
        try:
            check(msg)
            return True
        except codec.CodecError as exc:
            self.bad += 1
            self.why = str(exc)
            return False

    def _enter(self, state, now):
        self.state = state
        self._since = now
        self.changes += 1

    def _rest(self):
        # Where the device goes when no citizen is busy with it.
        self.stars = 0
        if self.full:
            state = FULL
        elif self.ctx and self.ctx.get("sn"):
            state = IDLE
        else:
            state = OFF
        self._enter(state, self._now)
