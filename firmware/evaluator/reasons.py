# The 差评 reasons screen's logic: which reasons a bad rating offers, the cursor, the choices
# and what the five keys mean while it is on screen. Used by rating.py; portable core.
from . import codec
from .downlink import AREA_ITEM, AREA_STAFF, MAX_CATALOGUE

# The five physical keys are soft keys here (their labels are drawn above them).
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
_FALLBACK_STAFF = 3  # the first three are about the staff member


def fallback(staff_only=False):
    """The built-in reasons as catalogue entries {"c", "a", "bm": None}."""
    out = []
    for i in range(_FALLBACK_STAFF if staff_only else len(FALLBACK_CODES)):
        area = AREA_STAFF if i < _FALLBACK_STAFF else AREA_ITEM
        out.append({"c": FALLBACK_CODES[i], "a": area, "bm": None})
    return out


def __getattr__(name):
    # FALLBACK_REASONS, as a tuple built on request (tests and tools read it).
    if name == "FALLBACK_REASONS":
        return tuple(fallback())
    raise AttributeError(name)

BACK = "back"  # key() results the rating acts on
SUBMIT = "submit"


class Reasons:
    """The reasons offered for one bad rating, the cursor and the chosen ones."""

    def __init__(self):
        self.entries = ()
        self.cv = ""
        self.cursor = 0
        self.hint = None
        self._picked = bytearray(MAX_CATALOGUE)  # 1 = entry at that index chosen

    def open(self, cat, staff_only):
        """Offer the reasons of catalogue `cat` (or the built-in ones), none chosen yet."""
        entries = cat["rs"] if cat else ()
        cv = cat["cv"] if cat else ""
        if entries and staff_only:
            # Acceptance of a 承诺件 rates the staff member only; a reason without an area
            # applies to both and stays.
            entries = [e for e in entries if e.get("a") != AREA_ITEM]
        if not entries:
            entries = fallback(staff_only)
            cv = FALLBACK_CV
        self.entries = tuple(entries)
        self.cv = cv
        self.cursor = 0
        self.hint = None
        self._clear()

    def close(self):
        self.entries = ()
        self.cv = ""
        self.cursor = 0
        self.hint = None
        self._clear()

    def key(self, key):
        """A soft key: moves or toggles here; returns BACK or SUBMIT for the rating, else None."""
        self.hint = None
        count = len(self.entries)
        if key == KEY_UP:
            self.cursor = (self.cursor - 1) % count
        elif key == KEY_DOWN:
            self.cursor = (self.cursor + 1) % count
        elif key == KEY_TOGGLE:
            picked = self._picked
            if picked[self.cursor]:
                picked[self.cursor] = 0
            elif len(self.codes()) < codec.MAX_REASONS:
                picked[self.cursor] = 1
            else:
                self.hint = HINT_MAX_REASONS
        elif key == KEY_BACK:
            return BACK
        elif self.codes():
            return SUBMIT
        else:
            self.hint = HINT_NEED_REASON
        return None

    def codes(self):
        # Catalogue order, not the order of choosing: the same choice gives the same record.
        out = []  # type: list[str]
        for i in range(len(self.entries)):
            if self._picked[i]:
                out.append(self.entries[i]["c"])
        return out

    def _clear(self):
        for i in range(MAX_CATALOGUE):
            self._picked[i] = 0
