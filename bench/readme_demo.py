"""The README's offline demo as a newcomer runs it: wall time, first starts included.

Each round reads the demo's commands from README.md (the first ```bash block under "Offline:
the pipeline on a generated HAM10000-format sample") and runs them exactly as written, through
the project's `./run`, in an empty directory with a fresh HOME, PREFECT_HOME and
SKINSENSE_HOME: Prefect's temporary server starts for the first time and migrates its
database, matplotlib builds its font cache, MLflow creates its store, the app starts cold.
Only the app's port is chosen here (SKINSENSE_APP_PORT), and the app is stopped after each
round. The target (issue 11) is at most 3 minutes a round on a 2-core machine.

tests/test_readme_demo.py runs one round as a test (without timing it).

Usage: python bench/readme_demo.py [--rounds 3] [--record]   (--record appends to
bench/RESULTS.md)
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shlex
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from datetime import date
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DEMO_HEADING = "## Offline: the pipeline on a generated HAM10000-format sample"
TARGET_S = 180.0


def readme_demo_commands(readme: str) -> list[str]:
    """The shell commands of the first ```bash block under the offline demo's heading."""
    if DEMO_HEADING not in readme:
        raise ValueError(f"README.md has no heading {DEMO_HEADING!r}")
    section = readme.split(DEMO_HEADING, 1)[1]
    block = re.search(r"```bash\n(.*?)```", section, re.S)
    if block is None:
        raise ValueError(f"no ```bash block under {DEMO_HEADING!r} in README.md")
    joined = block.group(1).replace("\\\n", " ")  # continuation lines
    commands = [line.split("#", 1)[0].strip() for line in joined.splitlines()]
    return [c for c in commands if c]


def fresh_environment(base: Path, app_port: int) -> dict[str, str]:
    """The environment of a newcomer: empty homes, no server or store configured."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("PREFECT_", "MLFLOW_", "SKINSENSE_"))}
    homes = {"HOME": base / "home", "PREFECT_HOME": base / "prefect",
             "SKINSENSE_HOME": base / "skinsense"}
    for path in homes.values():
        path.mkdir(parents=True)
    return env | {k: str(v) for k, v in homes.items()} | {"SKINSENSE_APP_PORT": str(app_port)}


@dataclass
class DemoRun:
    """One round of the demo: what each command printed and how long it took."""

    env: dict[str, str]
    commands: list[str]
    seconds: list[float] = field(default_factory=list)
    stdout: list[str] = field(default_factory=list)

    @property
    def result(self) -> dict:
        """The pipeline's JSON summary (the last command's output)."""
        out = self.stdout[-1]
        return json.loads(out[out.index("{\n"):])

    @property
    def app_dir(self) -> Path:
        return Path(self.env["SKINSENSE_HOME"]) / "app"


def run_demo(base: Path, app_port: int, *, timeout_s: float = 900) -> DemoRun:
    """Run the README's demo commands in `base/newcomer` with fresh homes under `base`.

    Raises:
        RuntimeError: a command failed; the message holds the end of its output.
    """
    commands = readme_demo_commands(README.read_text())
    work = base / "newcomer"
    work.mkdir(parents=True)
    (work / "run").symlink_to(ROOT / "run")  # `./run` as the README writes it
    run = DemoRun(env=fresh_environment(base, app_port), commands=commands)
    for command in commands:
        start = time.perf_counter()
        done = subprocess.run(["bash", "-c", command], cwd=work, env=run.env, text=True,
                              stdin=subprocess.DEVNULL, capture_output=True, timeout=timeout_s)
        run.seconds.append(time.perf_counter() - start)
        run.stdout.append(done.stdout)
        if done.returncode != 0:
            raise RuntimeError(f"`{command}` failed with exit status {done.returncode}:\n"
                               f"{done.stderr[-4000:]}")
    return run


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> int:
    from skinsense.serving.deploy import check_prediction, stop_app

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--record", action="store_true", help="append to bench/RESULTS.md")
    args = parser.parse_args()
    if args.rounds < 1:
        parser.error("--rounds must be at least 1")
    commands = readme_demo_commands(README.read_text())
    print("README demo:", *commands, sep="\n  ", flush=True)
    totals, rows = [], []
    for round_ in range(1, args.rounds + 1):
        port = _free_port()
        with tempfile.TemporaryDirectory(prefix="skinsense-demo-") as tmp:
            run = None
            try:
                run = run_demo(Path(tmp), port)
                label = check_prediction(f"http://127.0.0.1:{port}")
            finally:
                stop_app(Path(tmp) / "skinsense" / "app")
        total = sum(run.seconds)
        totals.append(total)
        scores = {a: m["balanced_accuracy"] for a, m in run.result["metrics"].items()}
        rows.append((round_, run.seconds, total, scores, label))
        print(f"round {round_}: " + ", ".join(f"{s:.1f} s" for s in run.seconds)
              + f" = {total:.1f} s; test balanced accuracy "
              + ", ".join(f"{a} {s:.3f}" for a, s in scores.items()) + f"; app said {label}",
              flush=True)
    median = statistics.median(totals)
    verdict = "PASS" if median <= TARGET_S else "FAIL"
    print(f"\nmedian of {len(totals)} rounds: {median:.1f} s (target <= {TARGET_S:.0f} s: "
          f"{verdict})")
    if args.record:
        _record(commands, rows, median, verdict)
    return 0


def _record(commands: list[str], rows: list, median: float, verdict: str) -> None:
    lines = [
        f"\n### README offline demo, {date.today().isoformat()} "
        f"({platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()})\n",
        "`python bench/readme_demo.py`: the README's demo commands as written, each round in "
        "fresh HOME, PREFECT_HOME and SKINSENSE_HOME (first Prefect start included):\n",
        *[f"    {c}" for c in commands], "",
        "| round | " + " | ".join(shlex.split(c)[1] for c in commands)
        + " | total | test balanced accuracy |",
        "|---" * (len(commands) + 3) + "|",
    ]
    for round_, seconds, total, scores, _ in rows:
        lines.append(f"| {round_} | " + " | ".join(f"{s:.1f} s" for s in seconds)
                     + f" | {total:.1f} s | "
                     + ", ".join(f"{a} {s:.3f}" for a, s in scores.items()) + " |")
    lines.append(f"\nMedian {median:.1f} s against the target of {TARGET_S:.0f} s: "
                 f"**{verdict}**.\n")
    with open(ROOT / "bench" / "RESULTS.md", "a") as f:
        f.write("\n".join(lines))


if __name__ == "__main__":
    sys.exit(main())
