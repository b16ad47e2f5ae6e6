"""Instruction tuning, one base, five methods: experiments/stdlib_sft.py's base model (no training)
and each method trained on the standard-library signatures task, measured side by side.

    python tools/sft_methods_table.py [--base smollm2|quickstart] [--workdir runs/stdlib_sft]
        [--methods base,full,lora,qlora,prompt_tuning,adapter] [--parent runs/quickstart]
        [--smoke] [--max-new-tokens 24] [--devices 1] [-- --config.train.steps=60 ...]

Each row runs in its own process (one after the other: a single heavy job at a time), in
``WORKDIR/BASE/METHOD``, and lands in ``WORKDIR/BASE/results.json`` as it finishes; a row
already there is kept (resume: delete it to measure again; a finished run in its folder is
reused by ``train``). Per row:

- exact match: the greedy replies (:func:`lmstack.chat.greedy_replies`, through the run's chat
  template) to every held-out question, equal to the answer after stripping whitespace
  (``reward.exact_match``); the held-out modules were never seen in training;
- trainable parameters (and the model's total), the median step time (the trainer's, logged
  every step, the compiling step left out), compile time, first and last training loss and the
  held-out loss per answer token;
- memory, as ``tools/bench_peft.py`` measures it: the compiled train step's
  ``memory_analysis()`` (arguments + temporaries, per device; compiled once more before
  training for the figures) and the process's peak resident set after training (``ru_maxrss``).

``--devices`` CPU devices per process (1, as tools/bench_peft.py: lmstack's default of one
device per core keeps a replica of the state per device, which would double full
fine-tuning's memory). Prints a markdown table, the machine, the load average and the wall time.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's lmstack, configs/ and tools/

from tools.bench_peft import MIB, compiled_step, peak_rss  # noqa: E402

ROWS = ("base", "full", "lora", "qlora", "prompt_tuning", "adapter")


def experiment(base: str, method: str, parent: str, smoke: bool = False) -> str:
    """The experiments/stdlib_sft.py variant of a row (the base row: full fine-tuning's config, untrained)."""
    return f"stdlib_sft:base={base},method={'full' if method == 'base' else method},parent={parent},smoke={smoke}"


def heldout(cfg) -> tuple[list[list[dict]], list[str]]:
    """(prompt conversations, answers) of the held-out split ``data.val_path``."""
    from lmstack.data.formats import load_records

    records = load_records(cfg.data, "data.val_path")
    return [r.messages[:-1] for r in records], [r.messages[-1]["content"] for r in records]


def measure(base: str, method: str, workdir: str, parent: str, smoke: bool, max_new_tokens: int, devices: int,
            overrides: list[str], conn) -> None:
    """One row (see the module docstring), sent back through ``conn``."""
    os.environ["JAX_NUM_CPU_DEVICES"] = str(devices)
    import lmstack  # noqa: F401  (XLA:CPU defaults before jax starts)
    import jax
    from absl import logging as absl_logging

    absl_logging.set_verbosity(absl_logging.ERROR)
    from lmstack.chat import greedy_replies
    from lmstack.config import load_config
    from lmstack.distributed import fetch
    from lmstack.metrics_log import read_metrics
    from lmstack.rl.rewards import exact_match
    from lmstack.run import Run
    from lmstack.sample import open_for_generation
    from lmstack.train import train
    from lmstack.trainstate import param_count

    cfg = load_config(experiment(base, method, parent, smoke),
                      ["--config.train.progress=false", "--config.train.log_every=1", *overrides])
    prompts, answers = heldout(cfg)
    row: dict = {"method": method, "lr": None if method == "base" else cfg.optimizer.lr,
                 "load": [os.getloadavg()[0]]}
    t0 = time.perf_counter()
    run, data = Run.for_training(cfg, workdir)
    state = run.starting_state()
    if method == "base":
        model, tokenizer = run.model(fetch(state)), data.tokenizer
        row.update(total=param_count(run.abstract), trainable=0)
    else:
        with jax.set_mesh(run.mesh):
            _, _, figures = compiled_step(run, data, state, cfg.train.batch_size)
        row.update({k: figures[k] for k in ("total", "trainable", "args", "temps", "params_b", "frozen_b", "opt_b")})
        del run, data, state, figures
        summary = train(cfg, workdir)
        row["rss_train"] = peak_rss()
        losses = [r["train/loss"] for r in read_metrics(workdir) if "train/loss" in r]
        row.update(steps=summary["step"], step_s=(summary["ms_per_step"] or 0) / 1e3, compile_s=summary["compile_s"],
                   loss_first=losses[0], loss_last=losses[-1], heldout_loss=summary["eval"]["loss"])
        run, model = open_for_generation(workdir)
        tokenizer = run.spec.tokenizer
    replies = greedy_replies(model, tokenizer, prompts, template=cfg.objective.chat_template,
                             max_new_tokens=max_new_tokens)
    row.update(correct=int(sum(exact_match(r, a) for r, a in zip(replies, answers))), questions=len(answers),
               replies=[{"prompt": p[-1]["content"], "answer": a, "reply": r}
                        for p, a, r in zip(prompts, answers, replies)],
               rss_peak=peak_rss(), wall_s=time.perf_counter() - t0)
    row["load"].append(os.getloadavg()[0])
    conn.send(row)


def table(rows: dict[str, dict], base: str) -> str:
    """The markdown table of the measured rows, in :data:`ROWS` order."""
    out = ["| | exact match | trainable | step s | step memory MiB (args + temps) | peak RSS MiB | "
           "train loss first -> last | held-out loss | lr |",
           "|---|---|---|---|---|---|---|---|---|"]
    for name in ROWS:
        r = rows.get(name)
        if r is None:
            continue
        em = f"{r['correct']}/{r['questions']} ({r['correct'] / r['questions']:.1%})"
        if name == "base":
            out.append(f"| {base} (no training) | {em} | 0 | | | | | | |")  # its RSS: full's state, unused
            continue
        share = r["trainable"] / r["total"]
        out.append(f"| {name} | {em} | {r['trainable']:,} ({share:.2%}) | {r['step_s']:.1f} | "
                   f"{(r['args'] + r['temps']) / MIB:.0f} ({r['args'] / MIB:.0f} + {r['temps'] / MIB:.0f}) | "
                   f"{r['rss_train'] / MIB:.0f} | {r['loss_first']:.2f} -> {r['loss_last']:.2f} | "
                   f"{r['heldout_loss']:.3f} | {r['lr']:g} |")
    return "\n".join(out)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base", default="smollm2", choices=("smollm2", "quickstart"))
    p.add_argument("--workdir", default="runs/stdlib_sft")
    p.add_argument("--methods", default=",".join(ROWS), help="comma-separated rows, of " + ", ".join(ROWS))
    p.add_argument("--parent", default="runs/quickstart", help="the quickstart run (base=quickstart)")
    p.add_argument("--smoke", action="store_true", help="the smoke variant (seconds; a tiny model from scratch)")
    p.add_argument("--max-new-tokens", type=int, default=24)
    p.add_argument("--devices", type=int, default=1, help="CPU devices per process")
    args, overrides = p.parse_known_args()
    overrides = [o for o in overrides if o != "--"]
    methods = [m for m in args.methods.split(",") if m]
    unknown = sorted(set(methods) - set(ROWS))
    if unknown:
        p.error(f"--methods: unknown {', '.join(unknown)}; choose from {', '.join(ROWS)}")

    from lmstack.config import ConfigError, load_config
    from lmstack.init_from import parse_init_from

    try:  # every row's config and starting weights, checked before anything is written
        for method in methods:
            parse_init_from(load_config(experiment(args.base, method, args.parent, args.smoke), overrides).init["from"])
    except ConfigError as e:
        sys.exit(f"sft_methods_table: {e}")

    import multiprocessing as mp

    ctx = mp.get_context("spawn")
    folder = Path(args.workdir) / args.base
    folder.mkdir(parents=True, exist_ok=True)
    results_path = folder / "results.json"
    rows = json.loads(results_path.read_text()) if results_path.is_file() else {}
    t0 = time.perf_counter()
    for method in methods:
        if method in rows:
            print(f"{method}: kept from {results_path}", file=sys.stderr)
            continue
        parent_conn, child_conn = ctx.Pipe()
        proc = ctx.Process(target=measure, args=(args.base, method, str(folder / method), args.parent, args.smoke,
                                                 args.max_new_tokens, args.devices, overrides, child_conn))
        proc.start()
        try:
            row = parent_conn.recv()
        except EOFError:
            proc.join()
            sys.exit(f"{method}: the measuring process died (exit code {proc.exitcode}); rows so far are in "
                     f"{results_path}")
        proc.join()
        row["overrides"] = overrides
        rows[method] = row
        results_path.write_text(json.dumps(rows, indent=1))
        print(f"{method}: {row['correct']}/{row['questions']} exact, {row['wall_s']:.0f} s", file=sys.stderr)
    loads = [x for r in rows.values() for x in r["load"]]
    from lmstack.perf import cpu_name

    cpu = cpu_name()
    print(f"\nstdlib_sft base={args.base}: {next(iter(rows.values()))['questions']} held-out questions; "
          f"{cpu}, {os.cpu_count()} cores, {args.devices} device(s) per process; load average "
          f"{min(loads):.1f}-{max(loads):.1f}; rows' wall time {sum(r['wall_s'] for r in rows.values()) / 60:.0f} min "
          f"(this call {(time.perf_counter() - t0) / 60:.0f} min)\n")
    print(table(rows, args.base))
    for name in ROWS:
        if name in rows:
            first = rows[name]["replies"][0]
            print(f"\n{name}: {first['prompt']!r} -> {first['reply']!r} (answer {first['answer']!r})")


if __name__ == "__main__":
    main()
