"""File-type detection: mailflow's signature table against libmagic and puremagic.

    python -m benchmarks.compare_filetype

What each names the test samples (an executable, ELF, PDF, PNG, zip, a docm with
macros, a Windows shortcut, plain text) and the time per detection. python-magic
(libmagic) and puremagic are not dependencies of mailflow: install them into the
environment to compare (``pip install python-magic puremagic``); a missing one is
skipped. The figures are in docs/performance.md; the choice in README's dependency
table.
"""

from __future__ import annotations

import timeit
from collections.abc import Callable

from mailflow.mime import filetype
from tests.attachment_support import ELF, PDF, PE, PNG, zip_of


def samples() -> dict[str, bytes]:
    docm = zip_of(("[Content_Types].xml", b"<Types/>"), ("word/vbaProject.bin", b"\x00" * 10))
    return {
        "pe": PE,
        "elf": ELF,
        "pdf": PDF,
        "png": PNG,
        "zip": zip_of(("a.txt", b"x")),
        "docm": docm,
        "lnk": b"L\x00\x00\x00\x01\x14\x02\x00" + b"\x00" * 60,
        "text": b"Hello there, plain words.\n" * 20,
    }


def detectors() -> dict[str, Callable[[bytes], str]]:
    found: dict[str, Callable[[bytes], str]] = {"mailflow": lambda d: filetype.detect(d).mime}
    try:
        import magic  # type: ignore[import-not-found]

        found["libmagic"] = magic.Magic(mime=True).from_buffer
    except ImportError:
        pass
    try:
        import puremagic  # type: ignore[import-not-found]

        def pure(data: bytes) -> str:
            try:
                return str(puremagic.from_string(data, mime=True))
            except Exception as exc:  # puremagic raises when it knows nothing
                return f"({type(exc).__name__})"

        found["puremagic"] = pure
    except ImportError:
        pass
    return found


def main() -> int:
    data = samples()
    found = detectors()
    for name, sample in data.items():
        print(f"{name:5}", "  ".join(f"{k}={fn(sample) or '-'}" for k, fn in found.items()))
    for label, fn in found.items():
        rounds = 500
        seconds = timeit.timeit(lambda fn=fn: [fn(d) for d in data.values()], number=rounds)
        print(f"{label}: {seconds / rounds / len(data) * 1e6:.1f} us per detection")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
