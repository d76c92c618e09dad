# The panel drivers we ship: SSD1322 (256x64, 4-bit gray, SPI) on the reference board and
# SSD1306 (128x64, I2C) on the small one. Each is a display.Display whose show() talks to
# the bus passed in; nothing here touches a pin or a bus in a constructor. A separate
# module from display.py so that a board without one of these panels (the simulator's)
# never loads their code.
from micropython import const  # MicroPython only: no fallback to load

import framebuf

from display import Display


def _guard(panel, fn, *args):
    # A bus operation that may fail: counted on the panel instead of raised.
    try:
        fn(*args)
    except OSError:
        panel.errors += 1
        panel.ok = False
        return False
    panel.ok = True
    return True


# SSD1322: 256x64 at 4 bits per pixel. Its RAM is 480 columns wide and addressed in
# groups of 4 pixels; 256-pixel panels are wired to the middle, columns 28..91.
_SSD1322_COL0 = const(28)

# The SSD1322 takes a command byte with D/C low and its parameters as data with D/C high
# (unlike the SSD1306). Encoded as bytes (parameter count, command, parameters...) so the
# sequence stays in flash instead of becoming tuples on the heap.
_SSD1322_INIT = (
    b"\x01\xfd\x12"  # unlock the command interface
    b"\x00\xae"  # display off while configuring
    b"\x01\xb3\x91"  # clock divider / oscillator frequency
    b"\x01\xca\x3f"  # multiplex ratio: 64 rows
    b"\x01\xa2\x00"  # display offset 0
    b"\x01\xa1\x00"  # start line 0
    b"\x02\xa0\x14\x11"  # horizontal increment, nibble remap, COM scan down, dual COM
    b"\x01\xb5\x00"  # GPIO pins unused
    b"\x01\xab\x01"  # internal VDD regulator
    b"\x02\xb4\xa0\xfd"  # enhancement A: external VSL, better low-gray quality
    b"\x01\xc1\x9f"  # contrast current
    b"\x01\xc7\x0f"  # master current: full
    b"\x00\xb9"  # default linear gray table
    b"\x01\xb1\xe2"  # phase 1 / phase 2 lengths
    b"\x02\xd1\x82\x20"  # enhancement B
    b"\x01\xbb\x1f"  # pre-charge voltage
    b"\x01\xb6\x08"  # second pre-charge period
    b"\x01\xbe\x07"  # VCOMH
    b"\x00\xa6"  # normal (not inverted) display
    b"\x00\xa9"  # exit partial display
)


