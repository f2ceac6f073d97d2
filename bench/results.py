"""Shared by the benchmarks: describe the machine and append a result section to bench/RESULTS.md."""

from __future__ import annotations

import datetime
import os
import platform
import shlex
import sys
from pathlib import Path

RESULTS = Path(__file__).with_name("RESULTS.md")


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import torch

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return (
        f"{cpu}, {os.cpu_count()} cores, {gpu}; Python {platform.python_version()}, "
        f"torch {torch.__version__}, {platform.system()} {platform.release()}"
    )


def command() -> str:
    return " ".join(shlex.quote(a) for a in [Path(sys.executable).name, *sys.argv])


def record(title: str, table: list[str], notes: str = "") -> None:
    """Print `table` and append it with the date, machine and exact command to bench/RESULTS.md."""
    when = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    section = [
        f"## {title}",
        "",
        f"- date: {when}",
        f"- machine: {machine()}",
        f"- command: `{command()}`",
        "",
    ]
    section += table
    if notes:
        section += ["", notes]
    text = "\n".join(section) + "\n\n"
    print(text)
    if not RESULTS.exists():
        RESULTS.write_text(
            "# Benchmark results\n\nNewest last. Each section names its command, machine and date.\n\n"
        )
    with RESULTS.open("a") as f:
        f.write(text)


def markdown_table(header: list[str], rows: list[list[object]]) -> list[str]:
    def cell(v: object) -> str:
        return f"{v:.4g}" if isinstance(v, float) else str(v)

    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return lines
