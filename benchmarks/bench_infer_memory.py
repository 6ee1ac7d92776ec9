"""The batch-inference driver's peak memory and throughput against cohort size.

The predictor actors write every prediction (anomaly map, both decodes, input slice) as
per-patient parts and return only small records to the driver, which has a patient's parts
merged into its file once its slices are in (``ray_jobs.infer``). The driver's memory should
therefore not grow with the cohort (before that change, every prediction came back to the
driver, in blocks as large as the cohort, and it grew). This measures it:
the test split of a preprocessed dataset replicated ``k`` times (each copy a new patient id),
``ray_jobs.infer`` run on each in a fresh process, the driver's own peak resident memory
(``VmHWM`` of ``/proc/self/status``, which excludes the Ray worker processes) and its wall time.

The network is a randomly initialised tiny UNet at one DDIM step each way (D = s): what is
measured is the data flow around the network, not the network (the per-slice payload depends
on the slice size, which the dataset fixes).

    python benchmarks/bench_infer_memory.py --data runs/demo/data --scales 1,3,10 \\
        --work /tmp/infer-memory
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from igconda.data.io import InferOutput, dataset_info_path, split_path  # noqa: E402

#: Runs ray_jobs.infer in this process and prints the process's peak resident memory (KiB).
DRIVER = """
import sys
from ray_jobs import infer
code = infer.main(sys.argv[1:])
hwm = next(l for l in open('/proc/self/status') if l.startswith('VmHWM:')).split()[1]
print('VMHWM_KIB', hwm, 'EXIT', code, flush=True)
"""


def replicate(data: Path, out: Path, copies: int, split: str) -> int:
    """``out``: ``data``'s ``split`` with every patient file copied ``copies`` times under new
    patient ids (``<id>_c<j>``) and ``dataset.json`` kept; returns the number of slices."""
    if out.exists():
        shutil.rmtree(out)
    target = Path(split_path(out, split))
    target.mkdir(parents=True)
    shutil.copy(dataset_info_path(data), dataset_info_path(out))
    rows = 0
    for path in sorted(Path(split_path(data, split)).glob("*.parquet")):
        table = pq.read_table(path)
        column = table.schema.get_field_index("patient_id")
        for j in range(copies):
            pid = f"{path.stem}_c{j}"
            ids = pa.array([pid] * table.num_rows, table.schema.field(column).type)
            pq.write_table(table.set_column(column, table.schema.field(column), ids),
                           target / f"{pid}.parquet")
            rows += table.num_rows
    return rows


def tiny_checkpoint(data: Path, folder: Path) -> Path:
    """A random tiny UNet saved with the dataset's own preprocessing settings."""
    import torch

    from igconda.checkpoint import save_checkpoint
    from igconda.config import load_config
    from igconda.models import build_unet

    # dataset.json's "config" is the preprocessing section the slices were made with.
    preprocess = json.loads(Path(dataset_info_path(data)).read_text()).get("config") or {}
    config = load_config(None)
    known = {k: v for k, v in preprocess.items() if k in config.preprocess.__dataclass_fields__}
    config = config.replace("preprocess", **known)
    config = config.replace("model", channels=[8, 8], attention="00", num_head_channels=8,
                            embedding_dim=16, norm_num_groups=4)
    torch.manual_seed(0)
    model = build_unet(config.model)
    return save_checkpoint(folder, model=model, config=config, metadata={"epoch": 0})


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", required=True, type=Path, help="a preprocessed dataset folder")
    p.add_argument("--scales", default="1,3,10", help="copies of the split's patients per run")
    p.add_argument("--split", default="test")
    p.add_argument("--work", required=True, type=Path, help="scratch folder (replaced)")
    p.add_argument("--batch-size", type=int, default=64)
    args = p.parse_args(argv)
    args.work.mkdir(parents=True, exist_ok=True)
    checkpoint = tiny_checkpoint(args.data, args.work / "checkpoint")
    results = []
    for copies in (int(s) for s in args.scales.split(",")):
        data = args.work / f"data_x{copies}"
        slices = replicate(args.data, data, copies, args.split)
        output = args.work / f"infer_x{copies}"
        shutil.rmtree(output, ignore_errors=True)
        command = [sys.executable, "-c", DRIVER, "--checkpoint", str(checkpoint), "--data", str(data),
                   "--output", str(output), "--split", args.split, "--noise-level", "4", "--stride", "4",
                   "--batch-size", str(args.batch_size), "--no-volumes",
                   "--tracking-uri", str(args.work / "mlflow.db")]
        started = time.perf_counter()
        # A Ray runtime of its own (RAY_ADDRESS=local), never a cluster already running here.
        done = subprocess.run(command, cwd=REPO, capture_output=True, text=True,
                              env={**os.environ, "RAY_ADDRESS": "local"})
        wall = time.perf_counter() - started
        line = next((x for x in done.stdout.splitlines() if x.startswith("VMHWM_KIB")), None)
        if done.returncode or line is None:
            print(done.stdout[-3000:], done.stderr[-3000:], file=sys.stderr)
            return 1
        peak_mib = int(line.split()[1]) / 1024
        written = len(InferOutput(output).predictions())
        results.append({"copies": copies, "patients": written, "slices": slices,
                        "driver_peak_mib": round(peak_mib, 1), "wall_s": round(wall, 1),
                        "slices_per_s": round(slices / wall, 1)})
        print(json.dumps(results[-1]), flush=True)
    (args.work / "result.json").write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
