"""The counter screens on a Raspberry Pi: Rating.view() drawn with Pillow for luma.oled.

The same states and the same layout as the MCU's firmware/screens.py (docs/rating.md has
the view dict), but the Pi has a font engine: fixed strings are rendered here with the
CJK font the hub uses (hub/bitmaps.py), at the size the panel suits. Names, item names and
reasons still arrive from the hub as wire bitmaps and are drawn as they are, so a 生僻字
shows exactly as the hub's font drew it. Without any CJK font the fixed strings fall back
to the MCU's pre-rendered bitmaps (firmware/ui_text.py), so the screen is never blank.

Wide panels (>= 200 px, the 256x64 SSD1322) show the staff photo on the IDLE screen when
the `ctx` downlink carries the optional `photo` field (docs/agent.md, "Staff photo").
Drawing happens on a greyscale canvas; render() converts it to the panel's mode, so a
photo is greyscale on the SSD1322 and dithered on the 1-bit SSD1306/SH1106.
"""
import base64
import collections
import logging

from PIL import Image, ImageDraw

from firmware.evaluator import codec

log = logging.getLogger("pingjia.agent.screens")

# The fixed strings (the MCU's firmware/build_ui.py renders the same ones at build time).
TEXT = {
    "PAUSED": "暂停服务",
    "THANKS": "谢谢您的评价",
    "SCAN_QR": "请扫码评价",
    "SCAN_HOW": "请用手机扫描左侧二维码",
    "NO_RATING": "暂时无法评价",
    "ASK_STAFF": "请联系窗口工作人员",
    "PLEASE_RATE": "请您评价",
    "WAIT": "正在保存",
    "PICK_REASONS": "请选择\n不满意的原因",
    "NEED_REASON": "请至少选择一项",
    "MAX_REASONS": "最多选择%d项" % codec.MAX_REASONS,
    "WINDOW": "窗口",
    "STAFF_NO": "工号",
    "CASE_NO": "编号",
    "STAFF_ONLY": "承诺件受理·仅评价工作人员",
    "DELIVERY": "承诺件办结",
    "BATCH_OPEN": "共",
    "BATCH_CLOSE": "件",
    "LEVEL_5": "非常满意",
    "LEVEL_4": "满意",
    "LEVEL_3": "基本满意",
    "LEVEL_2": "不满意",
    "LEVEL_1": "非常不满意",
    "KEY_UP": "上",
    "KEY_DOWN": "下",
    "KEY_TOGGLE": "选择",
    "KEY_BACK": "返回",
    "KEY_SUBMIT": "提交",
}
LEVELS = ("LEVEL_5", "LEVEL_4", "LEVEL_3", "LEVEL_2", "LEVEL_1")  # left to right over the keys
SOFT_KEYS = ("KEY_UP", "KEY_DOWN", "KEY_TOGGLE", "KEY_BACK", "KEY_SUBMIT")
FALLBACK_LABELS = {"PJ01": "服务态度", "PJ02": "服务水平", "PJ03": "服务效率",
                   "PJ04": "办事流程", "PJ05": "服务便民度", "PJ06": "服务事项管理"}

WIDE = 200  # panels at least this wide get the full layout and the photo
ROW = 16  # one line of hub text
PAUSE_MS = 1500  # a scrolling text rests this long at each end
SPEED = 32  # scrolling speed, pixels per second
PANEL_W = 84  # REASONS side panel on wide screens
BOX = 9  # check box size
INK = 255
PAPER = 0
# Photo limits: a 4-bit 64x64 photo is 2 KB, about 2.7 KB in the ctx as base64.
PHOTO_MAX_W = 128
PHOTO_MAX_H = 128
PHOTO_MAX_BYTES = 8192
_CACHE = 256  # rendered strings and decoded bitmaps kept


