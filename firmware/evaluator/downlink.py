# Checks for the hub's screen downlinks (`ctx`, `prompt`, `cat`; docs/protocol.md) before the
# rating state machine uses them: a malformed message is refused where it arrives, with a
# CodecError naming the field, instead of breaking a screen later. Portable core.
from . import codec

KIND_JI = "ji"  # 即办件: rated once when done
KIND_CN_ACC = "cn_acc"  # 承诺件 at acceptance: only the staff member is rated
KIND_CN_DLV = "cn_dlv"  # 承诺件 at delivery: staff and item
KINDS = (KIND_JI, KIND_CN_ACC, KIND_CN_DLV)

AREA_ITEM = "item"  # a reason about the service item (事项)
AREA_STAFF = "staff"  # a reason about the staff member (工作人员)

MAX_CATALOGUE = 16  # reasons in one catalogue
MAX_TTL_S = 3600  # a prompt's ttl in seconds, 1..MAX_TTL_S
MAX_BATCH = 10000  # `n`, the cases one batch rating covers
MAX_BITMAP_W = 1024  # the same limits as display.py's blit and hub/bitmaps.py
MAX_BITMAP_H = 64
MAX_BITMAP_BYTES = 2048


def is_int(value):
    # bool is an int subclass on CPython; `"n": true` is malformed.
    return isinstance(value, int) and not isinstance(value, bool)


def check_bitmap(bm, name):
    """A wire bitmap {"w","h","b"} or None; else CodecError."""
    if bm is None:
        return None
    if not isinstance(bm, dict):
        raise codec.CodecError(name + ": bitmap not an object")
    w = bm.get("w")
    h = bm.get("h")
    b = bm.get("b")
    # isinstance() spelled out (not is_int) so the type checker knows w and h are ints below.
    if not isinstance(w, int) or isinstance(w, bool) or not 0 < w <= MAX_BITMAP_W:
        raise codec.CodecError(name + ": bitmap size")
    if not isinstance(h, int) or isinstance(h, bool) or not 0 < h <= MAX_BITMAP_H:
        raise codec.CodecError(name + ": bitmap size")
    if (w + 7) // 8 * h > MAX_BITMAP_BYTES:
        raise codec.CodecError(name + ": bitmap size")
    # Exact padded base64 length of ceil(w/8)*h bytes: a short bitmap would make the screen
    # code read past its end.
    if not isinstance(b, str) or len(b) != ((w + 7) // 8 * h + 2) // 3 * 4:
        raise codec.CodecError(name + ": bitmap data length")
    return bm


def check_prompt(prompt):
    if not isinstance(prompt, dict):
        raise codec.CodecError("prompt: not an object")
    codec.check_id(prompt.get("pid"), "pid")
    codec.check_id(prompt.get("case", ""), "case", True)
    if prompt.get("kind") not in KINDS:
        raise codec.CodecError("kind: unknown")
    n = prompt.get("n", 1)
    if not is_int(n) or not 1 <= n <= MAX_BATCH:
        raise codec.CodecError("n: not 1..10000")
    ttl = prompt.get("ttl")
    if ttl is not None and (not is_int(ttl) or not 1 <= ttl <= MAX_TTL_S):
        raise codec.CodecError("ttl: not 1..3600")
    check_bitmap(prompt.get("item"), "item")
    return prompt


def check_context(ctx):
    if not isinstance(ctx, dict):
        raise codec.CodecError("ctx: not an object")
    codec.check_id(ctx.get("w", ""), "w", True)
    codec.check_id(ctx.get("sn", ""), "sn", True)
    check_bitmap(ctx.get("name"), "name")
    check_bitmap(ctx.get("win"), "win")
    return ctx


def check_catalogue(cat):
    if not isinstance(cat, dict):
        raise codec.CodecError("cat: not an object")
    codec.check_id(cat.get("cv"), "cv")
    entries = cat.get("rs")
    if not isinstance(entries, list) or len(entries) > MAX_CATALOGUE:
        raise codec.CodecError("rs: not a list of at most 16 reasons")
    for i in range(len(entries)):
        entry = entries[i]
        if not isinstance(entry, dict):
            raise codec.CodecError("rs: reason not an object")
        code = codec.check_id(entry.get("c"), "c")
        for j in range(i):
            if entries[j]["c"] == code:
                raise codec.CodecError("c: duplicate code")
        if entry.get("a") not in (None, AREA_ITEM, AREA_STAFF):
            raise codec.CodecError("a: not item or staff")
        check_bitmap(entry.get("bm"), "bm")
    return cat
