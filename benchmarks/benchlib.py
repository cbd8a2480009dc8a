"""Helpers shared by the benchmark scripts (``bench.py``, ``bench_memory.py``,
``compress_error.py``): peak resident memory, machine load, the code version, and rewriting one
``## `` section of BENCHMARKS.md while keeping the others."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def rss_reset() -> bool:
    """Reset the kernel's peak-RSS mark of this process (``VmHWM``); False where refused."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def status_mb(key: str) -> float:
    """A ``/proc/self/status`` memory field (``VmRSS``, ``VmHWM``) in MB; NaN where missing."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return float("nan")


def peak_rss_mb(reset_ok: bool) -> float:
    """Peak RSS since :func:`rss_reset` (when it worked), else of the whole process."""
    if reset_ok:
        peak = status_mb("VmHWM")
        if peak == peak:  # not NaN
            return peak
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def load_average() -> str:
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "n/a"


def git_rev() -> str:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True
        )
        return out.stdout.strip() or "n/a"
    except OSError:
        return "n/a"


def split_section(text: str, heading: str) -> tuple[str, str, str]:
    """``(before, section, after)`` of the ``heading`` section (up to the next ``## ``);
    ``section`` is empty and ``before`` ends with a blank line when there is none."""
    start = text.find(heading)
    if start < 0:
        return text.rstrip("\n") + "\n\n", "", ""
    nxt = re.search(r"^## ", text[start + len(heading) :], flags=re.M)
    end = len(text) if nxt is None else start + len(heading) + nxt.start()
    return text[:start], text[start:end], text[end:]


def join_section(before: str, section: str, after: str) -> str:
    text = before + section.rstrip("\n") + "\n" + ("\n" + after.lstrip("\n") if after else "")
    return text.rstrip("\n") + "\n"


def replace_section(path: Path, heading: str, body: str) -> None:
    """Write ``body`` (starting with ``heading``) in place of that section of ``path``."""
    text = path.read_text() if path.exists() else "# Benchmarks\n"
    before, _, after = split_section(text, heading)
    path.write_text(join_section(before, body, after))
    print(f"wrote {path}")


def print_summary(table: str, notes: list[str], load_before: str, load_after: str, minutes: float):
    """Print a benchmark's table, its notes and the load average around the run."""
    print()
    print(table)
    for n in notes:
        print("- " + n)
    print(f"load average before {load_before}, after {load_after}; {minutes:.1f} min")