class Text:
    """Strings to 1-bit images: the CJK font when there is one, else the MCU's bitmaps."""

    def __init__(self, renderer=None):
        self._renderer = renderer
        self._tried = renderer is not None
        self._cache = collections.OrderedDict()
        self.missing_font = False

    def _get_renderer(self):
        if not self._tried:
            self._tried = True
            from hub import bitmaps
            try:
                self._renderer = bitmaps.default_renderer()
            except bitmaps.FontNotFound as exc:
                log.warning("%s: fixed strings use the pre-rendered bitmaps", exc)
                self.missing_font = True
        return self._renderer

    def image(self, text, height):
        """A mode "1" image of text in lines of `height` px (ink = 1)."""
        key = (text, height)
        cached = self._cache.get(key)
        if cached is not None:
            self._cache.move_to_end(key)
            return cached
        image = self._render(text, height)
        self._cache[key] = image
        if len(self._cache) > _CACHE:
            self._cache.popitem(last=False)
        return image

    def label(self, name, height):
        return self.image(TEXT[name], height)

    def _render(self, text, height):
        renderer = self._get_renderer()
        if renderer is not None:
            from hub import bitmaps
            lines = text.count("\n") + 1
            try:
                rendering = renderer.rasterize(text, height=height, max_lines=lines)
                return bitmaps.to_image(rendering.bitmap)
            except bitmaps.BitmapError as exc:
                log.warning("cannot render a fixed string: %s", exc)
        return _fallback(text, height)


