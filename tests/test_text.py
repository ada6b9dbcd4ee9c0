"""Text (NLP): Hugging Face models read offline, GLUE-format files, exact length-dependent FLOPs, GLUE metrics,
length bucketing, and the one-line errors of bad text input (issue 16)."""

from __future__ import annotations

import sys

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

pytest.importorskip("transformers")

from freezebench import metrics as M  # noqa: E402
from freezebench.cli import main  # noqa: E402
from freezebench.config import load_config  # noqa: E402
from freezebench.trainer import Trainer  # noqa: E402
from helpers import one_line  # noqa: E402

TEXT = ["data.name=text_demo", "data.text_samples=96", "data.batch_size=16", "data.eval_batch_size=64",
        "model.name=bert_tiny", "trainer.epochs=2", "trainer.max_steps_per_epoch=3", "trainer.progress=false",
        "trainer.probe_batch_size=16", "trainer.device=cpu", "tracking.enabled=false", "optim.name=adamw",
        "optim.lr=0.001", "trainer.save_checkpoint=false", "trainer.checkpoint_every=0"]

WORDS = ("the a cat dog sat on mat ran fast slow big small red blue house car tree it is was not very good bad "
         "he she they we said that".split())
MRPC_ROWS = [(i % 2, f"{WORDS[i % 7]} {WORDS[(i + 3) % 11]} sat on the mat", f"the {WORDS[i % 13]} ran fast")
             for i in range(24)]
COLA_ROWS = [(i % 2, f"{WORDS[i % 5]} {WORDS[(i + 2) % 9]} was very {WORDS[(i + 1) % 17]}") for i in range(24)]


def _write_glue(root):
    (root / "MRPC").mkdir(parents=True)
    (root / "CoLA").mkdir()
    head = "Quality\t#1 ID\t#2 ID\t#1 String\t#2 String\n"
    for name, rows in (("train.tsv", MRPC_ROWS), ("dev.tsv", MRPC_ROWS[:10])):
        (root / "MRPC" / name).write_text(head + "".join(f"{q}\t{i}\t{i + 100}\t{a}\t{b}\n"
                                                         for i, (q, a, b) in enumerate(rows)), encoding="utf-8")
    for name, rows in (("train.tsv", COLA_ROWS), ("dev.tsv", COLA_ROWS[:10])):  # CoLA: no header
        (root / "CoLA" / name).write_text("".join(f"gj04\t{y}\t{'' if y else '*'}\t{s}\n" for y, s in rows),
                                          encoding="utf-8")


def _save_bert(folder, num_labels=2, tokenizer=True):
    from transformers import BertConfig, BertForSequenceClassification, BertTokenizer

    folder.mkdir(parents=True)
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]
    if tokenizer:
        (folder / "vocab.txt").write_text("\n".join(vocab) + "\n")
        BertTokenizer(str(folder / "vocab.txt")).save_pretrained(str(folder))
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=len(vocab), hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=32, max_position_embeddings=64, num_labels=num_labels)
    model = BertForSequenceClassification(cfg)
    model.save_pretrained(str(folder))
    return model


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("text")
    _write_glue(root / "glue")
    saved = _save_bert(root / "bert")
    _save_bert(root / "bert3", num_labels=3)
    _save_bert(root / "bare", tokenizer=False)
    return {"root": root, "glue": str(root / "glue"), "bert": str(root / "bert"), "bert3": str(root / "bert3"),
            "bare": str(root / "bare"), "saved": saved}


def _glue(files, task="mrpc", model="bert"):
    return [*TEXT, "model.name=hf", f"model.hf_path={files[model]}", "data.name=glue", f"data.task={task}",
            f"data.root={files['glue']}", "model.granularity=block"]


def test_hf_model_and_glue_mrpc_through_the_real_path(files):
    """save_pretrained -> model.name=hf (local_files_only); MRPC TSVs -> data.name=glue; BERT blocks; F1."""
    trainer = Trainer(load_config(_glue(files)))
    assert [u.name for u in trainer.units] == ["hf.bert.embeddings", "hf.bert.encoder.layer.0",
                                               "hf.bert.encoder.layer.1", "hf.bert.pooler+hf.classifier"]
    saved = files["saved"].state_dict()
    assert all(torch.equal(v, trainer.model.hf.state_dict()[k]) for k, v in saved.items())
    assert trainer.data.info.num_train == len(MRPC_ROWS) and trainer.data.info.num_val == 10
    batch = next(iter(trainer.data.train))[0]
    assert set(batch) == {"input_ids", "attention_mask", "token_type_ids"}  # sentence pairs have segments
    m = trainer.fit().metrics
    assert m[M.VAL_SCORE] == m[M.VAL_F1] and M.VAL_MCC not in m and 0 <= m[M.VAL_F1] <= 1


