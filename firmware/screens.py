# The counter screens: draw(fb, view, now) paints one state of the rating state machine
# (evaluator/rating.py, view() documented in docs/rating.md) into the 1-bit framebuffer.
# docs/screens.md shows every screen.
#
# Layout is for the 256x64 panel first; narrower panels (the 128x64 SSD1306) get compact
# fallbacks: star pips instead of level labels, no side panel. Text never gets cut
# silently: an item name wider than the screen scrolls (pause, glide, pause, jump back),
# a long case number scrolls by characters, a reason row wider than its column scrolls
# while the cursor is on it and shows a "more" mark otherwise.
#
# Chinese comes only as bitmaps: wire bitmaps from the hub (names, item, reasons) and the
# build-time strings in ui_text.py. ASCII (工号 digits, case numbers, counters) uses
# framebuf's 8x8 font.
try:
    from time import ticks_diff
except ImportError:  # CPython type checkers
    def ticks_diff(a, b):  # type: ignore[no-redef]
        return a - b

try:
    from micropython import const
except ImportError:
    def const(x):  # type: ignore[misc]
        return x

import framebuf

import ui_text as T
from display import blit_bitmap, blit_ui, load_bitmap

_ROW = const(16)  # one line of hub text
_LABEL_Y_GAP = const(2)  # a 12 px label sits 2 px down in a 16 px row
_TEXT_Y_GAP = const(4)  # 8x8 text sits 4 px down in a 16 px row
_PAUSE_MS = const(1500)  # a scrolling text rests this long at each end
_SPEED = const(32)  # scrolling speed, pixels per second
_CHAR_MS = const(400)  # a scrolling 8x8 string moves one character this often
_PANEL_W = const(84)  # REASONS side panel on wide screens
_BOX = const(9)  # check box size
_WIDE = const(200)  # screens at least this wide get the full layout

# Where each scrolling region started: [key, start ms] for the item row and the reason
# under the cursor; a new bitmap (another prompt, cursor moved) starts from the left.
_scroll = [None, 0, None, 0]


def marquee(total, visible, elapsed_ms):
    """Left offset of a `total`-pixel strip seen through a `visible`-pixel window.

    0 for the first _PAUSE_MS, then gliding at _SPEED px/s to total - visible, a pause
    there, then back to 0. Over one cycle every column of the strip is shown.
    """
    travel = total - visible
    if travel <= 0:
        return 0
    glide = travel * 1000 // _SPEED
    t = elapsed_ms % (_PAUSE_MS + glide + _PAUSE_MS)
    if t < _PAUSE_MS:
        return 0
    t -= _PAUSE_MS
    if t >= glide:
        return travel
    return t * _SPEED // 1000


def _elapsed(slot, key, now):
    # Scrolling starts when its content first appears, not at some arbitrary phase.
    if _scroll[slot] is not key:
        _scroll[slot] = key
        _scroll[slot + 1] = now
        return 0
    return ticks_diff(now, _scroll[slot + 1])


# Label positions over the keys, filled in place: drawing allocates nothing for them.
_KEYS = const(5)
_WIDTHS = [0] * _KEYS
_XS = [0] * _KEYS


