"""The ``lmstack`` command end to end: list, train, eval (latest and --step), sample, tokenizer train."""

from __future__ import annotations

import ast
import json
import math
from pathlib import Path

import pytest

from lmstack.cli import main
from lmstack.data.tokenizers import SentencePieceTokenizer
from lmstack.evaluate import read_results
from lmstack.metrics_log import read_metrics
from tests.helpers import corpus_text

EXPERIMENTS = Path(__file__).resolve().parents[1] / "experiments"
PROMPT = "def fibonacci(n):\n"


def run(capsys, argv: list[str]) -> str:
    """``lmstack ARGV`` must succeed; its stdout."""
    capsys.readouterr()
    rc = main(argv)
    out, err = capsys.readouterr()
    assert rc == 0, err
    return out


def test_list_shows_every_experiment_with_its_description(capsys, monkeypatch):
    monkeypatch.delenv("LMSTACK_EXPERIMENTS", raising=False)
    rows = {line.split()[0]: line for line in run(capsys, ["list"]).splitlines()}
    files = [p for p in sorted(EXPERIMENTS.glob("*.py")) if not p.name.startswith("_")]
    assert files and set(rows) >= {p.stem for p in files}
    for path in files:
        summary = ast.get_docstring(ast.parse(path.read_text())).split("\n\n")[0].splitlines()
        shown = rows[path.stem].split(None, 1)[1]  # the summary paragraph, unwrapped onto its row
        assert shown.startswith(summary[0].strip()) and shown.endswith(summary[-1].strip()), path.stem


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """``lmstack train quickstart:smoke=True`` (6 steps, checkpoints and evals at 3 and 6)."""
    workdir = tmp_path_factory.mktemp("cli") / "quickstart"
    assert main(["train", "quickstart:smoke=True", "--workdir", str(workdir), "--config.train.progress=false"]) == 0
    return workdir, read_metrics(workdir)


def eval_loss_at(records: list[dict], step: int) -> float:
    return [r["eval/loss"] for r in records if r["step"] == step and "eval/loss" in r][-1]


def test_eval_reproduces_the_final_eval_of_training(capsys, trained):
    workdir, records = trained
    result = json.loads(run(capsys, ["eval", "quickstart", "--workdir", str(workdir)]))
    assert result["step"] == 6
    assert abs(result["loss"] - eval_loss_at(records, 6)) <= 1e-5
    assert result["perplexity"] == pytest.approx(math.exp(result["loss"]), rel=1e-6)
    assert read_results(workdir)[-1] == result


def test_eval_an_earlier_step(capsys, trained):
    workdir, records = trained
    result = json.loads(run(capsys, ["eval", "quickstart", "--workdir", str(workdir), "--step", "3"]))
    assert result["step"] == 3
    assert abs(result["loss"] - eval_loss_at(records, 3)) <= 1e-5
    assert abs(result["loss"] - eval_loss_at(records, 6)) > 1e-3  # really another checkpoint


def test_eval_refuses_a_step_without_checkpoint_and_another_experiment(capsys, trained):
    workdir, _ = trained
    assert main(["eval", "quickstart", "--workdir", str(workdir), "--step", "4"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert err.startswith("lmstack: error: no checkpoint for step 4 in ") and "(have: 3, 6)" in err
    assert main(["eval", "shakespeare_char", "--workdir", str(workdir)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert "was trained with experiment 'quickstart', not 'shakespeare_char'" in err


def sample(capsys, workdir: Path, *extra: str) -> str:
    return run(capsys, ["sample", "--workdir", str(workdir), "--prompt", PROMPT, "--max-new-tokens", "12", *extra])


def test_greedy_sample_is_deterministic(capsys, trained):
    workdir, _ = trained
    first = sample(capsys, workdir, "--temperature", "0")
    assert first.startswith(PROMPT)
    assert len(first) > len(PROMPT) + 1  # it generated something
    assert sample(capsys, workdir, "--temperature", "0") == first
    assert sample(capsys, workdir, "--temperature", "0", "--seed", "7") == first  # greedy ignores the seed
    # Sampling at temperature 1 depends on the seed (12 tokens from ~500: a repeat is vanishingly rare).
    hot = [sample(capsys, workdir, "--temperature", "1", "--top-p", "1", "--seed", str(s)) for s in (0, 1)]
    assert all(h.startswith(PROMPT) for h in hot)
    assert hot[0] != hot[1]


def test_sample_past_the_context_window(capsys, trained, monkeypatch):
    """A prompt longer than the model's 64-token context is cropped with a note, and every one of the
    tokens asked for comes out (the context slides) instead of a silent cut or a traceback."""
    import lmstack.sample
    from lmstack.run import Run

    shapes = []
    real = lmstack.sample.generate_sliding

    def spy(*args, **kwargs):
        out = real(*args, **kwargs)
        shapes.append(out.shape)
        return out

    monkeypatch.setattr(lmstack.sample, "generate_sliding", spy)
    workdir, _ = trained
    tok = Run.open(workdir).spec.tokenizer
    prompt = corpus_text()[:2000]
    n_prompt = len(tok.encode(prompt))
    assert n_prompt > 64
    capsys.readouterr()
    assert main(["sample", "--workdir", str(workdir), "--prompt", prompt, "--max-new-tokens", "150",
                 "--temperature", "0"]) == 0
    out, err = capsys.readouterr()
    assert f"the prompt has {n_prompt + 1} tokens; the model's context is 64" in err  # + bos
    assert out.startswith(prompt[:100]) and len(out) > len(prompt)
    assert shapes == [(1, 150)]


def test_tokenizer_train_writes_a_loadable_model(capsys, tmp_path):
    text = corpus_text(20_000)
    src = tmp_path / "corpus.txt"
    src.write_text(text)
    out = tmp_path / "sub" / "tok.model"
    stdout = run(capsys, ["tokenizer", "train", "--input", str(src), "--vocab-size", "400", "--out", str(out)])
    assert stdout.strip() == f"wrote {out}"
    tok = SentencePieceTokenizer.load(out)
    assert tok.vocab_size == 400
    sample_text = text[:500]
    ids = tok.encode(sample_text)
    assert tok.decode(ids) == sample_text  # exact round trip, newlines included
    assert len(ids) < len(sample_text.encode()) / 2  # it learned merges, not just bytes
    assert all(0 <= i < 400 for i in ids)


@pytest.mark.parametrize("flags, message", [
    (["--num-samples", "0"], "--num-samples=0: must be at least 1"),
    (["--max-new-tokens", "-5"], "--max-new-tokens=-5: must be at least 1"),
    (["--temperature", "-1"], "--temperature=-1.0: must be >= 0 (0 is greedy)"),
    (["--top-p", "2"], "--top-p=2.0: must be in (0, 1] (1: no cut)"),
    (["--top-k", "-3"], "--top-k=-3: must be >= 0 (0: no cut)"),
])
def test_sampling_flags_out_of_range_are_one_line_errors(capsys, tmp_path, flags, message):
    capsys.readouterr()
    assert main(["sample", "--workdir", str(tmp_path), "--prompt", "x", *flags]) == 2
    assert capsys.readouterr().err == f"lmstack: error: {message}\n"
