"""Tests for lmstack.config: finding experiments, overrides, validation, save/load, resume checks."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lmstack.config import (
    ConfigError,
    check_resume,
    experiment_dirs,
    flat_items,
    list_experiments,
    load_config,
    load_saved_config,
    parse_arg,
    save_config,
    validate,
)
from lmstack import registry
from lmstack.config import compose
from lmstack.configs.base import base_config

TINY = '''"""A tiny experiment
for tests.

Longer text that the listing does not show.
"""
from lmstack.config import parse_arg
from lmstack.configs.base import base_config


def get_config(arg=None):
    a = parse_arg(arg, allowed={"size": "small", "smoke": False, "steps": 10})
    c = base_config()
    c.model.d_model = {"small": 64, "big": 128}[a["size"]]
    c.train.steps = 2 if a["smoke"] else a["steps"]
    c.eval.names = ("perplexity", "fake")
    c.eval.fake = {"tup": (1, 2)}  # an evaluator's section (its other key, maybe, keeps its default)
    return c
'''


@registry.register("eval.fake", config_defaults={"tup": (1, 2), "maybe": None})
def _fake_evaluator(ctx):
    """An evaluator with a tuple and a None setting, for the tests of its config section."""
    yield "fake", 0.0


@pytest.fixture
def exp_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Two experiment dirs on $LMSTACK_EXPERIMENTS; the current directory is an empty tmp dir."""
    first, second = tmp_path / "first", tmp_path / "second"
    first.mkdir()
    second.mkdir()
    (first / "tiny.py").write_text(TINY)
    (first / "_helper.py").write_text('"""Not an experiment."""\n')
    (first / "bad_keys.py").write_text(
        "from lmstack.configs.base import base_config\n\n"
        "def get_config(arg=None):\n    c = base_config()\n    c.model.dmodel = 3\n    return c\n")
    (first / "bad_value.py").write_text(
        '"""Sets an invalid value in the file."""\nfrom lmstack.configs.base import base_config\n\n'
        "def get_config(arg=None):\n    c = base_config()\n    c.train.microbatches = 3\n    return c\n")
    (second / "tiny.py").write_text('"""Shadowed by first/tiny.py."""\n')
    (second / "other.py").write_text(
        '"""Another experiment."""\nfrom lmstack.configs.base import base_config\n\n'
        "def get_config(arg=None):\n    c = base_config()\n"
        "    c.eval.names = ('fake',)\n    c.eval.fake = {'tup': (3,)}\n    return c\n")
    (second / "broken.py").write_text("def get_config(:\n")
    monkeypatch.setenv("LMSTACK_EXPERIMENTS", f"{first}:{second}:{tmp_path / 'missing'}")
    work = tmp_path / "cwd"
    work.mkdir()
    monkeypatch.chdir(work)
    return first


def _error(fn, *args) -> str:
    with pytest.raises(ConfigError) as e:
        fn(*args)
    msg = str(e.value)
    assert "\n" not in msg
    return msg


# --- experiments ----------------------------------------------------------------------


def test_experiment_dirs_order_and_existing_only(exp_dir: Path) -> None:
    dirs = experiment_dirs()
    assert dirs[:2] == [exp_dir.resolve(), (exp_dir.parent / "second").resolve()]
    assert all(d.is_dir() for d in dirs) and len(set(dirs)) == len(dirs)


def test_list_experiments_descriptions_first_dir_wins(exp_dir: Path) -> None:
    listed = dict(list_experiments())
    assert listed["tiny"] == "A tiny experiment for tests."
    assert listed["other"] == "Another experiment."
    assert listed["bad_keys"] == ""
    assert listed["broken"].startswith("(cannot parse: ") and "line 1" in listed["broken"]
    assert "_helper" not in listed
    assert [n for n, _ in list_experiments()] == sorted(listed)


def test_load_by_name_and_arg(exp_dir: Path) -> None:
    cfg = load_config("tiny")
    assert (cfg.name, cfg.arg, cfg.model.d_model, cfg.train.steps) == ("tiny", "", 64, 10)
    cfg = load_config("tiny:size=big,smoke=True")
    assert (cfg.arg, cfg.model.d_model, cfg.train.steps) == ("size=big,smoke=True", 128, 2)
    with pytest.raises(AttributeError):
        cfg.model.dmodel = 3  # locked


def test_unknown_experiment(exp_dir: Path) -> None:
    msg = _error(load_config, "tinny")
    assert msg == "unknown experiment 'tinny': did you mean tiny? (`lmstack list` shows all)"
    assert "none in" in _error(load_config, "zzzzzzzz")


