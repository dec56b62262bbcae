"""The unicode1 transcript of docs/writeup.md, reproduced exactly.

    uv run python scripts/unicode1.py

An expression shows its repr, as the interactive interpreter would. A print() call shows the repr
of exactly the text it writes (`# writes '...'`), so the NUL it writes appears as the escape
\\x00 instead of whatever a terminal makes of the raw byte (most show nothing; none a space).
"""

from __future__ import annotations

import contextlib
import io

TRANSCRIPT = [
    "chr(0)",
    "print(chr(0))",
    '"this is a test" + chr(0) + "string"',
    'print("this is a test" + chr(0) + "string")',
    '("this is a test" + chr(0) + "string").encode()',
]


def run(source: str) -> str:
    """What the interpreter shows for `source`: the repr of its value, or, for a print call, the
    repr of the text it writes."""
    written = io.StringIO()
    with contextlib.redirect_stdout(written):
        value = eval(source)  # noqa: S307 -- the fixed statements above
    if source.startswith("print("):
        return f"# writes {written.getvalue()!r}"
    return repr(value)


def main() -> None:
    for source in TRANSCRIPT:
        print(f">>> {source}")
        print(run(source))


if __name__ == "__main__":
    main()
