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
# a citizen can always complete a bad rating. The labels are for the build step that renders
# fixed UI text to bitmaps; the device never renders text itself.
FALLBACK_CV = "pj-builtin-1"
FALLBACK_REASONS = (
    {"c": "PJ01", "a": AREA_STAFF, "bm": None, "label": "服务态度"},
    {"c": "PJ02", "a": AREA_STAFF, "bm": None, "label": "服务水平"},
    {"c": "PJ03", "a": AREA_STAFF, "bm": None, "label": "服务效率"},
    {"c": "PJ04", "a": AREA_ITEM, "bm": None, "label": "办事流程"},
    {"c": "PJ05", "a": AREA_ITEM, "bm": None, "label": "服务便民度"},
    {"c": "PJ06", "a": AREA_ITEM, "bm": None, "label": "服务事项管理"},
)

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
            entries = FALLBACK_REASONS
            cv = FALLBACK_CV
            if staff_only:
                entries = [e for e in entries if e["a"] == AREA_STAFF]
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
