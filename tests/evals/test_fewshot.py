"""Few-shot prompts against a literal transcription of lm-eval's ContextSampler."""

from lmstack.evals.fewshot import fewshot_contexts
from tests.evals.reference import lm_eval_contexts

DOCS = [{"q": f"{i}+{i}", "a": str(2 * i)} for i in range(12)]


def text(d):
    return f"Q: {d['q']}\nA:"


def target(d):
    return d["a"]


def test_prompts_match_lm_eval_sampling():
    got = fewshot_contexts(DOCS, text, target, num_fewshot=3, fewshot_seed=1234, pool=DOCS, same_split=True)
    assert got == lm_eval_contexts(DOCS, text, target, pool=DOCS, n=3, seed=1234, same_split=True)
    assert all(p.count("\n\n") == 3 and p.endswith(text(d)) for p, d in zip(got, DOCS))
    for p, d in zip(got, DOCS):  # never the document itself as a shot
        assert p.count(f"Q: {d['q']}\n") == 1
    pool = [{"q": f"train {i}", "a": str(i)} for i in range(5)]
    other = fewshot_contexts(DOCS[:4], text, target, num_fewshot=2, fewshot_seed=7, pool=pool, same_split=False,
                             description="Arithmetic.\n\n")
    assert other == lm_eval_contexts(DOCS[:4], text, target, pool=pool, n=2, seed=7, same_split=False,
                                     description="Arithmetic.\n\n")


def test_layout_with_every_other_document_as_shot():
    docs = DOCS[:3]
    got = fewshot_contexts(docs, text, target, num_fewshot=2, fewshot_seed=0, pool=docs, same_split=True,
                           target_delimiter="=", fewshot_delimiter="\n###\n")
    first = got[0]
    assert first in ("Q: 1+1\nA:=2\n###\nQ: 2+2\nA:=4\n###\nQ: 0+0\nA:",
                     "Q: 2+2\nA:=4\n###\nQ: 1+1\nA:=2\n###\nQ: 0+0\nA:")
    assert fewshot_contexts(docs, text, target, num_fewshot=0, fewshot_seed=0, pool=docs,
                            same_split=True) == [text(d) for d in docs]
