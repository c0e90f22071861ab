"""What the harness reads around each run: CPU time of processes and Prometheus counters."""

from __future__ import annotations

import os
import re
import urllib.request
from collections.abc import Iterable, Mapping
from pathlib import Path

CLK_TCK = os.sysconf("SC_CLK_TCK")
PROC = Path("/proc")


def _stat_fields(pid: int) -> list[str] | None:
    try:
        raw = (PROC / str(pid) / "stat").read_text()
    except OSError:
        return None
    # The command name (field 2) is in parentheses and may hold spaces: split after it.
    return raw[raw.rindex(")") + 2 :].split()


def cpu_ticks(pid: int) -> int | None:
    """utime + stime of one process, in clock ticks (None once it is gone)."""
    fields = _stat_fields(pid)
    if fields is None:
        return None
    # After the name: state(3) ppid(4) ... utime(14) stime(15), so index 11 and 12 here.
    return int(fields[11]) + int(fields[12])


def _children_by_parent() -> dict[int, list[int]]:
    children: dict[int, list[int]] = {}
    for entry in PROC.iterdir():
        if not entry.name.isdigit():
            continue
        fields = _stat_fields(int(entry.name))
        if fields is not None:
            children.setdefault(int(fields[1]), []).append(int(entry.name))
    return children


def descendants(roots: Iterable[int]) -> set[int]:
    """The roots and every live process below them (gunicorn workers, JVM children)."""
    children = _children_by_parent()
    found: set[int] = set()
    stack = [pid for pid in roots if (PROC / str(pid)).exists()]
    while stack:
        pid = stack.pop()
        if pid in found:
            continue
        found.add(pid)
        stack.extend(children.get(pid, ()))
    return found


def process_tree(root: int) -> list[tuple[int, list[str]]]:
    """`root` and every live process below it with its command line, the deepest first."""
    children = _children_by_parent()
    found: list[tuple[int, int]] = []
    stack = [(root, 0)] if (PROC / str(root)).exists() else []
    while stack:
        pid, depth = stack.pop()
        found.append((depth, pid))
        stack.extend((child, depth + 1) for child in children.get(pid, ()))
    out = []
    for _, pid in sorted(found, reverse=True):
        try:
            raw = (PROC / str(pid) / "cmdline").read_bytes()
        except OSError:
            continue
        out.append((pid, [part.decode(errors="replace") for part in raw.split(b"\0") if part]))
    return out


class CpuMeter:
    """CPU time spent by named processes (and their descendants) between two samples."""

    def __init__(self, roots: Mapping[str, int]) -> None:
        self.roots = dict(roots)
        self._before: dict[int, int] = {}

    def _owners(self) -> dict[int, str]:
        """Every live process below a root, with the root's name."""
        owners: dict[int, str] = {}
        for name, root in self.roots.items():
            for pid in descendants([root]):
                owners.setdefault(pid, name)
        return owners

    def start(self) -> None:
        self._before = {}
        for pid in self._owners():
            ticks = cpu_ticks(pid)
            if ticks is not None:
                self._before[pid] = ticks

    def stop(self) -> dict[str, float]:
        """Milliseconds of CPU since start() per root name; a process born meanwhile counts
        in full."""
        spent: dict[str, float] = dict.fromkeys(self.roots, 0.0)
        for pid, name in self._owners().items():
            ticks = cpu_ticks(pid)
            if ticks is not None:
                spent[name] += (ticks - self._before.get(pid, 0)) * 1000.0 / CLK_TCK
        return spent


_SAMPLE = re.compile(
    r"^(?P<name>[a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(?P<labels>[^}]*)\})? (?P<value>\S+)"
)
_LABEL = re.compile(r'(\w+)="((?:[^"\\]|\\.)*)"')


def scrape(address: str, metric: str, timeout: float = 5.0) -> list[tuple[dict[str, str], float]]:
    """Every sample of `metric` on a Prometheus text endpoint (`host:port`)."""
    with urllib.request.urlopen(f"http://{address}/metrics", timeout=timeout) as response:
        text = response.read().decode()
    samples = []
    for line in text.splitlines():
        match = _SAMPLE.match(line)
        if match is None or match["name"] != metric:
            continue
        labels = dict(_LABEL.findall(match["labels"] or ""))
        samples.append((labels, float(match["value"])))
    return samples


def answers_by_source(address: str, objective: str) -> dict[str, float]:
    """`rdv_answers_total` of one objective summed by source (MODEL, DEFAULT)."""
    out: dict[str, float] = {}
    for labels, value in scrape(address, "rdv_answers_total"):
        if labels.get("objective") != objective:
            continue
        source = labels.get("source", "").removeprefix("ANSWER_SOURCE_")
        out[source] = out.get(source, 0.0) + value
    return out
