"""The lm-eval adapter: its plain request functions (no lm_eval needed), and the LM subclass
where lm_eval is installed."""

from types import SimpleNamespace

import pytest

from lmstack.evals.generation import generate_until
from lmstack.evals.lm_eval_adapter import generate_until_requests
from lmstack.evals.loglikelihood import continuation_logprobs, rolling_loglikelihood

PROMPTS = ["The king said", "The earl said", "The duke said"]


def test_generate_until_requests_groups_by_settings(model, tokenizer):
    args = [(PROMPTS[0], {"until": ["\n\n"], "max_gen_toks": 8}), (PROMPTS[1], {"until": "e", "do_sample": False}),
            (PROMPTS[2], {"until": ["\n\n"], "max_gen_toks": 8, "temperature": 0.0})]
    got = generate_until_requests(model, tokenizer, args, batch_size=2, max_gen_toks=8)
    same = generate_until(model, tokenizer, [PROMPTS[0], PROMPTS[2]], until=("\n\n",), max_new_tokens=8, batch_size=2)
    assert got == [same[0], generate_until(model, tokenizer, [PROMPTS[1]], until=("e",), max_new_tokens=8,
                                           batch_size=2)[0], same[1]]
    with pytest.raises(ValueError) as e:
        generate_until_requests(model, tokenizer, [(PROMPTS[0], {"do_sample": True})], batch_size=2)
    assert str(e.value) == ("generate_until request 0 asks for sampling ({'do_sample': True}): the lmstack adapter "
                            "decodes greedily only (do_sample=False, temperature=0)")


def test_lm_subclass(model, tokenizer):
    pytest.importorskip("lm_eval")
    from lm_eval.api.model import LM

    from lmstack.evals.lm_eval_adapter import LmstackLM

    lm = LmstackLM.from_model(model, tokenizer, batch_size=2, max_gen_toks=8)
    assert isinstance(lm, LM)
    req = lambda *args: SimpleNamespace(args=args)  # noqa: E731  (lm-eval's Instance carries .args)
    pairs = [("The king", " said"), ("", "hello")]
    assert lm.loglikelihood([req(*p) for p in pairs]) == continuation_logprobs(model, tokenizer, pairs, batch_size=2)
    assert lm.loglikelihood_rolling([req("some text")]) == rolling_loglikelihood(model, tokenizer, ["some text"],
                                                                                 batch_size=2)
    assert lm.generate_until([req(PROMPTS[0], {"until": ["\n\n"]})]) == generate_until(
        model, tokenizer, PROMPTS[:1], until=("\n\n",), max_new_tokens=8, batch_size=2)
