"""An lm-evaluation-harness model over an lmstack workdir, for lm-eval's own task suite.

``lm_eval`` is optional and imported only when the class is first used::

    from lmstack.evals.lm_eval_adapter import LmstackLM      # imports lm_eval here
    import lm_eval
    lm_eval.simple_evaluate(model=LmstackLM(workdir="runs/x"), tasks=["hellaswag"])

or, once ``LmstackLM`` has been imported (which registers it with lm-eval as ``lmstack``),
``--model lmstack --model_args workdir=runs/x,step=1000`` through lm-eval's Python entry points. The scoring lives in plain functions that take the
requests' ``args`` and need no lm-eval: :func:`lmstack.evals.loglikelihood.continuation_logprobs`
(``loglikelihood``), :func:`lmstack.evals.loglikelihood.rolling_loglikelihood`
(``loglikelihood_rolling``) and :func:`generate_until_requests` (``generate_until``).
"""

from __future__ import annotations

import functools
from typing import Any, Sequence

from flax import nnx

from lmstack.data.tokenizers import Tokenizer
from lmstack.evals.generation import generate_until
from lmstack.evals.loglikelihood import continuation_logprobs, rolling_loglikelihood


def generate_until_requests(model: nnx.Module, tokenizer: Tokenizer, args: Sequence[tuple[str, dict]], *,
                            batch_size: int, max_length: int = 0, max_gen_toks: int = 256) -> list[str]:
    """lm-eval ``generate_until`` on ``(context, gen_kwargs)`` pairs, in order: ``until`` (a
    string or list; eos always stops too), ``max_gen_toks`` (default ``max_gen_toks``);
    requests sharing both are generated together. Greedy only: raises ValueError for
    ``do_sample=True`` or a temperature above 0."""
    groups: dict[tuple[tuple[str, ...], int], list[int]] = {}
    for i, (_, kwargs) in enumerate(args):
        kwargs = dict(kwargs)
        if kwargs.get("do_sample") or float(kwargs.get("temperature", 0.0) or 0.0) > 0:
            raise ValueError(f"generate_until request {i} asks for sampling ({kwargs}): the lmstack adapter decodes "
                             f"greedily only (do_sample=False, temperature=0)")
        until = kwargs.get("until") or ()
        until = (until,) if isinstance(until, str) else tuple(until)
        groups.setdefault((until, int(kwargs.get("max_gen_toks", max_gen_toks))), []).append(i)
    out = [""] * len(args)
    for (until, n_new), members in groups.items():
        texts = generate_until(model, tokenizer, [args[i][0] for i in members], until=until, max_new_tokens=n_new,
                               batch_size=batch_size, max_length=max_length)
        for i, text in zip(members, texts):
            out[i] = text
    return out


@functools.cache
def _lm_class() -> type:
    from lm_eval.api.model import LM
    from lm_eval.api.registry import register_model

    @register_model("lmstack")
    class LmstackLM(LM):
        """lm-eval's ``LM`` over the checkpoint at ``step`` (default: latest) of an lmstack
        ``workdir``, on one device; or over a model in memory (:meth:`from_model`)."""

        def __init__(self, workdir: str | None = None, step: int | str | None = None, batch_size: int | str = 16,
                     max_length: int | str = 0, max_gen_toks: int | str = 256):
            super().__init__()
            self.batch_size, self.max_length, self.max_gen_toks = int(batch_size), int(max_length), int(max_gen_toks)
            if workdir is not None:
                from lmstack.sample import open_for_generation

                run, self.model = open_for_generation(workdir, None if step in (None, "") else int(step))
                self.tokenizer = run.spec.tokenizer

        @classmethod
        def from_model(cls, model: nnx.Module, tokenizer: Tokenizer, **settings: Any) -> "LmstackLM":
            lm = cls(**settings)
            lm.model, lm.tokenizer = model, tokenizer
            return lm

        def loglikelihood(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
            return continuation_logprobs(self.model, self.tokenizer, [tuple(r.args) for r in requests],
                                         batch_size=self.batch_size, max_length=self.max_length)

        def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
            return rolling_loglikelihood(self.model, self.tokenizer, [r.args[0] for r in requests],
                                         batch_size=self.batch_size, max_length=self.max_length)

        def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
            return generate_until_requests(self.model, self.tokenizer, [tuple(r.args) for r in requests],
                                           batch_size=self.batch_size, max_length=self.max_length,
                                           max_gen_toks=self.max_gen_toks)

    return LmstackLM


def __getattr__(name: str) -> Any:
    if name == "LmstackLM":  # built on first use, so importing this module needs no lm_eval
        return _lm_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
