"""Chinese text to 1-bit wire bitmaps for devices that have no font engine.

The wire form is docs/protocol.md "Bitmaps": {"w": W, "h": H, "b": base64}, rows top to
bottom, each row MSB first in ceil(W/8) bytes (framebuf MONO_HLSB). Staff names, item names,
window names and reason labels all travel this way, so a 生僻字 shows exactly as the hub's
font draws it. The build step for the device's fixed UI strings (firmware/build_ui.py) uses
the same renderer, so both kinds of text look alike on the screen.

Width is never cut silently: text that does not fit `max_lines` lines of `max_width` pixels
raises TextTooWide, unless the caller asks for overflow="ellipsis", which cuts, draws "…"
and reports how many characters were left out (Rendering.cut). Characters no font has are
drawn as a crossed box and reported (Rendering.missing).
"""
import base64
import functools
import logging
import os
from dataclasses import dataclass

from . import PingjiaError

log = logging.getLogger(__name__)

# Device-side limits (firmware/display.py checks the same): a bitmap must fit its heap.
MAX_W = 1024
MAX_H = 64
MAX_BYTES = 2048

# Standard Debian/XDG font locations, searched in this order.
FONT_DIRS = ("/usr/share/fonts", "/usr/local/share/fonts", "~/.local/share/fonts", "~/.fonts")
# CJK fonts by preference. The first found is the main face; the others only draw the
# characters it lacks (HanaMinB and BabelStone Han cover the CJK extension planes).
FONT_FILES = (
    "wqy-microhei.ttc",
    "wqy-zenhei.ttc",
    "NotoSansCJK-Regular.ttc",
    "NotoSansCJKsc-Regular.otf",
    "NotoSerifCJK-Regular.ttc",
    "HanaMinA.ttf",
    "HanaMinB.ttf",
    "BabelStoneHan.ttf",
)

# A code point no font maps (plane 16 private use): what a font draws for it is its
# "missing glyph", so a character drawing the same way is missing too.
_NEVER_MAPPED = "\U0010fffd"
# The glyph whose box sets the type size (see TextRenderer).
_CJK_REFERENCE = "国"
_ELLIPSIS = "…"


class BitmapError(PingjiaError):
    """A text or bitmap that cannot become a valid wire bitmap."""


class FontNotFound(BitmapError):
    """No CJK font in the standard font directories."""


class TextTooWide(BitmapError):
    """The text does not fit the allowed width and number of lines."""


class BadBitmap(BitmapError):
    """A wire bitmap whose fields disagree with docs/protocol.md."""


@dataclass(frozen=True)
class Rendering:
    """One rendered text: the wire bitmap plus what the caller should know about it."""

    bitmap: dict
    lines: int
    missing: tuple  # characters drawn as placeholder boxes, in order of first use
    cut: int  # characters left out (only with overflow="ellipsis"), else 0


def row_bytes(width):
    return (width + 7) // 8


def pack(rows):
    """Rows of 0/1 pixels (equal lengths) -> wire bitmap dict."""
    h = len(rows)
    w = len(rows[0]) if h else 0
    stride = row_bytes(w)
    raw = bytearray(stride * h)
    for y, row in enumerate(rows):
        if len(row) != w:
            raise BadBitmap("row %d has %d pixels, expected %d" % (y, len(row), w))
        base = y * stride
        for x, on in enumerate(row):
            if on:
                raw[base + (x >> 3)] |= 0x80 >> (x & 7)
    return _wire(w, h, bytes(raw))


def unpack(bitmap):
    """Wire bitmap dict -> rows of 0/1 pixels."""
    w, h, raw = decode(bitmap)
    stride = row_bytes(w)
    return [[(raw[y * stride + (x >> 3)] >> (7 - (x & 7))) & 1 for x in range(w)]
            for y in range(h)]


