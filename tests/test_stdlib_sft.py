"""experiments/stdlib_sft.py composes for every base and method (full and smoke), and
tools/sft_methods_table.py asks for the variant of each of its rows."""

import pytest

from lmstack.config import ConfigError, load_config
from tools.sft_methods_table import ROWS, experiment

METHODS = ("full", "lora", "qlora", "prompt_tuning", "adapter")


@pytest.mark.parametrize("base", ["smollm2", "quickstart"])
@pytest.mark.parametrize("method", METHODS)
def test_every_base_and_method_composes(base, method):
    full = load_config(f"stdlib_sft:base={base},method={method}")
    assert full.peft.name == ("none" if method == "full" else method)
    assert full.objective.name == "sft" and full.data.source == "prompt_completion"
    assert full.data.path.endswith("train.jsonl") and full.data.val_path.endswith("test.jsonl")
    if base == "smollm2":
        assert full.init["from"].endswith("SmolLM2-135M-Instruct.Q4_1.gguf") and full.objective.chat_template == ""
    else:
        assert full.init["from"] == "runs/quickstart" and full.objective.chat_template == "chatml"
    smoke = load_config(f"stdlib_sft:base={base},method={method},smoke=True")
    assert smoke.init["from"] == "" and smoke.data.tokenizer.kind == "byte" and smoke.peft.name == full.peft.name
    assert smoke.train.steps < full.train.steps and smoke.data.val_path == full.data.val_path


def test_learning_rates_follow_the_method_and_the_parent_is_a_variant():
    lr = {m: load_config(f"stdlib_sft:method={m}").optimizer.lr for m in METHODS}
    assert lr["full"] < lr["lora"] == lr["qlora"] == lr["adapter"] < lr["prompt_tuning"]
    assert load_config("stdlib_sft:base=quickstart,parent=runs/qs@400").init["from"] == "runs/qs@400"


def test_unknown_variants_are_one_line():
    with pytest.raises(ConfigError) as e:
        load_config("stdlib_sft:method=ia3")
    assert str(e.value) == ("experiments/stdlib_sft.py: variant method='ia3' is unknown: choose one of full, lora, "
                            "qlora, prompt_tuning, adapter")
    with pytest.raises(ConfigError) as e:
        load_config("stdlib_sft:base=gpt2")
    assert str(e.value) == "experiments/stdlib_sft.py: variant base='gpt2' is unknown: choose one of smollm2, quickstart"


def test_the_table_rows_are_experiment_variants():
    assert ROWS == ("base", *METHODS)
    for row in ROWS:
        cfg = load_config(experiment("quickstart", row, "runs/qs", smoke=True))
        assert cfg.peft.name == ("none" if row in ("base", "full") else row) and cfg.train.steps == 4
