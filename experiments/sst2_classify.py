"""SST-2 sentiment classification: a Llama-style decoder with a classification head (HF
LlamaForSequenceClassification's ``score`` on the last token), trained on SST-2.

Launch:  lmstack train sst2_classify --workdir runs/sst2
         from a pre-trained run (its tokenizer and trunk, a fresh head; same architecture as causal_lm):
           lmstack train causal_lm --workdir runs/causal_lm
           lmstack train sst2_classify --workdir runs/sst2_ft --config.init.from=runs/causal_lm
         linear probing (the head only): add --config.train.trainable='score.*'
Data:    ../shared/data/sst2: train.tsv (67,349 sentences), dev.tsv (872; the held-out split),
         ``label<TAB>sentence`` with a header row (the text is column 1: the headers differ),
         labels 0 (negative) and 1 (positive).
Config:  the causal_lm architecture (4 layers, d=128, SentencePiece 4096 trained on SST-2 train
         when from scratch), 64 tokens a sentence, batch 32, 1,000 steps (about half an epoch).
Expect:  from scratch, dev accuracy 0.583 at step 250, 0.742 (macro-F1 0.741) at step 500 and 0.771
         at step 750 of the 1,000 (measured on a heavily shared 2-core CPU, ~2 s a step; step 1,000
         not measured); a majority-class guess gets 0.51.
"""

from configs.pretrain import stdlib_pretraining, stdlib_smoke


def get_config(arg: str | None = None):
    c, args = stdlib_pretraining(arg)
    c.model.name = "decoder"
    c.model.style = "llama"
    c.model.num_labels = 2
    c.data.source = "classification"
    c.data.path = "../shared/data/sst2/train.tsv"
    c.data.val_path = "../shared/data/sst2/dev.tsv"
    c.data.field = "1"  # the text column (train.tsv calls it sentence, dev.tsv content)
    c.data.label_field = "label"
    c.data.seq_len = 64
    c.objective.name = "classify"
    c.objective.labels = "0,1"
    c.train.batch_size = 32
    c.train.steps = 1000
    c.optimizer.lr = 1e-3
    c.optimizer.warmup_steps = 50
    c.checkpoint.every = 500
    c.eval.every = 250
    c.eval.batches = 0  # the whole dev set
    c.eval.names = ("perplexity", "classification")
    if args["smoke"]:
        stdlib_smoke(c)
        c.data.max_records = 400
    return c
