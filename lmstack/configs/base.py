"""The base config: every trunk key an experiment may set, with its default.

Experiments start from :func:`base_config` and change values. The ``model``,
``objective``, ``peft`` and ``regularization`` sections hold only the plug-in's ``name`` here, and ``eval`` only the trunk's
keys: the loader composes each from the chosen plug-in's own defaults
(:func:`lmstack.config.compose`), so a key the chosen plug-in lacks is an error naming it.
"""

from __future__ import annotations

import ml_collections as mlc


def base_config() -> mlc.ConfigDict:
    c = mlc.ConfigDict()
    c.name = ""  # experiment name, filled in by the loader
    c.arg = ""  # the experiment's variant string, filled in by the loader

    # Plug-in sections: each holds its plug-in's name here; the loader adds the chosen model
    # family's, objective's and evaluators' own keys with their defaults (lmstack.config.compose).
    c.model = mlc.ConfigDict(dict(name="decoder"))  # registry: model.<name>
    c.data = mlc.ConfigDict(
        dict(
            # stdlib | text | jsonl, or a data format: alpaca | sharegpt | prompt_completion | classification
            # | preference | kto
            source="stdlib",
            path="",  # file, directory or glob for text/jsonl sources and data formats
            field="text",  # JSONL field holding the text (classification: the text column)
            label_field="label",  # classification: the label column
            prompt_field="prompt",  # prompt_completion: the prompt and completion fields
            completion_field="completion",
            query_field="query",  # pairs_jsonl: the query, the document and (optional) group fields
            doc_field="document",
            group_field="",
            max_chars=0,  # 0: no limit; otherwise cut the corpus to this many characters
            max_records=0,  # data formats: 0 all records; otherwise the first N of data.path (data efficiency)
            val_path="",  # data formats: held-out records from this file; "": data.val_fraction of data.path's
            placeholders="",  # data formats: a JSON object of strings filling {{key}} in the records' texts
            seq_len=128,
            val_fraction=0.1,  # the last fraction of the token stream is held out
            seed=0,
            tokenizer=mlc.ConfigDict(
                dict(
                    kind="sentencepiece",  # sentencepiece | byte | char
                    path="",  # a trained SentencePiece model; empty: train one and cache it
                    vocab_size=4096,
                    model_type="bpe",  # SentencePiece model type when training: bpe | unigram
                    max_train_chars=4_000_000,
                )
            ),
        )
    )
    c.objective = mlc.ConfigDict(dict(name="causal_lm"))  # registry: objective.<name>
    c.optimizer = mlc.ConfigDict(
        dict(
            name="adamw",  # adamw | muon (Muon on the hidden matrices, AdamW elsewhere: lmstack.optim)
            lr=1e-3,
            min_lr_ratio=0.1,  # final lr = lr * min_lr_ratio
            schedule="cosine",  # cosine | linear | constant (all after linear warmup)
            warmup_steps=100,
            decay_steps=0,  # 0: train.steps
            b1=0.9,
            b2=0.95,
            eps=1e-8,
            weight_decay=0.1,
            decay_embeddings=False,
            clip_norm=1.0,  # 0: no clipping
            muon_beta=0.95,  # Muon's Nesterov momentum
            muon_ns_steps=5,  # Muon's Newton-Schulz iterations
        )
    )
    c.train = mlc.ConfigDict(
        dict(
            steps=1000,
            batch_size=32,  # global batch, in sequences
            microbatches=1,  # gradient accumulation: the batch is split into this many
            seed=0,
            log_every=10,
            progress=True,
            # The trainable set (regexes fully matching dotted parameter paths, e.g.
            # 'blocks.attn.q.weight'): "" trains every parameter, or only the PEFT method's
            # adapters when peft.name is set; the rest is frozen (no gradients, no optimizer state).
            trainable="",
            frozen="",  # taken out of the trainable set, e.g. 'embed|pos_embed' to freeze the embeddings
            frozen_layers=0,  # the first k blocks of the layer stack get no updates
        )
    )
    # Parameter-efficient fine-tuning: the method's own keys are composed from peft.<name>.
    c.peft = mlc.ConfigDict(dict(name="none"))  # registry: peft.<name> (none | lora | qlora | ia3 | prompt_tuning | prefix_tuning | adapter)
    c.mesh = mlc.ConfigDict(dict(data=-1, fsdp=1, tensor=1))  # -1: the remaining devices
    c.checkpoint = mlc.ConfigDict(dict(every=500, keep=3, async_save=True))
    c.eval = mlc.ConfigDict(
        dict(
            every=500,  # 0: only at the end
            batches=20,  # validation batches per evaluation (0: the whole split)
            batch_size=0,  # 0: train.batch_size
            names=("perplexity",),  # registered evaluators to run (eval.NAME)
        )
    )
    c.sample = mlc.ConfigDict(
        dict(prompt="", max_new_tokens=64, temperature=0.8, top_k=0, top_p=0.95, seed=0)
    )
    # Where the weights start: scratch | WORKDIR[@STEP] | WORKDIR/checkpoints/STEP | a Hugging Face
    # directory (config.json + safetensors) | a .gguf file (see lmstack.init_from).
    # data_source/data_path: the corpus the init.from weights were trained on (a data.source name and
    # its data.path; the run's other data settings apply), for replay, EWC's Fisher and eval.forgetting;
    # "": the init.from run's own data, as its config.json records it (lmstack.forgetting.parent).
    c.init = mlc.ConfigDict(dict(**{"from": "scratch"}, data_source="", data_path=""))
    # Continued pre-training against forgetting (lmstack.forgetting): replay mixes round(fraction *
    # train.batch_size) windows of the parent's training split into every batch (window objectives);
    # regularization pulls the weights towards where they started (none | l2sp | ewc).
    c.replay = mlc.ConfigDict(dict(fraction=0.0))
    c.regularization = mlc.ConfigDict(dict(name="none"))  # registry: regularization.<name>
    c.log = mlc.ConfigDict(dict(jsonl=True, tensorboard=True))
    return c
