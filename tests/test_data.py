"""load_texts on every supported source (files made in tmp_path and the real SST-2 / AG News), tokenize, and the
missing-data error."""

import json

import pytest

from fastkd.data import DataNotFoundError, has_splits, label_names, load_texts, tokenize


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    from fastkd.models.teacher import default_teacher_path

    return AutoTokenizer.from_pretrained(default_teacher_path())


def test_tsv_with_header_and_named_labels_sorted(tmp_path):
    f = tmp_path / "train.tsv"
    f.write_text('sentence\tlabel\nit is "great" , really\tpos\nawful\tneg\nfine\tpos\n')
    ds = load_texts(str(f))
    assert ds["text"] == ['it is "great" , really', "awful", "fine"]  # quotes kept: TSV is read without quoting
    assert label_names(ds) == ["neg", "pos"]
    assert ds["label"] == [1, 0, 1]


def test_first_seen_order_and_explicit_names(tmp_path):
    f = tmp_path / "d.tsv"
    f.write_text("text\tlabel\na\tzeta\nb\talpha\nc\tzeta\n")
    assert label_names(load_texts(str(f), label_order="first_seen")) == ["zeta", "alpha"]
    ds = load_texts(str(f), label_names=["zeta", "mid", "alpha"])
    assert ds["label"] == [0, 2, 0] and label_names(ds) == ["zeta", "mid", "alpha"]
    with pytest.raises(ValueError, match="label_names"):
        load_texts(str(f), label_names=["zeta"])
    with pytest.raises(ValueError, match="label_order"):
        load_texts(str(f), label_order="random")


def test_headerless_tsv_is_text_then_label(tmp_path):
    f = tmp_path / "agnews_like.tsv"
    f.write_text("Stocks fall\tBusiness\nTeam wins\tSports\n")
    ds = load_texts(str(f))
    assert ds["text"] == ["Stocks fall", "Team wins"]
    assert label_names(ds) == ["Business", "Sports"] and ds["label"] == [0, 1]


def test_csv_detects_text_column_and_int_labels(tmp_path):
    f = tmp_path / "reviews.csv"
    f.write_text('id,review,label\n7,"good, very good",1\n8,bad,0\n9,"ok",2\n')
    ds = load_texts(str(f))
    assert ds.column_names == ["text", "label"]
    assert ds["text"] == ["good, very good", "bad", "ok"]
    assert ds["label"] == [1, 0, 2] and label_names(ds) is None


def test_first_string_column_when_no_known_name(tmp_path):
    f = tmp_path / "x.jsonl"
    f.write_text("\n".join(json.dumps({"n": i, "body": f"text {i}", "label": i % 2}) for i in range(4)) + "\n")
    ds = load_texts(str(f))
    assert ds["text"] == [f"text {i}" for i in range(4)] and ds["label"] == [0, 1, 0, 1]


def test_named_columns_when_the_header_uses_other_names(tmp_path):
    # Neither "body" nor "stars" is a name fastkd tries: without the column names the header line would be read as a
    # record; with them it is a header and the named columns are used (the label names case-insensitively).
    f = tmp_path / "reviews.csv"
    f.write_text("id,body,stars\n1,great film,5\n2,dull,1\n3,fine,5\n")
    ds = load_texts(str(f), text_column="body", label_column="STARS")
    assert ds["text"] == ["great film", "dull", "fine"] and ds["label"] == [5, 1, 5]
    # A known text column with an unknown label column: without label_column the file is unlabelled.
    g = tmp_path / "r.tsv"
    g.write_text("review\tsentiment\ngood\tpos\nbad\tneg\n")
    assert load_texts(str(g)).column_names == ["text"]
    ds = load_texts(str(g), label_column="sentiment")
    assert ds["label"] == [1, 0] and label_names(ds) == ["neg", "pos"]


def test_named_column_missing_names_the_argument_and_the_columns(tmp_path):
    f = tmp_path / "reviews.csv"
    f.write_text("body,stars\ngreat,5\n")
    with pytest.raises(ValueError, match=r"text_column: .*reviews.csv has no column 'review'; its columns are "
                                         r"\['body', 'stars'\]"):
        load_texts(str(f), text_column="review")
    with pytest.raises(ValueError, match="label_column: .* has no column 'rating'"):
        load_texts(str(f), text_column="body", label_column="rating")


