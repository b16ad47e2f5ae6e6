"""SST-2 accuracy against the number of labelled examples, from all-MiniLM-L6-v2's pre-trained
weights and from scratch on the same step budget (experiments/sst2_efficiency.py): one run per
(init, n, seed), a markdown table, the answer to "at what n does the scratch model reach what
the pre-trained one reaches with 100 examples?", and a plot (accuracy against n, log x).

    python tools/sst2_efficiency_table.py [--workdir runs/sst2_efficiency] [--data ../shared/data/sst2]
        [--ns 32,100,316,1000,3162,8000] [--seeds-at-100 2]

Each run is a subprocess (``lmstack train``) in WORKDIR/INIT-nN-sS; its result goes into
WORKDIR/results.json as it finishes, so a rerun resumes with the runs still missing (delete an
entry to redo it). Runs share a JAX compilation cache in WORKDIR/jax_cache, and their
checkpoints are deleted once scored (--keep-checkpoints keeps them). Seed 0 trains on the first
n sentences of train.tsv (its order is already shuffled); seed s > 0 on the first n of a seeded
permutation of the file, written once to WORKDIR/data/train_seedS.tsv, so seeds differ in the
examples too, and a smaller n is a subset of a larger one.
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
from typing import Any, Callable, Iterable

import numpy as np

NS = (32, 100, 316, 1000, 3162, 8000)
INITS = ("pretrained", "scratch")
REFERENCE_N = 100  # the pre-trained model's label count the question compares with

Key = tuple[str, int, int]  # (init, n, seed)


def run_name(init: str, n: int, seed: int) -> str:
    return f"{init}-n{n}-s{seed}"


def plan(ns: Iterable[int] = NS, seeds_at_100: int = 2, seeds: int = 1) -> list[Key]:
    """The runs: every n for both inits with ``seeds`` seeds, then more seeds (up to
    ``seeds_at_100``) of the pre-trained model at n = 100, the reference the question compares with."""
    keys = [(init, n, s) for s in range(seeds) for n in sorted(ns) for init in INITS]
    keys += [("pretrained", REFERENCE_N, s) for s in range(seeds, seeds_at_100)]
    return keys


def load_results(path: Path) -> dict[str, dict]:
    """``results.json``'s runs by name ({} when the file is absent)."""
    return json.loads(path.read_text())["runs"] if path.is_file() else {}


def save_results(path: Path, runs: dict[str, dict], machine: dict[str, Any]) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"machine": machine, "runs": runs}, indent=1, sort_keys=True))
    tmp.replace(path)


def run_grid(keys: list[Key], results_path: Path, runner: Callable[[Key], dict], machine: dict[str, Any]
             ) -> dict[str, dict]:
    """Run every key whose name ``results.json`` lacks, saving after each; returns all results."""
    runs = load_results(results_path)
    todo = [k for k in keys if run_name(*k) not in runs]
    print(f"{len(keys) - len(todo)} of {len(keys)} runs already in {results_path}; {len(todo)} to go", flush=True)
    for i, key in enumerate(todo, 1):
        result = runner(key)
        runs[run_name(*key)] = result
        save_results(results_path, runs, machine)
        print(f"[{i}/{len(todo)}] {run_name(*key)}: accuracy {result['accuracy']:.4f}  macro-F1 "
              f"{result['macro_f1']:.4f}  ({result['wall_s']:.0f} s)", flush=True)
    return runs


def by_cell(runs: dict[str, dict]) -> dict[tuple[str, int], list[dict]]:
    """Results grouped by (init, n), seeds in order."""
    cells: dict[tuple[str, int], list[dict]] = {}
    for r in sorted(runs.values(), key=lambda r: (r["init"], r["n"], r["seed"])):
        cells.setdefault((r["init"], r["n"]), []).append(r)
    return cells


def mean_accuracy(results: list[dict]) -> float:
    return float(np.mean([r["accuracy"] for r in results]))


def _cell(results: list[dict] | None, key: str) -> str:
    if not results:
        return "-"
    values = [r[key] for r in results]
    text = f"{np.mean(values):.3f}"
    return text + (f" ({', '.join(f'{v:.3f}' for v in values)})" if len(values) > 1 else "")


