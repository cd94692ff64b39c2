"""Why loading runs in a passing thread: the scheduler thread's decode step with and without a second OpenMP pool.

    python bench/pools.py [--config d1024] [--rounds 4] [--no-save]

Each thread that runs a parallel torch op keeps an OpenMP pool until it ends.  Two fresh processes build
the same random model (``bench/serve.py``'s) and time one scheduler decode step (batch 1 and 8, median of
15) in a background thread, as the scheduler runs it:

- "main thread built it": the model and the adapter K/V were computed in the main thread, which stays
  alive, so its pool does too (what ``load()`` did before ``llama_adapter/threads.py``);
- "passing thread built it": both ran in a thread that ended (what ``load()`` and ``Pipeline`` do now).

The rounds alternate the two processes, so that the machine's drift hits both alike.
"""

from __future__ import annotations

import argparse
import json
import shlex
import statistics
import subprocess
import sys
import threading
import time

import torch
from common import append_results
from serve import CONFIGS, random_model

from llama_adapter.serve.scheduler import Limits, Row, Scheduler
from llama_adapter.threads import in_passing_thread

BATCHES = (1, 8)
MODES = {"main": "main thread built it", "passing": "passing thread built it"}


def step_ms(model: torch.nn.Module, kv: list, batch: int, reps: int = 15) -> float:
    scheduler = Scheduler(model, eos_id=-1, limits=Limits(max_rows=batch, max_cached_tokens=batch * 256))
    rows = [Row(list(range(1, 60)), model, kv, 100, 0.0, 1.0, None) for _ in range(batch)]
    with torch.inference_mode():
        for row in rows:
            scheduler._prefill_chunk(row, 256)
            row.next_token = 5
        times = []
        for _ in range(reps):
            start = time.perf_counter()
            scheduler._decode(rows)
            times.append(time.perf_counter() - start)
            for row in rows:
                row.pos += 1
    return statistics.median(times) * 1000


def child(config: str, mode: str) -> None:
    def build() -> tuple[torch.nn.Module, list]:
        model = random_model.__wrapped__(CONFIGS[config])  # type: ignore[attr-defined]
        with torch.inference_mode():
            return model, model.adapter_kv()

    model, kv = build() if mode == "main" else in_passing_thread(build)()
    out: dict[int, float] = {}
    worker = threading.Thread(target=lambda: out.update({b: step_ms(model, kv, b) for b in BATCHES}))
    worker.start()
    worker.join()
    print(json.dumps(out))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="d1024", choices=list(CONFIGS))
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--no-save", action="store_true", help="print only; do not append to RESULTS.md")
    p.add_argument("--child", choices=list(MODES), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        child(args.config, args.child)
        return
    runs: dict[str, dict[int, list[float]]] = {m: {b: [] for b in BATCHES} for m in MODES}
    for _ in range(args.rounds):
        for mode in MODES:
            cmd = [sys.executable, __file__, "--config", args.config, "--child", mode]
            result = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.strip().splitlines()[-1])
            for b in BATCHES:
                runs[mode][b].append(round(result[str(b)], 1))
    rows = ["| who built the model | " + " | ".join(f"batch {b}: step ms (median of {args.rounds} runs)" for b in BATCHES) + " |"]
    rows.append("|---|" + "---|" * len(BATCHES))
    medians = {m: {b: statistics.median(runs[m][b]) for b in BATCHES} for m in MODES}
    for mode, label in MODES.items():
        cells = []
        for b in BATCHES:
            ratio = medians[mode][b] / medians["passing"][b]
            cells.append(f"{medians[mode][b]:.1f} ({ratio:.2f}x)")
        rows.append(f"| {label} | " + " | ".join(cells) + " |")
    setup = f"{CONFIGS[args.config].name}, fp32, {torch.get_num_threads()} threads"
    table = "\n".join(rows) + f"\n\n- config: {setup}; each run's figures (ms): {json.dumps(runs)}"
    print(table)
    if not args.no_save:
        command = "python bench/pools.py " + shlex.join(sys.argv[1:])
        append_results("Scheduler decode step with and without a second OpenMP pool", command, table)


if __name__ == "__main__":
    main()
