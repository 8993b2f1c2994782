"""A small byte-level BPE, trained with the ``tokenizers`` library and saved beside the model.

Byte-level: every string round-trips exactly (``decode(encode(s)) == s``), whatever its script. Before the
byte-level split, digits are split one by one (``"40213"`` is five tokens), so numbers in the retrieval
tasks are copied digit by digit rather than through arbitrary merges. Two special tokens:
:data:`EOS` ends every document and task answer, :data:`PAD` pads batches (never a training target).

Saved with ``PreTrainedTokenizerFast.save_pretrained`` (``tokenizer.json`` and ``tokenizer_config.json``),
so ``transformers.AutoTokenizer.from_pretrained(folder)`` loads it too.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING

from attnlab.organisms.errors import CheckpointError, ConfigError

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerFast

EOS = "<|endoftext|>"
PAD = "<|pad|>"
#: the byte alphabet plus the special tokens: the smallest vocabulary a byte-level BPE can have
MIN_VOCAB = 256 + 2


def train_tokenizer(texts: Iterable[str], vocab_size: int, min_frequency: int = 2) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE of ``vocab_size`` tokens (256 bytes, 2 special tokens, the rest merges) on
    ``texts``. Deterministic for the same texts in the same order."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    if not isinstance(vocab_size, int) or vocab_size < MIN_VOCAB:
        raise ConfigError(f"tokenizer vocab_size={vocab_size!r}: expected an integer >= {MIN_VOCAB}")
    if min_frequency < 1:
        raise ConfigError(f"tokenizer min_frequency={min_frequency}: expected >= 1")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=[EOS, PAD],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return wrap(tok)


def wrap(tok: object) -> PreTrainedTokenizerFast:
    """A ``tokenizers.Tokenizer`` as a ``PreTrainedTokenizerFast`` with attnlab's special tokens."""
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS, pad_token=PAD, bos_token=None)


def save_tokenizer(tokenizer: PreTrainedTokenizerFast, folder: str | Path) -> None:
    """Write the tokenizer files into ``folder`` (created if missing)."""
    Path(folder).mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(str(folder))


def load_tokenizer(folder: str | Path) -> PreTrainedTokenizerFast:
    """Load a tokenizer saved by :func:`save_tokenizer` from a local folder (never from a hub)."""
    from tokenizers import Tokenizer

    path = Path(folder) / "tokenizer.json"
    if not path.is_file():
        raise CheckpointError(
            f"no tokenizer.json in {str(folder)!r}: expected a folder written by attnlab train"
        )
    return wrap(Tokenizer.from_file(str(path)))


def encode(tokenizer: PreTrainedTokenizerFast, text: str) -> list[int]:
    """Token ids of ``text``, no special tokens added; a special token's spelling inside ``text`` is
    encoded as plain text (so ``decode(encode(s)) == s`` for every string)."""
    return list(tokenizer(text, add_special_tokens=False, split_special_tokens=True)["input_ids"])


def encode_batch(tokenizer: PreTrainedTokenizerFast, texts: list[str]) -> list[list[int]]:
    """:func:`encode` of each text, batched (in the tokenizer's Rust code)."""
    if not texts:
        return []
    out = tokenizer(texts, add_special_tokens=False, split_special_tokens=True)["input_ids"]
    return [list(ids) for ids in out]


def decode(tokenizer: PreTrainedTokenizerFast, ids: Iterable[int]) -> str:
    """The text of ``ids``, special tokens dropped, spaces kept exactly as encoded."""
    return str(tokenizer.decode(list(ids), skip_special_tokens=True, clean_up_tokenization_spaces=False))
