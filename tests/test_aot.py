"""Ahead-of-time compilation for TPU topologies (lmstack.aot, `lmstack compile`)."""

from __future__ import annotations

import pytest

from lmstack.aot import GIB, compile_for_topology, parse_topology
from lmstack.cli import main
from lmstack.config import ConfigError, load_config


@pytest.mark.parametrize("name, topology_name, chips, hbm_gib", [
    ("v5p-128", "v5p:4x4x4", 64, 95),  # v5p-N counts TensorCores, two per chip
    ("v4-32", "v4:2x2x4", 16, 32),
    ("v5e-256", "v5e:16x16", 256, 16),  # v5e-N counts chips
    ("v5e-8", "v5e:2x4", 8, 16),
    ("v6e-4", "v6e:2x2", 4, 32),
    ("v5e:2x2", "v5e:2x2", 4, 16),
    ("v5p:2x2x1", "v5p:2x2x1", 4, 95),
])
def test_topology_names(name, topology_name, chips, hbm_gib):
    t = parse_topology(name)
    assert (t.topology_name, t.chips, t.hbm_bytes) == (topology_name, chips, hbm_gib * GIB)


KNOWN = ("v5e-1, v5e-4, v5e-8, v5e-16, v5e-32, v5e-64, v5e-128, v5e-256, v6e-1, v6e-4, v6e-8, v6e-16, v6e-32, "
         "v6e-64, v6e-128, v6e-256, v4-8, v4-16, v4-32, v4-64, v4-128, v4-256, v4-512, v4-1024, v4-2048, v4-4096, "
         "v5p-8, v5p-16, v5p-32, v5p-64, v5p-128, v5p-256, v5p-512, v5p-1024, v5p-2048, v5p-4096")


@pytest.mark.parametrize("name", ["v5x-8", "v5p-100", "v5e:2x2x2", "tpu"])
def test_unknown_topology_is_a_one_line_error_listing_the_known_ones(name):
    with pytest.raises(ConfigError) as e:
        parse_topology(name)
    assert str(e.value) == (f"unknown TPU topology {name!r}: use a TPU type ({KNOWN}) or GENERATION:AxB[xC] with "
                            f"GENERATION one of v4, v5p, v5e, v6e (e.g. v5e:2x2)")


def test_cli_unknown_topology(capsys):
    assert main(["compile", "causal_lm:smoke=True", "--topology", "v9-8"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("lmstack: error: unknown TPU topology 'v9-8': use a TPU type (v5e-1,") and err.count("\n") == 1


def test_compile_the_real_train_step_for_a_v5e_slice():
    pytest.importorskip("libtpu", reason="libtpu (the TPU compiler) is not installed: pip install -e '.[tpu-aot]'")
    cfg = load_config("causal_lm:smoke=True")
    report = compile_for_topology(cfg, "v5e:2x2")
    assert report.topology.chips == 4 and report.mesh == {"data": 4, "fsdp": 1, "tensor": 1}
    assert report.tokens_per_step == cfg.train.batch_size * cfg.data.seq_len
    # Data parallel: every chip holds all float32 parameters and both AdamW moments of each
    # (plus the step counts), and the step needs at least those, twice over with the updates.
    assert report.params_bytes == 4 * report.n_params
    assert 2 * report.params_bytes <= report.opt_state_bytes <= 2 * report.params_bytes + 64
    assert report.batch_bytes == 3 * 4 * (cfg.train.batch_size // 4) * (cfg.data.seq_len + 1)
    assert report.temp_bytes > 0 and report.code_bytes > 0
    assert report.peak_bytes >= report.params_bytes + report.opt_state_bytes and report.fits
    # The compiled step counts 6N + attention (the analytic figure) plus the loss, norms,
    # softmax and the AdamW update, which add ~11% at this tiny size (d=32, vocab 384).
    assert 1.0 < report.flops / report.model_flops < 1.3
