"""A device framebuffer (raw 1-bit bytes) as a picture: pixel rows for tests, PNGs for docs.

The device's Display keeps MONO_HLSB rows (each row MSB first, ceil(w/8) bytes); the
SSD1306 driver keeps MONO_VLSB pages. Both are read here. PNGs are scaled up with an
OLED-like look: lit pixels in amber (or white) on black, a faint gap between pixels.
"""
from PIL import Image, ImageChops

MONO_HLSB = "MONO_HLSB"
MONO_VLSB = "MONO_VLSB"

COLOURS = {
    "amber": (255, 176, 0),
    "white": (235, 240, 255),
    "green": (80, 255, 140),
}
_UNLIT = (6, 6, 6)
_BEZEL = (24, 24, 24)


def buffer_size(w, h, fmt=MONO_HLSB):
    if fmt == MONO_HLSB:
        return (w + 7) // 8 * h
    if fmt == MONO_VLSB:
        return w * ((h + 7) // 8)
    raise ValueError("unknown framebuffer format %r" % fmt)


def to_mono(raw, w, h, fmt=MONO_HLSB):
    """Raw framebuffer -> Pillow mode "1" image, one pixel per device pixel."""
    raw = bytes(raw)
    if len(raw) != buffer_size(w, h, fmt):
        raise ValueError("framebuffer of %d bytes is not %dx%d %s" % (len(raw), w, h, fmt))
    if fmt == MONO_HLSB:
        return Image.frombytes("1", (w, h), raw)
    image = Image.new("1", (w, h), 0)
    px = image.load()
    for page in range((h + 7) // 8):
        for x in range(w):
            byte = raw[page * w + x]
            for bit in range(8):
                y = page * 8 + bit
                if y < h and byte >> bit & 1:
                    px[x, y] = 1
    return image


def pixels(raw, w, h, fmt=MONO_HLSB):
    """Raw framebuffer -> rows of 0/1."""
    data = to_mono(raw, w, h, fmt).convert("L").tobytes()
    return [[1 if data[y * w + x] else 0 for x in range(w)] for y in range(h)]


def to_image(raw, w, h, fmt=MONO_HLSB, scale=3, colour="amber", bezel=2):
    """Raw framebuffer -> RGB image scaled `scale` times, looking like the lit panel."""
    lit = COLOURS.get(colour, colour)
    mono = to_mono(raw, w, h, fmt).convert("L")
    mask = mono.resize((w * scale, h * scale), Image.NEAREST)
    if scale >= 3:
        # Real OLED pixels have dark gaps between them; dim the last row and column of
        # each scaled pixel so the dot structure shows.
        tile = Image.new("L", (scale, scale), 255)
        for i in range(scale):
            tile.putpixel((scale - 1, i), 110)
            tile.putpixel((i, scale - 1), 110)
        grid = Image.new("L", mask.size)
        for ty in range(0, mask.size[1], scale):
            for tx in range(0, mask.size[0], scale):
                grid.paste(tile, (tx, ty))
        mask = ImageChops.multiply(mask, grid)
    panel = Image.new("RGB", mask.size, _UNLIT)
    panel.paste(Image.new("RGB", mask.size, lit), (0, 0), mask)
    if bezel <= 0:
        return panel
    pad = bezel * scale
    framed = Image.new("RGB", (mask.size[0] + 2 * pad, mask.size[1] + 2 * pad), _BEZEL)
    framed.paste(panel, (pad, pad))
    return framed


def save_png(raw, w, h, path, **options):
    """Write the framebuffer as a PNG at path (options as for to_image)."""
    to_image(raw, w, h, **options).save(path, format="PNG", optimize=True)
    return path
