"""The uncompressed kernel (vmlinux) inside a bzImage, when it can boot by its PVH entry point.

Under TCG most of a guest's boot went into the bzImage unpacking itself: measured here, a
Debian 6.1 kernel (XZ) took 10-11 s from QEMU start to the agent's ready, and its vmlinux
(an ELF with a Xen PVH entry note, which QEMU's -kernel starts directly, skipping the
real-mode setup and the decompressor) 4-5 s on the same host. The image build stores the
vmlinux beside the vmlinuz when the payload can be unpacked (xz and gzip here, zstd through
the `zstd` program) and carries the PVH note; otherwise guests boot the vmlinuz as before.
"""

from __future__ import annotations

import lzma
import shutil
import struct
import tempfile
import zlib
from pathlib import Path

from harness.errors import CommandFailed
from harness.run import run

# The Xen ELF note QEMU looks for to boot an ELF kernel in 32-bit protected mode (PVH).
XEN_ELFNOTE_PHYS32_ENTRY = 18
_XZ = b"\xfd7zXZ\x00"
_GZIP = b"\x1f\x8b\x08"
_ZSTD = b"\x28\xb5\x2f\xfd"


def bzimage_payload(bzimage: bytes) -> bytes | None:
    """The compressed kernel inside a bzImage (boot protocol >= 2.08), or None."""
    if len(bzimage) < 0x250 or bzimage[0x202:0x206] != b"HdrS":
        return None
    setup_sects = bzimage[0x1F1] or 4
    offset, length = struct.unpack_from("<II", bzimage, 0x248)
    start = (setup_sects + 1) * 512 + offset
    payload = bzimage[start : start + length]
    return payload if len(payload) == length and length > 0 else None


def _unzstd(payload: bytes) -> bytes | None:
    zstd = shutil.which("zstd")
    if zstd is None:
        return None
    with tempfile.TemporaryDirectory(prefix="ksmh-vmlinux-") as tmp:
        src, dst = Path(tmp) / "payload.zst", Path(tmp) / "vmlinux"
        # The kernel appends the unpacked size (4 bytes) after the frame: zstd refuses those.
        src.write_bytes(payload[:-4])
        try:
            run([zstd, "-dqf", "-o", str(dst), str(src)], timeout=120)
        except CommandFailed:
            return None
        return dst.read_bytes()


def decompress_payload(payload: bytes) -> bytes | None:
    """The payload unpacked by its magic (xz, gzip, zstd), or None for anything else."""
    try:
        if payload.startswith(_XZ):
            return lzma.LZMADecompressor(format=lzma.FORMAT_XZ).decompress(payload)
        if payload.startswith(_GZIP):
            # One gzip member: the kernel pads after it, which a decompressobj leaves unused.
            return zlib.decompressobj(16 + zlib.MAX_WBITS).decompress(payload)
        if payload.startswith(_ZSTD):
            return _unzstd(payload)
    except (lzma.LZMAError, OSError, EOFError, zlib.error):
        return None
    return None


def has_pvh_note(elf: bytes) -> bool:
    """Whether a 64-bit little-endian ELF has the Xen PHYS32_ENTRY note in a PT_NOTE segment."""
    if len(elf) < 64 or elf[:4] != b"\x7fELF" or elf[4] != 2 or elf[5] != 1:
        return False
    (phoff,) = struct.unpack_from("<Q", elf, 0x20)
    phentsize, phnum = struct.unpack_from("<HH", elf, 0x36)
    for i in range(phnum):
        base = phoff + i * phentsize
        if base + 56 > len(elf):
            return False
        (p_type,) = struct.unpack_from("<I", elf, base)
        if p_type != 4:  # PT_NOTE
            continue
        (off,) = struct.unpack_from("<Q", elf, base + 8)
        (size,) = struct.unpack_from("<Q", elf, base + 32)
        if _notes_have_pvh(elf[off : off + size]):
            return True
    return False


def _notes_have_pvh(notes: bytes) -> bool:
    pos = 0
    while pos + 12 <= len(notes):
        namesz, descsz, kind = struct.unpack_from("<III", notes, pos)
        name = notes[pos + 12 : pos + 12 + namesz].rstrip(b"\0")
        if name == b"Xen" and kind == XEN_ELFNOTE_PHYS32_ENTRY:
            return True
        pos += 12 + (namesz + 3) // 4 * 4 + (descsz + 3) // 4 * 4
    return False


def pvh_vmlinux(bzimage: bytes) -> bytes | None:
    """The bzImage's vmlinux when it boots by PVH (see the module docstring), else None."""
    payload = bzimage_payload(bzimage)
    elf = decompress_payload(payload) if payload is not None else None
    return elf if elf is not None and has_pvh_note(elf) else None
