"""Errors the command lines turn into one clear line and exit code 2."""
from __future__ import annotations


class InputError(ValueError):
    """Bad user input: a file that cannot be read, a size out of range, a bad number.

    The message is one line that says what is wrong and, where it helps, what to do instead.
    """


def check_utf8(text: str, what: str) -> str:
    """Return `text` unchanged if it encodes as UTF-8; else raise InputError naming the first bad byte.

    Python decodes command-line bytes that are not valid UTF-8 (e.g. Latin-1 ``caf\\xe9``) to lone
    surrogates U+DC80..U+DCFF ("surrogateescape"); the tokenizer cannot encode those. We refuse such text
    up front instead of guessing its encoding: a guess would silently change the prompt the model sees.
    """
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        char = ord(text[exc.start])
        if 0xDC80 <= char <= 0xDCFF:  # a byte that surrogateescape could not decode
            found = f"byte 0x{char - 0xDC00:02X}, which is not valid UTF-8,"
        else:
            found = f"the lone surrogate U+{char:04X}"
        before = text[max(0, exc.start - 20):exc.start]  # enough to find the spot, short enough for one line
        raise InputError(f"{what} holds {found} at character {exc.start + 1} (after {before!r}); "
                         "pass UTF-8 text (e.g. convert it with iconv -f latin1 -t utf-8)") from None
    return text
