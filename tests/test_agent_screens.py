# The Pi's screens (agent/screens.py): every rating state on the 256x64 SSD1322 and the
# 128x64 SSD1306/SH1106, the staff photo on wide panels only (greyscale on the SSD1322,
# dithered on 1-bit panels), photos that cannot be drawn, long item names that scroll, and
# the pre-rendered strings when the Pi has no CJK font. The pictures in docs/agent/ that
# come from fixed views are checked here (PINGJIA_WRITE_SCREENS=1 rewrites them).
import json
import os

import pytest
from PIL import Image, ImageDraw

from agent import screens as S
from conftest import ROOT
from firmware import ui_text
from firmware.evaluator.rating import Rating
from hub import bitmaps
from hub.http_api import Downlink

DOCS_AGENT = os.path.join(ROOT, "docs", "agent")
needs_font = pytest.mark.skipif(not bitmaps.find_fonts(), reason="no CJK font installed")


def portrait():
    """A stand-in staff photo: a face and shoulders in greys."""
    image = Image.new("L", (60, 80), 30)
    draw = ImageDraw.Draw(image)
    draw.rectangle((4, 52, 56, 80), fill=120)
    draw.ellipse((14, 8, 46, 48), fill=210)
    draw.ellipse((22, 20, 27, 25), fill=40)
    draw.ellipse((33, 20, 38, 25), fill=40)
    return image


def downlinks(photo=False):
    sent = []
    dl = Downlink(lambda *a, **k: sent.append(a))
    ctx = dl.ctx("PI0001", "W03", "10234", "张伟")
    if photo:
        ctx["photo"] = S.photo_field(portrait())
    cat = json.loads(dl.cat_payload())
    prompt = dl.prompt("PI0001", "P1", "GD2026-0001", "ji", 3,
                       "不动产登记（二手房转移登记及抵押权注销一并办理）")
    return ctx, cat, prompt


def views(photo=False):
    """(name, view) for every state, from a real Rating fed real hub downlinks."""
    ctx, cat, prompt = downlinks(photo)
    out = []
    r = Rating()
    out.append(("off", r.view()))
    r.set_context(ctx)
    out.append(("idle", r.view()))
    r.set_catalogue(cat)
    r.offer(prompt, 1000)
    out.append(("prompt", r.view()))
    r.press(2, 2000)
    r.press(4, 3000)
    r.press(3, 4000)
    out.append(("reasons", r.view()))
    r.press(1, 5000)
    out.append(("saving", r.view()))
    r.saved(True, 5100)
    out.append(("thanks", r.view()))
    full = Rating()
    full.qr = bitmaps.qr_bitmap("https://hcp.example.gov.cn/r/PI0001")
    full.set_full(True)
    out.append(("full", full.view()))
    return out


def px(image):
    """Grey levels of every pixel (0..255), row by row."""
    return image.convert("L").tobytes()


def lit(image):
    return sum(1 for v in px(image) if v)


@needs_font
@pytest.mark.parametrize("width,mode", [(256, "RGB"), (128, "1")])
def test_every_state_draws_on_both_panel_sizes(width, mode):
    screens = S.Screens(width, 64, mode)
    drawn = {}
    for name, view in views():
        image = screens.render(view, 1000)
        assert image.size == (width, 64) and image.mode == mode
        assert lit(image) > 100, name
        drawn[name] = image.tobytes()
    assert len(set(drawn.values())) == len(drawn)  # each state looks different
    assert screens.bad_bitmaps == 0
    unknown = screens.render({"state": "NEW_STATE"}, 0)
    assert lit(unknown) > 0  # says "state?" rather than going blank


@needs_font
def test_levels_over_the_keys_on_wide_panels_and_pips_on_narrow_ones():
    name, prompt_view = views()[2]
    wide = S.Screens(256, 64, "1").render(prompt_view, 1000)
    narrow = S.Screens(128, 64, "1").render(prompt_view, 1000)
    text = S.Text()
    labels = [text.label(n, 12).width for n in S.LEVELS]
    assert S._spread(labels, 256, 4) is not None and S._spread(labels, 128, 4) is None
    assert lit(wide.crop((0, 51, 256, 64))) > lit(narrow.crop((0, 51, 128, 64))) > 50


@needs_font
def test_saving_shows_the_chosen_level_inverted():
    saving = dict(views())["saving"]
    image = S.Screens(256, 64, "1").render(saving, 1000).convert("L")
    xs = S._spread([S.Text().label(n, 12).width for n in S.LEVELS], 256, 4)
    x = xs[5 - saving["stars"]]
    # The chosen label sits on a lit box: mostly lit, unlike the others.
    box = image.crop((x, 52, x + 20, 63))
    other = image.crop((xs[0], 52, xs[0] + 20, 63))
    assert lit(box) > 150 > lit(other)


