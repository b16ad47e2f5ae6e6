"""LoRA adapters in the PEFT library's layout, out and back in.

``adapter_config.json`` (``peft_type: LORA``, ``r``, ``lora_alpha``, ``lora_dropout``,
``target_modules`` as HF module names, ``use_rslora``) and ``adapter_model.safetensors`` with
keys ``base_model.model.<HF module>.lora_A.weight`` ``[r, in]`` and ``...lora_B.weight``
``[out, r]`` (PEFT ``LoraModel`` on a ``LlamaForCausalLM``; ``get_peft_model_state_dict``
drops the adapter name). Module names come from the HF tensor tables of
:mod:`lmstack.interop.hf` (llama / mistral / qwen2 decoders); lmstack's q/k rows are already
in HF's rotate-half order, so factors are only transposed.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
from flax import nnx

from lmstack.config import ConfigError
from lmstack.interop.hf import _layout
from lmstack.peft.lora import LoraSpec, projections

PREFIX = "base_model.model."


def _hf_modules(model_cfg: Any) -> dict[str, str]:
    """lmstack projection path -> HF module name template (``model.layers.{i}.self_attn.q_proj``)."""
    if getattr(model_cfg, "style", None) != "llama":
        raise ConfigError("PEFT adapters are written for llama-style decoders (llama, mistral, qwen2): "
                          f"this model is {type(model_cfg).__name__} style {getattr(model_cfg, 'style', '?')!r}")
    out = {}
    for t in _layout("llama"):
        if t.ours.endswith("/weight") and t.layout == "linear":
            out[t.ours[: -len("/weight")].replace("/", ".")] = t.hf[: -len(".weight")]
    return out


def export_peft(model: nnx.Module, model_cfg: Any, spec: LoraSpec, out_dir: str | Path, *,
                base_model: str = "") -> Path:
    """Write ``model``'s LoRA adapters (made with ``spec``, the run's ``config.peft``) as a PEFT
    adapter directory; returns it. Raises ConfigError for a model without adapters or a family
    PEFT's layout is not written for."""
    modules = _hf_modules(model_cfg)
    tensors: dict[str, np.ndarray] = {}
    targets = set()
    for path, proj in projections(model):
        if proj.lora_a is None:
            continue
        if path not in modules:
            raise ConfigError(f"the adapter on {path} has no module in the HF llama layout")
        a, b = np.asarray(proj.lora_a[...], np.float32), np.asarray(proj.lora_b[...], np.float32)
        r = a.shape[-1]
        k, n = math.prod(proj.in_shape), math.prod(proj.out_shape)
        for i in range(a.shape[0]):
            name = PREFIX + modules[path].format(i=i)
            tensors[name + ".lora_A.weight"] = np.ascontiguousarray(a[i].reshape(k, r).T)
            tensors[name + ".lora_B.weight"] = np.ascontiguousarray(b[i].reshape(r, n).T)
        targets.add(modules[path].rsplit(".", 1)[-1])
    if not tensors:
        raise ConfigError("the model holds no LoRA adapter: export a run trained with --config.peft.name=lora")
    config = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model,
        "r": spec.r, "lora_alpha": spec.alpha, "lora_dropout": spec.dropout,
        "target_modules": sorted(targets), "use_rslora": spec.use_rslora, "bias": "none", "fan_in_fan_out": False,
        "init_lora_weights": True, "modules_to_save": None, "inference_mode": True,
    }
    from safetensors.numpy import save_file

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "adapter_config.json").write_text(json.dumps(config, indent=2))
    save_file(tensors, str(out / "adapter_model.safetensors"))
    return out


def read_peft_config(adapter_dir: str | Path) -> dict[str, Any]:
    """``adapter_config.json`` of a PEFT LoRA adapter. Raises ConfigError for another type."""
    path = Path(adapter_dir) / "adapter_config.json"
    if not path.is_file():
        raise ConfigError(f"{adapter_dir}: no adapter_config.json: pass a directory written by PEFT's "
                          f"save_pretrained or `lmstack export --format peft`")
    config = json.loads(path.read_text())
    if config.get("peft_type") != "LORA":
        raise ConfigError(f"{path}: peft_type is {config.get('peft_type')!r}; lmstack reads LORA adapters")
    return config


def peft_section(adapter_dir: str | Path) -> dict[str, Any]:
    """The ``config.peft`` keys that rebuild an adapter's shape (r, alpha, targets, rsLoRA)."""
    c = read_peft_config(adapter_dir)
    names = {"q_proj": "q", "k_proj": "k", "v_proj": "v", "o_proj": "o", "gate_proj": "gate", "up_proj": "up",
             "down_proj": "down"}
    targets = c["target_modules"] if isinstance(c["target_modules"], list) else [c["target_modules"]]
    unknown = [t for t in targets if t not in names]
    if unknown:
        raise ConfigError(f"{adapter_dir}: target_modules {unknown} are not llama projections ({', '.join(names)})")
    return {"name": "lora", "r": int(c["r"]), "alpha": float(c["lora_alpha"]),
            "dropout": float(c.get("lora_dropout", 0.0)), "use_rslora": bool(c.get("use_rslora", False)),
            "target_modules": ",".join(sorted(names[t] for t in targets))}


def load_peft_adapter(model: nnx.Module, model_cfg: Any, adapter_dir: str | Path) -> int:
    """Set ``model``'s LoRA factors from a PEFT adapter directory (the model must carry LoRA
    on the same modules with the same rank, e.g. built with :func:`peft_section`); returns the
    number of tensors read. Raises ConfigError naming the tensor when the adapter's base does
    not match (a module or shape the model lacks, or a model adapter the file lacks)."""
    from safetensors.numpy import load_file

    modules = _hf_modules(model_cfg)
    file = Path(adapter_dir) / "adapter_model.safetensors"
    if not file.is_file():
        raise ConfigError(f"{adapter_dir}: no adapter_model.safetensors: pass a directory written by PEFT's "
                          f"save_pretrained or `lmstack export --format peft`")
    tensors = load_file(str(file))
    used = 0
    for path, proj in projections(model):
        if proj.lora_a is None:
            continue
        a, b = np.array(proj.lora_a[...]), np.array(proj.lora_b[...])
        r = a.shape[-1]
        k, n = math.prod(proj.in_shape), math.prod(proj.out_shape)
        for i in range(a.shape[0]):
            name = PREFIX + modules[path].format(i=i)
            for part, want, dst in (("lora_A", (r, k), a), ("lora_B", (n, r), b)):
                key = f"{name}.{part}.weight"
                if key not in tensors:
                    raise ConfigError(f"{adapter_dir}: {key} is missing: the adapter was not trained on this "
                                      f"model's {path} (check target_modules and the number of layers)")
                got = tensors.pop(key)
                if tuple(got.shape) != want:
                    raise ConfigError(f"{adapter_dir}: {key} has shape {list(got.shape)} but the model needs "
                                      f"{list(want)}: the adapter's base model or rank does not match")
                dst[i] = got.T.reshape(dst[i].shape)
                used += 1
        proj.lora_a[...], proj.lora_b[...] = a, b
    if tensors:
        raise ConfigError(f"{adapter_dir}: {len(tensors)} tensors fit no adapter of the model, e.g. "
                          f"{sorted(tensors)[0]}: the adapter's target_modules or layers do not match")
    return used