def test_json_array_and_unlabelled(tmp_path):
    f = tmp_path / "x.json"
    f.write_text(json.dumps([{"sentence": "one"}, {"sentence": "two"}]))
    ds = load_texts(str(f))
    assert ds.column_names == ["text"] and ds["text"] == ["one", "two"]


def test_plain_text_corpus_skips_blank_lines(tmp_path):
    f = tmp_path / "corpus.txt"
    f.write_text("first line\n\nsecond line\n   \nthird\n")
    ds = load_texts(str(f))
    assert ds.column_names == ["text"] and ds["text"] == ["first line", "second line", "third"]


def test_folder_with_split_files(tmp_path):
    (tmp_path / "train.csv").write_text("text,label\na,x\nb,y\n")
    (tmp_path / "dev.jsonl").write_text('{"text": "c", "label": "y"}\n')
    assert load_texts(str(tmp_path), "train")["text"] == ["a", "b"]
    dev = load_texts(str(tmp_path), "dev", label_names=["x", "y"])
    assert dev["label"] == [1]


def test_missing_file_error_names_paths_and_layout(tmp_path):
    missing = tmp_path / "nope.tsv"
    with pytest.raises(DataNotFoundError) as e:
        load_texts(str(missing))
    msg = str(e.value)
    assert str(missing) in msg and "Tried" in msg and ".tsv" in msg and "one text per line" in msg


def test_missing_split_in_folder_lists_every_candidate(tmp_path):
    (tmp_path / "train.tsv").write_text("text\tlabel\na\t0\n")
    with pytest.raises(DataNotFoundError) as e:
        load_texts(str(tmp_path), "test")
    for ext in (".tsv", ".csv", ".json", ".jsonl", ".txt"):
        assert str(tmp_path / f"test{ext}") in str(e.value)


def test_missing_task_split_names_data_dir_and_layout(tmp_path, monkeypatch):
    monkeypatch.setenv("FASTKD_DATA_DIR", str(tmp_path))
    monkeypatch.setenv("FASTKD_OFFLINE", "1")
    with pytest.raises(DataNotFoundError) as e:
        load_texts("sst2", "train")
    msg = str(e.value)
    assert str(tmp_path / "sst2" / "train.tsv") in msg and "FASTKD_DATA_DIR" in msg and "sentence" in msg


def test_bad_arguments():
    with pytest.raises(ValueError, match="source"):
        load_texts(42)


def test_real_sst2_and_agnews():
    sst2 = load_texts("sst2", "dev")
    assert len(sst2) == 6735 and label_names(sst2) == ["negative", "positive"]
    assert set(sst2["label"]) == {0, 1} and all(isinstance(t, str) and t for t in sst2["text"][:100])
    ag = load_texts("agnews", "test")
    assert len(ag) == 7600 and label_names(ag) == ["World", "Sports", "Business", "Sci/Tech"]
    assert set(ag["label"]) == {0, 1, 2, 3}
    # the first AG News test line is labelled Business
    assert ag[0]["text"].startswith("Unions representing workers") and ag[0]["label"] == 2


def test_real_file_by_path_matches_task(tmp_path):
    from fastkd.data import task_file

    by_path = load_texts(str(task_file("sst2", "test")))
    by_task = load_texts("sst2", "test")
    assert by_path["text"] == by_task["text"] and by_path["label"] == by_task["label"]


def test_tokenize_no_padding_lengths_index(tokenizer):
    ds = load_texts("sst2", "test").select(range(50))
    tok = tokenize(ds, tokenizer, max_length=16)
    assert {"input_ids", "length", "index", "label", "text"} <= set(tok.column_names)
    assert tok["index"] == list(range(50)) and tok["label"] == ds["label"]
    lengths = tok["length"]
    assert all(len(ids) == n for ids, n in zip(tok["input_ids"], lengths, strict=True))
    assert max(lengths) == 16 and min(lengths) < 16  # truncated to max_length, short ones not padded
    for ids in tok["input_ids"]:
        assert ids[0] == tokenizer.cls_token_id and ids[-1] == tokenizer.sep_token_id
        assert tokenizer.pad_token_id not in ids
    with pytest.raises(ValueError, match="max_length"):
        tokenize(ds, tokenizer, max_length=1)


# ---------------------------------------------------------------- sentence pairs


