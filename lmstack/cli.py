"""The ``lmstack`` command: list, train, eval, sample, chat, import, export, compile, tokenizer, report, sweep.

Bad input (a config, data, mesh or checkpoint problem) ends with one line on stderr,
``lmstack: error: ...``, and exit status 2; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Sequence

def _user_errors() -> tuple[type[BaseException], ...]:
    from lmstack.config import ConfigError
    from lmstack.data.sources import DataError
    from lmstack.registry import UnknownNameError
    from lmstack.sharding import MeshError

    return (ConfigError, DataError, MeshError, UnknownNameError, FileNotFoundError)


def _add_process_flags(p: argparse.ArgumentParser) -> None:
    """A job of several processes (multi-host); SLURM sets these itself (see lmstack/distributed.py)."""
    p.add_argument("--coordinator", default=None,
                   help="HOST:PORT of process 0, or 'auto' to let jax detect the cluster (TPU pod)")
    p.add_argument("--num-processes", type=int, default=None, help="how many processes the job has")
    p.add_argument("--process-id", type=int, default=None, help="this process's index in [0, --num-processes)")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="lmstack", description="Pre-train and post-train language models in JAX.")
    sub = p.add_subparsers(dest="command", required=True)

    sub.add_parser("list", help="every experiment with its one-line description")

    t = sub.add_parser("train", help="train an experiment: lmstack train NAME[:arg] --workdir W [--config.a.b=v]")
    t.add_argument("experiment", help="NAME or NAME:arg (experiments/NAME.py:get_config(arg))")
    t.add_argument("--workdir", required=True, help="run directory; re-running resumes from its checkpoint")
    t.add_argument("--accept-changed-data", action="store_true",
                   help="resume even though the data's token stream differs from the one the run started on")
    _add_process_flags(t)

    e = sub.add_parser("eval", help="evaluate saved checkpoints: lmstack eval NAME --workdir W [--step N|all] "
                                    "[--watch]; one JSON line per step, also in W/eval/results.jsonl")
    e.add_argument("experiment", nargs="?", help="the experiment the workdir was trained with (checked)")
    e.add_argument("--workdir", required=True)
    e.add_argument("--step", default=None, help="a checkpoint step, or 'all' for every one not yet in "
                                                "W/eval/results.jsonl (default: the latest)")
    e.add_argument("--watch", action="store_true", help="evaluate each checkpoint of a running job once, as it is "
                                                        "saved, until its last step (train.steps)")
    e.add_argument("--poll-seconds", type=float, default=None, help="with --watch: how often to look (default 30)")
    e.add_argument("--timeout-seconds", type=float, default=None,
                   help="with --watch: stop after this long without a new checkpoint (default 3600)")
    _add_process_flags(e)

    s = sub.add_parser("sample", help="generate from a saved checkpoint: lmstack sample --workdir W --prompt ...")
    s.add_argument("--workdir", required=True)
    s.add_argument("--prompt", default="")
    s.add_argument("--step", type=int, default=None)
    s.add_argument("--max-new-tokens", type=int, default=128)
    s.add_argument("--temperature", type=float, default=0.8, help="0 means greedy")
    s.add_argument("--top-k", type=int, default=0, help="0 means no top-k cut")
    s.add_argument("--top-p", type=float, default=0.95, help="1 means no nucleus cut")
    s.add_argument("--num-samples", type=int, default=1)
    s.add_argument("--seed", type=int, default=0)

    c = sub.add_parser("chat", help="chat with a checkpoint through its chat template: lmstack chat --workdir W")
    c.add_argument("--workdir", required=True)
    c.add_argument("--prompt", default=None, help="one message and its reply; without it, read messages from stdin")
    c.add_argument("--system", default="", help="a system message first")
    c.add_argument("--template", default="", help="chat template: the model's own (default), chatml, llama3, "
                                                  "or a Jinja string")
    c.add_argument("--step", type=int, default=None)
    c.add_argument("--max-new-tokens", type=int, default=256)
    c.add_argument("--temperature", type=float, default=0.0, help="0 means greedy")
    c.add_argument("--top-k", type=int, default=0)
    c.add_argument("--top-p", type=float, default=1.0)
    c.add_argument("--seed", type=int, default=0)

    i = sub.add_parser("import", help="make a workdir from open weights: lmstack import SOURCE --workdir W")
    i.add_argument("source", help="a Hugging Face directory, a .gguf file, or a run's workdir")
    i.add_argument("--workdir", required=True)

    x = sub.add_parser("export", help="write a run as open weights: lmstack export --workdir W --format hf --out D")
    x.add_argument("--workdir", required=True)
    x.add_argument("--format", required=True, choices=["hf", "gguf", "peft"],
                   help="hf: safetensors + config.json; gguf; peft: LoRA adapters alone (adapter_config.json)")
    x.add_argument("--out", required=True, help="a directory (hf, peft) or a .gguf file")
    x.add_argument("--qtype", default="F32", choices=["F32", "F16", "Q8_0"], help="gguf tensor type of the matrices")
    x.add_argument("--step", type=int, default=None)

    r = sub.add_parser("report", help="compare runs: lmstack report W [W ...] (or a sweep directory)")
    r.add_argument("workdirs", nargs="+", help="run workdirs, or a sweep directory holding member workdirs")
    r.add_argument("--format", default="table", choices=["table", "markdown", "csv", "json"])
    r.add_argument("--out", default=None, help="where the PNG plots go (default: W/report, or the common "
                                               "parent's report/ for several workdirs)")

    sw = sub.add_parser("sweep", help="run an experiment's sweep(): lmstack sweep NAME[:arg] --launcher local")
    sw.add_argument("experiment", help="NAME or NAME:arg; experiments/NAME.py must define sweep()")
    sw.add_argument("--launcher", default="local", choices=["local", "slurm", "tpu-vm"])
    sw.add_argument("--parallel", type=int, default=1, help="local: members running at once")
    sw.add_argument("--workdir", default=None, help="the sweep directory (default runs/NAME); member M runs in "
                                                    "WORKDIR/M")
    sw.add_argument("--tpu-name", default=None, help="tpu-vm: the TPU VM slice")
    sw.add_argument("--zone", default=None, help="tpu-vm: its zone")
    sw.add_argument("--dry-run", action="store_true", help="print what would run or be written; do nothing")
    aot = sub.add_parser("compile", help="compile the train step for a TPU slice here, print per-chip memory and "
                                         "FLOPs: lmstack compile NAME[:arg] --topology v5p-128 [--config.a.b=v]")
    aot.add_argument("experiment", help="NAME or NAME:arg")
    aot.add_argument("--topology", required=True, help="a TPU type (v5e-8, v5p-128, v4-32, v6e-16) or a libtpu "
                                                       "name (v5e:2x2, v5p:4x4x4)")

    tok = sub.add_parser("tokenizer", help="tokenizer tools")
    tsub = tok.add_subparsers(dest="tokenizer_command", required=True)
    tt = tsub.add_parser("train", help="train a SentencePiece model on text files")
    tt.add_argument("--input", nargs="+", required=True, help="UTF-8 text files")
    tt.add_argument("--vocab-size", type=int, required=True)
    tt.add_argument("--out", required=True, help="where to write the .model file")
    tt.add_argument("--model-type", default="bpe", choices=["bpe", "unigram"])
    return p


def _split_overrides(argv: Sequence[str]) -> tuple[list[str], list[str]]:
    """Separate ``--config.a.b=v`` / ``--config.a.b v`` overrides from ordinary arguments."""
    rest, overrides = [], []
    it = iter(argv)
    for arg in it:
        if arg.startswith("--config."):
            overrides.append(arg if "=" in arg else f"{arg}={next(it, '')}")
        else:
            rest.append(arg)
    return rest, overrides


def _check_sampling(args: argparse.Namespace) -> None:
    """One-line errors for sampling flags out of range, before any model is loaded."""
    from lmstack.config import ConfigError

    checks = [("--max-new-tokens", args.max_new_tokens >= 1, "at least 1"),
              ("--temperature", args.temperature >= 0, ">= 0 (0 is greedy)"),
              ("--top-k", args.top_k >= 0, ">= 0 (0: no cut)"),
              ("--top-p", 0 < args.top_p <= 1, "in (0, 1] (1: no cut)")]
    if hasattr(args, "num_samples"):
        checks.append(("--num-samples", args.num_samples >= 1, "at least 1"))
    for flag, ok, need in checks:
        if not ok:
            raise ConfigError(f"{flag}={getattr(args, flag[2:].replace('-', '_'))}: must be {need}")


def _run(args: argparse.Namespace, overrides: list[str]) -> int:
    from lmstack import config as config_lib

    if args.command == "list":
        rows = config_lib.list_experiments()
        width = max((len(n) for n, _ in rows), default=0)
        for name, desc in rows:
            print(f"{name:<{width}}  {desc}")
        return 0
    if args.command == "tokenizer":
        from lmstack.data.tokenizers import train_tokenizer_files

        out = train_tokenizer_files(args.input, args.vocab_size, args.out, args.model_type)
        print(f"wrote {out}")
        return 0
    if args.command in ("train", "eval"):
        from lmstack.distributed import initialize_from

        initialize_from(args)  # before anything starts jax's backend
    if args.command == "train":
        from lmstack.train import train

        cfg = config_lib.load_config(args.experiment, overrides)
        # an interrupted (SIGTERM) run has saved and exits cleanly too
        train(cfg, args.workdir, accept_changed_data=args.accept_changed_data)
        return 0
    if args.command == "compile":
        from lmstack.aot import compile_for_topology

        report = compile_for_topology(config_lib.load_config(args.experiment, overrides), args.topology)
        print(report.format())
        return 0 if report.fits else 1
    if args.command == "eval":
        from lmstack.distributed import is_primary
        from lmstack.evaluate import check_eval_flags, check_run_dir, evaluate, evaluate_all, watch

        step, poll_s, timeout_s = check_eval_flags(args.step, args.watch, args.poll_seconds, args.timeout_seconds)
        cfg = config_lib.load_saved_config(check_run_dir(args.workdir))
        if args.experiment and args.experiment.split(":")[0] != cfg.name:
            raise config_lib.ConfigError(
                f"workdir {args.workdir!r} was trained with experiment {cfg.name!r}, not {args.experiment!r}: "
                f"pass {cfg.name!r} or another --workdir"
            )
        cfg = config_lib.configure(cfg, overrides, str(Path(args.workdir) / "config.json"), cfg.name)
        if args.watch:
            records = watch(cfg, args.workdir, poll_seconds=poll_s, timeout_seconds=timeout_s)
        elif step == "all":
            records = evaluate_all(cfg, args.workdir)
        else:
            records = [evaluate(cfg, args.workdir, step)]
        try:
            for record in records:
                if is_primary():
                    print(json.dumps(record), flush=True)
        except KeyboardInterrupt:  # the usual way to stop a watcher; every record so far is written
            print("lmstack: eval stopped", file=sys.stderr)
            return 130
        return 0
    if args.command in ("sample", "chat"):
        _check_sampling(args)
    if args.command == "sample":
        from lmstack.sample import sample_workdir

        texts = sample_workdir(
            Path(args.workdir), args.prompt, step=args.step, max_new_tokens=args.max_new_tokens,
            temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, seed=args.seed,
            num_samples=args.num_samples,
        )
        print("\n----\n".join(texts))
        return 0
    if args.command == "chat":
        from lmstack.chat import chat_workdir

        return chat_workdir(args.workdir, prompt=args.prompt, system=args.system, template=args.template,
                            step=args.step, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                            top_k=args.top_k, top_p=args.top_p, seed=args.seed)
    if args.command == "import":
        from lmstack.interop.workdirs import import_workdir

        print(f"wrote {import_workdir(args.source, args.workdir)}: lmstack chat --workdir {args.workdir}")
        return 0
    if args.command == "export":
        from lmstack.interop.workdirs import export_workdir

        print(f"wrote {export_workdir(args.workdir, args.format, args.out, qtype=args.qtype, step=args.step)}")
        return 0
    if args.command == "report":
        from lmstack.report import report

        text, pngs = report(args.workdirs, fmt=args.format, out=args.out)
        print(text)
        for png in pngs:  # stderr, so stdout stays the table (csv and json parse as they are)
            print(f"wrote {png}", file=sys.stderr)
        return 0
    if args.command == "sweep":
        from lmstack.sweep import launch, load_sweep

        sweep = load_sweep(args.experiment, overrides, args.workdir)  # every member validated first
        failed = launch(sweep, args.launcher, parallel=args.parallel, dry_run=args.dry_run,
                        tpu_name=args.tpu_name, zone=args.zone)
        if failed:
            print(f"lmstack: error: {len(failed)} of {len(sweep.members)} sweep members did not finish: "
                  f"{', '.join(failed)} (each one's output is in its train.log; re-run the sweep to resume them)",
                  file=sys.stderr)
            return 1
        return 0
    raise AssertionError(args.command)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    from absl import logging as absl_logging  # orbax logs every save at INFO/WARNING

    absl_logging.set_verbosity(absl_logging.ERROR)
    rest, overrides = _split_overrides(argv)
    args = _parser().parse_args(rest)
    if overrides and args.command not in ("train", "eval", "sweep", "compile"):
        print(f"lmstack: error: {args.command} takes no --config overrides (got {overrides[0]})", file=sys.stderr)
        return 2
    try:
        return _run(args, overrides)
    except _user_errors() as e:
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        print(f"lmstack: error: {msg}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
