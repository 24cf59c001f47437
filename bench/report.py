"""`make bench`: run the benchmarks and write `bench/RESULTS.md` with PNG plots.

    uv run --group bench python bench/report.py [--quick] [--only capacity patterns queue]

Runs each benchmark as a subprocess with `--json` (they start and stop their own local
servers) and writes:

- `bench/RESULTS.md`: the command, the date, the machine, the versions, a summary of the
  goals against what was measured (pass/fail), then one section per benchmark; the
  capacity section ends with normal load (`worker_streams.py --processes 1 --arrival
  steady --n 64`: jobs arriving steadily, about 64 in flight), which the goal for the
  time to first text is read from;
- `bench/plots/*.png` (matplotlib, Agg): the capacity curve (answers at once against
  wall/model, fragment gap p95, time to first text p95 and the worker's CPU per token,
  for 1 and 2 worker processes), the memory per concurrent answer, where the CPU went,
  and a chart each for `patterns.py` and `queue_vs_arq.py`;
- `bench/plots/data/*.json`: each benchmark's JSON as it printed it, so `--replot` can
  redraw the report without running anything.

A benchmark whose script is missing, fails or prints no JSON gets a section that says so;
the rest of the report is still written. Options: `--quick` (a few small runs: a smoke
test of the whole pipeline, minutes not a quarter of an hour), `--only` (some sections),
`--n` (the capacity run's answers at once), `--processes` (1 2), `--replot`.

Exit status 0 when the report is written and every benchmark's correctness checks held
(every answer exact, no publish refused); 1 otherwise. Performance goals that are missed
are shown as FAIL in the report, never an exit status: they depend on the machine.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import os
import platform
import shutil
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
RESULTS = BENCH / "RESULTS.md"
PLOTS = BENCH / "plots"
DATA = PLOTS / "data"

CAPACITY_N = [16, 32, 64, 128, 160, 192, 256, 320]
QUICK_N = [4, 16]
TOKENS_PER_SECOND = 50.0  # the model's pace for issue 15
# Normal load: jobs arriving steadily, about this many answers in flight (one process).
NORMAL_LOAD = "normal-load"
NORMAL_LOAD_N = 64

# The goals of issue 15.
GOAL_WALL_OVER_MODEL = 1.05
GOAL_GAP_P95_MS = 100.0
GOAL_ANSWERS_ONE_PROCESS = 256
FLOOR_ANSWERS_ONE_PROCESS = 160
GOAL_CPU_US_PER_TOKEN = 60.0
CPU_TOLERANCE = 1.10  # "about 60 us": within 10 %
GOAL_MEMORY_KB_PER_ANSWER = 100.0
GOAL_TTFT_OVER_MS = 30.0  # at normal load: time to first text p50 over the model's delay
SATURATED_PCT = 85.0  # one process at this share of a core: it is the limit

ROLE_COLOURS = {
    "worker": "#1f77b4",
    "subscribers": "#2ca02c",
    "proxy": "#ff7f0e",
    "model": "#9467bd",
    "sockudo": "#8c564b",
    "redis": "#e377c2",
    "bench": "#bcbd22",
    "rest": "#c7c7c7",
}
P_STYLE = {1: ("#1f77b4", "o"), 2: ("#d62728", "s"), 3: ("#2ca02c", "^"), 4: ("#9467bd", "D")}


# --- running a benchmark ---------------------------------------------------------------------


@dataclass
class Run:
    """One benchmark subprocess: its JSON (or why there is none)."""

    name: str
    argv: list[str]
    data: dict[str, Any] | None = None
    status: int | None = None
    seconds: float = 0.0
    note: str = ""  # why there is no data, or what the exit status means
    stderr_tail: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "argv": self.argv,
            "status": self.status,
            "seconds": round(self.seconds, 1),
            "note": self.note,
            "stderr_tail": self.stderr_tail,
            "data": self.data,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Run:
        return cls(
            d["name"],
            d["argv"],
            d.get("data"),
            d.get("status"),
            d.get("seconds", 0.0),
            d.get("note", ""),
            d.get("stderr_tail", []),
        )


def script_options(script: Path) -> str:
    """The script's `--help` text, to pass only the options it has."""
    try:
        out = subprocess.run(
            [sys.executable, str(script), "--help"],
            capture_output=True,
            text=True,
            timeout=60,
            cwd=REPO,
        )
        return out.stdout
    except (OSError, subprocess.SubprocessError):
        return ""


def run_bench(name: str, script: Path, args: list[str], timeout_s: float) -> Run:
    """`python SCRIPT --json ARGS`; its stderr (progress) goes on to ours as it comes."""
    argv = [sys.executable, str(script), "--json", *args]
    shown = ["python", str(script.relative_to(REPO)), "--json", *args]
    run = Run(name, shown)
    if not script.exists():
        run.note = f"`{script.relative_to(REPO)}` does not exist (yet): not run"
        print(f"[report] {name}: {run.note}", file=sys.stderr, flush=True)
        return run
    print(f"[report] {name}: {' '.join(shown)}", file=sys.stderr, flush=True)
    started = time.monotonic()
    proc = subprocess.Popen(
        argv,
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        stdin=subprocess.DEVNULL,
    )
    tail: list[str] = []
    chunks: list[str] = []

    def pump() -> None:  # stderr: shown as it comes, the last lines kept
        assert proc.stderr is not None
        for line in proc.stderr:
            sys.stderr.write(f"  {line}")
            sys.stderr.flush()
            tail.append(line.rstrip())
            del tail[:-30]

    def collect() -> None:  # stdout: the JSON
        assert proc.stdout is not None
        chunks.append(proc.stdout.read())

    readers = [threading.Thread(target=f, daemon=True) for f in (pump, collect)]
    for reader in readers:
        reader.start()
    try:
        proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        proc.kill()  # its servers get SIGTERM when it dies (PR_SET_PDEATHSIG)
        proc.wait()
        run.note = f"timed out after {timeout_s:.0f} s"
    for reader in readers:
        reader.join(10)
    out = "".join(chunks)
    run.seconds = time.monotonic() - started
    run.status = proc.returncode
    run.stderr_tail = tail[-12:]
    try:
        start = out.index("{")
        run.data = json.loads(out[start:])
    except ValueError:
        run.note = run.note or f"exit status {proc.returncode}, no JSON on stdout"
    else:
        if proc.returncode:
            run.note = run.note or (
                f"exit status {proc.returncode}: the script says a check failed (see below)"
            )
    print(f"[report] {name}: {run.seconds:.0f} s, exit {proc.returncode}", file=sys.stderr)
    return run


# --- the machine and the versions ---------------------------------------------------------------


def machine() -> dict[str, str]:
    model = "?"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    memory = "?"
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                memory = f"{int(line.split()[1]) / 1024 / 1024:.1f} GiB"
                break
    except OSError:
        pass
    try:
        load = " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        load = "?"
    return {
        "cores": str(os.cpu_count()),
        "cpu": model,
        "memory": memory,
        "os": f"{platform.system()} {platform.release()} ({platform.machine()})",
        "load average at start": load,
    }


def _package(name: str) -> str:
    try:
        return version(name)
    except PackageNotFoundError:
        return "not installed"


def versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    try:
        sys.path.insert(0, str(REPO))
        import worker
        from worker.devstack.sockudo_install import SOCKUDO_VERSION

        out["worker"] = getattr(worker, "__version__", "?")
        out["Sockudo"] = SOCKUDO_VERSION
    except Exception as exc:  # the report still gets written
        out["Sockudo"] = f"? ({exc})"
    for label, dist in (
        ("ably (ably-python)", "ably"),
        ("openai", "openai"),
        ("redis-py", "redis"),
        ("uvloop", "uvloop"),
        ("arq", "arq"),
        ("matplotlib", "matplotlib"),
    ):
        out[label] = _package(dist)
    if out["arq"] == "not installed":
        out["arq"] = "not in this environment (bench/queue_vs_arq.py runs it in its own)"
    binary = os.environ.get("REDIS_SERVER_BIN") or shutil.which("redis-server")
    server = "not found"
    if binary:
        try:
            text = subprocess.run(
                [binary, "--version"], capture_output=True, text=True, timeout=10
            ).stdout
            server = next((w[2:] for w in text.split() if w.startswith("v=")), text.strip())
        except (OSError, subprocess.SubprocessError):
            server = "?"
    out["redis-server"] = server
    return out


# --- formatting ----------------------------------------------------------------------------


def num(value: Any, digits: int = 0, unit: str = "") -> str:
    if value is None:
        return "-"
    if isinstance(value, float) and math.isnan(value):
        return "-"
    if isinstance(value, int | float):
        return f"{value:,.{digits}f}{unit}"
    return str(value)


def pq(p: dict[str, Any] | None) -> str:
    if not p:
        return "-"
    return f"{num(p.get('p50'))} / {num(p.get('p95'))}"


def table(head: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(head) + " |", "| " + " | ".join("---" for _ in head) + " |"]
    lines += ["| " + " | ".join(str(c).replace("|", "\\|") for c in row) + " |" for row in rows]
    return "\n".join(lines)


def flatten(obj: Any, prefix: str = "") -> dict[str, Any]:
    """Nested dicts as dotted keys; lists of scalars joined; other lists counted."""
    out: dict[str, Any] = {}
    if isinstance(obj, dict):
        for key, value in obj.items():
            out.update(flatten(value, f"{prefix}{key}."))
    elif isinstance(obj, list):
        if all(not isinstance(v, dict | list) for v in obj):
            out[prefix[:-1]] = ", ".join(str(v) for v in obj) if obj else "-"
        else:
            out[prefix[:-1]] = f"{len(obj)} items"
    else:
        out[prefix[:-1]] = obj
    return out


def generic_tables(data: dict[str, Any]) -> str:
    """Any benchmark's JSON as tables: each list of objects a table, the scalars a list."""
    parts: list[str] = []
    scalars: dict[str, Any] = {}

    def walk(obj: Any, path: str) -> None:
        if isinstance(obj, list) and obj and all(isinstance(v, dict) for v in obj):
            flat = [flatten(v) for v in obj]
            keys = list(dict.fromkeys(k for f in flat for k in f))
            keys = [k for k in keys if k != "problems"][:14]
            rows = [
                [num(f.get(k), 2) if isinstance(f.get(k), float) else num(f.get(k)) for k in keys]
                for f in flat
            ]
            parts.append(f"**{path or 'rows'}**\n\n" + table(keys, rows))
        elif isinstance(obj, dict):
            for key, value in obj.items():
                walk(value, f"{path}.{key}" if path else key)
        elif not isinstance(obj, list):
            scalars[path] = obj
        elif obj:
            scalars[path] = ", ".join(str(v) for v in obj)[:200]

    walk(data, "")
    if scalars:
        parts.insert(
            0,
            table(
                ["figure", "value"],
                [[k, num(v, 2) if isinstance(v, float) else num(v)] for k, v in scalars.items()],
            ),
        )
    return "\n\n".join(parts)


# --- plots ---------------------------------------------------------------------------------------


def pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plt.rcParams.update(
        {
            "font.size": 10,
            "axes.titlesize": 11,
            "axes.grid": True,
            "grid.alpha": 0.3,
            "figure.dpi": 110,
        }
    )
    return plt


def good_rows(run: Run) -> list[dict[str, Any]]:
    return [r for r in (run.data or {}).get("rows", []) if "error" not in r]


def n_ticks(ax: Any, ns: list[int]) -> None:
    ax.set_xticks(ns)
    ax.set_xticklabels([str(n) for n in ns], rotation=45 if len(ns) > 6 else 0)
    ax.set_xlabel("answers at once (N)")


def capacity_lines(ax: Any, ns: list[int]) -> None:
    """The one-process goal (256) and floor (160) as vertical lines, when in range."""
    if not ns:
        return
    for x, label in (
        (FLOOR_ANSWERS_ONE_PROCESS, "floor 160"),
        (GOAL_ANSWERS_ONE_PROCESS, "goal 256"),
    ):
        if min(ns) <= x <= max(ns):
            ax.axvline(x, color="grey", linestyle=":", linewidth=1)
            ax.annotate(
                label,
                (x, 1),
                xycoords=("data", "axes fraction"),
                xytext=(2, -10),
                textcoords="offset points",
                fontsize=8,
                color="grey",
            )


