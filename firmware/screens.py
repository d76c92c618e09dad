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
# Chinese comes only as bitmaps in the device form of display.py: hub bitmaps (names,
# item, reasons; the app decodes them when their downlink arrives) and the build-time
# strings of ui_text.py, used here by index (_T_*). ASCII (工号 digits, case numbers,
# counters) uses framebuf's 8x8 font. Drawing a view allocates nothing: the app redraws
# several times a second while a prompt is up.
try:
    from time import ticks_diff
except ImportError:  # CPython type checkers
    def ticks_diff(a, b):  # type: ignore[no-redef]
        return a - b

from micropython import const  # MicroPython only: no fallback to load

from display import blit, width
from evaluator.rating import FALLBACK_CODES, HINT_MAX_REASONS, HINT_NEED_REASON
from ui_text import TEXTS

# Indices into ui_text.TEXTS (build_ui.STRINGS order, then the built-in reasons);
# tests/test_display.py checks every one against ui_text.NAMES.
_T_PAUSED = const(0)
_T_THANKS = const(1)
_T_SCAN_QR = const(2)
_T_SCAN_HOW = const(3)
_T_NO_RATING = const(4)
_T_ASK_STAFF = const(5)
_T_PLEASE_RATE = const(6)
_T_WAIT = const(7)
_T_PICK_REASONS = const(8)
_T_NEED_REASON = const(9)
_T_MAX_REASONS = const(10)
_T_WINDOW = const(11)
_T_STAFF_NO = const(12)
_T_CASE_NO = const(13)
_T_STAFF_ONLY = const(14)
_T_DELIVERY = const(15)
_T_BATCH_OPEN = const(16)
_T_BATCH_CLOSE = const(17)
_T_LEVEL_5 = const(18)  # LEVEL_5 .. LEVEL_1 follow in key order, left to right
_T_KEY_UP = const(23)  # KEY_UP, KEY_DOWN, KEY_TOGGLE, KEY_BACK, KEY_SUBMIT
_T_REASON_PJ01 = const(28)  # REASON_PJ01 .. REASON_PJ06: the built-in reasons

_ROW = const(16)  # one line of hub text
_LABEL_Y_GAP = const(2)  # a 12 px label sits 2 px down in a 16 px row
_TEXT_Y_GAP = const(4)  # 8x8 text sits 4 px down in a 16 px row
_PAUSE_MS = const(1500)  # a scrolling text rests this long at each end
_SPEED = const(32)  # scrolling speed, pixels per second
_CHAR_MS = const(400)  # a scrolling 8x8 string moves one character this often
_PANEL_W = const(84)  # REASONS side panel on wide screens
_BOX = const(9)  # check box size
_WIDE = const(200)  # screens at least this wide get the full layout
_KEYS = const(5)

# Where each scrolling region started: [key, start ms] for the item row and the reason
# under the cursor; a new bitmap (another prompt, cursor moved) starts from the left.
_scroll = [None, 0, None, 0]
# Label widths and positions over the keys, filled in place.
_WIDTHS = [0] * _KEYS
_XS = [0] * _KEYS
# A 9x9 star in the device bitmap form.
_STAR = b"\x08\x00\x08\x00\x1c\x00\xff\x80\x7f\x00\x3e\x00\x3e\x00\x63\x00\x41\x00\x09\x00\x09"


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


