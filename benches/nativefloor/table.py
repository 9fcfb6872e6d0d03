"""Tabulate a directory written by runs.sh: one row per run (python floor or native)."""

from __future__ import annotations

import pathlib
import re
import sys

ORDER = ["python", "bare", "real", "bare+overlap", "real+overlap"]
_NUM = r"\s+([\d.]+)"
_PY = _NUM * 4 + r"\s+(\d+)" + _NUM * 2
_NATIVE = re.compile(r"^\s+(\d+)\s+(\d+)" + _NUM * 7 + "$", re.M)


def _key(p: pathlib.Path) -> tuple[int, int]:
    m = re.match(r"round(\d+)-(.*)\.txt", p.name)
    assert m is not None, p
    return int(m.group(1)), ORDER.index(m.group(2))


def _row(p: pathlib.Path) -> str:
    t = p.read_text()
    load_m = re.search(r"load average: ([\d.]+)", t)
    load = load_m.group(1) if load_m else "?"
    if p.stem.endswith("python"):
        a = re.search(r"3 nodes, majority durable" + _PY, t)
        b = re.search(r"3 nodes, 16 at once, group commit" + _PY, t)
        assert a is not None and b is not None, p
        r1 = (float(a[5]), float(a[1]), float(a[3]))
        r16 = (float(b[5]), float(b[1]), float(b[3]))
        cpu = f"{float(b[6]) * 1000:6.1f} {float(b[7]) * 1000:5.1f}    -     -"
    else:
        rows = {int(m[0]): m for m in _NATIVE.findall(t)}
        a, b = rows[1], rows[16]
        r1 = (float(a[1]), float(a[2]), float(a[4]))
        r16 = (float(b[1]), float(b[2]), float(b[4]))
        cpu = " ".join(f"{float(x) * 1000:5.1f}" for x in b[5:9])
    return (
        f"{p.stem:<22} {load:>5} | {r1[0]:9.0f} {r1[1]:6.3f} {r1[2]:6.3f} | "
        f"{r16[0]:10.0f} {r16[1]:6.3f} {r16[2]:6.3f} | {r16[0] / r1[0]:6.2f}x "
        f"{r16[1] / r1[1]:8.2f}x | {cpu}"
    )


def main() -> None:
    d = pathlib.Path(sys.argv[1])
    print(
        f"{'run':<22} {'load1':>5} | {'K=1 req/s':>9} {'p50':>6} {'p99':>6} | "
        f"{'K=16 req/s':>10} {'p50':>6} {'p99':>6} | {'X ratio':>7} {'p50 ratio':>9} | "
        "CPU us/req K=16: leader follower client all"
    )
    for p in sorted(d.glob("round*.txt"), key=_key):
        print(_row(p))


if __name__ == "__main__":
    main()