def test_unknown_variant_key_names_allowed(exp_dir: Path) -> None:
    msg = _error(load_config, "tiny:sz=big")
    assert "tiny.py" in msg and "'sz'" in msg and "size, smoke, steps" in msg


def test_experiment_adding_a_key_is_an_error(exp_dir: Path) -> None:
    msg = _error(load_config, "bad_keys")
    assert msg.startswith(f"{exp_dir / 'bad_keys.py'} sets model.dmodel, which model.decoder does not have: "
                          f"its keys are activation, attention_impl, classifier_pooling, d_ff, d_model, ")


def test_evaluator_sections_come_from_eval_names(exp_dir: Path) -> None:
    cfg = load_config("other")
    assert cfg.eval.fake.tup == (3,) and cfg.eval.fake.maybe is None and "perplexity" not in cfg.eval
    assert load_config("other", ["--config.eval.fake.maybe=5"]).eval.fake.maybe == 5  # a key like any other
    msg = _error(load_config, "other", ["--config.eval.fake.nope=1"])
    assert msg == ("unknown config key 'eval.fake.nope' (from --config.eval.fake.nope=1): eval.fake has no key "
                   "'nope'; its keys: maybe, tup")


def test_plugin_sections_follow_the_chosen_names(exp_dir: Path) -> None:
    cfg = load_config("tiny", ["--config.model.name=encoder", "--config.model.norm_position=post",
                               "--config.objective.name=mlm", "--config.objective.select_rate=0.2"])
    assert (cfg.model.name, cfg.model.norm_position, cfg.model.d_model) == ("encoder", "post", 64)
    assert (cfg.objective.select_rate, cfg.objective.mask_rate) == (0.2, 0.8)
    assert "pooling" not in load_config("tiny").model  # the decoder's section has no encoder keys
    msg = _error(load_config, "tiny", ["--config.model.pooling=cls"])
    assert msg.startswith("unknown config key 'model.pooling' (from --config.model.pooling=cls): model.decoder has "
                          "no key 'pooling'; its keys: activation, attention_impl, classifier_pooling, d_ff, d_model, ")


def test_bad_plugin_options_fail_at_load(exp_dir: Path) -> None:
    msg = _error(load_config, "tiny", ["--config.model.name=encoder", "--config.model.norm=batchnorm"])
    assert msg == ("invalid config 'tiny': model.norm is 'batchnorm': must be one of '', rmsnorm, layernorm "
                   "(from --config.model.norm=batchnorm)")
    msg = _error(load_config, "tiny", ["--config.model.name=encoder_decoder", "--config.model.style=bert"])
    assert "model.style is 'bert': must be one of llama, gpt2" in msg
    msg = _error(load_config, "tiny", ["--config.eval.names=('fake', 'retrieval')"])
    assert "eval.names has retrieval, which embeds the held-out query/document pairs of objective.contrastive" in msg
    from lmstack.registry import UnknownNameError

    with pytest.raises(UnknownNameError, match="model.name: unknown model 'decodr': did you mean decoder"):
        load_config("tiny", ["--config.model.name=decodr"])


def test_parse_arg() -> None:
    assert parse_arg(None) == {}
    assert parse_arg("smoke=True,size=small,lr=3e-4,n=2,flag") == {
        "smoke": True, "size": "small", "lr": 3e-4, "n": 2, "flag": True}
    allowed = {"smoke": False, "size": "small", "n": 1}
    assert parse_arg("size=1,smoke", allowed) == {"smoke": True, "size": "1", "n": 1}
    assert "allowed keys are n, size, smoke" in _error(parse_arg, "sise=big", allowed)
    assert "expects int" in _error(parse_arg, "n=two", allowed)
    assert "needs a value" in _error(parse_arg, "size", allowed)