def test_glue_cola_logs_matthews_correlation(files):
    m = Trainer(load_config([*_glue(files, "cola"), "trainer.epochs=1"])).fit().metrics
    assert m[M.VAL_SCORE] == m[M.VAL_MCC] and M.VAL_F1 not in m


def test_task_metrics_as_glue_defines_them():
    from freezebench.zoo.text_data import task_metrics

    conf = torch.tensor([[5.0, 1.0], [2.0, 4.0]])  # [label, prediction]: tn 5, fp 1, fn 2, tp 4
    mrpc = task_metrics("mrpc", conf)
    assert mrpc == {M.VAL_ACC: 9 / 12, M.VAL_F1: 8 / 11, M.VAL_SCORE: 8 / 11}
    cola = task_metrics("cola", conf)
    assert cola[M.VAL_MCC] == (4 * 5 - 1 * 2) / ((5 * 6 * 6 * 7) ** 0.5) == cola[M.VAL_SCORE]
    assert task_metrics("sst2", conf)[M.VAL_SCORE] == 9 / 12
    assert task_metrics(None, conf) == {M.VAL_ACC: 9 / 12, M.VAL_SCORE: 9 / 12}


def _training_flops(model, inputs):
    model.train()
    with FlopCounterMode(display=False) as fc:
        model(inputs)
    return fc.get_total_flops() / inputs["input_ids"].shape[0]


@pytest.mark.parametrize("granularity", ["layer", "block"])
def test_bert_tiny_unit_flops_equal_flop_counter_at_every_length(granularity):
    """Unit FLOPs (exact quadratics in the length) equal FlopCounterMode's training-mode count, attention
    included, at lengths the fit never traced."""
    trainer = Trainer(load_config([*TEXT, f"model.granularity={granularity}"]))
    lengths = trainer.batch.lengths
    for L in (5, 17, 33):
        unit, other = lengths.flops(L)
        ref = _training_flops(trainer.model, {"input_ids": torch.ones(3, L, dtype=torch.long),
                                              "attention_mask": torch.ones(3, L, dtype=torch.long)})
        assert sum(unit) + other == ref
        assert other == 0
    assert [u.flops for u in trainer.units] == lengths.flops(trainer.data.info.max_length)[0]


def test_steps_are_counted_at_their_padded_length():
    """cost/tflops_full is the sum over the trained batches of full training at each batch's own length."""
    trainer = Trainer(load_config([*TEXT, "trainer.epochs=1"]))
    expected = 0.0
    loader = trainer.data.train
    loader.set_epoch(0)
    for b, (x, y, _) in enumerate(loader):
        if b == 3:
            break
        expected += trainer.batch.lengths.at(x["input_ids"].shape[1]).full_step_flops * len(y)
    m = trainer.fit().metrics
    assert m[M.COST_TFLOPS_FULL] == expected / 1e12 == m[M.COST_TFLOPS]  # `full` freezes nothing


def _counted_per_module(model, L):
    """FlopCounterMode's training-mode FLOPs per sample at ``L`` tokens: the total and each module's inclusive
    count (names relative to the model)."""
    model.train()
    with torch.random.fork_rng(), FlopCounterMode(display=False) as fc:
        model({"input_ids": torch.ones(2, L, dtype=torch.long), "attention_mask": torch.ones(2, L, dtype=torch.long)})
    root = type(model).__name__ + "."
    per = {k[len(root):]: sum(v.values()) / 2 for k, v in fc.get_flop_counts().items() if k.startswith(root)}  # 0: absent
    return fc.get_total_flops() / 2, per


def _reference_step(f, frozen):
    """freezebench's step convention (freezebench.cost), by hand: the forward of every unit, the weight gradients
    of the trainable ones, the input gradients of every unit after the first trainable one."""
    trainable = [i for i in range(len(f)) if i not in frozen]
    first = trainable[0] if trainable else len(f)
    return sum(f) + sum(f[i] for i in trainable) + sum(f[first + 1:])