def plot_capacity(runs: dict[int, Run], title: str, path: Path) -> None:
    plt = pyplot()
    fig, axes = plt.subplots(2, 2, figsize=(12, 8.2))
    panels: list[tuple[Any, str, Callable[[dict[str, Any]], Any], float | None, str]] = [
        (
            axes[0][0],
            "wall time / model-only time",
            lambda r: r["wall_over_model"],
            GOAL_WALL_OVER_MODEL,
            "goal <= 1.05",
        ),
        (
            axes[0][1],
            "text fragment gap p95 (ms)",
            lambda r: r["gap_ms"]["p95"],
            GOAL_GAP_P95_MS,
            "goal <= 100 ms",
        ),
        (axes[1][0], "time to first text p95 (ms)", lambda r: r["ttft_ms"]["p95"], None, ""),
        (
            axes[1][1],
            "worker CPU per token streamed (µs)",
            lambda r: r["worker_cpu_us_per_token"],
            GOAL_CPU_US_PER_TOKEN,
            "goal ~60 µs",
        ),
    ]
    ns = sorted({r["n"] for run in runs.values() for r in (run.data or {}).get("rows", [])})
    for ax, label, value, goal, goal_label in panels:
        for p, run in sorted(runs.items()):
            rows = good_rows(run)
            if not rows:
                continue
            colour, marker = P_STYLE.get(p, ("black", "o"))
            xs = [r["n"] for r in rows]
            ys = [value(r) for r in rows]
            name = "1 worker process" if p == 1 else f"{p} worker processes"
            ax.plot(xs, ys, marker=marker, color=colour, label=name, linewidth=1.8)
            failed = [r["n"] for r in (run.data or {}).get("rows", []) if "error" in r]
            for n in failed:  # at the foot of the panel, whatever its y scale
                ax.plot(
                    [n],
                    [0.03],
                    marker="x",
                    color=colour,
                    markersize=11,
                    linestyle="none",
                    markeredgewidth=2,
                    transform=ax.get_xaxis_transform(),
                )
                ax.annotate(
                    "failed",
                    (n, 0.03),
                    xycoords=ax.get_xaxis_transform(),
                    xytext=(-16, 9),
                    textcoords="offset points",
                    fontsize=8,
                    color=colour,
                )
        if goal is not None:
            ax.axhline(goal, color="#2ca02c", linestyle="--", linewidth=1.2, label=goal_label)
        capacity_lines(ax, ns)
        ax.set_title(label)
        ax.set_ylim(0, max(ax.get_ylim()[1], goal or 0) * 1.1)
        if label.startswith("wall"):
            top = max([1.3, *[value(r) for run in runs.values() for r in good_rows(run)]])
            ax.set_ylim(0.9, top * 1.03)
        if ns:
            n_ticks(ax, ns)
        ax.legend(fontsize=8, loc="best")
    fig.suptitle(title, fontsize=12)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def plot_memory(runs: dict[int, Run], title: str, path: Path) -> None:
    plt = pyplot()
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.6))
    ns = sorted({r["n"] for run in runs.values() for r in good_rows(run)})
    for p, run in sorted(runs.items()):
        rows = good_rows(run)
        if not rows:
            continue
        colour, marker = P_STYLE.get(p, ("black", "o"))
        name = "1 worker process" if p == 1 else f"{p} worker processes"
        xs = [r["n"] for r in rows]
        left.plot(
            xs,
            [r["memory_kb_per_answer"] for r in rows],
            marker=marker,
            color=colour,
            label=name,
            linewidth=1.8,
        )
        right.plot(
            xs,
            [r["worker_rss_mb"]["peak"] for r in rows],
            marker=marker,
            color=colour,
            label=f"{name}: peak",
            linewidth=1.8,
        )
        right.plot(
            xs,
            [r["worker_rss_mb"]["idle"] for r in rows],
            marker=marker,
            color=colour,
            label=f"{name}: idle",
            linewidth=1,
            linestyle="--",
            alpha=0.7,
        )
    left.axhline(GOAL_MEMORY_KB_PER_ANSWER, color="#2ca02c", linestyle="--", label="goal < 100 KB")
    left.set_title("memory per concurrent answer (KB): (peak - idle) / N")
    right.set_title("the worker's resident memory (MB, all its processes)")
    for ax in (left, right):
        ax.set_ylim(bottom=0)
        if ns:
            n_ticks(ax, ns)
        ax.legend(fontsize=8)
    fig.suptitle(title, fontsize=12)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def plot_cpu(runs: dict[int, Run], cores: int, path: Path) -> None:
    plt = pyplot()
    shown = {p: good_rows(run) for p, run in sorted(runs.items()) if good_rows(run)}
    if not shown:
        return
    fig, axes = plt.subplots(1, len(shown), figsize=(6.2 * len(shown), 4.8), squeeze=False)
    for ax, (p, rows) in zip(axes[0], shown.items(), strict=True):
        roles = [k for k in ROLE_COLOURS if k in rows[0]["cpu_pct_of_core"]]
        xs = [r["n"] for r in rows]
        ys = [[r["cpu_pct_of_core"].get(role, 0) for r in rows] for role in roles]
        ax.stackplot(xs, ys, labels=roles, colors=[ROLE_COLOURS[k] for k in roles], alpha=0.85)
        ax.axhline(
            100 * cores,
            color="black",
            linestyle="--",
            linewidth=1.2,
            label=f"the machine ({cores} cores)",
        )
        ax.plot(
            xs,
            [r.get("worker_busiest_pct_of_core", 0) for r in rows],
            color="black",
            linestyle=":",
            marker="o",
            linewidth=1.5,
            label="busiest worker process",
        )
        ax.set_title(f"{p} worker process{'es' if p > 1 else ''}: CPU while the answers stream")
        ax.set_ylabel("% of one core (stacked)")
        n_ticks(ax, xs)
        ax.set_ylim(0, max(100 * cores * 1.1, max(map(sum, zip(*ys, strict=True))) * 1.05))
        ax.legend(fontsize=7, loc="upper left", ncol=2)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def plot_bars(
    groups: list[str], series: dict[str, list[float | None]], title: str, ylabel: str, path: Path
) -> None:
    """A grouped bar chart: one group per case, one bar per series."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(max(6.0, 1.4 * len(groups) + 2), 4.4))
    width = 0.8 / max(1, len(series))
    for i, (name, values) in enumerate(series.items()):
        xs = [g + (i - (len(series) - 1) / 2) * width for g in range(len(groups))]
        ys = [v if v is not None else 0 for v in values]
        bars = ax.bar(xs, ys, width, label=name)
        ax.bar_label(
            bars,
            labels=[num(v, 1) if v is not None else "-" for v in values],
            fontsize=7,
            padding=2,
        )
    ax.set_xticks(range(len(groups)))
    ax.set_xticklabels(groups, fontsize=8)
    shown = [v for values in series.values() for v in values if v]
    if shown and max(shown) / min(shown) > 50:
        ax.set_yscale("log")  # both sides readable when one is 50 times the other
        ylabel = f"{ylabel} (log scale)".strip()
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def plot_panels(panels: list[tuple[str, dict[str, float | None]]], title: str, path: Path) -> None:
    """One small bar chart per figure, each on its own scale: {bar name: value}."""
    plt = pyplot()
    fig, axes = plt.subplots(1, len(panels), figsize=(3.6 * len(panels), 4.0), squeeze=False)
    colours = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728"]
    for ax, (label, bars_of) in zip(axes[0], panels, strict=True):
        names = list(bars_of)
        values = [bars_of[n] or 0 for n in names]
        bars = ax.bar(range(len(names)), values, color=colours[: len(names)])
        ax.bar_label(bars, labels=[num(bars_of[n], 1) for n in names], fontsize=8, padding=2)
        ax.set_xticks(range(len(names)))
        ax.set_xticklabels([n.replace("message-", "").replace("-", " ") for n in names], fontsize=8)
        ax.set_title(label, fontsize=10)
        ax.set_ylim(0, max(values or [1]) * 1.15 or 1)
    fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


# --- capacity: the section and the goals ---------------------------------------------------------


def row_meets(row: dict[str, Any]) -> bool:
    """An N that holds the streaming goals: every answer right, none refused, w/m and gap."""
    return (
        "error" not in row
        and row["ok"] == row["answers"]
        and not row["refused"]
        and not row.get("retried")
        and row["wall_over_model"] <= GOAL_WALL_OVER_MODEL
        and (row["gap_ms"]["p95"] or 0) <= GOAL_GAP_P95_MS
    )


def capacity_of(run: Run) -> int | None:
    """The largest N such that it and every smaller N measured meet the goals."""
    best = None
    for row in sorted((run.data or {}).get("rows", []), key=lambda r: r["n"]):
        if not row_meets(row):
            break
        best = row["n"]
    return best


def at_n(run: Run, n: int) -> dict[str, Any] | None:
    """The row at N, else the largest measured N below it (a quick run)."""
    rows = [r for r in good_rows(run) if r["n"] <= n] or good_rows(run)
    return max(rows, key=lambda r: r["n"]) if rows else None


def busiest_processes(row: dict[str, Any]) -> list[tuple[str, float]]:
    """Single processes by their share of a core, highest first."""
    shares = row["cpu_pct_of_core"]
    single = {
        "a worker process": row.get("worker_busiest_pct_of_core", shares["worker"]),
        "a subscriber process": row.get("subscriber_busiest_pct_of_core", 0.0),
        "the fault proxy": shares.get("proxy", 0.0),
        "the model server": shares.get("model", 0.0),
        "Sockudo (multi-threaded)": shares.get("sockudo", 0.0),
        "Redis": shares.get("redis", 0.0),
    }
    return sorted(single.items(), key=lambda kv: -kv[1])


def harness_pct(row: dict[str, Any]) -> float:
    """The benchmark's own load generators: Sockudo, the proxy, the model, the subscribers,
    Redis and the bench process."""
    shares = row["cpu_pct_of_core"]
    return float(sum(v for k, v in shares.items() if k not in ("worker", "rest")))


def machine_pct(row: dict[str, Any]) -> float:
    return float(sum(row["cpu_pct_of_core"].values()))


def limits_text(p: int, run: Run, cores: int) -> str:
    rows = sorted((run.data or {}).get("rows", []), key=lambda r: r["n"])
    if not rows:
        return f"- **{p} process(es)**: no figures."
    capacity = capacity_of(run)
    first_bad = next((r for r in rows if not row_meets(r)), None)
    parts = [
        f"- **{p} worker process{'es' if p > 1 else ''}**: the goals hold up to "
        f"N={capacity if capacity is not None else 'none measured'}"
    ]
    if first_bad is None:
        parts.append(f" (every N measured, up to {rows[-1]['n']}).")
        look = rows[-1]
    elif "error" in first_bad:
        parts.append(f"; N={first_bad['n']} failed: {first_bad['error'][:160]}.")
        look = at_n(run, first_bad["n"]) or rows[-1]
    else:
        parts.append(
            f"; at N={first_bad['n']} wall/model is {first_bad['wall_over_model']:.2f}, gap p95 "
            f"{num(first_bad['gap_ms']['p95'])} ms, {first_bad['ok']}/{first_bad['answers']} "
            f"answers right, {first_bad['refused']} refused, {first_bad.get('retried', 0)} "
            "jobs run again after a worker error."
        )
        look = first_bad
    looks = [look] + [r for r in good_rows(run)[-1:] if r["n"] != look["n"]]
    for row in looks:  # where it first misses, and the largest N
        top = busiest_processes(row)
        saturated = [f"{name} at {pct:.0f} %" for name, pct in top if pct >= SATURATED_PCT]
        busy = machine_pct(row)
        parts.append(
            f" At N={row['n']} (wall/model {row['wall_over_model']:.2f}) the busiest single "
            "processes were "
            + ", ".join(f"{name} {pct:.0f} %" for name, pct in top[:3])
            + f" of a core; the whole machine {busy:.0f} % of {100 * cores} %, of which "
            + f"{row['cpu_pct_of_core'].get('rest', 0):.0f} % outside the benchmark, "
            + f"{harness_pct(row):.0f} % the benchmark's own servers and subscribers"
            + (f" (saturated: {', '.join(saturated)})" if saturated else "")
            + (" — the machine itself is full" if busy >= 0.9 * 100 * cores else "")
            + "."
        )
    largest = good_rows(run)[-1] if good_rows(run) else None
    if largest and largest.get("worker_cpu_us_per_token"):
        tps = float((run.data or {}).get("tokens_per_second") or TOKENS_PER_SECOND)
        per_core = 1e6 / (largest["worker_cpu_us_per_token"] * tps)
        parts.append(
            f" At its CPU per token at N={largest['n']} "
            f"({num(largest['worker_cpu_us_per_token'])} µs), one core of its own would carry "
            f"about {per_core:.0f} answers at {tps:g} tokens/s (an extrapolation, not a "
            "measurement)."
        )
    return "".join(parts)


def capacity_table(run: Run) -> str:
    head = [
        "N",
        "wall/model",
        "gap p50 / p95 ms",
        "ttft p50 / p95 ms",
        "worker µs/token",
        "worker % core (busiest proc)",
        "KB/answer",
        "RSS idle→peak MB",
        "ok",
        "refused",
        "retried",
        "subscribers % (busiest)",
        "proxy %",
        "model %",
        "Sockudo %",
        "machine %",
    ]
    rows = []
    for r in (run.data or {}).get("rows", []):
        if "error" in r:
            rows.append([str(r["n"]), f"failed: {r['error'][:120]}"] + [""] * (len(head) - 2))
            continue
        c = r["cpu_pct_of_core"]
        rows.append(
            [
                str(r["n"]),
                num(r["wall_over_model"], 2),
                pq(r["gap_ms"]),
                pq(r["ttft_ms"]),
                num(r["worker_cpu_us_per_token"]),
                f"{num(c['worker'])} ({num(r.get('worker_busiest_pct_of_core'))})",
                num(r["memory_kb_per_answer"]),
                f"{num(r['worker_rss_mb']['idle'])}→{num(r['worker_rss_mb']['peak'])}",
                f"{r['ok']}/{r['answers']}",
                str(r["refused"]),
                str(r.get("retried", "-")),
                f"{num(c.get('subscribers'))} ({num(r.get('subscriber_busiest_pct_of_core'))})",
                num(c.get("proxy")),
                num(c.get("model")),
                num(c.get("sockudo")),
                num(machine_pct(r)),
            ]
        )
    notes = [
        f"- N={r['n']}: the worker logged `job.error` x{count}: `{error}`"
        for r in (run.data or {}).get("rows", [])
        for error, count in (r.get("worker_errors") or {}).items()
    ]
    return table(head, rows) + ("\n\n" + "\n".join(notes) if notes else "")


@dataclass
class Goal:
    goal: str
    target: str
    measured: str
    result: str  # PASS, FAIL, FLOOR (the floor met, not the goal), n/a


def capacity_goals(runs: dict[int, Run]) -> list[Goal]:
    goals: list[Goal] = []
    one = runs.get(1)
    if one is None or not good_rows(one):
        note = one.note if one else "not run"
        return [Goal("capacity curve", "", f"no figures ({note})", "n/a")]
    cap = capacity_of(one)
    largest = max(r["n"] for r in one.data["rows"]) if one.data else 0
    if cap is not None and cap >= GOAL_ANSWERS_ONE_PROCESS:
        verdict = "PASS"
    elif cap is not None and cap >= FLOOR_ANSWERS_ONE_PROCESS:
        verdict = "FLOOR"
    elif largest < FLOOR_ANSWERS_ONE_PROCESS and cap == largest:
        verdict = "n/a"  # a quick run: not measured that far
    else:
        verdict = "FAIL"
    goals.append(
        Goal(
            "answers at once, one process (wall/model <= 1.05, gap p95 <= 100 ms, all exact)",
            f">= {GOAL_ANSWERS_ONE_PROCESS} (floor {FLOOR_ANSWERS_ONE_PROCESS})",
            f"{cap if cap is not None else 'none'} (measured up to {largest})",
            verdict,
        )
    )
    for p, run in sorted(runs.items()):
        if p == 1:
            continue
        cap_p = capacity_of(run)
        goals.append(
            Goal(
                f"answers at once, {p} processes (same criteria)",
                "reported",
                f"{cap_p if cap_p is not None else 'none'}",
                "n/a",
            )
        )
    row = at_n(one, GOAL_ANSWERS_ONE_PROCESS)
    if row is not None:
        where = f"at N={row['n']}, 1 process"
        goals.append(
            Goal(
                f"wall time / model time ({where})",
                f"<= {GOAL_WALL_OVER_MODEL}",
                num(row["wall_over_model"], 3),
                "PASS" if row["wall_over_model"] <= GOAL_WALL_OVER_MODEL else "FAIL",
            )
        )
        gap = row["gap_ms"]["p95"]
        goals.append(
            Goal(
                f"fragment gap p95 ({where})",
                f"<= {GOAL_GAP_P95_MS:.0f} ms",
                f"{num(gap)} ms",
                "PASS" if gap is not None and gap <= GOAL_GAP_P95_MS else "FAIL",
            )
        )
        cpu = row["worker_cpu_us_per_token"]
        goals.append(
            Goal(
                f"worker CPU per token ({where})",
                f"~{GOAL_CPU_US_PER_TOKEN:.0f} µs (<= {GOAL_CPU_US_PER_TOKEN * CPU_TOLERANCE:.0f})",
                f"{num(cpu)} µs",
                "PASS"
                if cpu is not None and cpu <= GOAL_CPU_US_PER_TOKEN * CPU_TOLERANCE
                else "FAIL",
            )
        )
        mem = row["memory_kb_per_answer"]
        goals.append(
            Goal(
                f"memory per concurrent answer ({where})",
                f"< {GOAL_MEMORY_KB_PER_ANSWER:.0f} KB",
                f"{num(mem)} KB",
                "PASS" if mem < GOAL_MEMORY_KB_PER_ANSWER else "FAIL",
            )
        )
        per_connection = kb_per_connection(one)
        if per_connection is not None:
            share = per_connection / float((one.data or {}).get("streams_per_connection") or 4)
            goals.append(
                Goal(
                    f"the same with the answer's share of its Ably connection ({where})",
                    "(for information)",
                    f"{num(mem + share)} KB ({num(per_connection)} KB per connection, "
                    f"{(one.data or {}).get('streams_per_connection')} answers each)",
                    "n/a",
                )
            )
    return goals


def ttft_over(row: dict[str, Any], run: Run) -> str:
    """Time to first text p50 over the model's first-token delay, with both."""
    delay = (run.data or {}).get("first_token_ms")
    return (
        f"+{num(row['overhead_ms']['p50'])} ms (ttft p50 {num(row['ttft_ms']['p50'])} ms, "
        f"the model's delay {num(delay)} ms)"
    )


