# The boot selector's choice (firmware/bootsel.py) and the updater's image check
# (firmware/ota.py, _valid()): pure logic, run under CPython (pytest) and under MicroPython
# (tests/core/run.py) alike.
from bootsel import back, choose
from ota import _valid as holds


def test_no_state_boots_slot_0_and_writes_nothing():
    assert choose({"a": 0}) == (0, None)
    assert choose({"a": 1, "t": None, "n": 0}) == (1, None)


def test_a_trial_gets_two_boots_each_counted_before_it_runs():
    st = {"a": 0, "t": 1, "n": 0, "tv": "0.2.0", "rb": None}
    slot, new = choose(st)
    assert slot == 1 and new["n"] == 1 and new["t"] == 1 and new["tv"] == "0.2.0"
    assert st["n"] == 0  # the caller's state is not changed in place
    slot, new = choose(new)
    assert slot == 1 and new["n"] == 2


def test_a_third_boot_without_confirmation_rolls_back_and_remembers_the_version():
    slot, new = choose({"a": 1, "t": 0, "n": 2, "tv": "0.3.0", "rb": None})
    assert slot == 1
    assert new == {"a": 1, "t": None, "n": 0, "rb": "0.3.0"}


def test_a_nonsense_trial_is_no_trial():
    assert choose({"a": 0, "t": 0, "n": 0}) == (0, None)  # trial slot = confirmed slot
    assert choose({"a": 0, "t": 7, "n": 0}) == (0, None)
    slot, new = choose({"a": 0, "t": 1, "n": "x", "tv": "9"})
    assert slot == 0 and new["rb"] == "9"  # an unreadable count: not trusted, rolled back


def test_rollback_state_keeps_the_confirmed_slot():
    assert back({"a": 1, "t": 0, "n": 1, "tv": "1.0"}) == {"a": 1, "t": None, "n": 0,
                                                              "rb": "1.0"}
    assert back({"a": 0}) == {"a": 0, "t": None, "n": 0, "rb": None}


# ---- ROMFS images, made by hand in VfsRom's format ------------------------------------------
def _uint(v):
    out = [v & 0x7F]
    v >>= 7
    while v:
        out.insert(0, 0x80 | (v & 0x7F))
        v >>= 7
    return bytes(out)


def _record(kind, payload):
    return _uint(kind) + _uint(len(payload)) + payload


def _file(name, data):
    return _record(5, _uint(len(name)) + name + _record(2, data))


def _dir(name, *records):
    return _record(4, _uint(len(name)) + name + b"".join(records))


def _image(*records):
    body = b"".join(records)
    size = _uint(len(body))
    if (3 + len(size) + len(body)) % 2:
        size = b"\x80" + size  # the writer's padding: a varint with a leading zero digit
    return b"\xd2\xcd\x31" + size + body


def _reader(image):
    def read(off, buf):
        piece = image[off:off + len(buf)]
        buf[:len(piece)] = piece
        return len(piece)
    return read


def test_an_image_holding_the_entry_module_passes():
    image = _image(_file(b"app.mpy", b"x" * 300), _dir(b"evaluator", _file(b"codec.mpy", b"y")),
                   _file(b"simdevice.mpy", b"z" * 40))
    assert holds(_reader(image), len(image), b"simdevice.mpy", bytearray(64))
    assert holds(_reader(image), len(image), b"app.mpy", bytearray(64))


def test_an_image_without_it_or_not_romfs_or_cut_short_fails():
    image = _image(_file(b"app.mpy", b"x" * 300), _dir(b"simdevice.mpy"))
    buf = bytearray(64)
    assert not holds(_reader(image), len(image), b"simdevice.mpy", buf)  # a folder of that name
    assert not holds(_reader(image), len(image), b"codec.mpy", buf)  # only at the top level
    good = _image(_file(b"simdevice.mpy", b"z"))
    assert not holds(_reader(b"\x00" + good[1:]), len(good), b"simdevice.mpy", buf)
    assert not holds(_reader(good), len(good) - 1, b"simdevice.mpy", buf)  # declared > size
    assert not holds(_reader(b""), 0, b"simdevice.mpy", buf)