def table(runs: dict[str, dict]) -> str:
    """The markdown table: one row per n; accuracy and macro-F1 per init (the mean, and each
    seed's value where there are several), and the runs' wall time."""
    cells = by_cell(runs)
    lines = ["| n | pre-trained acc | scratch acc | pre-trained macro-F1 | scratch macro-F1 | wall s (pre / scratch) |",
             "|---|---|---|---|---|---|"]
    for n in sorted({n for _, n in cells}):
        pre, scr = cells.get(("pretrained", n)), cells.get(("scratch", n))
        wall = " / ".join("-" if not c else "+".join(f"{r['wall_s']:.0f}" for r in c) for c in (pre, scr))
        lines.append(f"| {n:,} | {_cell(pre, 'accuracy')} | {_cell(scr, 'accuracy')} | {_cell(pre, 'macro_f1')} | "
                     f"{_cell(scr, 'macro_f1')} | {wall} |")
    return "\n".join(lines)


def answer(runs: dict[str, dict]) -> str:
    """The smallest n at which the scratch model's mean accuracy reaches the pre-trained one's at
    n = 100, as a label ratio, or a lower bound when no measured n reaches it."""
    cells = by_cell(runs)
    if ("pretrained", REFERENCE_N) not in cells:
        return f"no pre-trained run at n = {REFERENCE_N} yet"
    target = mean_accuracy(cells[("pretrained", REFERENCE_N)])
    scratch = sorted((n, mean_accuracy(rs)) for (init, n), rs in cells.items() if init == "scratch")
    if not scratch:
        return "no scratch run yet"
    head = f"pre-trained at n = {REFERENCE_N}: accuracy {target:.3f}; "
    for n, acc in scratch:
        if acc >= target:
            return head + f"scratch first reaches it at n = {n:,} ({acc:.3f}): {n / REFERENCE_N:g}x the labels"
    n_max, acc_max = scratch[-1]
    best_n, best = max(scratch, key=lambda t: t[1])
    return (head + f"scratch does not reach it by n = {n_max:,} (best {best:.3f} at n = {best_n:,}): "
            f"> {n_max / REFERENCE_N:g}x the labels, a lower bound")


