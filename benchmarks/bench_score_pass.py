"""Time one scoring (``ray_jobs.score_method``) of two code trees, alternating (issue 12).

::

    git worktree add --detach /tmp/igc-base <base commit>
    python benchmarks/bench_score_pass.py --trees /tmp/igc-base . --data <study>/data \\
        --work /tmp/score-bench [--checkpoint hirescam=<baseline>/best] [--rounds 2] [--repeats 1]

Each round starts, for each tree in turn, a fresh process in that tree, with it first on
``PYTHONPATH`` (for the Ray workers too) and one local Ray runtime of 2 CPUs; it runs one untimed
``intensity`` scoring (the runtime's first Ray Data execution pays for worker start-up, which a
comparison study pays once), then times ``intensity`` ``--repeats`` times and each ``--checkpoint`` method once,
each a whole :func:`ray_jobs.score_method.run` (both Ray Data passes, or the one pass, the
parquet, summary and MLflow run), as the comparison study calls it. Prints one JSON line per
(tree, method, repeat: ``seconds`` the whole run, ``passes_s`` what the job reports for its
Ray Data pass(es) and files) and the mean per tree and method.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path


def child(tree: str, data: str, work: str, checkpoints: list[str], repeats: int) -> None:
    """Runs in the subprocess: one Ray runtime, a warm-up scoring, then the timed ones."""
    import ray

    from ray_jobs import score_method

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"PYTHONPATH": tree}})
    jobs = [("intensity", None, "warmup"), *(("intensity", None, k) for k in range(repeats))]
    jobs += [(m, path, 0) for m, path in (c.split("=", 1) for c in checkpoints)]
    for method, checkpoint, repeat in jobs:
        out = Path(work) / f"{Path(tree).resolve().name}-{method}-{repeat}"
        argv = ["--method", method, "--data", data, "--output", str(out), "--num-cpus", "1"]
        argv += ["--checkpoint", checkpoint] if checkpoint else []
        printed = io.StringIO()
        started = time.perf_counter()
        with contextlib.redirect_stdout(printed):
            result = score_method.run(score_method.parse_args(argv))
        seconds = time.perf_counter() - started
        # The job's own "<n> slices scored in <t> s": its Ray Data pass(es) and the files.
        passes = re.search(r"slices scored in ([0-9.]+) s", printed.getvalue())
        if repeat != "warmup":
            print("RESULT " + json.dumps({"tree": tree, "method": method, "repeat": repeat,
                                          "seconds": round(seconds, 2),
                                          "passes_s": float(passes.group(1)) if passes else None,
                                          "tau": result["tau"]}), flush=True)
    ray.shutdown()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--trees", nargs="+", required=True, help="repository roots to compare")
    p.add_argument("--data", required=True, help="preprocessed dataset folder")
    p.add_argument("--work", required=True, help="scratch folder for the scorings' outputs")
    p.add_argument("--checkpoint", action="append", default=[], help="METHOD=FOLDER, timed once")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--repeats", type=int, default=1, help="timed intensity scorings per process")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        child(args.trees[0], args.data, args.work, args.checkpoint, args.repeats)
        return 0
    results = []
    for round_ in range(args.rounds):
        for tree in args.trees:
            tree = str(Path(tree).resolve())
            env = {**os.environ, "PYTHONPATH": tree}
            cmd = [sys.executable, str(Path(__file__).resolve()), "--child", "--trees", tree, "--data", args.data,
                   "--work", str(Path(args.work) / f"round{round_}"), "--repeats", str(args.repeats)]
            cmd += [f"--checkpoint={c}" for c in args.checkpoint]
            # cwd too: Ray puts the driver's working directory on its workers' sys.path.
            done = subprocess.run(cmd, env=env, cwd=tree, capture_output=True, text=True, check=False)
            if done.returncode:
                print(done.stdout[-3000:], done.stderr[-3000:], file=sys.stderr)
                return 1
            for line in done.stdout.splitlines():
                if line.startswith("RESULT "):
                    results.append(json.loads(line[len("RESULT "):]))
                    print(line[len("RESULT "):], flush=True)
    for tree in dict.fromkeys(r["tree"] for r in results):
        for method in dict.fromkeys(r["method"] for r in results):
            times = [r["seconds"] for r in results if r["tree"] == tree and r["method"] == method]
            passes = [r["passes_s"] for r in results if r["tree"] == tree and r["method"] == method]
            taus = sorted({r["tau"] for r in results if r["tree"] == tree and r["method"] == method})
            print(f"{tree}  {method}: mean {sum(times) / len(times):.2f} s over {len(times)} "
                  f"({', '.join(f'{t:.2f}' for t in times)}), of which the Ray Data pass(es) "
                  f"{', '.join(f'{s:.2f}' for s in passes if s is not None)}; τ {taus}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