def test_sparse_text_steps_count_exact_flops_at_their_padded_length():
    """Sparse training on bert_tiny (75% uniform sparsity, block units): the masked modules are exactly the
    encoder layers' linear layers; a step at padded length L costs the dense FlopCounterMode count of each unit
    with every masked linear layer's own count scaled by its density (attention scores, embeddings, LayerNorm
    and the dense head unscaled), forward, weight and input gradients as for images, at lengths never traced;
    a trained epoch's cost/tflops is the sum of that over its batches and cost/tflops_full stays dense."""
    from torch import nn

    trainer = Trainer(load_config([*TEXT, "trainer.epochs=1", "model.granularity=block", "sparsity.enabled=true",
                                   "sparsity.sparsity=0.75", "sparsity.distribution=uniform", "sparsity.mask_every=1"]))
    model, sp = trainer.model, trainer.sparsity
    encoder_linears = {n for n, m in model.named_modules() if isinstance(m, nn.Linear) and ".encoder.layer." in n}
    assert set(sp.names) == encoder_linears and len(encoder_linears) == 12  # 6 per layer; pooler, classifier dense
    assert all(k / p.numel() == 0.25 for k, p in zip(sp.kept, sp.params))  # 1 - d exactly 3/4: exact floats below

    def reference(L):
        total, per = _counted_per_module(model, L)
        dense = [per.get("hf.bert.embeddings", 0.0), per["hf.bert.encoder.layer.0"], per["hf.bert.encoder.layer.1"],
                 per["hf.bert.pooler"] + per["hf.classifier"]]
        assert sum(dense) == total  # the four blocks hold every counted FLOP (attention scores inside the layers)
        sparse = [dense[0], *(dense[1 + i] - 0.75 * sum(per[n] for n in encoder_linears
                                                          if n.startswith(f"hf.bert.encoder.layer.{i}."))
                              for i in range(2)), dense[3]]
        return dense, sparse

    lengths = trainer.batch.lengths
    for L in (5, 17, 33):
        dense, sparse = reference(L)
        assert lengths.at(L).full_step_flops == _reference_step(dense, ())
        for frozen in ((), (0,), (0, 1), (0, 1, 2)):
            assert lengths.trained_at(L).step_flops(frozen) == _reference_step(sparse, frozen)
    assert trainer.cost.f == reference(trainer.data.info.max_length)[1]  # what policies plan with

    expected = expected_full = 0.0
    loader = trainer.data.train
    loader.set_epoch(0)
    for b, (x, y, _) in enumerate(loader):
        if b == 3:
            break
        dense, sparse = reference(x["input_ids"].shape[1])
        expected += _reference_step(sparse, ()) * len(y)
        expected_full += _reference_step(dense, ()) * len(y)
    m = trainer.fit().metrics
    assert sp.updates > 0  # masks were updated (pruned and regrown); the kept counts, hence the FLOPs, never change
    assert m[M.COST_TFLOPS] == expected / 1e12 and m[M.COST_TFLOPS_FULL] == expected_full / 1e12
    assert m[M.SPARSITY_DENSITY] == 0.25


def test_length_bucketing_visits_every_sample_once_with_less_padding():
    from freezebench.zoo.text_data import TextLoader

    g = torch.Generator().manual_seed(0)
    lengths = torch.randint(2, 40, (203,), generator=g)
    ids = torch.ones(203, 40, dtype=torch.long)
    y = torch.zeros(203, dtype=torch.long)

    def pad(loader):
        seen, padded = [], 0
        for x, _, idx in loader:
            seen += idx.tolist()
            padded += x["input_ids"].numel()
        return sorted(seen), padded, [i for _, _, i in loader]

    plain = TextLoader(ids, lengths, None, y, 16, shuffle=True, seed=1, bucket=0)
    bucketed = TextLoader(ids, lengths, None, y, 16, shuffle=True, seed=1, bucket=4)
    (s0, p0, _), (s1, p1, order) = pad(plain), pad(bucketed)
    assert s0 == s1 == list(range(203)) and p1 < p0
    assert len(order) == len(bucketed) == 13
    assert all(torch.equal(a, b) for a, b in zip(order, pad(bucketed)[2]))  # the same order again


