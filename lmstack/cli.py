"""The ``lmstack`` command: list, train, eval, sample, chat, import, export, compile, tokenizer.

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


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="lmstack", description="Pre-train and post-train language models in JAX.")
    sub = p.add_subparsers(dest="command", required=True)

    sub.add_parser("list", help="every experiment with its one-line description")

    t = sub.add_parser("train", help="train an experiment: lmstack train NAME[:arg] --workdir W [--config.a.b=v]")
    t.add_argument("experiment", help="NAME or NAME:arg (experiments/NAME.py:get_config(arg))")
    t.add_argument("--workdir", required=True, help="run directory; re-running resumes from its checkpoint")
    t.add_argument("--accept-changed-data", action="store_true",
                   help="resume even though the data's token stream differs from the one the run started on")

    e = sub.add_parser("eval", help="evaluate a saved checkpoint: lmstack eval NAME --workdir W [--step S]")
    e.add_argument("experiment", nargs="?", help="the experiment the workdir was trained with (checked)")
    e.add_argument("--workdir", required=True)
    e.add_argument("--step", type=int, default=None, help="checkpoint step (default: the latest)")

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
    x.add_argument("--format", required=True, choices=["hf", "gguf"])
    x.add_argument("--out", required=True, help="a directory (hf) or a .gguf file")
    x.add_argument("--qtype", default="F32", choices=["F32", "F16", "Q8_0"], help="gguf tensor type of the matrices")
    x.add_argument("--step", type=int, default=None)

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
        from lmstack.evaluate import evaluate

        cfg = config_lib.load_saved_config(args.workdir)
        if args.experiment and args.experiment.split(":")[0] != cfg.name:
            raise config_lib.ConfigError(
                f"workdir {args.workdir!r} was trained with experiment {cfg.name!r}, not {args.experiment!r}: "
                f"pass {cfg.name!r} or another --workdir"
            )
        config_lib.apply_overrides(cfg, overrides)
        print(json.dumps(evaluate(cfg, args.workdir, args.step), indent=1))
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
    raise AssertionError(args.command)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    from absl import logging as absl_logging  # orbax logs every save at INFO/WARNING

    absl_logging.set_verbosity(absl_logging.ERROR)
    rest, overrides = _split_overrides(argv)
    args = _parser().parse_args(rest)
    if overrides and args.command not in ("train", "eval", "compile"):
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