# --- overrides ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "override, key, value",
    [
        ("--config.train.progress=False", "train.progress", False),
        ("--config.log.jsonl=no", "log.jsonl", False),
        ("config.model.use_bias=YES", "model.use_bias", True),
        ("--config.train.steps=20", "train.steps", 20),
        ("--config.train.steps=1e3", "train.steps", 1000),
        ("--config.train.steps=1_000", "train.steps", 1000),
        ("--config.optimizer.lr=3e-4", "optimizer.lr", 3e-4),
        ("--config.optimizer.lr=1", "optimizer.lr", 1.0),
        ("--config.data.path=a/b=c.txt", "data.path", "a/b=c.txt"),
        ("--config.init.from=runs/pretrain", "init.from", "runs/pretrain"),
        ("--config.eval.fake.tup=(3, 4, 5)", "eval.fake.tup", (3, 4, 5)),
        ("--config.eval.fake.tup=[6]", "eval.fake.tup", (6,)),
        ("--config.eval.fake.maybe=[1, 2]", "eval.fake.maybe", [1, 2]),
        ("--config.eval.fake.maybe=some text", "eval.fake.maybe", "some text"),
    ],
)
def test_override_types(exp_dir: Path, override: str, key: str, value: object) -> None:
    got = flat_items(load_config("tiny", [override]))[key]
    assert got == value and type(got) is type(value)


def test_override_two_token_form(exp_dir: Path) -> None:
    cfg = load_config("tiny", ["--config.train.steps", "7", "--config.data.path", "config.txt"])
    assert (cfg.train.steps, cfg.data.path) == (7, "config.txt")


def test_unknown_key_names_closest(exp_dir: Path) -> None:
    msg = _error(load_config, "tiny", ["--config.optimizer.lrr=3e-4"])
    assert msg.startswith(
        "unknown config key 'optimizer.lrr' (from --config.optimizer.lrr=3e-4): closest valid keys:")
    assert "optimizer.lr" in msg
    assert "model.d_model" in _error(load_config, "tiny", ["--config.modl.d_model=3"])


@pytest.mark.parametrize(
    "override, expected",
    [
        ("--config.train.steps=ten",
         "config key 'train.steps' expects int, got 'ten' (from --config.train.steps=ten)"),
        ("--config.train.steps=1.5", "expects int, got '1.5'"),
        ("--config.optimizer.lr=fast", "expects float, got 'fast'"),
        ("--config.train.progress=maybe", "expects bool"),
        ("--config.eval.fake.tup=3", "expects tuple"),
    ],
)
def test_override_wrong_type(exp_dir: Path, override: str, expected: str) -> None:
    assert expected in _error(load_config, "tiny", [override])


def test_override_malformed_or_section(exp_dir: Path) -> None:
    msg = _error(load_config, "tiny", ["--config.model=3"])
    assert "'model' is a section" in msg and "--config.model." in msg
    assert "--config.KEY=VALUE" in _error(load_config, "tiny", ["train.steps=3"])
    assert "has no value" in _error(load_config, "tiny", ["--config.train.steps"])


# --- validation -----------------------------------------------------------------------


@pytest.mark.parametrize(
    "overrides, expected",
    [
        (["model.style=lama"], "model.style is 'lama': must be one of llama, gpt2"),
        (["model.dtype=fp16"], "model.dtype is 'fp16': must be one of float32, bfloat16"),
        (["model.remat=some"], "model.remat is 'some'"),
        (["optimizer.schedule=cos"], "optimizer.schedule is 'cos': must be one of cosine, linear, constant"),
        (["data.tokenizer.kind=bpe"], "data.tokenizer.kind is 'bpe'"),
        (["train.steps=0"], "train.steps is 0: must be a positive int"),
        (["model.n_layers=-2"], "model.n_layers is -2: must be a positive int"),
        (["train.batch_size=30", "train.microbatches=4"],
         "train.batch_size=30 is not divisible by train.microbatches=4: "
         "set train.batch_size=32 or train.microbatches=3"),
        (["model.n_kv_heads=3"], "model.n_heads=4 is not divisible by model.n_kv_heads=3"),
        (["model.d_model=66"], "model.d_model=66 is not divisible by model.n_heads=4"),
        (["data.val_fraction=1.0"], "data.val_fraction is 1.0: must be in [0, 1)"),
        (["data.val_fraction=-0.1"], "data.val_fraction is -0.1"),
        (["optimizer.muon_beta=1.0"], "optimizer.muon_beta is 1.0: must be in [0, 1)"),
        (["optimizer.b2=1"], "optimizer.b2 is 1.0: must be in [0, 1)"),
        (["mesh.fsdp=0"], "mesh.fsdp is 0: must be an int >= 1, or -1"),
        (["mesh.fsdp=-1"], "mesh.data, mesh.fsdp are each -1: at most one mesh axis"),
    ],
)
def test_validate_messages(exp_dir: Path, overrides: list[str], expected: str) -> None:
    msg = _error(load_config, "tiny", [f"--config.{o}" for o in overrides])
    assert expected in msg
    assert f"from --config.{overrides[-1]}" in msg  # says where the bad value came from