def test_sentence_pairs_found_by_name_or_named(tmp_path):
    f = tmp_path / "nli.jsonl"
    f.write_text("\n".join(json.dumps({"premise": f"p{i}", "hypothesis": f"h{i}", "label": lab})
                           for i, lab in enumerate(["entailment", "neutral", "contradiction"])) + "\n")
    ds = load_texts(str(f))
    assert ds.column_names == ["text", "text_pair", "label"]
    assert ds["text"] == ["p0", "p1", "p2"] and ds["text_pair"] == ["h0", "h1", "h2"]
    assert label_names(ds) == ["contradiction", "entailment", "neutral"] and ds["label"] == [1, 2, 0]
    g = tmp_path / "pairs.tsv"
    g.write_text("sentence\tanswer\tlabel\nwho?\tme\t1\nwhy?\tso\t0\n")
    assert load_texts(str(g)).column_names == ["text", "label"]  # "answer" is no pair name: single texts
    ds = load_texts(str(g), text_pair_column="answer")
    assert ds["text"] == ["who?", "why?"] and ds["text_pair"] == ["me", "so"] and ds["label"] == [1, 0]
    with pytest.raises(ValueError, match="text_pair_column: .* has no column 'reply'"):
        load_texts(str(g), text_pair_column="reply")
    with pytest.raises(ValueError, match="text_pair_column: the second text must be another column"):
        load_texts(str(g), text_column="sentence", text_pair_column="sentence")


def test_glue_pair_task_from_the_data_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("FASTKD_DATA_DIR", str(tmp_path))
    (tmp_path / "mrpc").mkdir()
    (tmp_path / "mrpc" / "train.tsv").write_text("sentence1\tsentence2\tlabel\na b\tc d\tequivalent\n"
                                                 "e\tf\t0\n")
    ds = load_texts("mrpc", "train")
    assert ds["text"] == ["a b", "e"] and ds["text_pair"] == ["c d", "f"] and ds["label"] == [1, 0]
    assert label_names(ds) == ["not_equivalent", "equivalent"]


def test_tokenize_pairs_marks_the_second_segment(tokenizer):
    import datasets

    from fastkd.training.batching import collate

    ds = datasets.Dataset.from_dict({"text": ["a gripping film", "dull"], "text_pair": ["it is", "very , very dull"],
                                     "label": [1, 0]})
    tok = tokenize(ds, tokenizer, max_length=32)
    for row in tok:
        ids, start = row["input_ids"], row["type_start"]
        # [CLS] a [SEP] b [SEP]: the second segment starts right after the first [SEP]
        assert ids[start - 1] == tokenizer.sep_token_id and ids.index(tokenizer.sep_token_id) == start - 1
        expected = tokenizer(row["text"], row["text_pair"])["token_type_ids"]
        assert [0] * start + [1] * (len(ids) - start) == expected
    batch = collate([dict(r) for r in tok], tokenizer.pad_token_id)
    assert batch.token_type_ids is not None and "token_type_ids" in batch.model_inputs()
    for row, r in enumerate(tok):
        n, start = r["length"], r["type_start"]
        assert batch.token_type_ids[row, :start].eq(0).all() and batch.token_type_ids[row, start:n].eq(1).all()
        assert batch.token_type_ids[row, n:].eq(0).all()  # padding
    # truncation keeps both texts (longest first)
    short = tokenize(ds, tokenizer, max_length=8)
    assert max(short["length"]) == 8 and all(0 < s < n for s, n in zip(short["type_start"], short["length"],
                                                                        strict=True))
    single = collate([dict(r) for r in tokenize(ds.remove_columns("text_pair"), tokenizer, 32)],
                     tokenizer.pad_token_id)
    assert single.token_type_ids is None and "token_type_ids" not in single.model_inputs()


def test_has_splits_tells_split_sources_from_single_files(tmp_path, monkeypatch):
    monkeypatch.setenv("FASTKD_DATA_DIR", str(tmp_path))
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "train.tsv").write_text("text\tlabel\na\t0\n")
    assert has_splits("sst2") and has_splits(str(tmp_path / "mine")) and has_splits("mine")  # in the data dir
    assert not has_splits(str(tmp_path / "mine" / "train.tsv")) and not has_splits("nowhere.tsv")
    assert has_splits("owner/name")  # a hub dataset name: its splits are the hub's
