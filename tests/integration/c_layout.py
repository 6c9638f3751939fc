"""Numbers only the compiler knows (struct offsets and sizes of the
project's headers), for tests and tools that read chatfcgi's shared
memory: the layout is not an interface, and asking the compiler keeps
them honest when fields change."""

import subprocess
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def compiled_values(program, names):
    """Compile the C program against include/ and run it; it prints one
    integer per name, in order. Returns {name: value}."""
    with tempfile.TemporaryDirectory() as d:
        src, exe = Path(d) / "layout.c", Path(d) / "layout"
        src.write_text(program)
        subprocess.run(["cc", "-std=gnu11", f"-I{REPO / 'include'}", "-o",
                        str(exe), str(src)], check=True, timeout=60)
        out = subprocess.run([str(exe)], capture_output=True, text=True,
                             check=True, timeout=10).stdout.split()
    return dict(zip(names, map(int, out)))