def normal_load_goals(steady: Run | None, one: Run | None) -> list[Goal]:
    """Time to first text at normal load (jobs arriving steadily), the goal; and for
    information the same number of answers enqueued at once (the capacity run's burst)."""
    target = f"p50 <= {GOAL_TTFT_OVER_MS:.0f} ms over the model's first-token delay"
    rows = (steady.data or {}).get("rows", []) if steady else []
    if steady is not None and rows and "error" not in rows[0]:
        row, over = rows[0], rows[0]["overhead_ms"]["p50"]
        goals = [
            Goal(
                f"time to first text at normal load ({row['n']} answers: jobs arriving "
                "steadily, 1 process)",
                target,
                ttft_over(row, steady),
                "PASS" if over is not None and over <= GOAL_TTFT_OVER_MS else "FAIL",
            )
        ]
    else:
        why = f"failed: {rows[0]['error'][:120]}" if rows else (steady.note if steady else "")
        goals = [
            Goal(
                f"time to first text at normal load ({NORMAL_LOAD_N} answers)",
                target,
                f"no figures ({why or 'not run'})",
                "n/a",
            )
        ]
    burst = at_n(one, NORMAL_LOAD_N) if one is not None else None
    if one is not None and burst is not None:
        goals.append(
            Goal(
                f"time to first text, {burst['n']} answers enqueued at once (a burst, 1 process)",
                "(for information)",
                ttft_over(burst, one),
                "n/a",
            )
        )
    return goals


