"""Names musl's libc the way musl systems install it, in a musllinux wheel built by Zig.

    python scripts/musl_libc_needed.py WHEEL...

Zig links a musl target against its own stub of musl's libc, whose soname is ``libc.so``,
so the extension's ``NEEDED`` entry is ``libc.so``: a file that only musl's development
package installs (Alpine's ``musl-dev``), which auditwheel therefore takes for an outside
library (the wheel is then only ``linux_x86_64``). Musl's loader is installed as
``libc.musl-<arch>.so.1`` (what the musllinux policy expects): each ``.so`` of the wheel
gets that name through ``patchelf --replace-needed``, and the wheel's RECORD its new hash
and size. A wheel with nothing to change is left as it is.
"""

from __future__ import annotations

import base64
import hashlib
import pathlib
import re
import subprocess
import sys
import tempfile
import zipfile

ZIG_MUSL_LIBC = "libc.so"


def musl_libc(wheel: pathlib.Path) -> str:
    """``libc.musl-<arch>.so.1`` for the wheel's platform tag (``..._x86_64.whl``)."""
    found = re.search(r"musllinux_\d+_\d+_(\w+)\.whl$", wheel.name)
    if found is None:
        raise SystemExit(f"{wheel.name}: not a musllinux wheel")
    return f"libc.musl-{found.group(1)}.so.1"


def needed(library: pathlib.Path) -> list[str]:
    out = subprocess.run(
        ["patchelf", "--print-needed", str(library)], check=True, capture_output=True, text=True
    ).stdout
    return out.split()


def record_line(name: str, data: bytes) -> str:
    digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
    return f"{name},sha256={digest},{len(data)}"


def fix(wheel: pathlib.Path) -> bool:
    """Rename the libc of the wheel's extensions; whether anything changed."""
    target = musl_libc(wheel)
    with zipfile.ZipFile(wheel) as source:
        entries = [(info, source.read(info)) for info in source.infolist()]
    patched: dict[str, bytes] = {}
    with tempfile.TemporaryDirectory() as scratch:
        for info, data in entries:
            if not info.filename.endswith(".so"):
                continue
            library = pathlib.Path(scratch) / pathlib.Path(info.filename).name
            library.write_bytes(data)
            if ZIG_MUSL_LIBC not in needed(library):
                continue
            subprocess.run(
                ["patchelf", "--replace-needed", ZIG_MUSL_LIBC, target, str(library)], check=True
            )
            patched[info.filename] = library.read_bytes()
    if not patched:
        return False
    rewritten = wheel.with_suffix(".tmp")
    with zipfile.ZipFile(rewritten, "w", zipfile.ZIP_DEFLATED) as out:
        for info, data in entries:
            if info.filename in patched:
                data = patched[info.filename]
            elif info.filename.endswith(".dist-info/RECORD"):
                lines = data.decode().splitlines()
                data = "".join(
                    (
                        record_line(line.split(",")[0], patched[line.split(",")[0]])
                        if line.split(",")[0] in patched
                        else line
                    )
                    + "\n"
                    for line in lines
                ).encode()
            out.writestr(info, data)
    rewritten.replace(wheel)
    return True


def main(argv: list[str]) -> int:
    if not argv:
        print(__doc__, file=sys.stderr)
        return 2
    for name in argv:
        wheel = pathlib.Path(name)
        changed = fix(wheel)
        print(f"{wheel.name}: {'NEEDED ' + musl_libc(wheel) if changed else 'unchanged'}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
