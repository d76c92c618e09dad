"""Run a MicroPython module from a ROMFS image kept outside the MicroPython heap (CPython).

    python tests/mp_display/romfs_run.py ROMFS HEAP MODULE [args...]

Boards execute .mpy files in place from a romfs partition: bytecode and bytes constants
(ui_text.py's bitmaps) cost no heap. The MicroPython unix port packaged as a CPython
extension (micropython_run) lets this process hold the image in its own memory, the way
flash is mapped, so heap figures measured here are the ones a board would see.
Exit status 3 when that extension is missing (the caller then loads .mpy files instead).
"""
import ctypes
import mmap
import os
import sys

_BOOT = ("import os,sys,uctypes,vfs\n"
         "a,n=os.getenv('PJ_DISPLAY_ROMFS').split(':')\n"
         "vfs.mount(vfs.VfsRom(uctypes.bytearray_at(int(a),int(n))),'/rom')\n"
         "sys.path.insert(0,'/rom')\n"
         "del a,n\n"
         "import %s\n")


def main(argv):
    if len(argv) < 3:
        print(__doc__, file=sys.stderr)
        return 2
    try:
        import micropython_run
    except ImportError:
        return 3
    romfs, heap, module, rest = argv[0], argv[1], argv[2], argv[3:]
    with open(romfs, "rb") as f:
        image = mmap.mmap(f.fileno(), 0, flags=mmap.MAP_PRIVATE,
                          prot=mmap.PROT_READ | mmap.PROT_WRITE)
    view = (ctypes.c_char * len(image)).from_buffer(image)
    os.environ["PJ_DISPLAY_ROMFS"] = "%d:%d" % (ctypes.addressof(view), len(image))
    return micropython_run.run_main(["micropython", "-X", "heapsize=" + heap, "-c",
                                     _BOOT % module, *rest])


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
