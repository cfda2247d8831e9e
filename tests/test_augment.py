"""TinyBERT's data augmentation (fastkd.augment): the replacement rules, determinism, the disk cache and its
resume, sentence pairs, bad input, the CLI and `fastkd.train --augment`. Tiny masked LMs are built offline, their
predictions steered through the output bias, their embeddings set so the nearest neighbours are known."""

from __future__ import annotations

import inspect
import math
import re

import datasets
import pytest
import torch

from fastkd import augment as aug_mod
from fastkd.augment import Augmenter, AugmentSettings, augment, augmented_folder
from fastkd.augment.__main__ import main as augment_main
from fastkd.augment.words import draw_copies, example_rng, word_spans
from tests.helpers import tiny_bert_config
from tests.train_support import args_for, one_thread, read_metrics, run_cli, tiny  # noqa: F401 (fixtures)

VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "the", "movie", "film", "was", "good", "great", "fine", "bad",
         "awful", "plot", "story", "walk", "talk", "##ing", "##ed", "cinema", "acting", ".", ",", "!"]
MLM_TOP = ("good", "great", "fine")  # what the steered masked LM predicts at any mask, after a "##ing" piece


def _tokenizer(folder):
    from transformers import BertTokenizerFast

    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.txt").write_text("\n".join(VOCAB) + "\n")
    key = "vocab" if "vocab" in inspect.signature(BertTokenizerFast.__init__).parameters else "vocab_file"
    tok = BertTokenizerFast(**{key: str(folder / "vocab.txt")}, do_lower_case=True)
    tok.save_pretrained(folder)
    return tok


def _steered_mlm(folder, vocab_size=None):
    """A tiny random BERT masked LM whose top predictions are ##ing, then good, great, fine (output bias), and
    whose input embeddings put story, then plot, nearest to mean(walk, ##ing) (the multi-piece "walking")."""
    from transformers import BertForMaskedLM

    tok = _tokenizer(folder)
    torch.manual_seed(0)
    model = BertForMaskedLM(tiny_bert_config(vocab_size=vocab_size or len(VOCAB)))
    if vocab_size is not None:  # a model that does not fit the tokenizer: nothing to steer
        model.save_pretrained(folder)
        return folder
    ids = {w: tok.convert_tokens_to_ids(w) for w in VOCAB}
    with torch.no_grad():
        bias = model.get_output_embeddings().bias
        bias.normal_(0, 0.1)
        for rank, w in enumerate(("##ing", *MLM_TOP)):
            bias[ids[w]] = 50.0 - rank
        emb = model.get_input_embeddings().weight
        emb.normal_(0, 1)
        mean = (emb[ids["walk"]] + emb[ids["##ing"]]) / 2
        emb[ids["story"]] = mean
        emb[ids["plot"]] = mean + 0.05 * torch.randn_like(mean)
    model.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def mlm(tmp_path_factory, one_thread):  # noqa: F811
    return _steered_mlm(tmp_path_factory.mktemp("mlm"))


def _augmenter(mlm, **kw):
    return Augmenter(AugmentSettings(**{"mlm": str(mlm), "candidates": 4, **kw}), device="cpu", log=lambda *_: None)


def test_single_piece_words_take_the_masked_lm_and_multi_piece_words_their_neighbours(mlm):
    aug = _augmenter(mlm)
    spans, cands = aug.candidates(["The movie was walking ."])
    words = ["The", "movie", "was", "walking", "."]
    assert [("The movie was walking ."[a:b]) for a, b in spans[0]] == words
    assert set(cands[0]) == {1, 3}  # stop words ("the", "was") and punctuation are never replaced
    assert sorted(cands[0][1]) == sorted(MLM_TOP)  # top-4 = ##ing + 3 words: the piece is dropped
    assert cands[0][3][:2] == ["story", "plot"]  # nearest to mean(walk, ##ing) in the MLM's input embeddings
    assert all(len(c) <= 4 for c in cands[0].values())  # M
    assert "walking" not in cands[0][3]


def test_candidates_per_word_is_m(mlm):
    _, cands = _augmenter(mlm, candidates=2).candidates(["walking"])
    assert cands[0][0] == ["story", "plot"]