def _fallback(text, height):
    # No font engine to use: the MCU's build-time bitmap of the same string, or for ASCII
    # (digits, case numbers) Pillow's built-in font.
    for name, value in TEXT.items():
        if value == text:
            from firmware import ui_text
            rows, w, h, _fmt = getattr(ui_text, name)
            return Image.frombytes("1", (w, h), bytes(rows))
    for code, label in FALLBACK_LABELS.items():
        if label == text:
            from firmware import ui_text
            rows, w, h, _fmt = ui_text.REASONS[code]
            return Image.frombytes("1", (w, h), bytes(rows))
    from PIL import ImageFont
    font = ImageFont.load_default()
    box = font.getbbox(text)
    image = Image.new("1", (max(1, box[2]), height), 0)
    ImageDraw.Draw(image).text((0, max(0, (height - box[3]) // 2)), text, font=font, fill=1)
    return image


def marquee(total, visible, elapsed_ms):
    """Left offset of a `total`-pixel strip seen through `visible` pixels: rest, glide at
    SPEED px/s to the end, rest, jump back (the MCU scrolls the same way)."""
    travel = total - visible
    if travel <= 0:
        return 0
    glide = travel * 1000 // SPEED
    t = elapsed_ms % (PAUSE_MS + glide + PAUSE_MS)
    if t < PAUSE_MS:
        return 0
    t -= PAUSE_MS
    return travel if t >= glide else t * SPEED // 1000


class ScreenError(ValueError):
    """A photo or bitmap in a downlink that cannot be drawn."""


def decode_photo(photo):
    """The ctx `photo` field -> greyscale Pillow image ("L"). See docs/agent.md."""
    if not isinstance(photo, dict):
        raise ScreenError("photo: not an object")
    w, h, b, bpp = photo.get("w"), photo.get("h"), photo.get("b"), photo.get("bpp", 1)
    for value in (w, h):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ScreenError("photo: size")
    if w > PHOTO_MAX_W or h > PHOTO_MAX_H or bpp not in (1, 4) or not isinstance(b, str):
        raise ScreenError("photo: size, bpp or data")
    stride = (w + 7) // 8 if bpp == 1 else (w + 1) // 2
    try:
        raw = base64.b64decode(b, validate=True)
    except ValueError:
        raise ScreenError("photo: not base64") from None
    if len(raw) != stride * h or len(raw) > PHOTO_MAX_BYTES:
        raise ScreenError("photo: data length")
    if bpp == 1:
        return Image.frombytes("1", (w, h), raw).convert("L")
    # 4 bits per pixel, high nibble first, rows padded to whole bytes; 15 is white.
    out = bytearray(w * h)
    for y in range(h):
        row = raw[y * stride:(y + 1) * stride]
        for x in range(w):
            nib = row[x >> 1] >> 4 if not x & 1 else row[x >> 1] & 15
            out[y * w + x] = nib * 17
    return Image.frombytes("L", (w, h), bytes(out))


def photo_field(image, max_w=48, max_h=64, bpp=4):
    """A staff photo (any Pillow image) as the ctx `photo` field, for whoever builds ctx
    downlinks: scaled to fit max_w x max_h, greyscale, 4 or 1 bits per pixel."""
    if bpp not in (1, 4):
        raise ScreenError("photo: bpp must be 1 or 4")
    im = image.convert("L")
    im.thumbnail((min(max_w, PHOTO_MAX_W), min(max_h, PHOTO_MAX_H)))
    w, h = im.size
    if bpp == 1:
        raw = im.convert("1").tobytes()
    else:
        px = im.tobytes()
        stride = (w + 1) // 2
        out = bytearray(stride * h)
        for y in range(h):
            for x in range(w):
                nib = px[y * w + x] * 15 // 255
                out[y * stride + (x >> 1)] |= nib << 4 if not x & 1 else nib
        raw = bytes(out)
    return {"w": w, "h": h, "bpp": bpp, "b": base64.b64encode(raw).decode("ascii")}


class Screens:
    """Draws views for one panel: render(view, now_ms) -> image in the panel's mode."""

    def __init__(self, width, height, mode="1", text=None, photo=None):
        self.width = width
        self.height = height
        self.mode = mode
        self.wide = width >= WIDE
        self.photo = self.wide if photo is None else bool(photo)
        self.text = text or Text()
        self._bitmaps = collections.OrderedDict()
        self._scroll = {}
        self.bad_bitmaps = 0  # hub bitmaps that could not be decoded (drawn as ids)
        self.bad_photos = 0

    # -- public ------------------------------------------------------------------------------
    def render(self, view, now=0):
        canvas = Image.new("L", (self.width, self.height), PAPER)
        draw = ImageDraw.Draw(canvas)
        state = view.get("state")
        fn = {"OFF": self._off, "IDLE": self._idle, "PROMPT": self._prompt,
              "SAVING": self._saving, "REASONS": self._reasons, "THANKS": self._thanks,
              "FULL": self._full}.get(state)
        if fn is None:  # a state this agent does not know: say so rather than go blank
            self._put(draw, self.text.image("state? %s" % str(state)[:24], 12), 0, 0)
        else:
            fn(canvas, draw, view, now)
        if self.mode == "1":
            return canvas.point(lambda v: 255 if v >= 128 else 0).convert("1")
        return canvas.convert(self.mode)

    # -- pieces ------------------------------------------------------------------------------
    def _put(self, draw, image, x, y, ink=INK):
        draw.bitmap((x, y), image, fill=ink)
        return x + image.width

    def _label(self, draw, name, x, y, height=12, ink=INK):
        return self._put(draw, self.text.label(name, height), x, y, ink)

    def _string(self, draw, s, x, y, height=16, ink=INK):
        return self._put(draw, self.text.image(s, height), x, y, ink)

    def _hub(self, bm):
        """A hub wire bitmap as a mode "1" image, or None (drawn as the id instead)."""
        if bm is None:
            return None
        key = bm.get("b") if isinstance(bm, dict) else None
        if isinstance(key, str):
            cached = self._bitmaps.get(key)
            if cached is not None:
                self._bitmaps.move_to_end(key)
                return cached
        from hub import bitmaps
        try:
            image = bitmaps.to_image(bm)
        except bitmaps.BitmapError:
            self.bad_bitmaps += 1
            return None
        self._bitmaps[key] = image
        if len(self._bitmaps) > _CACHE:
            self._bitmaps.popitem(last=False)
        return image

    def _one_line(self, image, bm):
        """A hub text of several 16 px lines as one long line, for the marquee."""
        key = ("line", bm.get("b"))
        cached = self._bitmaps.get(key)
        if cached is not None:
            return cached
        parts = []
        for top in range(0, image.height - ROW + 1, ROW):
            line = image.crop((0, top, image.width, top + ROW))
            box = line.getbbox()
            if box:
                parts.append(line.crop((0, 0, box[2] + 1, ROW)))
        if not parts:
            return image
        strip = Image.new("1", (sum(p.width for p in parts), ROW), 0)
        x = 0
        for part in parts:
            strip.paste(part, (x, 0))
            x += part.width
        self._bitmaps[key] = strip
        return strip

    def _elapsed(self, slot, key, now):
        # Scrolling starts when its content first appears, not at some arbitrary phase.
        held = self._scroll.get(slot)
        if held is None or held[0] != key:
            self._scroll[slot] = (key, now)
            return 0
        return now - held[1]

    def _centre(self, w, left=0, right=None):
        right = self.width if right is None else right
        return left + max(0, (right - left - w) // 2)

    def _window(self, draw, ctx, x, y):
        # The hub's `win` bitmap already reads 窗口 …; a bare window id gets the label.
        win = self._hub(ctx.get("win"))
        w_id = ctx.get("w") or ""
        if win is not None:
            self._put(draw, win, x, y)
            return True
        if not w_id:
            return False
        x = self._label(draw, "WINDOW", x, y + 2) + 4
        self._string(draw, w_id, x, y)
        return True

    def _fit(self, name, heights, room=None):
        """The fixed string at the first height that fits `room` px (the smallest if none)."""
        room = self.width if room is None else room
        for height in heights:
            image = self.text.label(name, height)
            if image.width <= room:
                return image
        return image

    def _staff_images(self, ctx):
        parts = []
        name = self._hub(ctx.get("name"))
        if name is not None:
            parts.append((name, 0, 6))
        sn = ctx.get("sn") or ""
        if sn:
            parts.append((self.text.label("STAFF_NO", 12), 2, 2))
            parts.append((self.text.image(sn, 16), 0, 0))
        return parts

    def _staff(self, draw, ctx, x, y):
        for image, dy, gap in self._staff_images(ctx):
            x = self._put(draw, image, x, y + dy) + gap
        return x

    def _staff_width(self, ctx):
        return sum(image.width + gap for image, _dy, gap in self._staff_images(ctx))

    def _key_row(self, draw, names, y, chosen=-1):
        labels = [self.text.label(n, 12) for n in names]
        xs = _spread([im.width for im in labels], self.width, 4)
        if xs is None:
            self._pips(draw, y, chosen)
            return
        for i, image in enumerate(labels):
            ink = INK
            if i == chosen:
                draw.rectangle((xs[i] - 2, y - 1, xs[i] + image.width + 1, y + image.height - 1),
                               fill=INK)
                ink = PAPER
            self._put(draw, image, xs[i], y, ink)

    def _pips(self, draw, y, chosen):
        # Too narrow for the level names: "5★ 4★ 3★ 2★ 1★" over the keys.
        n = 5
        for i in range(n):
            centre = (2 * i + 1) * self.width // (2 * n)
            ink = INK
            if i == chosen:
                draw.rectangle((centre - 12, y - 1, centre + 11, y + 10), fill=INK)
                ink = PAPER
            digit = self.text.image(str(5 - i), 12)
            self._put(draw, digit, centre - 2 - digit.width, y, ink)
            _star(draw, centre + 1, y + 1, 9, ink)

    # -- the screens -------------------------------------------------------------------------
    def _photo_box(self, canvas, ctx):
        """Paste the staff photo at the left; returns the x where text may start."""
        if not self.photo or not ctx.get("photo"):
            return 0
        try:
            photo = decode_photo(ctx["photo"])
        except ScreenError:
            self.bad_photos += 1
            return 0
        photo.thumbnail((self.height, self.height))
        if self.mode == "1":
            photo = photo.convert("1").convert("L")  # dithered: a 1-bit panel has no grey
        canvas.paste(photo, (0, (self.height - photo.height) // 2))
        return photo.width + 6

    def _off(self, canvas, draw, view, now):
        ctx = view.get("ctx") or {}
        top = self._window(draw, ctx, 0, 0)
        image = self._fit("PAUSED", (32, 24) if not top else (32, 24, 16))
        y = 24 if top else (self.height - image.height) // 2
        self._put(draw, image, self._centre(image.width), y)

    def _idle(self, canvas, draw, view, now):
        ctx = view.get("ctx") or {}
        left = self._photo_box(canvas, ctx)
        self._window(draw, ctx, left, 0)
        w = self._staff_width(ctx)
        if w <= self.width - left:
            self._staff(draw, ctx, self._centre(w, left), 22)
        else:  # narrow panel: the name on one row, 工号 on the next
            self._staff(draw, {"name": ctx.get("name")}, left, 17)
            self._staff(draw, {"sn": ctx.get("sn")}, left, 33)
            return
        image = self.text.label("PLEASE_RATE", 16)
        self._put(draw, image, self._centre(image.width, left), self.height - image.height)

    def _item_row(self, draw, view, now):
        prompt = view.get("prompt") or {}
        item = self._hub(prompt.get("item"))
        if item is not None and item.height > ROW:
            item = self._one_line(item, prompt.get("item"))
        if item is None:
            self._label(draw, "PLEASE_RATE", 0, 0, 16)
            return
        off = marquee(item.width, self.width, self._elapsed("item", prompt.get("pid"), now))
        self._put(draw, item, -off, 0)

    def _saving(self, canvas, draw, view, now):
        self._prompt(canvas, draw, view, now, saving=True)

    def _prompt(self, canvas, draw, view, now, saving=False):
        W = self.width
        prompt = view.get("prompt") or {}
        ctx = view.get("ctx") or {}
        self._item_row(draw, view, now)
        # Row 2: who served; on the right the batch size and the seconds left. Where the
        # row is too narrow the countdown goes first (the MCU screen does the same).
        y2 = 18
        left_s = view.get("left_s")
        secs = self.text.image("%ds" % left_s, 16) if left_s is not None and not saving else None
        n = prompt.get("n", 1) or 1
        batch = []
        if n > 1:
            batch = [self.text.label("BATCH_OPEN", 12), self.text.image(str(n), 16),
                     self.text.label("BATCH_CLOSE", 12)]
        batch_w = sum(p.width + 2 for p in batch) + (6 if batch else 0)
        if secs is not None and self._staff_width(ctx) + batch_w + secs.width + 6 > W:
            secs = None
        right = W
        if secs is not None:
            right -= secs.width
            self._put(draw, secs, right, y2)
            right -= 6
        if batch:
            right -= batch_w
            x = right + 6
            for i, image in enumerate(batch):
                x = self._put(draw, image, x, y2 + (0 if i == 1 else 2)) + 2
        name = self._hub(ctx.get("name"))
        if self._staff_width(ctx) <= right:
            self._staff(draw, ctx, 0, y2)
        elif name is not None and name.width <= right:
            self._put(draw, name, 0, y2)  # 工号 is on the IDLE screen
        # Row 3: the case number, and what kind of rating this is (or the saving note).
        y3 = 34
        note = None
        if saving:
            note = self.text.label("WAIT", 16)
        elif view.get("staff_only"):
            note = self.text.label("STAFF_ONLY", 12)
        elif prompt.get("kind") == "cn_dlv":
            note = self.text.label("DELIVERY", 12)
        room = W
        if note is not None and note.width <= W:
            nx = W - note.width
            self._put(draw, note, nx, y3 + (2 if note.height <= 12 else 0))
            room = nx - 8
        case = prompt.get("case") or ""
        if case:
            x = 0
            if note is None:
                x = self._label(draw, "CASE_NO", 0, y3 + 2) + 4
            image = self.text.image(case, 16)
            off = marquee(image.width, room - x, self._elapsed("case", case, now))
            strip = image.crop((off, 0, off + max(0, room - x), image.height))
            self._put(draw, strip, x, y3)
        # Row 4: the five levels over the keys; while saving, the chosen one inverted.
        draw.line((0, 50, W - 1, 50), fill=INK)
        stars = view.get("stars") or 0
        self._key_row(draw, LEVELS, 52, 5 - stars if saving and stars else -1)

    def _reasons(self, canvas, draw, view, now):
        W = self.width
        list_w = W - PANEL_W - 2 if self.wide else W
        reasons = view.get("reasons") or ()
        selected = view.get("selected") or ()
        cursor = view.get("cursor") or 0
        per_page = view.get("per_page") or 3
        rows = min(per_page, 48 // ROW)
        first = (view.get("page") or 0) * per_page
        text_x = 4 + BOX + 3
        room = list_w - text_x - 2
        for r in range(rows):
            i = first + r
            if i >= len(reasons):
                break
            entry = reasons[i]
            y = r * ROW
            on = i == cursor
            ink, paper = (PAPER, INK) if on else (INK, PAPER)
            row = Image.new("L", (list_w, ROW), paper)
            row_draw = ImageDraw.Draw(row)
            image = self._hub(entry.get("bm"))
            if image is None:
                label = entry.get("label") or FALLBACK_LABELS.get(entry.get("c"))
                image = self.text.image(label or entry.get("c") or "?", 16)
            off = 0
            if on and image.width > room:
                off = marquee(image.width, room, self._elapsed("reason", entry.get("c"), now))
            clip = image.crop((off, 0, off + room, min(ROW, image.height)))
            self._put(row_draw, clip, text_x, max(0, (ROW - image.height) // 2), ink)
            if image.width - off > room:  # more text to the right: a small arrow says so
                row_draw.rectangle((list_w - 7, 0, list_w - 1, ROW - 1), fill=paper)
                row_draw.polygon(((list_w - 6, 5), (list_w - 3, 8), (list_w - 6, 11)), fill=ink)
            row_draw.rectangle((4, 3, 4 + BOX - 1, 3 + BOX - 1), outline=ink)
            if entry.get("c") in selected:
                row_draw.rectangle((6, 5, 6 + BOX - 5, 5 + BOX - 5), fill=ink)
            canvas.paste(row, (0, y))
        pages = view.get("pages") or 0
        hint = {"need_reason": "NEED_REASON", "max_reasons": "MAX_REASONS"}.get(view.get("hint"))
        if self.wide:
            px = W - PANEL_W
            draw.line((px - 4, 0, px - 4, 47), fill=INK)
            stars = view.get("stars") or 0
            if 1 <= stars <= 5:
                image = self.text.label(LEVELS[5 - stars], 12)
                draw.rectangle((px, 0, px + image.width + 3, image.height), fill=INK)
                self._put(draw, image, px + 2, 0, PAPER)
            if hint is not None:
                image = self.text.label(hint, 12)
                draw.rectangle((px, 18, px + image.width - 1, 18 + image.height + 1), fill=INK)
                self._put(draw, image, px, 19, PAPER)
            else:
                self._label(draw, "PICK_REASONS", px, 14)
            if pages > 1:
                self._string(draw, "%d/%d" % ((view.get("page") or 0) + 1, pages), px, 36, 12)
            left_s = view.get("left_s")
            if left_s is not None:
                secs = self.text.image("%ds" % left_s, 12)
                self._put(draw, secs, W - secs.width, 36)
        elif hint is not None:  # over the list's last row: the citizen must see it now
            image = self.text.label(hint, 12)
            y = rows * ROW - image.height - 2
            draw.rectangle((0, y, W - 1, y + image.height + 1), fill=INK)
            self._put(draw, image, self._centre(image.width), y + 1, PAPER)
        draw.line((0, 50, W - 1, 50), fill=INK)
        self._key_row(draw, SOFT_KEYS, 52)

    def _thanks(self, canvas, draw, view, now):
        stars = view.get("stars") or 0
        image = self._fit("THANKS", (24, 20, 16))
        if not 1 <= stars <= 5:
            self._put(draw, image, self._centre(image.width), (self.height - image.height) // 2)
            return
        # The level just recorded, under the thanks: the citizen sees what went in.
        self._put(draw, image, self._centre(image.width), 8)
        label = self.text.label(LEVELS[5 - stars], 12)
        x = self._centre(label.width + 8 + 11 * stars)
        x = self._put(draw, label, x, 44) + 8
        for i in range(stars):
            _star(draw, x + 11 * i, 45, 9, INK)

    def _full(self, canvas, draw, view, now):
        qr = view.get("qr")
        qr_image = self._hub(qr) if isinstance(qr, dict) else None
        if qr_image is None:
            for name, y, h in (("NO_RATING", 8, 24), ("ASK_STAFF", 40, 12)):
                image = self.text.label(name, h)
                self._put(draw, image, self._centre(image.width), y)
            return
        box = self.height
        n = max(qr_image.width, qr_image.height)
        scale = max(1, (box - 4) // n)
        quiet = max(0, (box - n * scale) // 2)
        # Dark modules on a lit square: phone cameras want dark on light.
        draw.rectangle((0, 0, box - 1, box - 1), fill=INK)
        big = qr_image.resize((qr_image.width * scale, qr_image.height * scale), Image.NEAREST)
        self._put(draw, big, quiet, quiet, PAPER)
        x = box + 6
        for name, y, h in (("SCAN_QR", 10, 24), ("SCAN_HOW", 42, 12)):
            image = self.text.label(name, h)
            if image.width <= self.width - x:
                self._put(draw, image, self._centre(image.width, x), y)


def _spread(widths, total, gap):
    """x of each label, centred over evenly spaced keys and pushed apart to `gap`;
    None when they cannot fit side by side."""
    n = len(widths)
    if sum(widths) + gap * (n - 1) > total:
        return None
    xs = [min(max(0, (2 * i + 1) * total // (2 * n) - widths[i] // 2), total - widths[i])
          for i in range(n)]
    for i in range(1, n):
        xs[i] = max(xs[i], xs[i - 1] + widths[i - 1] + gap)
    for i in range(n - 1, -1, -1):
        most = total - widths[i] if i == n - 1 else xs[i + 1] - gap - widths[i]
        xs[i] = min(xs[i], most)
    return xs


def _star(draw, x, y, size, ink):
    # A five-pointed star in a size x size box.
    import math
    cx, cy = x + size / 2.0, y + size / 2.0
    outer, inner = size / 2.0, size / 5.0
    points = []
    for k in range(10):
        r = outer if k % 2 == 0 else inner
        a = -math.pi / 2 + k * math.pi / 5
        points.append((cx + r * math.cos(a), cy + r * math.sin(a)))
    draw.polygon(points, fill=ink)