def _spread(widths, total, gap, xs=_XS):
    """x of each label, centred over evenly spaced keys, pushed apart to `gap`.

    Fills and returns xs, or returns None when the labels cannot fit side by side.
    """
    n = len(widths)
    need = gap * (n - 1)
    for w in widths:
        need += w
    if need > total:
        return None
    for i in range(n):
        centre = (2 * i + 1) * total // (2 * n)
        xs[i] = min(max(0, centre - widths[i] // 2), total - widths[i])
    for i in range(1, n):  # push right where a label runs into its left neighbour
        least = xs[i - 1] + widths[i - 1] + gap
        if xs[i] < least:
            xs[i] = least
    for i in range(n - 1, -1, -1):  # then left where that ran past the edge or a neighbour
        most = total - widths[i] if i == n - 1 else xs[i + 1] - gap - widths[i]
        if xs[i] > most:
            xs[i] = most
    return xs


def _digits(n):
    count = 1
    while n >= 10:
        n //= 10
        count += 1
    return count


def _number(fb, n, x, y, c=1):
    """Draw a non-negative int in the 8x8 font without building a string; returns x after."""
    x += 8 * _digits(n)
    end = x
    while True:
        x -= 8
        fb.text("0123456789"[n % 10], x, y, c)
        n //= 10
        if not n:
            return end


def _text(fb, s, x, y, c=1):
    fb.text(s, x, y, c)
    return x + 8 * len(s)


def _text_scroll(fb, s, x, y, max_chars, now, slot):
    # A string of 8x8 characters that may be longer than its room: whole characters slide.
    if len(s) <= max_chars:
        return _text(fb, s, x, y)
    if max_chars < 1:
        return x
    travel = len(s) - max_chars
    t = _elapsed(slot, s, now) % (2 * _PAUSE_MS + travel * _CHAR_MS)
    first = 0 if t < _PAUSE_MS else min(travel, (t - _PAUSE_MS) // _CHAR_MS)
    return _text(fb, s[first:first + max_chars], x, y)


# A 9x9 star, in the (buffer, w, h, format) form blit() takes without copying.
_STAR = (b"\x08\x00\x08\x00\x1c\x00\xff\x80\x7f\x00\x3e\x00\x3e\x00\x63\x00\x41\x00",
         9, 9, framebuf.MONO_HLSB)
# Palette that draws ink as 0: a star on a lit (inverted) background.
_DARK = framebuf.FrameBuffer(bytearray(1), 2, 1, framebuf.MONO_HLSB)


def _seconds(fb, n, x, y):
    # "57s": the seconds left before the prompt ends unrated.
    fb.text("s", _number(fb, n, x, y), y, 1)


def _star(fb, x, y, c=1):
    if c:
        fb.blit(_STAR, x, y, 0)
    else:
        fb.blit(_STAR, x, y, 0, _DARK)


def _key_row(fb, labels, y, chosen=-1):
    """The labels over the five keys; label `chosen` (index) drawn inverted."""
    widths = _WIDTHS
    for i in range(_KEYS):
        widths[i] = labels[i][1]
    xs = _spread(widths, fb.width, 4)
    if xs is None:
        _pips(fb, y, chosen)
        return
    for i in range(len(labels)):
        if i == chosen:
            fb.fill_rect(xs[i] - 2, y - 1, widths[i] + 4, labels[i][2] + 1, 1)
        blit_ui(fb, labels[i], xs[i], y, i == chosen)


def _pips(fb, y, chosen):
    # 5..1 stars as a digit and a star per key.
    n = 5
    for i in range(n):
        centre = (2 * i + 1) * fb.width // (2 * n)
        if i == chosen:
            fb.fill_rect(centre - 12, y - 1, 24, 12, 1)
        c = 0 if i == chosen else 1
        _number(fb, 5 - i, centre - 10, y + 2, c)
        _star(fb, centre + 1, y + 1, c)


def _bitmap_or_text(fb, bm, fallback, x, y):
    """Draw a hub bitmap, or the ASCII fallback (an id) when the hub sent none."""
    if bm is not None:
        return x + blit_bitmap(fb, bm, x, y)
    return _text(fb, fallback, x, y + _TEXT_Y_GAP)


def _staff(fb, ctx, x, y):
    """Staff name, 工号 and number on a 16 px row from x; returns the x after it."""
    name = ctx.get("name")
    if name is not None:
        x += blit_bitmap(fb, name, x, y) + 6
    sn = ctx.get("sn") or ""
    if sn:
        x += blit_ui(fb, T.STAFF_NO, x, y + _LABEL_Y_GAP) + 2
        x = _text(fb, sn, x, y + _TEXT_Y_GAP)
    return x


def _width_of_staff(ctx):
    w = 0
    name = ctx.get("name")
    if name is not None:
        w += name["w"] + 6
    sn = ctx.get("sn") or ""
    if sn:
        w += T.STAFF_NO[1] + 2 + 8 * len(sn)
    return w


def _centre_x(fb, w):
    return max(0, (fb.width - w) // 2)


def _window(fb, ctx, y):
    """窗口 + window name (bitmap, or the window id); returns True if anything was drawn."""
    win = ctx.get("win")
    w_id = ctx.get("w") or ""
    if win is None and not w_id:
        return False
    x = blit_ui(fb, T.WINDOW, 0, y + _LABEL_Y_GAP) + 4
    _bitmap_or_text(fb, win, w_id, x, y)
    return True


# ---- the screens ------------------------------------------------------------------------
def draw_off(fb, view, now):
    ctx = view.get("ctx") or {}
    top = _window(fb, ctx, 0)
    t = T.PAUSED
    y = 24 if top else (fb.height - t[2]) // 2
    blit_ui(fb, t, _centre_x(fb, t[1]), y)


def draw_idle(fb, view, now):
    ctx = view.get("ctx") or {}
    _window(fb, ctx, 0)
    w = _width_of_staff(ctx)
    if w <= fb.width:
        _staff(fb, ctx, _centre_x(fb, w), 22)
    else:  # narrow panel: name on one row, 工号 below the hint's row
        name = ctx.get("name")
        _staff(fb, {"name": name}, 0, 18)
        _staff(fb, {"sn": ctx.get("sn")}, 0, 32)
    t = T.PLEASE_RATE
    blit_ui(fb, t, _centre_x(fb, t[1]), fb.height - t[2])


def _item_row(fb, view, now):
    prompt = view.get("prompt") or {}
    item = prompt.get("item")
    if item is None:
        blit_ui(fb, T.PLEASE_RATE, 0, 0)
        return False
    load_bitmap(item)
    off = marquee(item["w"], fb.width, _elapsed(0, item, now))
    blit_bitmap(fb, item, -off, 0)
    return item["w"] > fb.width


def _batch_width(n):
    return T.BATCH_OPEN[1] + 2 + 8 * _digits(n) + 2 + T.BATCH_CLOSE[1]


def _batch(fb, n, x, y):
    x += blit_ui(fb, T.BATCH_OPEN, x, y + _LABEL_Y_GAP) + 2
    x = _number(fb, n, x, y + _TEXT_Y_GAP) + 2
    return x + blit_ui(fb, T.BATCH_CLOSE, x, y + _LABEL_Y_GAP)


def draw_prompt(fb, view, now, saving=False):
    W = fb.width
    prompt = view.get("prompt") or {}
    ctx = view.get("ctx") or {}
    moving = _item_row(fb, view, now)

    # Row 2: who served, and on the right the batch size and the seconds left. Where the
    # row is too narrow the countdown goes first, then 工号 (it is on the IDLE screen).
    y2 = 18
    n = prompt.get("n", 1) or 1
    batch_w = _batch_width(n) + 6 if n > 1 else 0
    staff_w = _width_of_staff(ctx)
    left_s = view.get("left_s")
    left_w = 0
    if left_s is not None and not saving:
        left_w = 8 * (_digits(left_s) + 1)
        if staff_w + batch_w + left_w + 6 > W:
            left_w = 0
    right = W
    if left_w:
        right -= left_w
        _seconds(fb, left_s, right, y2 + _TEXT_Y_GAP)
        right -= 6
    if batch_w:
        right -= batch_w
        _batch(fb, n, right + 6, y2)
    if staff_w <= right:
        _staff(fb, ctx, 0, y2)
    elif ctx.get("name") is not None:
        blit_bitmap(fb, ctx["name"], 0, y2)

    # Row 3: the case number, and what kind of rating this is (or the saving note).
    y3 = 34
    note = None
    if saving:
        note = T.WAIT
    elif view.get("staff_only"):
        note = T.STAFF_ONLY
    elif prompt.get("kind") == "cn_dlv":
        note = T.DELIVERY
    room = W
    if note is not None:
        nx = W - note[1]
        blit_ui(fb, note, nx, y3 + _LABEL_Y_GAP if note[2] <= 12 else y3 - 2)
        room = nx - 8
    case = prompt.get("case") or ""
    if case:
        x = 0
        if note is None:
            x = blit_ui(fb, T.CASE_NO, 0, y3 + _LABEL_Y_GAP) + 4
        _text_scroll(fb, case, x, y3 + _TEXT_Y_GAP, (room - x) // 8, now, 2)

    # Row 4: the five levels over the keys; while saving, the chosen one inverted.
    fb.hline(0, 50, W, 1)
    stars = view.get("stars") or 0
    _key_row(fb, T.LEVELS, 52, 5 - stars if saving and stars else -1)
    return moving


def draw_reasons(fb, view, now):
    W = fb.width
    wide = W >= _WIDE
    list_w = W - _PANEL_W - 2 if wide else W
    reasons = view.get("reasons") or ()
    selected = view.get("selected") or ()
    cursor = view.get("cursor") or 0
    per_page = view.get("per_page") or 3
    rows = min(per_page, 48 // _ROW)
    first = (view.get("page") or 0) * per_page
    text_x = 4 + _BOX + 3
    room = list_w - text_x - 2
    moving = False
    for r in range(rows):
        i = first + r
        if i >= len(reasons):
            break
        entry = reasons[i]
        y = r * _ROW
        on = i == cursor
        paper = 1 if on else 0
        if on:
            fb.fill_rect(0, y, list_w, _ROW, 1)
        bm = entry.get("bm")
        ui = T.REASONS.get(entry.get("c")) if bm is None else None  # built-in reasons
        width = bm["w"] if bm is not None else (ui[1] if ui is not None else 8 * len(entry["c"]))
        off = 0
        if on and width > room:
            off = marquee(width, room, _elapsed(2, bm if bm is not None else entry, now))
            moving = True
        x = text_x - off
        if bm is not None:
            blit_bitmap(fb, bm, x, y + (_ROW - bm["h"]) // 2 if bm["h"] < _ROW else y, on)
        elif ui is not None:
            blit_ui(fb, ui, x, y, on)
        else:  # a reason with neither bitmap nor built-in label: show its code
            _text(fb, entry["c"], x, y + _TEXT_Y_GAP, 1 - paper)
        # Clip what scrolled past the left or right edge of the text column.
        fb.fill_rect(0, y, text_x, _ROW, paper)
        fb.fill_rect(list_w - 2, y, W - list_w + 2, _ROW, 0)
        if on:
            fb.fill_rect(list_w - 2, y, 2, _ROW, 1)
        if width - off > room:  # more text to the right: a small arrow says so
            fb.fill_rect(list_w - 7, y, 5, _ROW, paper)
            for k in range(3):
                fb.vline(list_w - 6 + k, y + 5 + k, 7 - 2 * k, 1 - paper)
        fb.rect(4, y + 3, _BOX, _BOX, 1 - paper)
        if entry.get("c") in selected:
            fb.fill_rect(6, y + 5, _BOX - 4, _BOX - 4, 1 - paper)
    pages = view.get("pages") or 0

    if wide:
        px = W - _PANEL_W
        fb.vline(px - 4, 0, 48, 1)
        stars = view.get("stars") or 0
        if 1 <= stars <= 5:
            t = T.LEVELS[5 - stars]
            fb.fill_rect(px, 0, t[1] + 4, t[2] + 1, 1)
            blit_ui(fb, t, px + 2, 0, True)
        hint = _hint(view.get("hint"))
        if hint is not None:
            fb.fill_rect(px, 18, hint[1], hint[2] + 2, 1)
            blit_ui(fb, hint, px, 19, True)
        elif view.get("hint"):
            _text(fb, str(view["hint"])[:_PANEL_W // 8], px, 20)
        else:
            blit_ui(fb, T.PICK_REASONS, px, 14)
        if pages > 1:
            x = _number(fb, (view.get("page") or 0) + 1, px, 40)
            fb.text("/", x, 40, 1)
            _number(fb, pages, x + 8, 40)
        left_s = view.get("left_s")
        if left_s is not None:
            _seconds(fb, left_s, W - 8 * (_digits(left_s) + 1), 40)
    else:
        hint = _hint(view.get("hint"))
        if hint is not None:  # over the list's last row: the citizen must see it now
            y = rows * _ROW - hint[2] - 2
            fb.fill_rect(0, y, W, hint[2] + 2, 1)
            blit_ui(fb, hint, _centre_x(fb, hint[1]), y + 1, True)
    fb.hline(0, 50, W, 1)
    _key_row(fb, T.SOFT_KEYS, 52)
    return moving


def _hint(hint):
    if hint == "need_reason":
        return T.NEED_REASON
    if hint == "max_reasons":
        return T.MAX_REASONS
    return None


def draw_thanks(fb, view, now):
    t = T.THANKS
    stars = view.get("stars") or 0
    if not 1 <= stars <= 5:
        blit_ui(fb, t, _centre_x(fb, t[1]), (fb.height - t[2]) // 2)
        return False
    # The level just recorded, under the thanks: the citizen sees what went in.
    blit_ui(fb, t, _centre_x(fb, t[1]), 8)
    label = T.LEVELS[5 - stars]
    x = _centre_x(fb, label[1] + 8 + 11 * stars)
    x += blit_ui(fb, label, x, 44) + 8
    for i in range(stars):
        _star(fb, x + 11 * i, 45)
    return False


def draw_full(fb, view, now):
    qr = view.get("qr")
    H = fb.height
    if not isinstance(qr, dict):
        t = T.NO_RATING
        blit_ui(fb, t, _centre_x(fb, t[1]), 8)
        t = T.ASK_STAFF
        blit_ui(fb, t, _centre_x(fb, t[1]), 40)
        return False
    size = _qr(fb, qr, 0, H)
    x = size + 6
    room = fb.width - x
    t = T.SCAN_QR
    if t[1] <= room:
        blit_ui(fb, t, x + (room - t[1]) // 2, 10)
    t = T.SCAN_HOW
    if t[1] <= room:
        blit_ui(fb, t, x + (room - t[1]) // 2, 42)
    return False


def _qr(fb, qr, x, box):
    """Draw a QR module matrix (one bit per module) scaled into a box x box square.

    Dark modules must be dark on a light ground for phone cameras, so on this light-on-
    dark panel the square is lit and the dark modules are left unlit. Returns box.
    """
    src = load_bitmap(qr)
    n = max(qr["w"], qr["h"])
    scale = max(1, (box - 4) // n) if n else 1
    quiet = max(0, (box - n * scale) // 2)
    fb.fill_rect(x, 0, box, box, 1)
    for my in range(qr["h"]):
        py = quiet + my * scale
        for mx in range(qr["w"]):
            if src.pixel(mx, my):
                fb.fill_rect(x + quiet + mx * scale, py, scale, scale, 0)
    return box


_DRAW = {
    "OFF": draw_off,
    "IDLE": draw_idle,
    "PROMPT": draw_prompt,
    "REASONS": draw_reasons,
    "THANKS": draw_thanks,
    "FULL": draw_full,
}


def draw(fb, view, now=0):
    """Clear fb and paint `view`; `now` is ticks_ms (drives scrolling).

    Returns True while something on screen scrolls (the caller redraws a few times a
    second). A malformed bitmap in the view raises ValueError from display.load_bitmap.
    """
    fb.fill(0)
    state = view.get("state")
    if state == "SAVING":
        return bool(draw_prompt(fb, view, now, True))
    fn = _DRAW.get(state)
    if fn is None:  # a state this firmware does not know: say so rather than go blank
        _text(fb, "state?", 0, 0)
        _text(fb, str(state)[: fb.width // 8], 0, 12)
        return False
    return bool(fn(fb, view, now))
