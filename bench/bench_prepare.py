"""Time and peak memory of `uae-ray prepare` on the real shared data, each run in a fresh process.

    .venv/bin/python bench/bench_prepare.py [--shared ../shared/data] [--out bench/results/bench_prepare.json]

For scale, two reference processes are measured the same way: the interpreter with the prepare code imported
(``baseline_imports``), and ``json.load`` of the QASPER train file (what holding it once as Python objects costs).
Peak memory is the child's max RSS from ``os.wait4``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def measure(cmd: list[str]) -> dict[str, float]:
    """Wall seconds, CPU seconds (user + system) and max RSS (MiB) of one child process; raises if it fails.

    CPU seconds are the figure to compare on a shared machine: wall time grows with other people's load.
    """
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
    out = proc.stdout.read() if proc.stdout else b""
    _, status, usage = os.wait4(proc.pid, 0)
    seconds = time.perf_counter() - t0
    if os.waitstatus_to_exitcode(status) != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{out.decode(errors='replace')[-3000:]}")
    return {"seconds": round(seconds, 2), "cpu_seconds": round(usage.ru_utime + usage.ru_stime, 2),
            "max_rss_mib": round(usage.ru_maxrss / 1024, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shared", default=str(ROOT.parent / "shared" / "data"))
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "bench_prepare.json"))
    args = parser.parse_args()
    shared = Path(args.shared)
    py = sys.executable
    cli = [py, "-m", "uae_ray.cli", "prepare"]
    qasper_train = shared / "qasper" / "qasper-train-v0.3.json"
    runs = {
        "baseline_imports": [py, "-c", "import uae_ray.stages.prepare, uae_ray.cli"],
        "json_load_qasper_train": [py, "-c", f"import json; d = json.load(open({str(qasper_train)!r})); print(len(d))"],
        "prepare_qasper_train": [*cli, "--format", "qasper", "--input", f"train={qasper_train}"],
        "prepare_qasper_dev": [*cli, "--format", "qasper", "--input", f"dev={shared / 'qasper/qasper-dev-v0.3.json'}"],
        "prepare_squad_mrqa": [*cli, "--format", "mrqa", "--input", str(shared / "squad/SQuAD-dev-v1.1.mrqa.jsonl.gz")],
    }
    results: dict[str, dict] = {}
    with tempfile.TemporaryDirectory(prefix="bench_prepare-") as tmp:
        for name, cmd in runs.items():
            if name.startswith("prepare_"):
                cmd = [*cmd, "--run-dir", str(Path(tmp) / name)]
            results[name] = measure(cmd)
            if name.startswith("prepare_"):
                report = json.loads((Path(tmp) / name / "prepare_report.json").read_text())
                results[name].update(questions_read=report["questions"]["read"],
                                     questions_kept=report["questions"]["kept"],
                                     passages=report["passages"]["kept"], corpus_rows=report["windows"]["rows"],
                                     stage_seconds=report["seconds"])
            print(f"{name:24s} {results[name]}", flush=True)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    load = os.getloadavg()[0]
    out.write_text(json.dumps({"cpu_count": os.cpu_count(), "load_average_1min_at_end": load, "results": results},
                              indent=2) + "\n")
    print(f"\nload average at the end: {load:.1f} on {os.cpu_count()} CPUs")
    print("| run | wall s | CPU s | max RSS MiB | questions read / kept | corpus rows |\n|---|---|---|---|---|---|")
    for name, r in results.items():
        qs = f"{r['questions_read']} / {r['questions_kept']}" if "questions_read" in r else ""
        rows = r.get("corpus_rows", "")
        print(f"| {name} | {r['seconds']} | {r['cpu_seconds']} | {r['max_rss_mib']} | {qs} | {rows} |")


if __name__ == "__main__":
    main()
