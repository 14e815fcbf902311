"""Give functions already loaded in this process new global names, with no compiler: a generated ELF shared object.

MLX's Linux library calls ``cblas_sgemm`` and friends by those names, looked up in the process's global scope. The
OpenBLAS of the ``scipy-openblas32`` wheel exports them as ``scipy_cblas_sgemm`` etc. (so that it can sit beside
other BLAS libraries). :func:`load_aliases` makes MLX find them anyway: it writes a small ELF shared object whose
dynamic symbol table defines each wanted name as an *absolute* symbol (``SHN_ABS``) whose value is the address of
the function already loaded, and ``dlopen``\\ s it with ``RTLD_GLOBAL``. The object holds no code and no
relocations: a symbol table, its string table, a SysV hash table and a dynamic section, in one readable and
writable segment (glibc's loader adjusts the dynamic section's addresses in place) and a non-executable-stack note.
A call through an alias goes straight into the original function (no trampoline), and ``dladdr`` of an alias
names the original library, so code that checks which library a function comes from sees the original one.

Follows the System V ABI's ELF-64 object file format (header, program headers, ``.dynsym``, ``.dynstr``, DT_HASH
as in the SysV gABI, chapter 5). Absolute symbols in shared objects are taken at face value (not shifted by the
load address) since glibc 2.28; MLX's Linux wheels require glibc 2.35. The addresses are this process's, so the
object is built per process, in an anonymous memory file (``memfd_create``; a temporary file that is removed at
once where that fails) that is never reused.
"""

from __future__ import annotations

import ctypes
import os
import platform
import struct
import sys
import tempfile

_MACHINES = {"x86_64": 62, "amd64": 62, "aarch64": 183, "arm64": 183}  # e_machine: EM_X86_64, EM_AARCH64
_PT_LOAD, _PT_DYNAMIC, _PT_GNU_STACK = 1, 2, 0x6474E551
_PF_W, _PF_R = 2, 4
_DT_NULL, _DT_HASH, _DT_STRTAB, _DT_SYMTAB, _DT_STRSZ, _DT_SYMENT = 0, 4, 5, 6, 10, 11
_SHN_ABS = 0xFFF1
_STB_GLOBAL, _STT_FUNC = 1, 2
_EHDR, _PHDR, _SYM, _DYN = 64, 56, 24, 16


def elf_hash(name: bytes) -> int:
    """The SysV ELF hash of a symbol name (gABI, "Hash Table")."""
    h = 0
    for c in name:
        h = ((h << 4) + c) & 0xFFFFFFFF
        g = h & 0xF0000000
        if g:
            h ^= g >> 24
        h &= ~g & 0xFFFFFFFF
    return h


def machine_code() -> int | None:
    """ELF ``e_machine`` of this process (x86_64 or aarch64, little-endian), or ``None`` elsewhere."""
    if sys.byteorder != "little" or struct.calcsize("P") != 8:
        return None
    return _MACHINES.get(platform.machine().lower())