def test_text_demo_preset_trains_and_learns():
    cfg = load_config(["tracking.enabled=false", "trainer.epochs=1", "trainer.max_steps_per_epoch=2",
                       "trainer.progress=false", "trainer.device=cpu", "trainer.save_checkpoint=false",
                       "trainer.checkpoint_every=0"], preset="text_demo")
    assert (cfg.model.name, cfg.data.name, cfg.schedule.name, cfg.optim.name) == ("bert_tiny", "text_demo", "linear",
                                                                                  "adamw")
    trainer = Trainer(cfg)
    assert len(trainer.units) == 4  # embeddings, two encoder layers, head


def test_linear_schedule_warms_up_and_decays_to_zero():
    from freezebench.trainer.loop import lr_factor

    s = load_config(["schedule.name=linear", "schedule.warmup_fraction=0.1"]).schedule
    assert [lr_factor(s, i, 10, 100) for i in (0, 9, 10, 55, 100)] == [0.1, 1.0, 1.0, 0.5, 0.0]


# --- bad input: one line, exit status 2 -------------------------------------------------------------------------
def _cli(capsys, args):
    return one_line(capsys, main(["train", *args, "tracking.enabled=false"]))


def test_missing_nlp_extra_says_how_to_install(capsys, monkeypatch):
    for mod in [m for m in sys.modules if m == "transformers" or m.startswith("transformers.")]:
        monkeypatch.delitem(sys.modules, mod)
    monkeypatch.setitem(sys.modules, "transformers", None)  # import transformers -> ImportError
    line = _cli(capsys, TEXT)
    assert 'pip install -e ".[nlp]"' in line


def test_missing_model_folder(capsys, files):
    line = _cli(capsys, [*_glue(files), f"model.hf_path={files['root'] / 'nope'}",
                         f"data.tokenizer={files['bert']}"])
    assert "model.hf_path=" in line and "nope" in line and "local_files_only" in line


def test_missing_tokenizer_beside_the_model(capsys, files):
    line = _cli(capsys, _glue(files, model="bare"))
    assert "no tokenizer found in" in line and "bare" in line


@pytest.mark.parametrize("task,expect", [("mrcp", "data.task=<mrpc|cola"), ("rte", "RTE/train.tsv")])
def test_wrong_glue_task_or_layout_names_the_file(capsys, files, task, expect):
    assert expect in _cli(capsys, _glue(files, task))


def test_glue_file_with_wrong_columns(capsys, files, tmp_path):
    (tmp_path / "MRPC").mkdir()
    for name in ("train.tsv", "dev.tsv"):
        (tmp_path / "MRPC" / name).write_text("label\tsentence\n1\tthe cat\n")
    line = _cli(capsys, [*_glue(files), f"data.root={tmp_path}"])
    assert "has no column '#1 String'" in line and "train.tsv" in line


def test_label_count_differing_from_the_head_needs_reinit(capsys, files):
    line = _cli(capsys, _glue(files, model="bert3"))
    assert "3 labels" in line and "model.reinit_head=true" in line
    trainer = Trainer(load_config([*_glue(files, model="bert3"), "model.reinit_head=true"]))
    assert trainer.model.hf.classifier.out_features == 2


@pytest.mark.parametrize("key", ["trainer.cache_frozen_prefix=true", "trainer.compile=true"])
def test_trainer_features_text_cannot_have_refuse_in_one_line(capsys, key):
    line = _cli(capsys, [*TEXT, key])
    assert key.rsplit("=", 1)[0] in line and "text" in line


@pytest.mark.parametrize("args,expect", [(["model.name=resnet20"], "is an image model"),
                                         (["data.name=digits", "model.name=bert_tiny"], "is a text model")])
def test_model_and_data_of_different_modalities(capsys, args, expect):
    assert expect in _cli(capsys, [*TEXT, *args])


