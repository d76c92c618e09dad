# Star keys over fake pins: debounce, one press per push, chords, stuck keys.
# Runs under CPython (pytest) and MicroPython (tests/core/run.py).
from evaluator.keys import Keys


class _Pins:
    """Five fake pins with pull-ups: level 1 when released, 0 while pressed."""

    def __init__(self):
        self.level = {1: 1, 2: 1, 3: 1, 4: 1, 5: 1}

    def pin(self, stars):
        return lambda: self.level[stars]

    def by_stars(self):
        return {s: self.pin(s) for s in (1, 2, 3, 4, 5)}


def _keys(**kw):
    pins = _Pins()
    keys = Keys(pins.by_stars(), **kw)
    keys.poll(0)  # learn the levels
    return pins, keys


def _run(keys, start, stop, step=10):
    # Poll from start to stop (inclusive) and collect every press reported.
    pressed = []
    for now in range(start, stop + 1, step):
        pressed.extend(keys.poll(now))
    return pressed


def test_a_clean_press_is_reported_once_after_the_debounce_time():
    pins, keys = _keys()
    pins.level[4] = 0
    assert list(keys.poll(10)) == []
    assert list(keys.poll(30)) == []
    assert list(keys.poll(40)) == [4]  # stable for 30 ms
    assert _run(keys, 50, 2000) == []  # held: no repeats
    pins.level[4] = 1
    assert _run(keys, 2010, 2100) == []
    pins.level[4] = 0
    assert _run(keys, 2110, 2200) == [4]


def test_contact_bounce_makes_a_single_press():
    pins, keys = _keys()
    pressed = []
    now = 10
    for level in (0, 1, 0, 1, 0, 0, 1, 0):  # bouncing every 5 ms ...
        pins.level[2] = level
        pressed.extend(keys.poll(now))
        now += 5
    pressed.extend(_run(keys, now, now + 100, 5))  # ... then settled down
    pins.level[2] = 1
    for level in (1, 0, 1, 0, 1):  # bouncing on release
        pins.level[2] = level
        pressed.extend(keys.poll(now + 200))
        now += 5
    pressed.extend(_run(keys, now + 200, now + 400, 5))
    assert pressed == [2]


def test_a_glitch_shorter_than_the_debounce_time_is_no_press():
    pins, keys = _keys()
    pins.level[5] = 0
    keys.poll(10)
    keys.poll(20)
    pins.level[5] = 1
    assert _run(keys, 30, 500) == []


def test_active_high_keys():
    levels = {3: 0}
    keys = Keys({3: lambda: levels[3]}, active=1)
    keys.poll(0)
    levels[3] = 1
    assert _run(keys, 10, 100) == [3]


def test_two_keys_going_down_together_are_ignored_and_counted():
    pins, keys = _keys()
    pins.level[1] = 0
    pins.level[5] = 0
    assert _run(keys, 10, 200) == []
    assert keys.chords == 1
    pins.level[1] = 1
    pins.level[5] = 1
    _run(keys, 210, 300)
    pins.level[3] = 0
    assert _run(keys, 310, 400) == [3]  # a single key afterwards works


def test_a_held_key_does_not_block_the_others():
    pins, keys = _keys()
    pins.level[1] = 0
    assert _run(keys, 10, 100) == [1]
    pins.level[4] = 0
    assert _run(keys, 110, 200) == [4]


def test_a_key_held_past_the_limit_is_reported_stuck_until_released():
    pins, keys = _keys(stuck_ms=1000)
    pins.level[2] = 0
    assert _run(keys, 10, 1030) == [2]
    assert keys.stuck == []
    keys.poll(1040)  # held for 1000 ms since the press was accepted
    assert keys.stuck == [2] and keys.stuck_events == 1
    assert _run(keys, 1050, 5000) == []
    assert keys.stuck == [2] and keys.stuck_events == 1
    pins.level[2] = 1
    _run(keys, 5010, 5100)
    assert keys.stuck == []
    pins.level[2] = 0
    assert _run(keys, 5110, 5200) == [2]  # works again after release


def test_a_key_down_at_boot_makes_no_press_and_turns_stuck():
    pins = _Pins()
    pins.level[5] = 0
    keys = Keys(pins.by_stars(), stuck_ms=500)
    assert _run(keys, 0, 1000) == []
    assert keys.stuck == [5]
    pins.level[3] = 0
    assert _run(keys, 1010, 1100) == [3]  # the others still work
    pins.level[5] = 1
    pins.level[3] = 1
    _run(keys, 1110, 1200)
    assert keys.stuck == []


def test_timing_survives_the_tick_counter_wrapping():
    period = 1 << 16

    def diff(a, b):  # like MicroPython's time.ticks_diff with a small period
        return ((a - b + period // 2) & (period - 1)) - period // 2

    pins = _Pins()
    keys = Keys(pins.by_stars(), diff=diff)
    keys.poll(period - 20)
    pins.level[4] = 0
    assert list(keys.poll(period - 10)) == []
    assert list(keys.poll(5)) == []
    assert list(keys.poll(20)) == [4]