def alias_object(symbols: dict[str, int], machine: int) -> bytes:
    """The bytes of an ELF-64 little-endian shared object defining each ``name -> address`` as a global absolute
    function symbol.

    Args:
        symbols: ASCII names (no NUL) to absolute addresses (non-zero: the loader skips symbols of value 0).
        machine: ELF ``e_machine`` (:func:`machine_code`).

    Raises:
        ValueError: no symbols, an empty or non-ASCII name, or an address of 0 or beyond 64 bits.
    """
    if not symbols:
        raise ValueError("alias_object: no symbols")
    names = []
    for name, address in symbols.items():
        raw = name.encode("ascii")
        if not raw or b"\0" in raw or not 0 < address < 2**64:
            raise ValueError(f"alias_object: bad symbol {name!r} -> {address!r}")
        names.append((raw, address))
    nsyms = len(names) + 1  # index 0 is the undefined symbol
    strtab = bytearray(b"\0")
    offsets = []
    for raw, _ in names:
        offsets.append(len(strtab))
        strtab += raw + b"\0"
    nbucket = max(1, len(names))
    buckets, chains = [0] * nbucket, [0] * nsyms
    for index, (raw, _) in enumerate(names, start=1):  # prepend each symbol to its bucket's chain
        b = elf_hash(raw) % nbucket
        chains[index], buckets[b] = buckets[b], index
    hashtab = struct.pack(f"<II{nbucket}I{nsyms}I", nbucket, nsyms, *buckets, *chains)

    nphdr = 3
    hash_off = _EHDR + nphdr * _PHDR
    sym_off = _align(hash_off + len(hashtab), 8)
    str_off = sym_off + nsyms * _SYM
    dyn_off = _align(str_off + len(strtab), 8)
    dynamic = [(_DT_HASH, hash_off), (_DT_STRTAB, str_off), (_DT_SYMTAB, sym_off), (_DT_STRSZ, len(strtab)),
               (_DT_SYMENT, _SYM), (_DT_NULL, 0)]
    size = dyn_off + len(dynamic) * _DYN

    out = bytearray(size)
    ident = b"\x7fELF" + bytes([2, 1, 1, 0]) + bytes(8)  # 64-bit, little-endian, version 1, System V ABI
    struct.pack_into("<16sHHIQQQIHHHHHH", out, 0, ident, 3, machine, 1, 0, _EHDR, 0, 0, _EHDR, _PHDR, nphdr,
                     64, 0, 0)  # ET_DYN, no entry point, no section headers
    phdrs = [(_PT_LOAD, _PF_R | _PF_W, 0, 0, 0, size, size, 0x1000),
             (_PT_DYNAMIC, _PF_R | _PF_W, dyn_off, dyn_off, dyn_off, len(dynamic) * _DYN, len(dynamic) * _DYN, 8),
             (_PT_GNU_STACK, _PF_R | _PF_W, 0, 0, 0, 0, 0, 16)]
    for i, ph in enumerate(phdrs):
        struct.pack_into("<IIQQQQQQ", out, _EHDR + i * _PHDR, *ph)
    out[hash_off:hash_off + len(hashtab)] = hashtab
    info = (_STB_GLOBAL << 4) | _STT_FUNC
    for index, ((_, address), name_off) in enumerate(zip(names, offsets), start=1):
        struct.pack_into("<IBBHQQ", out, sym_off + index * _SYM, name_off, info, 0, _SHN_ABS, address, 0)
    out[str_off:str_off + len(strtab)] = strtab
    for i, (tag, value) in enumerate(dynamic):
        struct.pack_into("<qQ", out, dyn_off + i * _DYN, tag, value)
    return bytes(out)


def _align(n: int, a: int) -> int:
    return (n + a - 1) // a * a


def load_aliases(symbols: dict[str, int]) -> ctypes.CDLL:
    """Make each ``name`` of ``symbols`` a global symbol of this process for its ``address`` (see the module's
    notes). Linux on x86_64 or aarch64 with glibc only.

    Args:
        symbols: names to addresses of functions loaded in this process (they must stay loaded: ctypes never
            unloads a library).

    Returns:
        The loaded alias object (keep it or not: it stays loaded).

    Raises:
        OSError: not such a platform, or the object could not be written or loaded.
        ValueError: as :func:`alias_object`.
    """
    machine = machine_code()
    if machine is None or not sys.platform.startswith("linux"):
        raise OSError(f"ELF aliases need Linux on x86_64 or aarch64 (little-endian), not {platform.machine()}")
    image = alias_object(symbols, machine)
    try:
        # The descriptor stays open for the life of the process: glibc identifies a loaded object by its path,
        # and a closed descriptor's number (hence "/proc/self/fd/N") could come back for another object.
        fd = os.memfd_create("sd_mlx-aliases", os.MFD_CLOEXEC)
    except (AttributeError, OSError):
        fd = None
    if fd is not None:
        try:
            os.write(fd, image)
            return ctypes.CDLL(f"/proc/self/fd/{fd}", mode=ctypes.RTLD_GLOBAL)
        except OSError:
            os.close(fd)
    with tempfile.NamedTemporaryFile(prefix="sd_mlx-aliases-", suffix=".so") as fh:
        fh.write(image)
        fh.flush()
        return ctypes.CDLL(fh.name, mode=ctypes.RTLD_GLOBAL)
