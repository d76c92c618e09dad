# The evaluator's display: one 1-bit framebuffer (the panel drivers build on it in
# panels.py), and the device's bitmap form with the bridge to it from wire bitmaps
# (docs/protocol.md "Bitmaps").
#
# Screens draw into the framebuffer with framebuf's own methods; only show() and the
# drivers' init_display(), poweroff() and poweron() touch the bus, and the bus is passed in,
# so the same code runs against fake buses in tests. The framebuffer is allocated once, in
# the constructor.
#
# A device bitmap is one bytes-like object: the rows (MONO_HLSB, ceil(w/8) bytes each, top
# to bottom) followed by three bytes, width low, width high, height. The fixed UI strings
# (ui_text.py) come in this form from flash, and a hub bitmap is decoded into it once, when
# its downlink arrives. blit() hands it to framebuf through one reused list, so drawing a
# bitmap allocates nothing: no FrameBuffer per bitmap, no tuple per blit.
import framebuf
from binascii import a2b_base64

from micropython import const  # MicroPython only: no fallback to load

# Wire bitmap limits; hub/bitmaps.py enforces the same before sending.
_MAX_W = const(1024)
_MAX_H = const(64)
_MAX_BYTES = const(2048)
_QUOTE = const(34)
_BACKSLASH = const(92)
_COLON = const(58)