def decode(bitmap):
    """Validate a wire bitmap; return (w, h, raw bytes)."""
    if not isinstance(bitmap, dict):
        raise BadBitmap("bitmap is not an object")
    w, h, b = bitmap.get("w"), bitmap.get("h"), bitmap.get("b")
    for name, value in (("w", w), ("h", h)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise BadBitmap("bitmap %s is not a non-negative integer" % name)
    if w > MAX_W or h > MAX_H:
        raise BadBitmap("bitmap %dx%d exceeds %dx%d" % (w, h, MAX_W, MAX_H))
    if not isinstance(b, str):
        raise BadBitmap("bitmap b is not a base64 string")
    try:
        raw = base64.b64decode(b, validate=True)
    except ValueError:
        raise BadBitmap("bitmap b is not valid base64") from None
    if len(raw) != row_bytes(w) * h:
        raise BadBitmap("bitmap has %d bytes, %dx%d needs %d" % (len(raw), w, h, row_bytes(w) * h))
    if len(raw) > MAX_BYTES:
        raise BadBitmap("bitmap of %d bytes exceeds %d" % (len(raw), MAX_BYTES))
    return w, h, raw


def to_image(bitmap):
    """Wire bitmap -> Pillow mode "1" image (1 = ink, shown white)."""
    from PIL import Image

    w, h, raw = decode(bitmap)
    # Pillow's raw "1" decoder reads exactly MONO_HLSB: MSB first, rows padded to bytes.
    return Image.frombytes("1", (w, h), raw)


def from_image(image):
    """Pillow image (non-zero = ink) -> wire bitmap."""
    mono = image.convert("1") if image.mode != "1" else image
    return _wire(mono.width, mono.height, mono.tobytes())


def _wire(w, h, raw):
    if w > MAX_W or h > MAX_H or len(raw) > MAX_BYTES:
        raise BitmapError("bitmap %dx%d (%d bytes) exceeds the device limit %dx%d, %d bytes"
                          % (w, h, len(raw), MAX_W, MAX_H, MAX_BYTES))
    return {"w": w, "h": h, "b": base64.b64encode(raw).decode("ascii")}


def find_fonts(dirs=FONT_DIRS, names=FONT_FILES):
    """Paths of the known CJK fonts present, in preference order."""
    found = {}
    for top in dirs:
        top = os.path.expanduser(top)
        for folder, _subdirs, files in os.walk(top):
            for name in files:
                if name in names and name not in found:
                    found[name] = os.path.join(folder, name)
    return [found[name] for name in names if name in found]


class _Face:
    """One font file at one pixel size."""

    def __init__(self, path, size):
        from PIL import ImageFont

        self.path = path
        self.size = size
        self.font = ImageFont.truetype(path, size)
        self._missing_mask = self._mask(_NEVER_MAPPED)

    def _mask(self, ch):
        mask = self.font.getmask(ch, mode="1")
        return mask.size, bytes(mask)

    def has(self, ch):
        if ch.isspace():
            return True
        return self._mask(ch) != self._missing_mask

    def advance(self, ch):
        return max(1, int(round(self.font.getlength(ch))))

    def ink(self, ch):
        """(top, bottom) rows of the glyph's ink relative to the baseline, or None."""
        box = self.font.getbbox(ch, mode="1", anchor="ls")
        if box[3] <= box[1]:
            return None
        return box[1], box[3]


class TextRenderer:
    """Renders text with a chain of CJK fonts; the first font that has a character draws it.

    Glyph size: the largest size at which a full ideograph (国) fills the line; if the
    text's own ink (descenders, tall brackets, a fallback font's glyphs) then reaches
    outside the line, the next smaller size is tried, so nothing is clipped vertically.
    The text's ink is centred in the line.
    """

    def __init__(self, font_paths=None):
        paths = list(font_paths) if font_paths else find_fonts()
        if not paths:
            raise FontNotFound("no CJK font found in %s (install fonts-wqy-microhei)"
                               % ", ".join(FONT_DIRS))
        for path in paths:
            if not os.path.exists(path):
                raise FontNotFound("font file %s does not exist" % path)
        self.font_paths = tuple(paths)

    @functools.lru_cache(maxsize=64)
    def _faces(self, size):
        return tuple(_Face(path, size) for path in self.font_paths)

    @functools.lru_cache(maxsize=32)
    def _first_size(self, height):
        size = height + height // 2
        while size > 4:
            box = self._faces(size)[0].ink(_CJK_REFERENCE)
            if box is None or box[1] - box[0] <= height:
                return size
            size -= 1
        return size

    @functools.lru_cache(maxsize=8192)
    def _glyph(self, ch, size):
        """(face or None when no font has ch, advance in pixels)."""
        faces = self._faces(size)
        if ord(ch) < 32 or 127 <= ord(ch) < 160:
            return None, faces[0].advance(_CJK_REFERENCE)  # control characters: shown, reported
        for face in faces:
            if face.has(ch):
                return face, face.advance(ch)
        return None, faces[0].advance(_CJK_REFERENCE)

    def _style(self, text, height):
        """(size, baseline row) for text in a line of `height` pixels."""
        size = self._first_size(height)
        while True:
            top, bottom = 0, 0
            for ch in (set(text) - {"\n"}) | {_CJK_REFERENCE, _ELLIPSIS}:
                face = self._glyph(ch, size)[0]
                box = face.ink(ch) if face is not None else None
                if box is not None:
                    top, bottom = min(top, box[0]), max(bottom, box[1])
            if bottom - top <= height or size <= 4:
                return size, (height - (bottom - top)) // 2 - top
            size -= 1

    def rasterize(self, text, height=16, max_width=None, max_lines=1, overflow="error"):
        """Render text into lines of `height` pixels; see the module docstring for overflow."""
        if not isinstance(text, str):
            raise BitmapError("text to render is not a string")
        if not 6 <= height <= MAX_H:
            raise BitmapError("line height %d is outside 6..%d" % (height, MAX_H))
        if max_lines < 1 or max_lines * height > MAX_H:
            raise BitmapError("%d lines of %d px exceed %d px" % (max_lines, height, MAX_H))
        if overflow not in ("error", "ellipsis"):
            raise BitmapError("overflow must be 'error' or 'ellipsis'")
        limit = MAX_W if max_width is None else min(max_width, MAX_W)
        text = text.replace("\t", " ").replace("\r\n", "\n").strip()
        if not text:
            raise BitmapError("nothing to render")
        size, baseline = self._style(text, height)
        lines = self._wrap(text, size, limit)
        cut = 0
        if len(lines) > max_lines:
            rest = sum(len(line) for line in lines[max_lines:])
            if overflow == "error":
                raise TextTooWide("text of %d characters needs %d lines of %d px, %d allowed"
                                  % (len(text), len(lines), limit, max_lines))
            lines = lines[:max_lines]
            last = lines[-1]
            ell_w = self._glyph(_ELLIPSIS, size)[1]
            while last and self._width(last, size) + ell_w > limit:
                last = last[:-1]
                rest += 1
            lines[-1] = last + _ELLIPSIS
            cut = rest
        return self._draw(lines, height, size, baseline, cut)

    def render(self, text, height=16, max_width=None, max_lines=1):
        """Render text to a wire bitmap; raises TextTooWide rather than cutting."""
        return self.rasterize(text, height, max_width, max_lines).bitmap

    def _width(self, chars, size):
        return sum(self._glyph(ch, size)[1] for ch in chars)

    def _wrap(self, text, size, limit):
        lines = []
        for para in text.split("\n"):
            line, width = "", 0
            for ch in para:
                adv = self._glyph(ch, size)[1]
                if adv > limit:
                    raise TextTooWide("one character is wider than %d px" % limit)
                if width + adv > limit:
                    # Latin words move whole to the next line; CJK breaks anywhere.
                    head, tail = line, ""
                    if ch.isalnum() and ord(ch) < 0x2E80 and " " in line:
                        cut_at = line.rindex(" ")
                        head, tail = line[:cut_at], line[cut_at + 1:]
                    lines.append(head.rstrip())
                    line = tail + ("" if ch == " " else ch)
                    width = self._width(line, size)
                else:
                    line += ch
                    width += adv
            lines.append(line)
        return lines

    def _draw(self, lines, height, size, baseline, cut):
        from PIL import Image, ImageDraw

        width = max(1, max(self._width(line, size) for line in lines))
        image = Image.new("1", (width, height * len(lines)), 0)
        draw = ImageDraw.Draw(image)
        draw.fontmode = "1"  # FreeType mono hinting: crisp strokes, no grey to threshold
        missing = []
        for row, line in enumerate(lines):
            x, top = 0, row * height
            for ch in line:
                face, adv = self._glyph(ch, size)
                if face is None:
                    if ch not in missing:
                        missing.append(ch)
                    _placeholder(draw, x, top, adv, height)
                elif not ch.isspace():
                    draw.text((x, top + baseline), ch, font=face.font, fill=1, anchor="ls")
                x += adv
        if missing:
            # Code points only: names are personal data and stay out of the log.
            log.warning("no font has %s; drawn as boxes",
                        " ".join("U+%04X" % ord(ch) for ch in missing))
        return Rendering(from_image(image), len(lines), tuple(missing), cut)


def _placeholder(draw, x, top, adv, height):
    # A crossed box: plainly "a character is missing here", unlike any real glyph.
    x0, y0, x1, y1 = x + 1, top + 1, x + adv - 2, top + height - 2
    draw.rectangle((x0, y0, x1, y1), outline=1)
    draw.line((x0, y0, x1, y1), fill=1)
    draw.line((x0, y1, x1, y0), fill=1)


@functools.lru_cache(maxsize=1)
def default_renderer():
    return TextRenderer()


def rasterize(text, height=16, max_width=None, max_lines=1, overflow="error"):
    """Render with the system's CJK fonts; returns a Rendering."""
    return default_renderer().rasterize(text, height, max_width, max_lines, overflow)


def render(text, height=16, max_width=None, max_lines=1):
    """Render with the system's CJK fonts; returns the wire bitmap dict."""
    return default_renderer().render(text, height, max_width, max_lines)


def qr_bitmap(text, error="m"):
    """A QR code's module matrix as a wire bitmap: one pixel per module, no quiet zone.

    The device scales it up and adds the quiet zone itself (firmware/screens.py).
    """
    import segno

    code = segno.make_qr(text, error=error)
    return pack([[1 if dark else 0 for dark in row] for row in code.matrix_iter(scale=1, border=0)])