def plot(runs: dict[str, dict], path: Path, title: str = "") -> None:
    """Dev accuracy against n (log x), one line per init through the seeds' means, every seed a dot."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cells = by_cell(runs)
    fig, ax = plt.subplots(figsize=(6, 4))
    for init, colour in zip(INITS, ("tab:blue", "tab:orange")):
        ns = sorted(n for i, n in cells if i == init)
        if not ns:
            continue
        ax.plot(ns, [mean_accuracy(cells[(init, n)]) for n in ns], "-o", color=colour,
                label=f"{'pre-trained (all-MiniLM-L6-v2)' if init == 'pretrained' else 'scratch (same architecture)'}")
        for n in ns:
            ax.scatter([n] * len(cells[(init, n)]), [r["accuracy"] for r in cells[(init, n)]], s=12, color=colour,
                       alpha=0.5)
    ax.axhline(0.5, color="grey", lw=0.8, ls=":", label="chance")
    ax.set_xscale("log")
    ax.set_xlabel("labelled training examples n")
    ax.set_ylabel("SST-2 dev accuracy (872)")
    ax.set_title(title or "SST-2: accuracy against labels, same step budget", fontsize=10)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def seeded_train_file(data: Path, root: Path, seed: int) -> Path:
    """train.tsv itself for seed 0; for seed s > 0 its rows (header kept) in a permutation drawn
    from seed s, written once under ``root/data``."""
    src = data / "train.tsv"
    if seed == 0:
        return src
    out = root / "data" / f"train_seed{seed}.tsv"
    if not out.is_file():
        header, *rows = src.read_bytes().splitlines(keepends=True)  # bytes: CRLF endings kept as they are
        order = np.random.default_rng(seed).permutation(len(rows))
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_suffix(".tmp")
        tmp.write_bytes(header + b"".join(rows[i] for i in order))
        tmp.replace(out)
    return out


def subprocess_runner(root: Path, data: Path, overrides: list[str], keep_checkpoints: bool
                      ) -> Callable[[Key], dict]:
    """Runs one key as ``lmstack train sst2_efficiency:...`` in its own process and workdir."""

    def run(key: Key) -> dict:
        init, n, seed = key
        workdir = root / run_name(*key)
        if workdir.exists():  # a run cut short: start it again
            shutil.rmtree(workdir)
        cmd = [sys.executable, "-m", "lmstack.cli", "train", f"sst2_efficiency:init={init},n={n},seed={seed}",
               "--workdir", str(workdir), "--config.train.progress=false", "--config.checkpoint.async_save=false",
               f"--config.data.path={seeded_train_file(data, root, seed)}",
               f"--config.data.val_path={data / 'dev.tsv'}", *overrides]
        env = {**os.environ, "JAX_COMPILATION_CACHE_DIR": str(root / "jax_cache")}
        t = time.perf_counter()
        with open(root / f"{run_name(*key)}.log", "w") as log:
            proc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
        wall = time.perf_counter() - t
        if proc.returncode:
            sys.exit(f"{run_name(*key)} failed (exit {proc.returncode}): see {root / run_name(*key)}.log")
        final = [r for r in map(json.loads, (workdir / "metrics.jsonl").read_text().splitlines())
                 if "eval/classification/accuracy" in r][-1]
        config = json.loads((workdir / "config.json").read_text())
        if not keep_checkpoints:
            shutil.rmtree(workdir / "checkpoints", ignore_errors=True)
        return dict(init=init, n=n, seed=seed, accuracy=final["eval/classification/accuracy"],
                    macro_f1=final["eval/classification/macro_f1"], step=final["step"], wall_s=round(wall, 1),
                    lr=config["optimizer"]["lr"], steps=config["train"]["steps"],
                    batch_size=config["train"]["batch_size"], seq_len=config["data"]["seq_len"],
                    load_after=round(os.getloadavg()[0], 2))

    return run


def machine_info() -> dict[str, Any]:
    from lmstack.perf import cpu_name

    return {"cpu": cpu_name(), "cpus": os.cpu_count()}


def report(runs: dict[str, dict], out_png: Path | None) -> str:
    """The table, the answer and the budget, as printed (and the plot written to ``out_png``)."""
    any_run = next(iter(runs.values()), None)
    budget = "" if any_run is None else (
        f"budget: {any_run['steps']} steps x batch {any_run['batch_size']} ({any_run['steps'] * any_run['batch_size']:,}"
        f" examples seen) x {any_run['seq_len']} tokens for every run; lr {sorted({r['lr'] for r in runs.values()})}")
    if out_png is not None and runs:
        plot(runs, out_png)
    return "\n".join([table(runs), "", answer(runs), budget])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--workdir", default="runs/sst2_efficiency")
    ap.add_argument("--data", default="../shared/data/sst2", help="the folder with train.tsv and dev.tsv")
    ap.add_argument("--ns", default=",".join(map(str, NS)))
    ap.add_argument("--seeds", type=int, default=1, help="seeds for every (init, n)")
    ap.add_argument("--seeds-at-100", type=int, default=2, help="seeds for the pre-trained model at n = 100")
    ap.add_argument("--keep-checkpoints", action="store_true")
    ap.add_argument("--summary-only", action="store_true", help="print the table of results.json; run nothing")
    ap.add_argument("overrides", nargs="*", help="--config.KEY=VALUE passed to every run (after --)")
    args = ap.parse_args()
    root, data = Path(args.workdir), Path(args.data)
    root.mkdir(parents=True, exist_ok=True)
    results_path = root / "results.json"
    if args.summary_only:
        runs = load_results(results_path)
    else:
        from configs.open_weights import minilm_dir

        try:
            minilm_dir()
        except FileNotFoundError as e:
            sys.exit(str(e))
        for name in ("train.tsv", "dev.tsv"):
            if not (data / name).is_file():
                sys.exit(f"--data {data}: no {name} there: pass the SST-2 folder (../shared/data/sst2)")
        machine = machine_info()
        t = time.perf_counter()
        load = os.getloadavg()
        keys = plan([int(n) for n in args.ns.split(",")], args.seeds_at_100, args.seeds)
        runs = run_grid(keys, results_path, subprocess_runner(root, data, args.overrides, args.keep_checkpoints),
                        machine)
        print(f"\n{machine['cpu']}, {machine['cpus']} CPUs; load average at start {load[0]:.2f} / {load[1]:.2f} / "
              f"{load[2]:.2f}, now {os.getloadavg()[0]:.2f}; this invocation {time.perf_counter() - t:.0f} s, all "
              f"runs {sum(r['wall_s'] for r in runs.values()):.0f} s\n")
    print(report(runs, root / "sst2_efficiency.png" if runs else None))
    if runs:
        print(f"\nplot: {root / 'sst2_efficiency.png'}")


if __name__ == "__main__":
    main()