class SSD1322(Display):
    """SSD1322 over 4-wire SPI. spi has write(buf); dc, res, cs are callables taking 0/1.

    The framebuffer stays 1-bit; show() expands it to 4-bit gray one row at a time into
    a single row buffer (width/2 bytes), so no second full-screen buffer exists. A lit
    pixel gets gray `level` (0..15); the left pixel of a pair goes in the high nibble.
    """

    def __init__(self, spi, dc, res, cs, width=256, height=64, level=15, col0=_SSD1322_COL0):
        if width % 8 or width > 480 or height > 128:
            raise ValueError("ssd1322: width must be a multiple of 8, at most 480x128")
        super().__init__(width, height)
        self.spi = spi
        self.dc = dc
        self.res = res
        self.cs = cs
        self.col0 = col0
        self._row = bytearray(width // 2)
        self._cmdbuf = bytearray(1)
        self._params = bytearray(2)
        self._lut = bytearray(4)
        self.set_level(level)  # no bus or pin traffic until init_display()

    def set_level(self, level):
        """Gray level 0..15 of a lit pixel (no bus traffic; takes effect at show())."""
        level = max(0, min(15, level))
        # Index = two pixels (left bit, right bit) -> one byte of two nibbles.
        self._lut[0] = 0
        self._lut[1] = level
        self._lut[2] = level << 4
        self._lut[3] = (level << 4) | level

    def reset(self, sleep_ms=None):
        """Pulse the reset line; sleep_ms(n) is passed in so tests need no clock."""
        self.res(1)
        if sleep_ms:
            sleep_ms(1)
        self.res(0)
        if sleep_ms:
            sleep_ms(10)
        self.res(1)
        if sleep_ms:
            sleep_ms(10)

    def _command(self, cmd, params=None):
        self.cs(1)
        self.dc(0)
        self.cs(0)
        self._cmdbuf[0] = cmd
        self.spi.write(self._cmdbuf)
        if params is not None and len(params):
            self.dc(1)
            self.spi.write(params)
        self.cs(1)

    def _command2(self, cmd, a, b):
        params = self._params
        params[0] = a
        params[1] = b
        self._command(cmd, params)

    def _send_init(self):
        seq = memoryview(_SSD1322_INIT)
        i = 0
        while i < len(seq):
            n = seq[i]
            self._command(seq[i + 1], seq[i + 2:i + 2 + n])
            i += 2 + n
        self._flush()
        self._command(0xAF)  # display on, after the RAM holds a clean frame

    def init_display(self, sleep_ms=None):
        self.reset(sleep_ms)
        return _guard(self, self._send_init)

    def poweroff(self):
        return _guard(self, self._command, 0xAE)

    def poweron(self):
        return _guard(self, self._command, 0xAF)

    def contrast(self, value):
        self._params[0] = value & 0xFF
        return _guard(self, self._command, 0xC1, memoryview(self._params)[:1])

    def _flush(self):
        w = self.width
        last_col = self.col0 + w // 4 - 1
        self._command2(0x15, self.col0, last_col)
        self._command2(0x75, 0, self.height - 1)
        self._command(0x5C)  # the data that follows fills RAM left to right, top down
        src = self.buffer
        row = self._row
        lut = self._lut
        stride = w >> 3
        spi = self.spi
        self.dc(1)
        self.cs(0)
        i = 0
        for _y in range(self.height):
            j = 0
            for _x in range(stride):
                b = src[i]
                row[j] = lut[b >> 6]
                row[j + 1] = lut[(b >> 4) & 3]
                row[j + 2] = lut[(b >> 2) & 3]
                row[j + 3] = lut[b & 3]
                i += 1
                j += 4
            spi.write(row)
        self.cs(1)


_SSD1306_INIT = (
    b"\xae"  # display off
    b"\x20\x00"  # horizontal addressing: one burst fills the whole RAM
    b"\x40"  # start line 0
    b"\xa1"  # column 127 is SEG0 (the usual module orientation)
    b"\xa8\x3f"  # multiplex 64
    b"\xc8"  # COM scan from COM[N-1]
    b"\xd3\x00"  # display offset 0
    b"\xda\x12"  # alternative COM pin configuration (64-row modules)
    b"\xd5\x80"  # clock divide ratio / oscillator
    b"\xd9\xf1"  # pre-charge, internal charge pump
    b"\xdb\x30"  # VCOMH deselect level
    b"\x81\xcf"  # contrast
    b"\xa4"  # output follows RAM
    b"\xa6"  # not inverted
    b"\x8d\x14"  # charge pump on
)


class SSD1306(Display):
    """SSD1306 over I2C. i2c has writeto(addr, buf) and writevto(addr, bufs).

    The framebuffer is MONO_VLSB, the panel's own page layout, so show() sends it as is;
    wire bitmaps (MONO_HLSB) still blit into it because framebuf converts per pixel.
    """

    def __init__(self, i2c, addr=0x3C, width=128, height=64):
        super().__init__(width, height, fmt=framebuf.MONO_VLSB)
        self.i2c = i2c
        self.addr = addr
        self._cmdbuf = bytearray(2)
        self._cmdbuf[0] = 0x80  # control byte: one command byte follows
        self._data_prefix = b"\x40"  # control byte: display data follows

    def _command(self, cmd):
        self._cmdbuf[1] = cmd
        self.i2c.writeto(self.addr, self._cmdbuf)

    def _send_init(self):
        for cmd in _SSD1306_INIT:
            self._command(cmd)
        self._flush()
        self._command(0xAF)

    def init_display(self):
        return _guard(self, self._send_init)

    def poweroff(self):
        return _guard(self, self._command, 0xAE)

    def poweron(self):
        return _guard(self, self._command, 0xAF)

    def contrast(self, value):
        return _guard(self, self._contrast, value)

    def _contrast(self, value):
        self._command(0x81)
        self._command(value & 0xFF)

    def _flush(self):
        for cmd in (0x21, 0, self.width - 1, 0x22, 0, (self.height >> 3) - 1):
            self._command(cmd)
        # writevto sends prefix and buffer in one transaction without joining them.
        self.i2c.writevto(self.addr, (self._data_prefix, self.buffer))