def _key_row(fb, first, y, chosen=-1):
    """The five labels TEXTS[first..first+4] over the keys; label `chosen` inverted.

    Labels too wide to sit side by side become pips: a digit and a star per key."""
    widths = _WIDTHS
    xs = _XS
    W = fb.width
    need = 4 * (_KEYS - 1)
    for i in range(_KEYS):
        widths[i] = width(TEXTS[first + i])
        need += widths[i]
    if need > W:
        for i in range(_KEYS):
            centre = (2 * i + 1) * W // (2 * _KEYS)
            if i == chosen:
                fb.fill_rect(centre - 12, y - 1, 24, 12, 1)
            _number(fb, 5 - i, centre - 10, y + 2, 0 if i == chosen else 1)
            # A star; on the lit box of the chosen key it is drawn dark.
            blit(fb, _STAR, centre + 1, y + 1, i == chosen)
        return
    # Centred over evenly spaced keys, pushed apart to a 4 px gap: first right where a
    # label runs into its left neighbour, then left where that ran past the edge.
    for i in range(_KEYS):
        centre = (2 * i + 1) * W // (2 * _KEYS)
        xs[i] = min(max(0, centre - widths[i] // 2), W - widths[i])
    for i in range(1, _KEYS):
        least = xs[i - 1] + widths[i - 1] + 4
        if xs[i] < least:
            xs[i] = least
    for i in range(_KEYS - 1, -1, -1):
        most = W - widths[i] if i == _KEYS - 1 else xs[i + 1] - 4 - widths[i]
        if xs[i] > most:
            xs[i] = most
    for i in range(_KEYS):
        label = TEXTS[first + i]
        if i == chosen:
            fb.fill_rect(xs[i] - 2, y - 1, widths[i] + 4, label[-1] + 1, 1)
        blit(fb, label, xs[i], y, i == chosen)


def _staff(fb, ctx, x, y, parts=3):
    """Staff name (parts & 1) and 工号 (parts & 2) on a 16 px row from x; returns x after."""
    name = ctx.get("name")
    if name is not None and parts & 1:
        x += blit(fb, name, x, y) + 6
    sn = ctx.get("sn") or ""
    if sn and parts & 2:
        x += blit(fb, TEXTS[_T_STAFF_NO], x, y + _LABEL_Y_GAP) + 2
        x = _text(fb, sn, x, y + _TEXT_Y_GAP)
    return x


def _width_of_staff(ctx):
    w = 0
    name = ctx.get("name")
    if name is not None:
        w += width(name) + 6
    sn = ctx.get("sn") or ""
    if sn:
        w += width(TEXTS[_T_STAFF_NO]) + 2 + 8 * len(sn)
    return w


def _centre(fb, i, y):
    # A UI string centred across the screen.
    t = TEXTS[i]
    blit(fb, t, max(0, (fb.width - width(t)) // 2), y)


def _window(fb, ctx, y):
    """窗口 + window name (bitmap, or the window id); returns True if anything was drawn."""
    win = ctx.get("win")
    w_id = ctx.get("w") or ""
    if win is None and not w_id:
        return False
    x = blit(fb, TEXTS[_T_WINDOW], 0, y + _LABEL_Y_GAP) + 4
    if win is not None:
        blit(fb, win, x, y)
    else:
        _text(fb, w_id, x, y + _TEXT_Y_GAP)
    return True


# ---- the screens ------------------------------------------------------------------------
def draw_prompt(fb, view, now, saving=False):
    W = fb.width
    prompt = view.get("prompt") or {}
    ctx = view.get("ctx") or {}
    # Row 1: the item name, gliding when wider than the screen.
    item = prompt.get("item")
    moving = False
    if item is None:
        blit(fb, TEXTS[_T_PLEASE_RATE], 0, 0)
    else:
        w = width(item)
        blit(fb, item, -marquee(w, W, _elapsed(0, item, now)), 0)
        moving = w > W

    # Row 2: who served, and on the right the batch size and the seconds left. Where the
    # row is too narrow the countdown goes first, then 工号 (it is on the IDLE screen).
    y2 = 18
    n = prompt.get("n", 1) or 1
    batch_w = 0
    if n > 1:
        batch_w = (width(TEXTS[_T_BATCH_OPEN]) + 2 + 8 * _digits(n) + 2
                   + width(TEXTS[_T_BATCH_CLOSE]) + 6)
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
        fb.text("s", _number(fb, left_s, right, y2 + _TEXT_Y_GAP), y2 + _TEXT_Y_GAP, 1)
        right -= 6
    if batch_w:
        right -= batch_w
        x = right + 6
        x += blit(fb, TEXTS[_T_BATCH_OPEN], x, y2 + _LABEL_Y_GAP) + 2
        x = _number(fb, n, x, y2 + _TEXT_Y_GAP) + 2
        blit(fb, TEXTS[_T_BATCH_CLOSE], x, y2 + _LABEL_Y_GAP)
    if staff_w <= right:
        _staff(fb, ctx, 0, y2)
    elif ctx.get("name") is not None:
        blit(fb, ctx["name"], 0, y2)

    # Row 3: the case number, and what kind of rating this is (or the saving note).
    y3 = 34
    note = -1
    if saving:
        note = _T_WAIT
    elif view.get("staff_only"):
        note = _T_STAFF_ONLY
    elif prompt.get("kind") == "cn_dlv":
        note = _T_DELIVERY
    room = W
    if note >= 0:
        t = TEXTS[note]
        nx = W - width(t)
        blit(fb, t, nx, y3 + _LABEL_Y_GAP if t[-1] <= 12 else y3 - 2)
        room = nx - 8
    case = prompt.get("case") or ""
    if case:
        x = 0
        if note < 0:
            x = blit(fb, TEXTS[_T_CASE_NO], 0, y3 + _LABEL_Y_GAP) + 4
        max_chars = (room - x) // 8
        y = y3 + _TEXT_Y_GAP
        if len(case) <= max_chars:
            _text(fb, case, x, y)
        elif max_chars >= 1:
            # Longer than its room: whole characters slide.
            travel = len(case) - max_chars
            t = _elapsed(2, case, now) % (2 * _PAUSE_MS + travel * _CHAR_MS)
            first = 0 if t < _PAUSE_MS else min(travel, (t - _PAUSE_MS) // _CHAR_MS)
            _text(fb, case[first:first + max_chars], x, y)

    # Row 4: the five levels over the keys; while saving, the chosen one inverted.
    fb.hline(0, 50, W, 1)
    stars = view.get("stars") or 0
    _key_row(fb, _T_LEVEL_5, 52, 5 - stars if saving and stars else -1)
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
        code = entry.get("c")
        y = r * _ROW
        on = i == cursor
        paper = 1 if on else 0
        if on:
            fb.fill_rect(0, y, list_w, _ROW, 1)
        bm = entry.get("bm")
        if bm is None and code in FALLBACK_CODES:  # a built-in reason: its ui_text label
            bm = TEXTS[_T_REASON_PJ01 + FALLBACK_CODES.index(code)]
        w = width(bm) if bm is not None else 8 * len(code)
        off = 0
        if on and w > room:
            off = marquee(w, room, _elapsed(2, bm if bm is not None else entry, now))
            moving = True
        x = text_x - off
        if bm is not None:
            blit(fb, bm, x, y + (_ROW - bm[-1]) // 2 if bm[-1] < _ROW else y, on)
        else:  # a reason with neither bitmap nor built-in label: show its code
            _text(fb, code, x, y + _TEXT_Y_GAP, 1 - paper)
        # Clip what scrolled past the left or right edge of the text column.
        fb.fill_rect(0, y, text_x, _ROW, paper)
        fb.fill_rect(list_w - 2, y, W - list_w + 2, _ROW, 0)
        if on:
            fb.fill_rect(list_w - 2, y, 2, _ROW, 1)
        if w - off > room:  # more text to the right: a small arrow says so
            fb.fill_rect(list_w - 7, y, 5, _ROW, paper)
            for k in range(3):
                fb.vline(list_w - 6 + k, y + 5 + k, 7 - 2 * k, 1 - paper)
        fb.rect(4, y + 3, _BOX, _BOX, 1 - paper)
        if code in selected:
            fb.fill_rect(6, y + 5, _BOX - 4, _BOX - 4, 1 - paper)
    pages = view.get("pages") or 0
    hint = view.get("hint")
    shown = _T_NEED_REASON if hint == HINT_NEED_REASON else (
        _T_MAX_REASONS if hint == HINT_MAX_REASONS else -1)

    if wide:
        px = W - _PANEL_W
        fb.vline(px - 4, 0, 48, 1)
        stars = view.get("stars") or 0
        if 1 <= stars <= 5:
            t = TEXTS[_T_LEVEL_5 + 5 - stars]
            fb.fill_rect(px, 0, width(t) + 4, t[-1] + 1, 1)
            blit(fb, t, px + 2, 0, True)
        if shown >= 0:
            t = TEXTS[shown]
            fb.fill_rect(px, 18, width(t), t[-1] + 2, 1)
            blit(fb, t, px, 19, True)
        elif hint:
            _text(fb, str(hint)[:_PANEL_W // 8], px, 20)
        else:
            blit(fb, TEXTS[_T_PICK_REASONS], px, 14)
        if pages > 1:
            x = _number(fb, (view.get("page") or 0) + 1, px, 40)
            fb.text("/", x, 40, 1)
            _number(fb, pages, x + 8, 40)
        left_s = view.get("left_s")
        if left_s is not None:
            x = W - 8 * (_digits(left_s) + 1)
            fb.text("s", _number(fb, left_s, x, 40), 40, 1)
    elif shown >= 0:  # over the list's last row: the citizen must see it now
        t = TEXTS[shown]
        y = rows * _ROW - t[-1] - 2
        fb.fill_rect(0, y, W, t[-1] + 2, 1)
        blit(fb, t, max(0, (W - width(t)) // 2), y + 1, True)
    fb.hline(0, 50, W, 1)
    _key_row(fb, _T_KEY_UP, 52)
    return moving


def draw(fb, view, now=0):
    """Clear fb and paint `view`; `now` is ticks_ms (drives scrolling).

    Returns True while something on screen scrolls (the caller redraws a few times a
    second). Bitmaps in the view are device bitmaps (display.bitmap() of the wire form).
    The simple screens are drawn here; PROMPT/SAVING and REASONS have functions of their
    own (each function costs the device heap, so small screens get none).
    """
    fb.fill(0)
    state = view.get("state")
    W = fb.width
    H = fb.height
    if state == "SAVING" or state == "PROMPT":
        return bool(draw_prompt(fb, view, now, state == "SAVING"))
    if state == "REASONS":
        return bool(draw_reasons(fb, view, now))
    if state == "OFF":  # 暂停服务, under the window when it is known
        top = _window(fb, view.get("ctx") or {}, 0)
        _centre(fb, _T_PAUSED, 24 if top else (H - TEXTS[_T_PAUSED][-1]) // 2)
    elif state == "IDLE":
        ctx = view.get("ctx") or {}
        _window(fb, ctx, 0)
        w = _width_of_staff(ctx)
        if w <= W:
            _staff(fb, ctx, max(0, (W - w) // 2), 22)
        else:  # narrow panel: name on one row, 工号 below the hint's row
            _staff(fb, ctx, 0, 18, 1)
            _staff(fb, ctx, 0, 32, 2)
        _centre(fb, _T_PLEASE_RATE, H - TEXTS[_T_PLEASE_RATE][-1])
    elif state == "THANKS":
        stars = view.get("stars") or 0
        if not 1 <= stars <= 5:
            _centre(fb, _T_THANKS, (H - TEXTS[_T_THANKS][-1]) // 2)
            return False
        # The level just recorded, under the thanks: the citizen sees what went in.
        _centre(fb, _T_THANKS, 8)
        label = TEXTS[_T_LEVEL_5 + 5 - stars]
        x = max(0, (W - (width(label) + 8 + 11 * stars)) // 2)
        x += blit(fb, label, x, 44) + 8
        for i in range(stars):
            blit(fb, _STAR, x + 11 * i, 45)
    elif state == "FULL":
        qr = view.get("qr")
        if qr is None:
            _centre(fb, _T_NO_RATING, 8)
            _centre(fb, _T_ASK_STAFF, 40)
            return False
        # The QR module matrix (one bit per module) scaled into an H x H square. Dark
        # modules must be dark on a light ground for phone cameras, so on this light-on-
        # dark panel the square is lit and the dark modules are left unlit.
        qw = width(qr)
        qh = qr[-1]
        stride = (qw + 7) >> 3
        n = max(qw, qh)
        scale = max(1, (H - 4) // n)
        quiet = max(0, (H - n * scale) // 2)
        fb.fill_rect(0, 0, H, H, 1)
        for my in range(qh):
            py = quiet + my * scale
            for mx in range(qw):
                if qr[my * stride + (mx >> 3)] & (0x80 >> (mx & 7)):
                    fb.fill_rect(quiet + mx * scale, py, scale, scale, 0)
        x = H + 6
        room = W - x
        for i, y in ((_T_SCAN_QR, 10), (_T_SCAN_HOW, 42)):
            t = TEXTS[i]
            if width(t) <= room:
                blit(fb, t, x + (room - width(t)) // 2, y)
    else:  # a state this firmware does not know: say so rather than go blank
        _text(fb, "state?", 0, 0)
        _text(fb, str(state)[: W // 8], 0, 12)
    return False
