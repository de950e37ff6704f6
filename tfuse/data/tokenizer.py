"""Tokenizers: a BERT WordPiece or a causal LM's byte-level BPE trained on texts (offline and
deterministic), and the framing of a causal LM's sequences. The tokenizer that given parents
share is read by their family (``tfuse.arch.shared_tokenizer``): data sits below the families."""
from __future__ import annotations

from tfuse.errors import TfuseError

SPECIAL = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
BPE_SPECIAL = ["<|endoftext|>", "<pad>"]  # begins (and ends) every document; padding


def train_tokenizer(texts: list[str], vocab_size: int):
    """A lower-cased BERT WordPiece tokenizer trained on ``texts`` (offline, deterministic)."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import BertTokenizerFast

    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece()
    trainer = trainers.WordPieceTrainer(vocab_size=vocab_size, special_tokens=SPECIAL, show_progress=False)
    tok.train_from_iterator(texts, trainer)
    # The trainer breaks ties between equally frequent pieces in a run-dependent order: give the
    # ids in a canonical order (specials, then sorted) so that every parent gets the same ids.
    learned = sorted(t for t in tok.get_vocab() if t not in SPECIAL)
    tok.model = models.WordPiece({t: i for i, t in enumerate(SPECIAL + learned)}, unk_token="[UNK]")
    cls_id, sep_id = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1", special_tokens=[("[CLS]", cls_id), ("[SEP]", sep_id)]
    )
    return BertTokenizerFast(
        tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]", sep_token="[SEP]",
        mask_token="[MASK]", do_lower_case=True,
    )


def train_bpe(texts: list[str], vocab_size: int):
    """A byte-level BPE (GPT-2's scheme) trained on ``texts``: offline and deterministic, every
    byte representable, ``<|endoftext|>`` as beginning/end and ``<pad>`` as padding."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=BPE_SPECIAL, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=BPE_SPECIAL[0], eos_token=BPE_SPECIAL[0],
                                   pad_token=BPE_SPECIAL[1])


def causal_framing(tokenizer) -> None:
    """A causal LM's sequences start with ``bos_token`` and are padded with ``pad_token`` (which
    the attention mask hides): checkpoints without them (GPT-2's) use ``eos_token`` for both."""
    if tokenizer.eos_token is None and (tokenizer.bos_token is None or tokenizer.pad_token is None):
        raise TfuseError("the parents' tokenizer has no bos, eos or pad token; a causal LM's sequences start with "
                         "bos_token and are padded with pad_token: set them and save the tokenizer again")
    if tokenizer.bos_token is None:
        tokenizer.bos_token = tokenizer.eos_token
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