def correctness(runs: list[Run]) -> tuple[bool, list[str]]:
    """Every answer exact and no publish refused, over every benchmark that ran."""
    problems: list[str] = []
    for run in runs:
        data = run.data or {}
        for row in data.get("rows", []):
            if "error" in row:
                continue  # a capacity limit, not a wrong answer
            if row["ok"] != row["answers"] or row["refused"]:
                problems.append(
                    f"{run.name} N={row['n']}: {row['ok']}/{row['answers']} "
                    f"right, {row['refused']} refused"
                )
        problems += [f"{run.name}: {p}" for p in data.get("problems", []) or []]
        problems += [
            f"{run.name}: {c.get('what')}"
            for c in data.get("checks", []) or []
            if not c.get("ok") and not str(c.get("what", "")).startswith("goal:")
        ]
    return not problems, problems


# --- the other sections ----------------------------------------------------------------------


def run_header(run: Run) -> str:
    lines = [f"Command: `{' '.join(run.argv)}`"]
    if run.status is not None:
        lines.append(f"({run.seconds:.0f} s, exit status {run.status}).")
    if run.note:
        lines.append(f"**Note:** {run.note}.")
    return " ".join(lines)


def failed_section(run: Run) -> str:
    text = run_header(run)
    if run.stderr_tail:
        text += (
            "\n\nThe last lines it printed on stderr:\n\n```\n"
            + "\n".join(run.stderr_tail)
            + "\n```"
        )
    return text


def patterns_section(run: Run) -> tuple[str, list[str]]:
    """Un-awaited vs awaited appends; message per response vs per token."""
    data = run.data or {}
    parts: list[str] = []
    plots: list[str] = []
    meta = data.get("meta", {})
    appends = data.get("appends") or {}
    if appends.get("rows"):
        rows = appends["rows"]
        parts.append(
            f"**Un-awaited vs awaited appends** ({num(meta.get('latency_ms'))} ms round trip "
            f"through the proxy, model at {num(meta.get('tokens_per_second'))} tokens/s or all "
            "at once):"
        )
        parts.append(
            table(
                [
                    "speed",
                    "streams",
                    "mode",
                    "tokens/s per stream",
                    "delay p50 / p95 ms",
                    "appends per stream",
                    "Ably-counted per stream",
                    "peak/s",
                    "refused",
                    "ok",
                ],
                [
                    [
                        r["speed"],
                        str(r["streams"]),
                        r["mode"],
                        num(r["delivered_tokens_per_s_per_stream"], 1),
                        pq(r["delay_ms"]),
                        num(r["appends_per_stream"], 1),
                        num(r["ably_counted_per_stream"], 1),
                        str(r["peak_counted_per_s_per_connection"]),
                        str(r["refused"]),
                        f"{r['ok']}/{r['streams']}",
                    ]
                    for r in rows
                ],
            )
        )
        ratios = appends.get("unawaited_over_awaited") or []
        if ratios:
            parts.append("Un-awaited over awaited (tokens/s: higher is better; delay: lower):")
            parts.append(
                table(
                    [
                        "speed",
                        "streams",
                        "tokens/s",
                        "delay p50",
                        "delay p95",
                        "wall",
                        "Ably-counted",
                    ],
                    [
                        [
                            r["speed"],
                            str(r["streams"]),
                            num(r["delivered_tokens_per_s"], 2),
                            num(r["delay_p50"], 3),
                            num(r["delay_p95"], 3),
                            num(r["wall"], 2),
                            num(r["ably_counted"], 2),
                        ]
                        for r in ratios
                    ],
                )
            )
        cases = [
            f"{r['speed']}\n{r['streams']} stream(s)" for r in rows if r["mode"] == "unawaited"
        ]
        series: dict[str, list[float | None]] = {}
        for mode in ("unawaited", "awaited"):
            series[mode] = [
                next(
                    (
                        r["delay_ms"]["p95"]
                        for r in rows
                        if r["mode"] == mode and f"{r['speed']}\n{r['streams']} stream(s)" == case
                    ),
                    None,
                )
                for case in cases
            ]
        if cases:
            path = PLOTS / "patterns_appends.png"
            plot_bars(
                cases, series, "model delta to subscriber, p95 (ms): lower is better", "ms", path
            )
            plots.append(path.name)
    conversation = data.get("conversation") or {}
    patterns = conversation.get("patterns") or {}
    if patterns:
        parts.append(
            f"**Message per response vs message per token** ({num(meta.get('answers'))} "
            f"answers of {num(meta.get('answer_tokens'))} tokens on one channel):"
        )
        parts.append(
            table(
                [
                    "pattern",
                    "messages per answer",
                    "Ably-counted per answer",
                    "history messages",
                    "history KB",
                    "pages",
                    "late joiner ms",
                    "late joiner ms at latency",
                    "refused",
                    "ok",
                ],
                [
                    [
                        name,
                        num(r["messages_published_per_answer"], 1),
                        num(r["ably_counted_per_answer"], 1),
                        num(r["history_messages"]),
                        num(r["history_bytes"] / 1024, 0),
                        num(r["history_pages"]),
                        num(r["late_joiner_ms"], 0),
                        num(r["late_joiner_ms_at_latency"], 0),
                        str(r["refused"]),
                        f"{r['answers_ok_at_late_joiner']}/{r['answers']}",
                    ]
                    for name, r in patterns.items()
                ],
            )
        )
        ratios = conversation.get("per_token_over_per_response") or {}
        if ratios:
            parts.append("Per token over per response:")
            parts.append(table(list(ratios), [[num(v, 2) for v in ratios.values()]]))
        figures = (
            ("messages published per answer", "messages_published_per_answer"),
            ("messages in history", "history_messages"),
            ("history KB", "history_bytes"),
            ("late joiner ms (loopback)", "late_joiner_ms"),
            ("late joiner ms (at latency)", "late_joiner_ms_at_latency"),
        )
        panels = [
            (
                label,
                {
                    name: (r.get(key) or 0) / (1024 if key == "history_bytes" else 1)
                    for name, r in patterns.items()
                },
            )
            for label, key in figures
        ]
        path = PLOTS / "patterns_conversation.png"
        plot_panels(panels, "message per response vs message per token: lower is better", path)
        plots.append(path.name)
    if not parts:
        return generic_tables(data), plots
    return "\n\n".join(parts), plots


