"""Page-content tokens: a tiny alphabet that names whole 4 KiB pages.

A scenario never carries page bytes, only tokens, so the same description drives the real
worker processes and the model and prints in one line:

- ``"a"`` (one printable character) or ``"0x61"`` / ``97``: a page full of that byte;
- ``"zero"``: a page of zero bytes (the same content as byte 0);
- ``"u:<k>"``: a page unique by construction to k. Two pages with the same k are identical,
  and no u-page equals any byte-filled page, so ``u:`` tokens build exact duplicate groups.

This module is imported by the worker child, so it stays free of anything but the stdlib.
"""

from __future__ import annotations

import string

ZERO = "zero"
_PLAIN = set(string.ascii_letters + string.digits)


class TokenError(ValueError):
    """A value that is not a page token; the message says what is accepted."""


def normalize(value: object) -> str:
    """Canonical spelling of a token: 'a', '0x00'-style for other bytes, 'zero', 'u:<k>'.

    Byte 0 is spelled 'zero' because it is the same page content.
    """
    if isinstance(value, bool):
        raise TokenError(f"{value!r} is not a page token")
    if isinstance(value, int):
        return _byte_token(value)
    if not isinstance(value, str):
        raise TokenError(f"{value!r} is not a page token")
    text = value.strip()
    if text == ZERO:
        return ZERO
    if len(text) == 1 and text in _PLAIN:
        return text
    if text.lower().startswith("0x"):
        try:
            return _byte_token(int(text, 16))
        except ValueError:
            pass
    elif text.startswith("u:") and text[2:].isdigit():
        return f"u:{int(text[2:])}"
    raise TokenError(
        f"{value!r} is not a page token (use one letter or digit, 0xNN, zero, or u:<k>)"
    )


def _byte_token(value: int) -> str:
    if not 0 <= value <= 255:
        raise TokenError(f"{value} is not a byte value (0..255)")
    if value == 0:
        return ZERO
    char = chr(value)
    return char if char in _PLAIN else f"0x{value:02x}"


def fill_byte(token: str) -> int | None:
    """The byte a page is filled with, or None for a u-page."""
    if token == ZERO:
        return 0
    if token.startswith("u:"):
        return None
    if token.startswith("0x"):
        return int(token, 16)
    return ord(token)


def page_bytes(token: str, page_size: int) -> bytes:
    """The exact bytes of one page with this (canonical) token."""
    byte = fill_byte(token)
    if byte is not None:
        return bytes([byte]) * page_size
    # A text header makes the page unlike every byte fill; the rest stays zero.
    header = f"ksm-harness unique page {token[2:]}\n".encode()
    return header + bytes(page_size - len(header))


def encode_runs(tokens: tuple[str, ...] | list[str]) -> list[str]:
    """Run-length form 'tok*count' used on the worker's command line."""
    runs: list[str] = []
    i = 0
    while i < len(tokens):
        j = i
        while j < len(tokens) and tokens[j] == tokens[i]:
            j += 1
        runs.append(f"{tokens[i]}*{j - i}")
        i = j
    return runs


def decode_runs(runs: list[str]) -> list[str]:
    """Inverse of encode_runs; also accepts a bare token for a run of one."""
    tokens: list[str] = []
    for run in runs:
        token, star, count = run.rpartition("*")
        if not star:
            tokens.append(normalize(run))
            continue
        if not count.isdigit() or int(count) < 1:
            raise TokenError(f"{run!r}: the repeat count must be a positive integer")
        tokens.extend([normalize(token)] * int(count))
    return tokens
