# The boot selector: which of the two app slots boots (docs/firmware.md, "Updates over the
# air"). It runs first at every boot, from source on the flash file system, and it is never
# updated over the air: a new firmware image can be broken, this file cannot be replaced by
# one. A board runs this file as its /main.py: the block at the end calls boot(), then
# run() imports the entry module boot() named. The simulator's launcher (simulator/fleet.py)
# imports it instead, calls boot(), drops the module and imports the entry with the same
# rule as run(): an exception while the slot is still on trial rolls back and resets; once
# the trial confirmed itself, a failure is raised like any other.
#
# Dropping the module frees its bytecode (compiled from source, it lives on the heap) before
# the firmware starts; what stays is the names it interned, so it keeps few and short ones.
#
# ota.json in the flash root: {"a": confirmed slot, "t": slot on trial or null, "n": boots
# of the trial so far, "tv": trial version, "rb": version rolled back}. A trial slot gets two
# boots to confirm itself (firmware/ota.py does that once it has reached the hub); a third
# boot without confirmation, or a trial image that does not mount or raises at import,
# rolls back to slot "a" by itself. The confirmed slot has nothing to fall back to: its
# failure raises (a board's watchdog resets it; the simulated device exits). The updater
# imports this module too (the image's compiled copy) for state(), save() and back().
import json
import os

_env = getattr(os, "getenv", None)  # the unix port's; a board has none


def state():
    """ota.json as a dict; absent or unreadable: slot 0 confirmed, nothing on trial."""
    try:
        with open("ota.json") as f:
            st = json.load(f)
        if st.get("a") in (0, 1):
            return st
    except (OSError, ValueError, AttributeError):
        pass
    return {"a": 0}


def save(st):
    """Write ota.json atomically: a power cut leaves the old state or the new, whole."""
    with open("ota.tmp", "w") as f:
        json.dump(st, f)
        f.flush()
    sync = getattr(os, "sync", None)
    if sync is not None:
        sync()
    os.rename("ota.tmp", "ota.json")


def back(st):
    """The state after the trial failed: slot "a" again, and the version that failed."""
    return {"a": st.get("a", 0), "t": None, "n": 0, "rb": st.get("tv")}


def choose(st):
    """(slot to boot, state to write first or None) for the state st."""
    a = st.get("a", 0)
    t = st.get("t")
    if t not in (0, 1) or t == a:
        return a, None
    n = st.get("n", 0)
    if not isinstance(n, int) or n >= 2:
        return a, back(st)  # booted twice on trial and never confirmed
    st = dict(st)
    st["n"] = n + 1
    return t, st


def reset():
    if _env is not None and _env("PJ_ENTRY"):
        raise SystemExit(75)  # the simulated device: its launcher executes it again
    import machine

    machine.reset()


def boot():
    """Choose the slot (counting a trial's boot first), mount its image at /rom and put it
    first on sys.path. Returns (entry module, ota.json text to write should the entry fail
    at import, or None for the confirmed slot). A trial image that does not mount is
    rolled back here."""
    import sys
    import vfs

    st = state()
    n, new = choose(st)
    if new is not None:
        save(new)
    a = n == st.get("a", 0)
    try:
        try:
            vfs.umount("/rom")  # a board mounts segment 0 there by itself
        except OSError:
            pass
        # The simulator maps the slot's file into memory and names its address; a board
        # has slot n as ROMFS segment n.
        p = _env("PJ_SLOT%d" % n) if _env is not None else None
        if p:
            import uctypes

            p = p.split(":")
            p = uctypes.bytearray_at(int(p[0]), int(p[1]))
        else:
            p = vfs.rom_ioctl(2, n)
        vfs.mount(vfs.VfsRom(p), "/rom")  # type: ignore[attr-defined]  # not in the stubs
    except Exception:
        if a:
            raise
        save(back(st))
        reset()
    if "/rom" in sys.path:
        sys.path.remove("/rom")
    sys.path.insert(0, "/rom")  # firmware first: no file on flash can shadow it
    return ((_env("PJ_ENTRY") if _env is not None else None) or "start",
            None if a else json.dumps(back(st)))


def run(e, r):
    """Import the entry module e that boot() named (the app runs inside that import).
    Should it raise while its slot is still on trial, write r (the rollback state) and
    reset. Once the trial confirmed itself (ota.json has no "t"), a later failure is the
    confirmed firmware's own and is raised like any other: a crash must not undo a good
    update. (One-letter names: every name here stays interned on the device heap.)"""
    try:
        __import__(e)
    except Exception:
        if r is None or state().get("t") is None:
            raise
        with open("ota.tmp", "w") as f:
            f.write(r)
        os.rename("ota.tmp", "ota.json")
        reset()


if __name__ == "__main__":
    # Run as the unit's /main.py itself (as hub/flashing.py installs it): the steps of the
    # simulator's loader, except that this module cannot be dropped while it runs, so its
    # bytecode stays on the heap (under 1 KB on a 32-bit board).
    run(*boot())