def test_p_zero_makes_no_copy_and_p_one_replaces_every_candidate_word(mlm):
    rows = [("the movie was walking .",)]
    assert _augmenter(mlm, p=0.0, copies=5).copies_of(rows, 0) == []
    out = _augmenter(mlm, p=1.0, copies=5).copies_of(rows, 0)
    assert 1 <= len(out) <= 5
    for src, (text,) in out:
        w = text.split()
        assert src == 0 and w[0] == "the" and w[2] == "was" and w[4] == "."
        assert w[1] in MLM_TOP and w[3] != "walking"


def test_n_copies_at_most_and_duplicates_dropped():
    text = "movie walking"
    spans = [word_spans(text)]
    cands = [{0: ["good", "great", "fine"], 1: ["story", "plot"]}]
    out = draw_copies([text], spans, cands, 20, 1.0, example_rng(0, 0))
    assert len(out) == len(set(out)) == 6  # 3 x 2 combinations, every one drawn in 20 tries, none twice
    assert len(draw_copies([text], spans, cands, 2, 1.0, example_rng(0, 0))) == 2


def test_deterministic_for_a_seed_whatever_the_chunking(mlm):
    rows = [(f"the {w} was walking .",) for w in ("movie", "film", "plot", "story", "acting")]
    aug = _augmenter(mlm, copies=4)
    whole = aug.copies_of(rows, 0)
    assert whole == _augmenter(mlm, copies=4).copies_of(rows, 0)
    assert whole == aug.copies_of(rows[:2], 0) + aug.copies_of(rows[2:], 2)
    assert whole != _augmenter(mlm, copies=4, seed=1).copies_of(rows, 0)


def test_default_without_mlm_uses_the_models_embedding_neighbours_for_every_word(mlm):
    aug = Augmenter(AugmentSettings(candidates=3), model=mlm, device="cpu", log=lambda *_: None)
    assert aug.mlm is None and "no masked LM" in aug.describe()
    _, cands = aug.candidates(["the movie was walking"])
    assert set(cands[0]) == {1, 3}
    assert cands[0][3][:2] == ["story", "plot"]
    whole = set(VOCAB[5:22]) - {"##ing", "##ed"}
    assert all(c in whole and c != "movie" for c in cands[0][1]) and len(cands[0][1]) == 3


def test_glove_embeddings_for_the_neighbours(mlm, tmp_path):
    glove = tmp_path / "glove.txt"
    glove.write_text("walking 1 0 0\nstrolling 0.9 0.1 0\nmovie 0 1 0\nfilm 0 0.9 0.1\n123 1 1 1\n")
    aug = Augmenter(AugmentSettings(candidates=1, embeddings=str(glove)), model=mlm, device="cpu",
                    log=lambda *_: None)
    _, cands = aug.candidates(["walking movie unknownword"])
    assert cands[0] == {0: ["strolling"], 1: ["film"], 2: ["unknownword"]}  # no vector: the word itself


def _data(n=6, pairs=False):
    texts = [f"the {w} was walking ." for w in ("movie", "film", "plot", "story", "acting", "cinema")][:n]
    cols = {"text": texts, "label": [i % 2 for i in range(n)]}
    if pairs:
        cols["text_pair"] = [f"a good {w}" for w in ("film", "movie", "story", "plot", "cinema", "acting")][:n]
    return datasets.Dataset.from_dict(cols)


def test_pairs_augment_both_sides_and_labels_are_carried(mlm, tmp_path):
    ds = _data(pairs=True)
    out = augment(ds, _augmenter(mlm, copies=4, p=0.5), cache_dir=tmp_path, progress=False, log=lambda *_: None)
    assert out["text"][:6] == ds["text"] and out["text_pair"][:6] == ds["text_pair"]  # originals first, in order
    assert out["source"][:6] == list(range(6)) and len(out) > 6
    copies = list(zip(out["source"][6:], out["text"][6:], out["text_pair"][6:], out["label"][6:], strict=True))
    assert all(label == ds["label"][src] for src, _, _, label in copies)
    assert any(a != ds["text"][s] for s, a, _, _ in copies) and any(b != ds["text_pair"][s] for s, _, b, _ in copies)


