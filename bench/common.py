"""What the benchmarks share: where the data is, tables, splicing generated blocks into BENCHMARKS.md,
and the machine probe (what the machine is, and how much of it other processes took meanwhile).

Generated text goes between `<!-- NAME:begin -->` and `<!-- NAME:end -->` under its heading. Everything
outside the markers is written by hand and is never touched: a regenerate replaces only the block.
"""

from __future__ import annotations

import importlib.metadata
import os
import platform
import resource
import sys
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# The environment we were started with: seqtrain's train() sets TOKENIZERS_PARALLELISM=false in this
# process for its DataLoader worker, and the subprocesses we time must not inherit that.
START_ENV = dict(os.environ)

_T0 = time.perf_counter()


def say(msg: str) -> None:
    print(f"[bench {time.perf_counter() - _T0:6.1f}s] {msg}", file=sys.stderr, flush=True)


def data_path(name: str = "imdb") -> Path:
    """data/NAME (after `make data`), else ../shared/data/NAME."""
    for p in (ROOT / "data" / name, ROOT.parent / "shared" / "data" / name):
        if p.is_dir():
            return p
    raise SystemExit(f"bench: no data in data/{name} or ../shared/data/{name} (run `make data`).")


# --------------------------------------------------------------------------- tables


def check(value: float, target: float, at_least: bool = True) -> str:
    ok = value >= target if at_least else value <= target
    return "✓" if ok else "✗"


def plain_table(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(x) for x in col) for col in zip(header, *rows, strict=True)]

    def line(cells: list[str]) -> str:
        return "  ".join(
            c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(cells, widths, strict=True))
        )

    return "\n".join([line(header), line(["-" * w for w in widths]), *(line(r) for r in rows)])


def md_table(header: list[str], rows: list[list[str]]) -> str:
    out = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] + ["---:"] * (len(header) - 1)) + "|"]
    return "\n".join(out + ["| " + " | ".join(r) + " |" for r in rows])


# --------------------------------------------------------------------------- BENCHMARKS.md


def markers(name: str) -> tuple[str, str]:
    return f"<!-- {name}:begin -->", f"<!-- {name}:end -->"


def write_between_markers(path: Path, heading: str, name: str, block: str) -> None:
    """Put `block` between the `name` markers of `path`; keep everything outside them as it is.

    Without the markers: under `heading` if the file has it (right below the heading line, before
    whatever was there, which stays), else at the end under a new `heading`. Nothing unmarked is
    ever removed, so prose and hand-run tables around a generated block survive every regenerate.
    """
    begin, end = markers(name)
    text = path.read_text(encoding="utf-8") if path.exists() else "# Benchmarks\n"
    marked = f"{begin}\n{block.strip(chr(10))}\n{end}"
    if begin in text and end in text.split(begin, 1)[1]:
        head, rest = text.split(begin, 1)
        text = head + marked + rest.split(end, 1)[1]
    else:
        lines = text.splitlines(keepends=True)
        at = next((i for i, line in enumerate(lines) if line.strip() == heading), None)
        if at is None:
            text = text.rstrip("\n") + f"\n\n{heading}\n\n{marked}\n"
        else:
            text = "".join(lines[: at + 1]) + f"\n{marked}\n" + "".join(lines[at + 1 :])
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")


# --------------------------------------------------------------------------- the machine


def package_version(pkg: str) -> str:
    try:
        return importlib.metadata.version(pkg)
    except importlib.metadata.PackageNotFoundError:
        return "?"


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


@dataclass
class CpuSnapshot:
    busy: float  # CPU-seconds all CPUs spent busy (or stolen by the hypervisor) since boot
    ours: float  # CPU-seconds of this process and its reaped children (DataLoader worker, subprocesses)
    wall: float


def cpu_snapshot() -> CpuSnapshot | None:
    try:
        # cpu  user nice system idle iowait irq softirq steal guest guest_nice (guest is inside user)
        v = [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:9]]
    except (OSError, ValueError):
        return None
    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    busy = (v[0] + v[1] + v[2] + v[5] + v[6] + v[7]) / os.sysconf("SC_CLK_TCK")
    return CpuSnapshot(busy, me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime, time.perf_counter())


def others_share(start: CpuSnapshot | None, end: CpuSnapshot | None) -> float | None:
    """Share of the machine's CPU capacity used by other processes between two snapshots.

    The benchmark owns every core (torch threads = physical cores); anything else running makes
    the multi-threaded kernels wait on each other, and the numbers are then not worth keeping.
    """
    if start is None or end is None or end.wall <= start.wall:
        return None
    others = (end.busy - start.busy) - (end.ours - start.ours)
    return max(0.0, others) / ((end.wall - start.wall) * (os.cpu_count() or 1))