def test_validate_names_the_experiment_file(exp_dir: Path) -> None:
    msg = _error(load_config, "bad_value")
    assert "train.microbatches=3" in msg and "set in" in msg and "bad_value.py" in msg


def test_validate_reports_every_problem_and_passes_base() -> None:
    cfg = compose(base_config())
    validate(cfg)
    cfg.model.style, cfg.train.steps = "x", 0
    msg = _error(validate, cfg)
    assert "model.style" in msg and "train.steps" in msg


# --- save, load, resume ---------------------------------------------------------------


def test_save_load_round_trip(exp_dir: Path, tmp_path: Path) -> None:
    cfg = load_config("other:x", ["--config.optimizer.lr=3e-4", "--config.mesh.data=2"])
    path = save_config(cfg, tmp_path / "runs" / "x")
    assert path == tmp_path / "runs" / "x" / "config.json"
    assert list(json.loads(path.read_text())) == sorted(json.loads(path.read_text()))
    assert [p.name for p in path.parent.iterdir()] == ["config.json"]  # no temp file left behind
    back = load_saved_config(path.parent)
    assert flat_items(back) == flat_items(cfg)
    assert back.eval.fake.tup == (3,)
    with pytest.raises(AttributeError):
        back.model.dmodel = 1  # locked


def test_load_saved_restores_types(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(json.dumps({"optimizer": {"lr": 1}, "train": {"steps": 5}}))
    cfg = load_saved_config(tmp_path)
    assert type(cfg.optimizer.lr) is float and cfg.train.steps == 5 and cfg.model.d_model == 256


def test_load_saved_missing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    msg = _error(load_saved_config, "runs/x")
    assert msg == "no config.json in 'runs/x': is this a workdir written by `lmstack train`?"


def test_check_resume(exp_dir: Path, tmp_path: Path) -> None:
    workdir = tmp_path / "run"
    cfg = load_config("tiny")
    check_resume(cfg, workdir)  # nothing saved yet
    save_config(cfg, workdir)
    check_resume(load_config("tiny"), workdir)
    safe = ["train.log_every=1", "sample.top_k=5", "log.tensorboard=false", "checkpoint.keep=9"]
    check_resume(load_config("tiny:size=small", [f"--config.{o}" for o in safe]), workdir)
    changed = load_config("tiny", ["--config.model.d_model=128", "--config.optimizer.lr=3e-4"])
    msg = _error(check_resume, changed, workdir)
    assert "model.d_model: 64 -> 128; optimizer.lr: 0.001 -> 0.0003" in msg
    assert msg.startswith(f"workdir '{workdir}' holds a run with a different config (")
    assert f"saved in {workdir / 'config.json'}" in msg and "--workdir" in msg


def test_check_resume_truncates_long_diffs(exp_dir: Path, tmp_path: Path) -> None:
    save_config(load_config("tiny"), tmp_path)
    keys = ["model.n_layers=5", "train.steps=11", "data.seq_len=64", "optimizer.b1=0.8",
            "optimizer.b2=0.9", "train.seed=1", "data.seed=2"]
    msg = _error(check_resume, load_config("tiny", [f"--config.{k}" for k in keys]), tmp_path)
    assert msg.count(" -> ") == 5 and "... and 2 more" in msg


def test_an_evaluator_without_its_data_fails_at_load(exp_dir: Path, tmp_path: Path) -> None:
    msg = _error(load_config, "tiny", ["--config.eval.names=('fake', 'linear_probe')",
                                       f"--config.eval.linear_probe.path={tmp_path}"])
    assert msg == (f"invalid config 'tiny': eval.linear_probe.path={str(tmp_path)!r} has no train.tsv or dev.tsv: "
                   f"point --config.eval.linear_probe.path at a folder with train.tsv and dev.tsv (label<TAB>sentence)")


def test_a_key_of_an_evaluator_not_selected_says_how_to_select_it(exp_dir: Path) -> None:
    msg = _error(load_config, "tiny", ["--config.eval.linear_probe.path=/tmp/x"])
    assert msg == ("config key 'eval.linear_probe.path' (from --config.eval.linear_probe.path=/tmp/x) belongs to "
                   "evaluator linear_probe, which is not in eval.names ('perplexity', 'fake'): add it, e.g. "
                   "--config.eval.names=\"('perplexity', 'fake', 'linear_probe')\"")