def test_cache_is_keyed_and_reused(mlm, tmp_path):
    ds, logs = _data(), []
    aug = _augmenter(mlm, copies=3)
    first = augment(ds, aug, cache_dir=tmp_path, progress=False, log=logs.append)
    again = augment(ds, aug, cache_dir=tmp_path, progress=False, log=logs.append)
    assert any("reusing" in m for m in logs) and first["text"] == again["text"]
    folder = augmented_folder(ds, aug, tmp_path)
    assert folder != augmented_folder(ds, _augmenter(mlm, copies=4), tmp_path)
    assert folder != augmented_folder(ds, _augmenter(mlm, copies=3, p=0.3), tmp_path)
    assert folder != augmented_folder(_data(5), aug, tmp_path)
    assert folder != augmented_folder(ds.map(lambda e: {"label": 1 - e["label"]}), aug, tmp_path)


def test_a_killed_augmentation_resumes_from_its_last_chunk(mlm, tmp_path, monkeypatch):
    monkeypatch.setattr(aug_mod, "CHUNK_EXAMPLES", 2)
    ds, aug = _data(), _augmenter(mlm, copies=3)
    real, calls = Augmenter.copies_of, []

    def dies_on_second_chunk(self, rows, first):
        calls.append(first)
        if len(calls) == 2:
            raise KeyboardInterrupt("killed")
        return real(self, rows, first)

    monkeypatch.setattr(Augmenter, "copies_of", dies_on_second_chunk)
    with pytest.raises(KeyboardInterrupt):
        augment(ds, aug, cache_dir=tmp_path / "a", progress=False, log=lambda *_: None)
    monkeypatch.setattr(Augmenter, "copies_of", lambda self, rows, first: (calls.append(first), real(self, rows,
                                                                                                  first))[1])
    logs = []
    resumed = augment(ds, aug, cache_dir=tmp_path / "a", progress=False, log=logs.append)
    assert calls[2:] == [2, 4] and any("resuming: 1 of 3 chunks done" in m for m in logs)
    fresh = augment(ds, aug, cache_dir=tmp_path / "b", progress=False, log=lambda *_: None)
    assert resumed.to_dict() == fresh.to_dict()


def test_bad_input_is_refused_naming_the_argument(mlm, tmp_path):
    from transformers import BertModel

    with pytest.raises(ValueError, match="^copies: expected a positive"):
        AugmentSettings(copies=0)
    with pytest.raises(ValueError, match="^p: expected a probability"):
        AugmentSettings(p=1.5)
    with pytest.raises(ValueError, match="^candidates: "):
        AugmentSettings(candidates=0)
    plain = tmp_path / "plain"
    BertModel(tiny_bert_config(vocab_size=len(VOCAB))).save_pretrained(plain)
    _tokenizer(plain)
    with pytest.raises(ValueError, match="^mlm: .* has no trained fill-mask head"):
        _augmenter(plain)
    small = _steered_mlm(tmp_path / "small", vocab_size=12)  # its tokenizer has 25 tokens
    with pytest.raises(ValueError, match=re.escape(f"tokenizer has {len(VOCAB)} tokens but the model predicts 12")):
        _augmenter(small)
    with pytest.raises(ValueError, match="^embeddings: .* is not a file"):
        Augmenter(AugmentSettings(embeddings=str(tmp_path / "none.txt")), model=mlm, device="cpu")
    with pytest.raises(ValueError, match="^model: expected the model"):
        Augmenter(AugmentSettings(), device="cpu")
    with pytest.raises(ValueError, match="^ds: expected at least one example"):
        augment(datasets.Dataset.from_dict({"text": [], "label": []}), _augmenter(mlm), cache_dir=tmp_path)
    with pytest.raises(ValueError, match="^ds: expected a 'text' column"):
        augment(datasets.Dataset.from_dict({"sentence": ["a"]}), _augmenter(mlm), cache_dir=tmp_path)


def test_cli_writes_a_datasets_folder_and_a_tsv(mlm, tmp_path, capsys):
    data = tmp_path / "train.tsv"
    data.write_text("sentence\tlabel\n" + "".join(f"the {w} was walking .\t{i % 2}\n" for i, w in
                                                  enumerate(("movie", "film", "plot", "story"))))
    out = tmp_path / "out"
    assert augment_main(["--task", str(data), "--output", str(out), "--teacher", str(mlm), "--copies", "2",
                         "--cache-dir", str(tmp_path / "cache"), "--no-progress"]) == 0
    ds = datasets.load_from_disk(str(out))
    lines = (out / "train.tsv").read_text().splitlines()
    assert lines[0] == "text\tlabel\tsource" and len(lines) == len(ds) + 1 and len(ds) > 4
    assert [ln.split("\t")[1:] for ln in lines[1:5]] == [["0", "0"], ["1", "1"], ["0", "2"], ["1", "3"]]
    assert augment_main(["--task", str(data), "--output", str(out), "--copies", "0"]) == 2
    assert "copies: expected a positive" in capsys.readouterr().err