def test_autofreeze_on_bert_scores_encoder_layers_front_to_back():
    """AutoFreeze (Liu et al. 2021) at block granularity with score_first=false: the encoder layers are
    scored, M times per epoch; the embeddings freeze with the first layer that freezes."""
    trainer = Trainer(load_config(["policy=autofreeze", *TEXT, "model.granularity=block", "trainer.epochs=3",
                                   "trainer.max_steps_per_epoch=4", "policy.evals_per_epoch=2",
                                   "policy.percentile=100"]))  # score_first: null -> false (an embedding first)
    assert trainer.policy._tracked == [1, 2]  # encoder layers 0 and 1; not the embeddings, not the head
    decided = []
    decide = trainer.policy.decide
    trainer.policy.decide = lambda step: decided.append(step) or decide(step)
    trainer.fit()
    assert decided[:2] == [2, 4]  # M = 2 evaluations per 4-step epoch
    steps = {e.unit: e.step for e in trainer.freezer.events}
    assert 1 in steps and steps[0] == steps[1]  # percentile 100: layer 0 freezes at the 2nd evaluation


def test_sieving_composes_with_length_bucketing():
    """data.sieve on text: the sieve's partial set is what the loader buckets (shuffle -> sieve -> buckets)."""
    trainer = Trainer(load_config([*TEXT, "data.sieve.enabled=true", "data.sieve.ratio=0.5",
                                   "trainer.max_steps_per_epoch=null", "data.bucket_batches=2"]))
    loader = trainer.data.train
    loader.set_epoch(0)
    seen = [i for _, _, idx in loader for i in idx.tolist()]
    assert sorted(seen) == sorted(trainer.sieve.partial.tolist()) and len(seen) == trainer.sieve.m
    h = trainer.fit().history
    assert [r["data/samples_per_epoch"] for r in h] == [float(trainer.sieve.m)] * 2


def test_text_suites_plan_and_name_missing_files(capsys, tmp_path):
    from freezebench.sweeps.plan import plan_suite
    from freezebench.sweeps.suite import load_suite

    [row] = plan_suite(load_suite("text_demo_suite"))
    assert (row.model, row.dataset, row.runs, row.epochs, row.train_samples) == ("bert_tiny", "text_demo", 11, 3, 1280)
    line = one_line(capsys, main(["suite", "table_a1", f"data.root={tmp_path}", "--storage",
                                  f"sqlite:///{tmp_path}/o.db"]))
    assert f"expected {tmp_path}/MRPC/train.tsv" in line


@pytest.mark.slow
def test_table_a1_plan_is_bert_base_at_128_tokens():
    from freezebench.sweeps.plan import plan_suite
    from freezebench.sweeps.suite import load_suite

    rows = plan_suite(load_suite("table_a1"))
    assert [(r.dataset, r.runs, r.train_samples, r.image_size) for r in rows] == [("glue_mrpc", 12, 3668, 128),
                                                                                 ("glue_cola", 12, 8551, 128)]
    assert 60 < rows[0].gflops_per_sample < 70  # 3 x (2 x 85M weights x 128 tokens + attention), about 67


@pytest.mark.parametrize("task", ["mrpc", "cola"])
def test_glue_save_to_disk_folder_gives_the_tsv_batches(files, task, tmp_path):
    """A DatasetDict saved with save_to_disk (Hugging Face glue columns) through data.name=glue yields exactly the
    tokenised batches of the equivalent TSV files."""
    datasets = pytest.importorskip("datasets")
    rows = MRPC_ROWS if task == "mrpc" else COLA_ROWS

    def split(rs):
        if task == "mrpc":
            return datasets.Dataset.from_dict({"sentence1": [a for _, a, _ in rs], "sentence2": [b for _, _, b in rs],
                                               "label": [q for q, _, _ in rs], "idx": list(range(len(rs)))})
        return datasets.Dataset.from_dict({"sentence": [t for _, t in rs], "label": [y for y, _ in rs],
                                           "idx": list(range(len(rs)))})

    folder = tmp_path / ("MRPC" if task == "mrpc" else "CoLA")
    datasets.DatasetDict({"train": split(rows), "validation": split(rows[:10])}).save_to_disk(str(folder))
    tsv = Trainer(load_config(_glue(files, task)))
    saved = Trainer(load_config([*_glue(files, task), f"data.root={tmp_path}"]))
    for a, b in ((tsv.data.train, saved.data.train), (tsv.data.val, saved.data.val)):
        got, want = list(b), list(a)
        assert len(got) == len(want) > 0
        for (xa, ya, ia), (xb, yb, ib) in zip(want, got):
            assert xa.keys() == xb.keys() and all(torch.equal(xa[k], xb[k]) for k in xa)
            assert torch.equal(ya, yb) and torch.equal(ia, ib)