def ppm(d: dict[str, Any] | None) -> str:
    """p50 / p95 / max of a dict, in its own unit."""
    if not d:
        return "-"
    return " / ".join(
        num(d.get(k), 1 if (d.get(k) or 0) < 10 else 0) for k in ("p50", "p95", "max")
    )


def queue_section(run: Run) -> tuple[str, list[str]]:
    """Our queue vs arq: throughput, idle pickup, crash; their checks."""
    data = run.data or {}
    meta = data.get("meta", {})
    parts: list[str] = []
    throughput = data.get("throughput") or []
    pickup = data.get("pickup") or []
    crash = data.get("crash") or []
    if throughput:
        parts.append(
            f"**Throughput**: {throughput[0].get('jobs')} instant jobs enqueued first, one "
            f"consumer process (arq {meta.get('arq', '?')}, Redis {meta.get('redis', '?')}):"
        )
        parts.append(
            table(
                [
                    "system",
                    "concurrency",
                    "completed",
                    "jobs/s",
                    "x arq default",
                    "x arq tuned",
                    "requests/job",
                    "Redis commands/job",
                    "consumer CPU µs/job",
                    "Redis CPU µs/job",
                ],
                [
                    [
                        r["system"],
                        str(r.get("concurrency")),
                        f"{r.get('completed')}/{r.get('jobs')}",
                        num(r.get("jobs_per_s")),
                        num((r.get("vs") or {}).get("arq default"), 2),
                        num((r.get("vs") or {}).get("arq tuned"), 2),
                        num(r.get("round_trips_per_job"), 2),
                        num(r.get("redis_commands_per_job"), 1),
                        num(r.get("consumer_cpu_us_per_job")),
                        num(r.get("redis_cpu_us_per_job")),
                    ]
                    for r in throughput
                ],
            )
        )
    if pickup:
        parts.append(
            f"**Idle pickup**: {pickup[0].get('pickups')} single jobs into an idle consumer "
            "(ms, p50 / p95 / max):"
        )
        parts.append(
            table(
                ["system", "enqueue to taken", "enqueue to started", "missing"],
                [
                    [
                        r["system"],
                        ppm(r.get("taken_ms")),
                        ppm(r.get("started_ms")),
                        str(r.get("missing")),
                    ]
                    for r in pickup
                ],
            )
        )
    if crash:
        parts.append(
            f"**Crash**: 10 in-flight jobs of about {num(meta.get('job_seconds'))} s, a signal, "
            "a new worker started at once:"
        )
        parts.append(
            table(
                [
                    "system",
                    "signal",
                    "knob",
                    "run again",
                    "lost",
                    "twice",
                    "all done s",
                    "exit s",
                    "note",
                ],
                [
                    [
                        r["system"],
                        r.get("signal", ""),
                        r.get("knob", ""),
                        str(r.get("rerun")),
                        str(r.get("lost")),
                        str(r.get("twice")),
                        num(r.get("recovered_s"), 1),
                        num(r.get("exit_s"), 1),
                        str(r.get("note") or ""),
                    ]
                    for r in crash
                ],
            )
        )
    checks = data.get("checks") or []
    if checks:
        parts.append(
            "Its checks:\n\n"
            + "\n".join(
                f"- {'ok' if c.get('ok') else '**FAILED**'}: {c.get('what')}" for c in checks
            )
        )
    if not parts:
        return generic_tables(data), []
    plots: list[str] = []
    if throughput or pickup:
        path = PLOTS / "queue_vs_arq.png"
        plot_queue(throughput, pickup, path)
        plots.append(path.name)
    return "\n\n".join(parts), plots