@needs_font
def test_the_staff_photo_shows_on_wide_panels_only():
    idle = dict(views(photo=True))["idle"]
    plain = dict(views())["idle"]
    grey = S.Screens(256, 64, "RGB").render(idle, 0).convert("L")
    # Greyscale on the SSD1322: the photo's greys survive.
    assert len(set(px(grey.crop((0, 0, 48, 64))))) > 2
    mono = S.Screens(256, 64, "1").render(idle, 0).convert("L")
    assert set(px(mono.crop((0, 0, 48, 64)))) == {0, 255}  # dithered
    assert lit(mono.crop((0, 0, 48, 64))) > 200
    # Text moves right of the photo; without one it is centred as before.
    assert S.Screens(256, 64, "1").render(plain, 0).tobytes() != mono.convert("1").tobytes()
    narrow = S.Screens(128, 64, "1")
    assert narrow.render(idle, 0).tobytes() == narrow.render(plain, 0).tobytes()
    # A board file can switch it off on a wide panel too.
    off = S.Screens(256, 64, "1", photo=False)
    assert off.render(idle, 0).tobytes() == off.render(plain, 0).tobytes()


def test_photo_field_round_trip_and_limits():
    field = S.photo_field(portrait(), max_w=48, max_h=64, bpp=4)
    assert (field["w"], field["h"], field["bpp"]) == (48, 64, 4)
    image = S.decode_photo(field)
    original = portrait().convert("L")
    original.thumbnail((48, 64))
    diffs = [abs(a - b) for a, b in zip(px(image), px(original))]
    assert max(diffs) <= 17  # 4-bit quantisation only
    one = S.photo_field(portrait(), bpp=1)
    assert set(px(S.decode_photo(one))) <= {0, 255}
    for bad in ({"w": 300, "h": 10, "b": ""}, {"w": 4, "h": 4, "bpp": 4, "b": "AAAA"},
                {"w": 4, "h": 4, "bpp": 2, "b": ""}, {"w": True, "h": 4, "b": ""}, "x"):
        with pytest.raises(S.ScreenError):
            S.decode_photo(bad)


@needs_font
def test_a_photo_that_cannot_be_drawn_is_counted_and_the_screen_still_shows():
    idle = dict(views())["idle"]
    broken = dict(idle, ctx=dict(idle["ctx"], photo={"w": 4, "h": 4, "bpp": 4, "b": "!!"}))
    screens = S.Screens(256, 64, "1")
    assert screens.render(broken, 0).tobytes() == screens.render(idle, 0).tobytes()
    assert screens.bad_photos == 1


@needs_font
def test_a_long_item_name_scrolls_and_comes_back():
    view = dict(views())["prompt"]
    screens = S.Screens(256, 64, "1")
    first = screens.render(view, 0).crop((0, 0, 256, 16)).tobytes()
    assert screens.render(view, 1000).crop((0, 0, 256, 16)).tobytes() == first  # resting
    later = screens.render(view, 4000).crop((0, 0, 256, 16)).tobytes()
    assert later != first
    assert S.marquee(500, 256, 0) == 0 and S.marquee(500, 256, 10 ** 9 % 15000) >= 0
    assert S.marquee(100, 256, 5000) == 0  # short text never moves


def test_without_a_cjk_font_the_mcu_strings_are_used(monkeypatch):
    def no_font():
        raise bitmaps.FontNotFound("no CJK font")

    monkeypatch.setattr(bitmaps, "default_renderer", no_font)
    text = S.Text()
    image = text.label("PAUSED", 32)
    assert text.missing_font
    assert image.size == (ui_text.PAUSED[1], ui_text.PAUSED[2])
    assert image.tobytes() == bytes(ui_text.PAUSED[0])
    assert text.image("10234", 16).getbbox() is not None  # ASCII from Pillow's own font
    screens = S.Screens(128, 64, "1", text=text)
    assert lit(screens.render({"state": "OFF", "ctx": None}, 0)) > 100


# -- the pictures in docs/agent/ ------------------------------------------------------------

PICTURES = {  # file -> (panel width, mode, view name, photo)
    "pi-idle-photo.png": (256, "RGB", "idle", True),
    "pi-full.png": (256, "RGB", "full", False),
    "ssd1306-prompt.png": (128, "1", "prompt", False),
    "ssd1306-reasons.png": (128, "1", "reasons", False),
}


def _picture(width, mode, name, photo):
    image = S.Screens(width, 64, mode).render(dict(views(photo))[name], 1000)
    return image.convert("RGB").resize((width * 3, 64 * 3), Image.NEAREST)


@needs_font
def test_committed_pictures_match_the_screens():
    write = os.environ.get("PINGJIA_WRITE_SCREENS") == "1"
    for filename, spec in PICTURES.items():
        image = _picture(*spec)
        path = os.path.join(DOCS_AGENT, filename)
        if write:
            os.makedirs(DOCS_AGENT, exist_ok=True)
            image.save(path, optimize=True)
        assert os.path.exists(path), "missing %s: PINGJIA_WRITE_SCREENS=1 pytest %s" % (
            path, __file__)
        assert Image.open(path).convert("RGB").tobytes() == image.tobytes(), (
            "%s is stale: PINGJIA_WRITE_SCREENS=1 pytest tests/test_agent_screens.py" % filename)