def _pred_losses(out):
    return [m["loss"] for m in read_metrics(out) if m.get("stage") == "prediction" and "loss" in m
            and "event" not in m]


def test_train_augments_the_intermediate_stage_and_carries_its_logits(tiny, tmp_path):  # noqa: F811
    """--augment on: the intermediate stage reads the task data and its copies, the prediction stage the task data,
    with the teacher logits the intermediate stage's forwards kept for the augmented data's first rows (those
    examples): the same losses as a live teacher's, and no teacher forward in the prediction stage."""
    from fastkd import train

    common = ("--augment", "on", "--augment-copies", "2", "--teacher-dtype", "fp32", "--amp", "off")
    run_cli(args_for(tiny, tmp_path / "live", "tinybert", *common))  # args_for: --cache off, a live teacher
    logs = []
    argv = args_for(tiny, tmp_path / "run", "tinybert", *common, "--cache", "auto")
    res = train.run(train.parse_config(argv), log=logs.append)
    data = res["trainer"].data
    n, n_aug = len(data["task"]), len(data["augmented"])
    assert n < n_aug <= 3 * n and data["augmented"]["input_ids"][:n] == data["task"]["input_ids"]
    assert any(f"{n_aug} examples (augmented data" in m for m in logs)
    assert any(f"{n} examples (task data" in m for m in logs)
    cache = {m["stage"]: m for m in read_metrics(tmp_path / "run") if m.get("event") == "cache"}
    assert cache["prediction"]["mode"] == "carried" and cache["prediction"]["teacher_forwards"] == 0
    a, b = _pred_losses(tmp_path / "live"), _pred_losses(tmp_path / "run")
    assert len(a) == len(b) > 0
    for x, y in zip(a, b, strict=True):
        assert abs(x - y) <= 1e-5 * abs(x), (a, b)


def test_train_refuses_augment_on_for_a_method_whose_paper_does_not_augment(tiny, tmp_path):  # noqa: F811
    with pytest.raises(ValueError, match="augment: no stage of kd"):
        run_cli(args_for(tiny, tmp_path / "run", "kd", "--augment", "on"))


def test_distillation_trainer_reads_the_augmented_dataset_where_the_paper_does(tiny, tmp_path):  # noqa: F811
    """fastkd.hf users: augment the raw dataset, hand it over as augmented_dataset; TinyBERT's intermediate stage
    reads it, the prediction stage the original train_dataset."""
    from transformers import AutoTokenizer, TrainingArguments

    from fastkd.data import load_texts
    from fastkd.distill.hf import DistillationTrainer
    from fastkd.models.encoder import resized_config
    from fastkd.models.teacher import load_model

    train_ds = load_texts(str(tiny["data"] / "train.tsv"))
    aug = augment(train_ds, Augmenter(AugmentSettings(copies=2), model=tiny["teacher"], device="cpu",
                                      log=lambda *_: None), cache_dir=tmp_path / "cache", progress=False,
                  log=lambda *_: None)
    teacher = load_model(tiny["teacher"], head=True)
    student = type(teacher)(resized_config(teacher.config, num_layers=2, hidden_size=32, num_heads=4,
                                           intermediate_size=64))
    args = TrainingArguments(str(tmp_path / "hf"), per_device_train_batch_size=16, report_to="none",
                             save_strategy="no", use_cpu=True, disable_tqdm=True)
    trainer = DistillationTrainer(model=student, teacher_model=teacher, method="tinybert", args=args,
                                  train_dataset=train_ds, augmented_dataset=aug, epochs=1,
                                  processing_class=AutoTokenizer.from_pretrained(tiny["teacher"]), max_length=24)
    trainer._set_stage_data(0)
    assert len(trainer.train_dataset) == len(aug) > len(train_ds)
    trainer._set_stage_data(1)
    assert len(trainer.train_dataset) == len(train_ds)
    trainer.train()
    assert trainer.state.global_step == math.ceil(len(train_ds) / 16)  # the last stage: the original data