def plot_queue(throughput: list[dict[str, Any]], pickup: list[dict[str, Any]], path: Path) -> None:
    plt = pyplot()
    panels = [p for p in (throughput, pickup) if p]
    fig, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 4.2), squeeze=False)
    at = 0
    for rows, title, value in (
        (
            throughput,
            "throughput, instant jobs (jobs/s): higher is better",
            lambda r: r.get("jobs_per_s"),
        ),
        (
            pickup,
            "idle pickup, enqueue to started p95 (ms): lower is better",
            lambda r: (r.get("started_ms") or {}).get("p95"),
        ),
    ):
        if not rows:
            continue
        ax = axes[0][at]
        at += 1
        names = [r["system"] for r in rows]
        values = [value(r) or 0 for r in rows]
        colours = ["#1f77b4" if n.startswith("ours") else "#ff7f0e" for n in names]
        bars = ax.bar(names, values, color=colours)
        ax.bar_label(bars, labels=[num(v, 1 if v < 10 else 0) for v in values], fontsize=8)
        ax.set_title(title)
        ax.tick_params(axis="x", labelsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def queue_goals(run: Run | None) -> list[Goal]:
    """The queue benchmark's own goals (its checks named `goal: ...`)."""
    if run is None or not run.data:
        return []
    return [
        Goal(
            "our queue (bench/queue_vs_arq.py's own goal)",
            "see measured",
            c["what"].split(":", 1)[1].strip(),
            "PASS" if c.get("ok") else "FAIL",
        )
        for c in run.data.get("checks") or []
        if str(c.get("what", "")).startswith("goal:")
    ]


# --- the report ----------------------------------------------------------------------------


def normal_load_section(run: Run | None) -> list[str]:
    """The steady run's row, under its own heading (nothing if it was not run)."""
    if run is None:
        return []
    rows = good_rows(run)
    heading = (
        "### Normal load: jobs arriving steadily, "
        f"{rows[0]['n'] if rows else NORMAL_LOAD_N} in flight\n\n"
    )
    if not run.data:
        return [heading + failed_section(run)]
    if not rows:  # the row says what failed
        return [f"{heading}{run_header(run)}\n\n{capacity_table(run)}"]
    r, parts = rows[0], rows[0]["overhead_parts_ms"]
    interval_ms = 1000 * r["model_s"] / r["n"]
    text = (
        "A burst of N jobs enqueued in the same millisecond is not normal load: here "
        f"(`--arrival steady`) jobs arrive one by one, one every {num(interval_ms)} "
        f"ms (one answer's model-only time, {num(r['model_s'], 2)} s, over N), so that about "
        f"N={r['n']} answers are in flight (WORKER_CONCURRENCY {r['concurrency']}: an answer "
        "holds its slot a little longer than its model-only time); measured, "
        f"{num(r.get('in_flight'), 1)} answers were open on average (enqueued, not yet closed "
        "at their subscriber) while the measured jobs arrived. The first N jobs, on the "
        "way to N in flight, are not measured; ttft and gap are of the "
        f"{r.get('answers_measured', '?')} after them, CPU and memory of the whole run. "
        "wall/model here is each measured answer's own enqueue to closed at its subscriber "
        "over its own model-only time, p95."
    )
    return [
        f"{heading}{text}\n\n{run_header(run)}\n\n{capacity_table(run)}\n\n"
        "Time to first text over the model's first-token delay, p50 / p95 ms: "
        f"{pq(r['overhead_ms'])}; of which pickup {pq(parts['pickup'])}, create+model "
        f"{pq(parts['create_model'])}, other {pq(parts['other'])} (as in "
        "`worker_streams.py`'s table)."
    ]


def capacity_section(
    runs: dict[int, Run], cores: int, quick: bool, steady: Run | None = None
) -> str:
    parts = []
    any_data = any(good_rows(r) for r in runs.values())
    for p, run in sorted(runs.items()):
        if not run.data:
            parts.append(f"### {p} worker process{'es' if p > 1 else ''}\n\n" + failed_section(run))
    if not any_data:
        return "\n\n".join(parts + normal_load_section(steady))
    meta = next(r.data for r in runs.values() if r.data)
    assert meta is not None
    parts.insert(
        0,
        (
            f"The worker streams N answers at once (model: about {meta['tokens']} tokens at "
            f"{meta['tokens_per_second']:g} tokens/s, first token after "
            f"{meta['first_token_ms']:g} ms; default settings: {meta['streams_per_connection']} "
            f"answers per Ably connection, {meta['messages_per_second']:g} messages/s each), "
            "through the fault proxy with Ably's rate limits enforced, to one live subscriber "
            "per channel (one Ably connection each, in child processes of the bench). "
            "`bench/worker_streams.py --processes P`: the worker runs as real `python -m worker "
            "run` processes; its CPU and memory are the sums over them, from /proc."
            + (" **Quick run**: a few small N only." if quick else "")
            + "\n\n![capacity curve](plots/capacity.png)\n\n"
            "The dotted lines are the one-process goal (256) and floor (160); dashed green, the "
            "goals. A cross marked failed at the foot of a panel: that N failed (see its row)."
        ),
    )
    spacing_ms = 1000 * meta["streams_per_connection"] / meta["messages_per_second"]
    for p, run in sorted(runs.items()):
        if run.data:
            parts.append(
                f"### {p} worker process{'es' if p > 1 else ''} ({run.data.get('launch', '?')})"
                f"\n\n{run_header(run)}\n\n{capacity_table(run)}"
            )
    parts += normal_load_section(steady)
    parts.append(
        "Columns: wall/model is the first enqueue to the last answer closed at its "
        "subscriber over the slowest answer's model-only time; gap, between text fragments "
        "of one answer at the subscriber; ttft, enqueue to the first text at the subscriber; "
        "worker µs/token, the worker's CPU (all its processes) over the tokens streamed; "
        "KB/answer, (the worker's peak resident memory while the N answers stream - its idle "
        "memory after the warm-up) / N; the % columns are shares of one core while the "
        "answers stream (machine: every process, of "
        f"{100 * cores} %).\n\n"
        f"By design an answer gets at most one append every {spacing_ms:.0f} ms "
        f"({meta['streams_per_connection']} answers share a connection's "
        f"{meta['messages_per_second']:g} messages/s), so the gap p50 sits near "
        f"{spacing_ms:.0f} ms at any N from {meta['streams_per_connection']} on and the gap "
        f"p95 goal ({GOAL_GAP_P95_MS:.0f} ms) leaves {GOAL_GAP_P95_MS - spacing_ms:.0f} ms "
        "for everything else.\n\n### What limits capacity\n\n"
        "![CPU while the answers stream](plots/cpu_shares.png)\n\n"
        "Stacked: each process's share of a core while the answers stream; `rest` is every "
        "other process on the machine (other work on it: the run is noisier when it is high). "
        "The dotted line is the busiest single worker process.\n\n"
        + "\n".join(limits_text(p, run, cores) for p, run in sorted(runs.items()) if run.data)
    )
    return "\n\n".join(parts)


def kb_per_connection(run: Run) -> float | None:
    """The slope of the worker's idle memory against its open Ably connections (KB)."""
    pairs = [(r["connections_open"], r["worker_rss_mb"]["idle"]) for r in good_rows(run)]
    if len({c for c, _ in pairs}) < 2:
        return None
    return float(statistics.linear_regression(*zip(*pairs, strict=True)).slope * 1024)


def memory_section(runs: dict[int, Run]) -> str:
    if not any(good_rows(r) for r in runs.values()):
        return "No figures: the capacity runs did not run (see above)."
    rows = []
    for p, run in sorted(runs.items()):
        for r in good_rows(run):
            rows.append(
                [
                    str(p),
                    str(r["n"]),
                    num(r["worker_rss_mb"]["idle"], 1),
                    num(r["worker_rss_mb"]["peak"], 1),
                    num(r["memory_kb_per_answer"]),
                    num(r.get("worker_settle_s"), 1),
                ]
            )
    slopes = []
    for p, run in sorted(runs.items()):
        if (slope := kb_per_connection(run)) is not None:
            slopes.append(f"{num(slope)} KB per connection with {p} process(es)")
    connections = (
        "\n\nThe idle memory itself grows with `WORKER_CONCURRENCY`, which sets the pool's Ably "
        "connections (ceil(concurrency / 4) per process, opened at the start): "
        + "; ".join(slopes)
        + " (the slope of idle memory against open connections). Idle at N answers is a worker "
        "sized for N; an answer's share of its connection is on top of the figure above."
        if slopes
        else ""
    )
    return (
        "The worker's resident memory (VmRSS, summed over its processes and their children) "
        "sampled at idle after a warm-up and every 0.1 s while the N answers stream; the "
        "difference over N is the memory one concurrent answer costs (Python keeps freed "
        "memory for reuse, so the peak is what an answer holds at its busiest). At small N "
        "the difference is within the noise of the allocator; read the large N. A fresh "
        "worker is busy for a while after its start (its connections); the idle figures are "
        "taken once its CPU has settled (the last column).\n\n"
        "![memory per answer](plots/memory.png)\n\n"
        + table(["processes", "N", "idle MB", "peak MB", "KB per answer", "settled after s"], rows)
        + connections
    )


def write_report(
    runs: dict[str, Run], info: dict[str, Any], args: argparse.Namespace
) -> tuple[bool, list[str]]:
    PLOTS.mkdir(parents=True, exist_ok=True)
    cores = int(info["machine"]["cores"]) if info["machine"]["cores"].isdigit() else 1
    capacity = {int(k.split("-p")[1]): r for k, r in runs.items() if k.startswith("capacity-p")}
    steady = runs.get(NORMAL_LOAD)
    sections: list[str] = []
    goals: list[Goal] = []
    if capacity or steady:
        title = (
            f"Capacity at {TOKENS_PER_SECOND:g} tokens/s per answer — "
            f"{info['machine']['cores']} cores, {info['machine']['cpu']}"
        )
        if any(good_rows(r) for r in capacity.values()):
            plot_capacity(capacity, title, PLOTS / "capacity.png")
            plot_memory(capacity, "Memory per concurrent answer", PLOTS / "memory.png")
            plot_cpu(capacity, cores, PLOTS / "cpu_shares.png")
        sections.append(
            "## Capacity curve\n\n" + capacity_section(capacity, cores, info["quick"], steady)
        )
        sections.append("## Memory per concurrent answer\n\n" + memory_section(capacity))
        goals += capacity_goals(capacity) + normal_load_goals(steady, capacity.get(1))
    for key, heading, render in (
        ("patterns", "Publishing patterns (`bench/patterns.py`)", patterns_section),
        ("queue", "Our queue vs arq (`bench/queue_vs_arq.py`)", queue_section),
    ):
        run = runs.get(key)
        if run is None:
            continue
        if run.data is None:
            body = failed_section(run)
        else:
            try:
                text, plots = render(run)
            except Exception as exc:  # an unexpected JSON shape: the tables still come
                text, plots = generic_tables(run.data), []
                text = f"(rendering as generic tables: {type(exc).__name__}: {exc})\n\n" + text
            body = run_header(run) + "\n\n" + "".join(f"![{p}](plots/{p})\n\n" for p in plots)
            body += text
        sections.append(f"## {heading}\n\n{body}")
    goals += queue_goals(runs.get("queue"))
    queue_meta = ((runs.get("queue") or Run("", [])).data or {}).get("meta") or {}
    if queue_meta.get("arq"):
        info["versions"]["arq"] = (
            f"{queue_meta['arq']} (its own environment, bench/queue_vs_arq.py)"
        )
    ok, problems = correctness(list(runs.values()))
    ran = [r for r in runs.values() if r.data]
    goals.append(
        Goal(
            "every answer exact, no publish refused (every benchmark that ran)",
            "all",
            "all" if ok else "; ".join(problems[:5]),
            ("PASS" if ok else "FAIL") if ran else "n/a",
        )
    )

    lines = [
        "# Benchmark results",
        "",
        f"Written by `{info['command']}` on {info['date']} (took {info['minutes']:.1f} min)."
        + (
            " **Quick run** (`--quick`): a smoke test, not the figures to quote."
            if info["quick"]
            else ""
        ),
        "Every number depends on the machine and on what else ran on it: read them as ratios "
        "from one run. `make bench` reruns everything.",
        "",
        "## Machine and versions",
        "",
        table(
            ["", ""],
            [[k, v] for k, v in info["machine"].items()]
            + [[k, v] for k, v in info["versions"].items()],
        ),
        "",
        "## Goals",
        "",
        table(
            ["goal", "target", "measured", "result"],
            [[g.goal, g.target, g.measured, g.result] for g in goals],
        ),
        "",
        "FLOOR: the floor is met, not the goal. n/a: not measured in this run (or no target).",
        "",
        *[s + "\n" for s in sections],
    ]
    RESULTS.write_text("\n".join(lines).rstrip() + "\n")
    return ok, problems


def quick_or_full(script: Path, quick: list[str]) -> list[str]:
    """The quick options the script actually has (`--quick` itself when it has one)."""
    options = script_options(script)
    if "--quick" in options:
        return ["--quick"]
    out: list[str] = []
    i = 0
    while i < len(quick):
        flag = quick[i]
        values = []
        i += 1
        while i < len(quick) and not quick[i].startswith("--"):
            values.append(quick[i])
            i += 1
        if flag in options:
            out += [flag, *values]
    return out


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="small runs: a smoke test")
    p.add_argument(
        "--only",
        nargs="+",
        choices=("capacity", "patterns", "queue"),
        default=["capacity", "patterns", "queue"],
    )
    p.add_argument("--n", type=int, nargs="+", help=f"capacity: answers at once ({CAPACITY_N})")
    p.add_argument("--processes", type=int, nargs="+", default=[1, 2], help="capacity: P")
    p.add_argument(
        "--replot", action="store_true", help="redraw from bench/plots/data/*.json, run nothing"
    )
    return p.parse_args(argv)


