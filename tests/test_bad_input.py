"""Every bad-input path of ``lmstack train``: one line ``lmstack: error: ...`` on stderr, exit
status 2, and a message that says what is wrong, where, and what to do."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from lmstack.cli import main
from tests.helpers import corpus_text

# shakespeare_char (char tokenizer, text source) on a small generated file, on one device.
BASE = ["train", "shakespeare_char:smoke=True", "--config.mesh.data=1", "--config.train.progress=false"]
# ... and shrunk further where a run really trains.
TINY = ["--config.model.n_layers=1", "--config.model.d_model=32", "--config.train.steps=2",
        "--config.checkpoint.every=1", "--config.eval.every=0", "--config.eval.batches=1",
        "--config.sample.max_new_tokens=2"]


def error_of(capsys, argv: list[str]) -> str:
    """Run ``lmstack ARGV``; assert status 2 and exactly one stderr line; return its message."""
    capsys.readouterr()
    rc = main(argv)
    err = capsys.readouterr().err
    assert rc == 2, err
    lines = err.splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("lmstack: error: "), err
    return lines[0].removeprefix("lmstack: error: ")


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("bad-input")
    text = corpus_text(8000)
    (d / "corpus.txt").write_text(text)
    (d / "empty.txt").write_text("")
    lines = [json.dumps({"text": line}) for line in text.splitlines()[:20]]
    lines[2] = lines[2][:-1]  # line 3 loses its closing brace
    (d / "bad.jsonl").write_text("\n".join(lines) + "\n")
    return {"dir": d, "corpus": d / "corpus.txt", "empty": d / "empty.txt", "jsonl": d / "bad.jsonl",
            "n_chars": len(set(text))}


def test_missing_data_file(capsys, files, tmp_path):
    missing = files["dir"] / "no-such-file.txt"
    msg = error_of(capsys, [*BASE, "--workdir", str(tmp_path / "w"), f"--config.data.path={missing}"])
    assert msg.startswith("data.path: no such file or directory")  # what, and which setting
    assert repr(str(missing)) in msg  # where
    assert "pass --config.data.path=FILE" in msg  # what to do


def test_empty_data_file(capsys, files, tmp_path):
    msg = error_of(capsys, [*BASE, "--workdir", str(tmp_path / "w"), f"--config.data.path={files['empty']}"])
    assert msg.startswith("data.path: ")
    assert f"{str(files['empty'])!r} is empty" in msg
    assert "point --config.data.path at text with content" in msg


def test_vocab_smaller_than_tokenizer(capsys, files, tmp_path):
    workdir = tmp_path / "w"
    msg = error_of(capsys, [*BASE, "--workdir", str(workdir), f"--config.data.path={files['corpus']}",
                            "--config.model.vocab_size=10"])
    n = files["n_chars"]  # the char tokenizer has one id per distinct character
    assert f"model.vocab_size=10 is smaller than the tokenizer's {n} tokens" in msg
    assert "(the char tokenizer data.tokenizer describes)" in msg
    assert "set --config.model.vocab_size=0" in msg
    assert not workdir.exists()  # found before anything is written


def test_batch_not_divisible_by_data_parallel_size(capsys, files, tmp_path):
    msg = error_of(capsys, [*BASE, "--workdir", str(tmp_path / "w"), f"--config.data.path={files['corpus']}",
                            "--config.mesh.data=8", "--config.train.batch_size=12"])
    assert msg.startswith("train.batch_size=12 is not divisible by the data-parallel size 8")
    assert "(mesh.data=8 x mesh.fsdp=1)" in msg
    assert "set --config.train.batch_size to a multiple of 8 (e.g. 16)" in msg
    assert "--config.mesh.data" in msg


def test_microbatch_not_divisible_by_data_parallel_size(capsys, files, tmp_path):
    msg = error_of(capsys, [*BASE, "--workdir", str(tmp_path / "w"), f"--config.data.path={files['corpus']}",
                            "--config.mesh.data=4", "--config.train.batch_size=12", "--config.train.microbatches=2"])
    assert msg.startswith("the microbatch size 6 (train.batch_size=12 / train.microbatches=2) is not divisible "
                          "by the data-parallel size 4")
    assert "set --config.train.batch_size to a multiple of 8 (e.g. 16), lower --config.train.microbatches" in msg


def test_eval_batch_not_divisible(capsys, files, tmp_path):
    # 16 training rows fit 8 devices, 60 evaluation rows do not.
    msg = error_of(capsys, [*BASE, "--workdir", str(tmp_path / "w"), f"--config.data.path={files['corpus']}",
                            "--config.mesh.data=8", "--config.train.batch_size=16", "--config.eval.batch_size=60"])
    assert msg.startswith("eval.batch_size=60 is not divisible by the data-parallel size 8")
    assert "set --config.eval.batch_size to a multiple of 8 (e.g. 64)" in msg


def test_mesh_larger_than_devices(capsys, files, tmp_path):
    msg = error_of(capsys, [*BASE, "--workdir", str(tmp_path / "w"), f"--config.data.path={files['corpus']}",
                            "--config.mesh.data=16"])
    assert "config.mesh {'data': 16, 'fsdp': 1, 'tensor': 1}" in msg
    assert "needs 16 devices but only 8 are available" in msg
    assert "lower --config.mesh" in msg


def test_malformed_jsonl_line(capsys, files, tmp_path):
    msg = error_of(capsys, [*BASE, "--workdir", str(tmp_path / "w"), "--config.data.source=jsonl",
                            f"--config.data.path={files['jsonl']}"])
    assert f"{files['jsonl']}:3: not valid JSON" in msg  # file:line
    assert "fix or delete that line" in msg


def test_unknown_config_key(capsys, tmp_path):
    msg = error_of(capsys, [*BASE, "--workdir", str(tmp_path / "w"), "--config.optimizer.lrr=0.1"])
    assert msg.startswith("unknown config key 'optimizer.lrr' (from --config.optimizer.lrr=0.1)")
    assert "closest valid keys: optimizer.lr" in msg


@pytest.mark.parametrize("override, expect", [
    ("--config.train.steps=ten", "config key 'train.steps' expects int, got 'ten' (from --config.train.steps=ten)"),
    ("--config.train.steps=1.5", "config key 'train.steps' expects int, got '1.5'"),
    ("--config.train.progress=maybe", "config key 'train.progress' expects bool (true/false), got 'maybe'"),
    ("--config.optimizer.lr=fast", "config key 'optimizer.lr' expects float, got 'fast'"),
])
def test_wrong_type(capsys, tmp_path, override, expect):
    msg = error_of(capsys, [*BASE, "--workdir", str(tmp_path / "w"), override])
    assert msg.startswith(expect)


def test_invalid_value_names_its_origin(capsys, tmp_path):
    msg = error_of(capsys, [*BASE, "--workdir", str(tmp_path / "w"), "--config.model.n_heads=3"])
    assert "model.d_model=128 is not divisible by model.n_heads=3" in msg
    assert "model.n_heads is from --config.model.n_heads=3" in msg


def _snapshot(directory: Path) -> dict[str, tuple[int, int, str]]:
    """relative path -> (size, mtime_ns, sha256) of every file below ``directory``."""
    out = {}
    for p in sorted(directory.rglob("*")):
        if p.is_file():
            st, digest = p.stat(), hashlib.sha256(p.read_bytes()).hexdigest()
            out[str(p.relative_to(directory))] = (st.st_size, st.st_mtime_ns, digest)
    return out


@pytest.fixture(scope="module")
def trained(files) -> tuple[Path, list[str]]:
    """A finished 2-step run (checkpoints 1 and 2): (workdir, the command's arguments)."""
    workdir = files["dir"] / "run"
    args = [*BASE, *TINY, "--workdir", str(workdir), f"--config.data.path={files['corpus']}"]
    assert main(args) == 0
    return workdir, args


def test_resume_with_a_different_config_is_refused(capsys, trained):
    workdir, args = trained
    steps = sorted(p.name for p in (workdir / "checkpoints").iterdir())
    assert steps == ["1", "2"]
    before = _snapshot(workdir)

    msg = error_of(capsys, [*args, "--config.optimizer.lr=0.002"])
    assert msg.startswith(f"workdir {str(workdir)!r} holds a run with a different config")  # what, where
    assert "(optimizer.lr: 0.001 -> 0.002)" in msg  # exactly the one difference
    assert f"resume with the same config (saved in {workdir / 'config.json'}) or pick a new --workdir" in msg
    # Nothing in the workdir changed: same checkpoints, same files, same saved config.
    assert sorted(p.name for p in (workdir / "checkpoints").iterdir()) == steps
    assert _snapshot(workdir) == before

    # Several differences are all named (up to five), in key order.
    msg = error_of(capsys, [*args, "--config.optimizer.lr=0.002", "--config.train.seed=3"])
    assert "(optimizer.lr: 0.001 -> 0.002; train.seed: 0 -> 3)" in msg
    assert _snapshot(workdir) == before


def test_sample_bad_input(capsys, trained, tmp_path):
    workdir, _ = trained
    # The char tokenizer has no bos token, so an empty prompt leaves nothing to continue.
    msg = error_of(capsys, ["sample", "--workdir", str(workdir)])
    assert msg == f"--prompt is empty and the tokenizer of {str(workdir)!r} has no bos token to start from: " \
                  "pass --prompt TEXT"
    msg = error_of(capsys, ["sample", "--workdir", str(workdir), "--prompt", "ROMEO: \u20ac"])
    assert msg.startswith("char tokenizer: character '\u20ac' at position 7 is not in the ")
    assert "remove it or rebuild the tokenizer" in msg
    msg = error_of(capsys, ["sample", "--workdir", str(workdir), "--prompt", "ROMEO:", "--step", "5"])
    assert msg.startswith("no checkpoint for step 5 in ") and "(have: 1, 2)" in msg
    missing = tmp_path / "not-a-run"
    msg = error_of(capsys, ["sample", "--workdir", str(missing), "--prompt", "ROMEO:"])
    assert msg == f"no config.json in {str(missing)!r}: is this a workdir written by `lmstack train`?"


def test_unknown_plugin_name_is_one_line(capsys, tmp_path):
    code = main(["train", "quickstart:smoke=True", "--workdir", str(tmp_path / "w"),
                 "--config.objective.name=causal_llm", "--config.train.progress=false"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1
    assert "unknown objective 'causal_llm'" in err[0] and "did you mean causal_lm" in err[0]
