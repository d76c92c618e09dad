# The rating state machine: what the counter screen shows and which record a key press makes.
# Pure logic, portable (MicroPython and CPython): time comes in as `now` in milliseconds, the
# screen is drawn from view(), and a record goes out to the app, which signs it, makes it
# durable in the journal and only then reports back with saved(): "thank you" never shows
# for a vote that is not on flash (DESIGN.md guarantee 1). docs/rating.md is the reference.
#
# One module with the checks of the screen downlinks and the reasons screen: the device's
# heap pays for every module and every name, and these three always load together.
from . import codec

try:
    from micropython import const
except ImportError:  # CPython
    def const(x):  # type: ignore[misc]
        return x

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

# The five physical keys are soft keys on the reasons screen (labels drawn above them).
KEY_UP = 5  # 上
KEY_DOWN = 4  # 下
KEY_TOGGLE = 3  # 选择
KEY_BACK = 2  # 返回
KEY_SUBMIT = 1  # 提交

HINT_NEED_REASON = "need_reason"  # 请至少选择一项: submit pressed with nothing chosen
HINT_MAX_REASONS = "max_reasons"  # a vote carries at most codec.MAX_REASONS codes

# Used while no catalogue (or none with staff reasons for 承诺件 acceptance) has arrived, so
# a citizen can always complete a bad rating: 服务态度, 服务水平, 服务效率 (about the staff
# member), then 办事流程, 服务便民度, 服务事项管理 (about the item). Their labels are
# rendered at build time (firmware/build_ui.py); the device shows only those bitmaps.
# The entries are built when a bad rating needs them, not kept: the device's heap is small.
FALLBACK_CV = "pj-builtin-1"
FALLBACK_CODES = ("PJ01", "PJ02", "PJ03", "PJ04", "PJ05", "PJ06")
_FALLBACK_STAFF = const(3)  # the first three are about the staff member

# Prompt kinds (docs/protocol.md, "Downlink").
_KIND_CN_ACC = const("cn_acc")  # 承诺件 at acceptance: only the staff member is rated
_KINDS = const(("ji", "cn_acc", "cn_dlv"))  # 即办件; 承诺件 at acceptance; at delivery
_AREA_ITEM = const("item")  # a reason about the service item (事项)
_AREA_STAFF = const("staff")  # a reason about the staff member (工作人员)
# Limits of the screen downlinks; the bitmap ones are display.py's and hub/bitmaps.py's.
_MAX_CATALOGUE = const(16)  # reasons in one catalogue
_MAX_TTL_S = const(3600)  # a prompt's ttl in seconds, 1.._MAX_TTL_S
_MAX_BATCH = const(10000)  # `n`, the cases one batch rating covers
_MAX_BITMAP_W = const(1024)
_MAX_BITMAP_H = const(64)
_MAX_BITMAP_BYTES = const(2048)


def fallback(staff_only=False):
    """The built-in reasons as catalogue entries {"c", "a", "bm": None}."""
    out = []
    for i in range(_FALLBACK_STAFF if staff_only else len(FALLBACK_CODES)):
        area = _AREA_STAFF if i < _FALLBACK_STAFF else _AREA_ITEM
        out.append({"c": FALLBACK_CODES[i], "a": area, "bm": None})
    return out


def __getattr__(name):
    # FALLBACK_REASONS, as a tuple built on request (tests and tools read it).
    if name == "FALLBACK_REASONS":
        return tuple(fallback())
    raise AttributeError(name)


# ---- checks of the screen downlinks (`ctx`, `prompt`, `cat`; Rating._valid) ---------------
# A malformed message is refused where it arrives, with a CodecError naming the field,
# instead of breaking a screen later.

def _int(value):
    # bool is an int subclass on CPython; `"n": true` is malformed.
    return isinstance(value, int) and not isinstance(value, bool)