def main() -> int:
    args = parse_args()
    started = time.monotonic()
    DATA.mkdir(parents=True, exist_ok=True)
    runs: dict[str, Run] = {}
    if args.replot:
        saved = json.loads((DATA / "report.json").read_text())
        info = saved["info"]
        runs = {k: Run.from_dict(v) for k, v in saved["runs"].items()}
    else:
        command = (
            "make bench"
            if os.environ.get("MAKELEVEL")
            else "uv run --group bench python bench/report.py " + " ".join(sys.argv[1:])
        ).strip()
        info = {
            "command": command,
            "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
            "machine": machine(),
            "versions": versions(),
            "quick": args.quick,
        }
        if "capacity" in args.only:
            ns = args.n or (QUICK_N if args.quick else CAPACITY_N)
            extra = ["--min-samples", "8"] if args.quick else []
            # (name, P, arrival, Ns): the bursts of the capacity curve, then normal load.
            plans = [(f"capacity-p{p}", p, "burst", ns) for p in args.processes]
            steady_n = QUICK_N[-1] if args.quick else NORMAL_LOAD_N
            plans.append((NORMAL_LOAD, 1, "steady", [steady_n]))
            for name, p, arrival, run_ns in plans:
                bench_args = [
                    "--processes",
                    str(p),
                    *(["--arrival", arrival] if arrival != "burst" else []),
                    "--tokens-per-second",
                    f"{TOKENS_PER_SECOND:g}",
                    "--n",
                    *map(str, run_ns),
                    *extra,
                ]
                timeout = 120 + sum(100 + n / 2 for n in run_ns)
                runs[name] = run_bench(name, BENCH / "worker_streams.py", bench_args, timeout)
        if "patterns" in args.only:
            script = BENCH / "patterns.py"
            quick = (
                ["--tokens", "60", "--streams", "1", "4", "--answers", "20", "--late-reads", "1"]
                if args.quick
                else []
            )
            runs["patterns"] = run_bench(
                "patterns", script, quick_or_full(script, quick) if quick else [], 900
            )
        if "queue" in args.only:
            script = BENCH / "queue_vs_arq.py"
            quick = (
                ["--quick", "--jobs", "500", "--pickups", "10", "--skip-crash"]
                if args.quick
                else []
            )
            runs["queue"] = run_bench(
                "queue", script, quick_or_full(script, quick) if quick else [], 900
            )
        info["minutes"] = (time.monotonic() - started) / 60
        (DATA / "report.json").write_text(
            json.dumps({"info": info, "runs": {k: r.as_dict() for k, r in runs.items()}}, indent=1)
        )
    ok, problems = write_report(runs, info, args)
    print(
        f"[report] wrote {RESULTS.relative_to(REPO)} and {PLOTS.relative_to(REPO)}/*.png",
        file=sys.stderr,
    )
    for problem in problems[:20]:
        print(f"[report] check failed: {problem}", file=sys.stderr)
    failed_to_run = [
        r.name for r in runs.values() if r.data is None and "does not exist" not in r.note
    ]
    if failed_to_run:
        print(f"[report] no figures from: {', '.join(failed_to_run)}", file=sys.stderr)
    return 0 if ok and not failed_to_run else 1


if __name__ == "__main__":
    sys.exit(main())
