from __future__ import annotations

import math

import pytest
import torch
from opacus import GradSampleModule
from opacus.validators import ModuleValidator

from fedmed.models.notes import NotesEncoder, load_tokenizer, make_tokenize_fn, train_tokenizer

TEXTS = [
    "Patient reports chest pain radiating to the left arm.",
    "No history of diabetes; mild hypertension.",
    "Lesion on the back, irregular border, growing over 3 months.",
    "Follow-up visit: blood pressure normal, no chest pain.",
] * 5


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return train_tokenizer(TEXTS, vocab_size=120, out_dir=tmp_path_factory.mktemp("tok"))


def test_tokenizer_round_trip(tokenizer, tmp_path):
    assert len(tokenizer) <= 120
    assert tokenizer.pad_token_id == 0
    tokenizer.save_pretrained(tmp_path)
    again = load_tokenizer(tmp_path)
    text = "Chest PAIN and hypertension"
    assert again(text)["input_ids"] == tokenizer(text)["input_ids"]
    ids = tokenizer(text)["input_ids"]
    assert ids[0] == tokenizer.cls_token_id and ids[-1] == tokenizer.sep_token_id
    assert tokenizer.unk_token_id not in ids  # lowercased words are in the vocabulary


def test_load_tokenizer_missing_dir(tmp_path):
    with pytest.raises(FileNotFoundError):
        load_tokenizer(tmp_path / "nope")


def test_tokenize_fn_pads_and_handles_missing(tokenizer):
    fn = make_tokenize_fn(tokenizer, 12)
    out = fn(["chest pain " * 20, None, math.nan, ""])
    assert out["input_ids"].shape == (4, 12) and out["input_ids"].dtype == torch.int64
    assert out["attention_mask"].dtype == torch.int64
    assert out["attention_mask"][0].all()  # truncated to max_length
    for row in (1, 2, 3):  # missing text → just [CLS] [SEP]
        assert out["attention_mask"][row].sum() == 2


def test_notes_encoder_shapes_and_opacus(tokenizer):
    enc = NotesEncoder(vocab_size=len(tokenizer), hidden_size=32, layers=1, heads=2, max_length=12)
    assert ModuleValidator.validate(enc, strict=False) == []
    batch = make_tokenize_fn(tokenizer, 12)(TEXTS[:4])
    gsm = GradSampleModule(enc)
    out = gsm(batch["input_ids"], batch["attention_mask"])
    assert out.shape == (4, 12, 32)
    out.sum().backward()
    for name, p in gsm.named_parameters():
        assert p.grad_sample is not None and p.grad_sample.shape[0] == 4, name


def test_notes_encoder_from_local_dir(tmp_path):
    enc = NotesEncoder(vocab_size=100, hidden_size=16, layers=1, heads=2, max_length=8)
    enc.bert.save_pretrained(tmp_path)
    again = NotesEncoder(
        vocab_size=0, hidden_size=0, layers=0, heads=1, max_length=8, encoder_dir=tmp_path
    )
    ids = torch.randint(1, 100, (2, 8))
    mask = torch.ones_like(ids)
    enc.eval(), again.eval()
    torch.testing.assert_close(enc(ids, mask), again(ids, mask))