class Display(framebuf.FrameBuffer):
    """A framebuffer with no panel behind it (the simulator's board).

    show() hands the raw buffer to `sink` (if given) and counts frames. Panel drivers
    (panels.py) subclass this and replace _flush(). `fmt` is the framebuf format of
    `buffer`.
    """

    def __init__(self, width=256, height=64, sink=None, fmt=framebuf.MONO_HLSB):
        self.width = width
        self.height = height
        self.fmt = fmt
        if fmt == framebuf.MONO_HLSB:
            size = ((width + 7) // 8) * height
        else:  # MONO_VLSB: pages of 8 rows
            size = width * ((height + 7) // 8)
        self.buffer = bytearray(size)
        super().__init__(self.buffer, width, height, fmt)
        self.sink = sink
        self.frames = 0  # frames shown
        self.errors = 0  # bus errors on show/init; the heartbeat reports disp=1 when > 0
        self.ok = True  # False after the last bus operation failed

    def show(self):
        """Send the framebuffer to the panel. Returns False (and counts) on a bus error."""
        try:
            self._flush()
        except OSError:
            # A loose cable must not stop the citizen's vote from being recorded; the
            # failure is counted and reported in the heartbeat instead.
            self.errors += 1
            self.ok = False
            return False
        self.frames += 1
        self.ok = True
        return True

    def _flush(self):
        if self.sink is not None:
            self.sink(self.buffer)


def lift(mv, into=None, skip=False):
    """Take the base64 out of a JSON downlink before json.loads sees it.

    mv is the payload, writable (the MQTT client's receive buffer). Every string value
    longer than 64 characters -- a bitmap's "b" -- is decoded into a bytearray with room
    for a device bitmap's three trailing bytes, and replaced in mv by "#<index>" and spaces;
    bitmap(wire, lifted) then finishes it. json.loads never builds the base64 text, the
    largest object a prompt would otherwise need (2.7 KB for the biggest item bitmap).
    Returns the list of decoded bytes; an entry is None where a string was no base64.

    `into`, a bytearray, takes the first such string if it fits (as a memoryview of it):
    the app decodes a prompt's item into one buffer allocated at boot, so a kilobyte never
    has to be found free at once in a heap that has been in use for days. With `skip` the
    strings are only taken out, not decoded (a prompt that cannot be shown now).
    """
    lifted = []
    n = len(mv)
    i = 0
    while i < n:
        if mv[i] != _QUOTE:
            i += 1
            continue
        j = i + 1
        while j < n and mv[j] != _QUOTE:
            j += 2 if mv[j] == _BACKSLASH else 1
        k = j + 1
        while k < n and mv[k] in b" \t\r\n":
            k += 1
        if j - i - 1 > 64 and j < n and (k >= n or mv[k] != _COLON):  # a long value
            lifted.append(None if skip else _unbase64(mv[i + 1:j], into))
            into = None
            tag = ('#%d"' % (len(lifted) - 1)).encode()
            mv[i + 1:i + 1 + len(tag)] = tag
            for m in range(i + 1 + len(tag), j + 1):
                mv[m] = 32  # whitespace after the string: still JSON
        i = j + 1
    return lifted


def _unbase64(text, into=None):
    # base64 text (a str, or a memoryview of bytes) -> its bytes + 3 spare, decoded 64
    # characters at a time into a new bytearray, or into the start of `into` (a view of
    # it) if they fit; None if not base64.
    if len(text) % 4 or len(text) < 4:
        return None
    size = len(text) // 4 * 3
    for c in (text[-1], text[-2]):
        if c == 61 or c == "=":  # padding
            size -= 1
    if into is not None and size + 3 <= len(into):
        out = memoryview(into)[:size + 3]
    else:
        out = bytearray(size + 3)  # type: ignore[assignment]
    at = 0
    for i in range(0, len(text), 64):
        try:
            part = a2b_base64(text[i:i + 64])
        except (ValueError, TypeError):
            return None
        if at + len(part) > size:
            return None
        out[at:at + len(part)] = part
        at += len(part)
    return out if at == size else None


def bitmap(wire, lifted=None):
    """A wire bitmap {"w", "h", "b": base64} as a device bitmap (None stays None).

    "b" may be a "#<index>" that lift() left: its bytes are lifted[index]. Decoded 64
    characters at a time straight into the result: no second copy of a kilobyte-sized
    bitmap. Raises ValueError for a malformed one."""
    if wire is None:
        return None
    try:
        w = wire["w"]
        h = wire["h"]
        b = wire["b"]
        need = ((w + 7) >> 3) * h
        ok = (isinstance(w, int) and isinstance(h, int) and 0 < w <= _MAX_W
              and 0 < h <= _MAX_H and need <= _MAX_BYTES)
        if ok and lifted is not None and b[:1] == "#":
            out = lifted[int(b[1:])]
        elif ok and len(b) == (need + 2) // 3 * 4:
            out = _unbase64(b)
        else:
            out = None
    except (KeyError, TypeError, ValueError, IndexError):
        out = None
    if out is None or len(out) != need + 3:
        raise ValueError("bitmap")
    out[need] = w & 0xFF
    out[need + 1] = w >> 8
    out[need + 2] = h
    return out


def width(bm):
    return bm[-3] | bm[-2] << 8


# framebuf.blit() takes (buffer, width, height, format) as its source; a list can be
# refilled for every bitmap where a tuple or a FrameBuffer would be a new object each time.
_SRC = [b"", 0, 0, framebuf.MONO_HLSB]
# The palette that swaps ink and paper: blit through it to draw a bitmap inverted.
_INVERT = framebuf.FrameBuffer(bytearray(1), 2, 1, framebuf.MONO_HLSB)
_INVERT.pixel(0, 0, 1)


def blit(fb, bm, x, y, invert=False):
    """Draw a device bitmap at (x, y): ink only, or (invert) ink dark on a lit box.

    Anything outside fb is clipped by framebuf; callers that scroll pass a negative x.
    Returns the bitmap's width."""
    src = _SRC
    src[0] = bm
    src[1] = w = bm[-3] | bm[-2] << 8
    src[2] = bm[-1]
    if invert:
        fb.blit(src, x, y, -1, _INVERT)
    else:
        fb.blit(src, x, y, 0)  # key 0: paper is transparent, ink is drawn
    src[0] = b""  # hold no bitmap past its frame
    return w
