"""A tiny BERT (hidden 32, 2 layers) and its WordPiece fast tokenizer, built here and saved to a temporary folder."""

from __future__ import annotations

from pathlib import Path

import pytest

WORDS = (
    "the a an is was very quite not good bad great awful movie film plot actor music food service price room "
    "cat dog bird fish red blue green happy sad fast slow big small and or but it this that i we"
).split()


def make_tokenizer(folder: Path, words=WORDS):
    """A lower-casing WordPiece tokenizer ([CLS] text [SEP]) wrapped as a fast transformers tokenizer."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    vocab = {t: i for i, t in enumerate([*specials, *words, "##s", "##ed"])}
    tok = Tokenizer(models.WordPiece(vocab, unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", special_tokens=[("[CLS]", vocab["[CLS]"]), ("[SEP]", vocab["[SEP]"])]
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        unk_token="[UNK]",
        pad_token="[PAD]",
        cls_token="[CLS]",
        sep_token="[SEP]",
        mask_token="[MASK]",
    )
    fast.save_pretrained(folder)
    return fast


def make_tiny_bert(folder: Path, *, seed: int = 0, dropout: float = 0.1, init_range: float = 0.02) -> Path:
    """A BertModel (no classifier) + tokenizer in `folder`, loadable by AutoModelForSequenceClassification.

    `init_range` (BERT's initializer_range): larger weights mix the tokens into the pooled output, so a linear probe on
    this untrained encoder has features to learn from."""
    import torch
    from transformers import BertConfig, BertModel

    tok = make_tokenizer(folder)
    cfg = BertConfig(
        vocab_size=len(tok),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=64,
        hidden_dropout_prob=dropout,
        attention_probs_dropout_prob=dropout,
        initializer_range=init_range,
    )
    torch.manual_seed(seed)
    BertModel(cfg).save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_bert(tmp_path_factory) -> Path:
    return make_tiny_bert(tmp_path_factory.mktemp("tiny_bert"))


@pytest.fixture(scope="session")
def tokenizer_maker():
    """make_tokenizer(folder, words=...), for tests that need a second, different tokenizer."""
    return make_tokenizer