def _bitmap(bm, name):
    # A wire bitmap {"w","h","b"}, or None -- or the device's decoded form (bytes-like: its
    # rows, then width low, width high, height: firmware/display.py), which the device's
    # app gives.
    if bm is None:
        return
    if isinstance(bm, (bytes, bytearray, memoryview)):
        bw = bm[-3] | bm[-2] << 8 if len(bm) > 3 else 0
        bh = bm[-1] if len(bm) > 3 else 0
        if (not 0 < bw <= _MAX_BITMAP_W or not 0 < bh <= _MAX_BITMAP_H
                or len(bm) != (bw + 7) // 8 * bh + 3 or len(bm) > _MAX_BITMAP_BYTES + 3):
            raise codec.CodecError(name + ": bitmap size")
        return
    if not isinstance(bm, dict):
        raise codec.CodecError(name + ": bitmap not an object")
    w = bm.get("w")
    h = bm.get("h")
    b = bm.get("b")
    # isinstance() spelled out (not _int) so the type checker knows w and h are ints below.
    if (not isinstance(w, int) or isinstance(w, bool) or not 0 < w <= _MAX_BITMAP_W
            or not isinstance(h, int) or isinstance(h, bool) or not 0 < h <= _MAX_BITMAP_H
            or (w + 7) // 8 * h > _MAX_BITMAP_BYTES):
        raise codec.CodecError(name + ": bitmap size")
    # Exact padded base64 length of ceil(w/8)*h bytes: a short bitmap would make the screen
    # code read past its end.
    if not isinstance(b, str) or len(b) != ((w + 7) // 8 * h + 2) // 3 * 4:
        raise codec.CodecError(name + ": bitmap data length")


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
        # The reasons screen: the reasons offered, their catalogue version, the cursor, the
        # hint on show and the chosen ones (1 = entry at that index chosen).
        self._entries = ()
        self._cv = ""
        self._cursor = 0
        self._hint = None
        self._picked = bytearray(_MAX_CATALOGUE)
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
        if not self._valid("ctx", ctx):
            return False
        self.ctx = ctx
        # A prompt on screen keeps the staff it was shown with; the new context takes over
        # once the citizen is done.
        if self.state == OFF or self.state == IDLE:
            self._rest()
        self.changes += 1
        return True

    def set_catalogue(self, cat: dict) -> bool:
        """The bad-rating indicator catalogue. Returns False (counted) for a malformed one."""
        if not self._valid("cat", cat):
            return False
        # Reasons on screen stay as they are; the new catalogue applies from the next bad rating.
        self.cat = cat
        return True

    def offer(self, prompt: dict, now: int) -> str:
        """A rating prompt: "shown", "busy", "full" or "bad" (malformed or already answered)."""
        self._now = now
        if self.state == THANKS:
            self._expire(now)
        if not self._valid("prompt", prompt):
            return "bad"
        pid = prompt["pid"]
        state = self.state
        rest = state == OFF or state == IDLE
        shown = self.prompt
        if (state == PROMPT or state == REASONS) and shown is not None and shown["pid"] == pid:
            return "shown"  # a QoS 1 redelivery of the prompt on screen: nothing changes
        if state == FULL or (self.full and rest):
            self.why = "full"
            return "full"
        if not rest:
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
        if self.full and (self.state == OFF or self.state == IDLE):
            self._enter(FULL, self._now)
        elif not self.full and self.state == FULL:
            self._rest()

    # ---- the citizen --------------------------------------------------------------------
    def press(self, stars: int, now: int) -> dict | None:
        """Key `stars` (1..5) went down. Returns a record for the app to save, or None."""
        if not _int(stars) or not 1 <= stars <= 5:
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
            # Offer the catalogue's reasons (or the built-in ones), none chosen yet.
            self.stars = stars
            cat = self.cat
            entries = cat["rs"] if cat else ()
            cv = cat["cv"] if cat else ""
            staff_only = self._staff_only()
            if entries and staff_only:
                # Acceptance of a 承诺件 rates the staff member only; a reason without an
                # area applies to both and stays.
                entries = [e for e in entries if e.get("a") != _AREA_ITEM]
            if not entries:
                entries = fallback(staff_only)
                cv = FALLBACK_CV
            self._close_reasons()
            self._entries = tuple(entries)
            self._cv = cv
            self._enter(REASONS, now)
            return None
        if state != REASONS:
            self.misuse += 1
            return None
        # The reasons screen: the keys move, choose, go back or submit.
        self._hint = None
        count = len(self._entries)
        if stars == KEY_UP:
            self._cursor = (self._cursor - 1) % count
        elif stars == KEY_DOWN:
            self._cursor = (self._cursor + 1) % count
        elif stars == KEY_TOGGLE:
            picked = self._picked
            if picked[self._cursor]:
                picked[self._cursor] = 0
            elif len(self._codes()) < codec.MAX_REASONS:
                picked[self._cursor] = 1
            else:
                self._hint = HINT_MAX_REASONS
        elif stars == KEY_BACK:
            self.stars = 0
            self._close_reasons()
            self._enter(PROMPT, now)  # the prompt's ttl starts again
            return None
        elif self._codes():
            return self._finish(codec.KIND_VOTE, self.stars, self._codes(), self._cv, now)
        else:
            self._hint = HINT_NEED_REASON
        self._enter(REASONS, now)  # the REASONS timeout measures inactivity
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
        self._close_reasons()
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

    # ---- the reasons screen ---------------------------------------------------------------
    def _close_reasons(self):
        self._entries = ()
        self._cv = ""
        self._cursor = 0
        self._hint = None
        for i in range(_MAX_CATALOGUE):
            self._picked[i] = 0

    def _codes(self):
        # Catalogue order, not the order of choosing: the same choice gives the same record.
        out = []  # type: list[str]
        for i in range(len(self._entries)):
            if self._picked[i]:
                out.append(self._entries[i]["c"])
        return out

    # ---- the screen ---------------------------------------------------------------------
    def view(self) -> dict:
        """What the screen must show now; keys documented in docs/rating.md."""
        state = self.state
        busy = state == PROMPT or state == REASONS or state == SAVING
        left_s = None
        if state == PROMPT or state == REASONS:
            limit = self._ttl_ms if state == PROMPT else self.reasons_timeout_ms
            left = limit - self._diff(self._now, self._since)
            left_s = (left + 999) // 1000 if left > 0 else 0
        per_page = self.per_page
        entries = self._entries  # empty outside REASONS
        return {
            "state": state,
            "ctx": self._served if busy else self.ctx,
            "prompt": self.prompt if busy else None,
            "stars": self.stars,
            "staff_only": busy and self._staff_only(),
            "reasons": entries,
            "cv": self._cv,
            "cursor": self._cursor,
            "selected": self._codes(),
            "page": self._cursor // per_page,
            "pages": (len(entries) + per_page - 1) // per_page,
            "per_page": per_page,
            "hint": self._hint,
            "left_s": left_s,
            "full": self.full,
            "qr": self.qr,
        }

    # ---- helpers ------------------------------------------------------------------------
    def _staff_only(self):
        return self.prompt is not None and self.prompt.get("kind") == _KIND_CN_ACC

    def _valid(self, kind, msg):
        # The checks of a `ctx`, `prompt` or `cat` downlink (docs/rating.md): False, counted,
        # with the CodecError's message (naming the field) in `why`, for a malformed one.
        try:
            if not isinstance(msg, dict):
                raise codec.CodecError(kind + ": not an object")
            if kind == "prompt":
                codec.check_id(msg.get("pid"), "pid")
                codec.check_id(msg.get("case", ""), "case", True)
                if msg.get("kind") not in _KINDS:
                    raise codec.CodecError("kind: unknown")
                n = msg.get("n", 1)
                if not _int(n) or not 1 <= n <= _MAX_BATCH:
                    raise codec.CodecError("n: not 1..10000")
                ttl = msg.get("ttl")
                if ttl is not None and (not _int(ttl) or not 1 <= ttl <= _MAX_TTL_S):
                    raise codec.CodecError("ttl: not 1..3600")
                _bitmap(msg.get("item"), "item")
            elif kind == "ctx":
                codec.check_id(msg.get("w", ""), "w", True)
                codec.check_id(msg.get("sn", ""), "sn", True)
                _bitmap(msg.get("name"), "name")
                _bitmap(msg.get("win"), "win")
            else:  # cat
                codec.check_id(msg.get("cv"), "cv")
                entries = msg.get("rs")
                if not isinstance(entries, list) or len(entries) > _MAX_CATALOGUE:
                    raise codec.CodecError("rs: not a list of at most 16 reasons")
                for i in range(len(entries)):
                    entry = entries[i]
                    if not isinstance(entry, dict):
                        raise codec.CodecError("rs: reason not an object")
                    code = codec.check_id(entry.get("c"), "c")
                    for j in range(i):
                        if entries[j]["c"] == code:
                            raise codec.CodecError("c: duplicate code")
                    if entry.get("a") not in (None, _AREA_ITEM, _AREA_STAFF):
                        raise codec.CodecError("a: not item or staff")
                    _bitmap(entry.get("bm"), "bm")
        except codec.CodecError as exc:
            self.bad += 1
            self.why = str(exc)
            return False
        return True

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
