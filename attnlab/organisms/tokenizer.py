"""A small byte-level BPE, trained with the ``tokenizers`` library and saved beside the model.

Byte-level: every string round-trips exactly (``decode(encode(s)) == s``), whatever its script. Before the
byte-level split, a run of digits is cut into groups of two from the left, the first group keeping the
space before it: ``" 40213"`` is ``" 40" "21" "3"`` (:data:`DIGIT_GROUPS`), and every such group is a
token (added after the merges learned from the text, whose digits the trainer never sees). So a number is tokenized the same
way wherever it stands, and copying it is copying tokens from a hundred or so values: with single-digit
tokens (ten values, each repeated all over the context) the micro organism learned no copying at all
within its CPU budget (issue 11: answer loss stayed at ln 10 per digit). Two special tokens:
:data:`EOS` ends every document and task answer, :data:`PAD` pads batches (never a training target).

Saved with ``PreTrainedTokenizerFast.save_pretrained`` (``tokenizer.json`` and ``tokenizer_config.json``),
so ``transformers.AutoTokenizer.from_pretrained(folder)`` loads it too.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING

from attnlab.organisms.errors import CheckpointError, ConfigError

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerFast

EOS = "<|endoftext|>"
PAD = "<|pad|>"
#: the pre-tokenizer's digit rule: at most two digits per group, an optional leading space kept with it
DIGIT_GROUPS = r" ?\d{1,2}"
#: merged tokens of digit groups a trained tokenizer holds: "dd", " d", " dd" (single digits are bytes)
DIGIT_TOKENS = 100 + 10 + 100
#: the byte alphabet, the special tokens and the digit groups: the smallest vocabulary allowed
MIN_VOCAB = 256 + 2 + DIGIT_TOKENS
_NO_DIGITS = re.compile(r"\d+")


def train_tokenizer(texts: Iterable[str], vocab_size: int, min_frequency: int = 2) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE of ``vocab_size`` tokens on ``texts``: 2 special tokens, 256 bytes, merges
    learned from the texts with their digits removed, then the :data:`DIGIT_TOKENS` digit-group merges
    (``" d"``, ``" dd"``, ``"dd"``; see the module docstring), last. Deterministic for the same texts in
    the same order."""
    import json

    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

    if not isinstance(vocab_size, int) or vocab_size < MIN_VOCAB:
        raise ConfigError(f"tokenizer vocab_size={vocab_size!r}: expected an integer >= {MIN_VOCAB}")
    if min_frequency < 1:
        raise ConfigError(f"tokenizer min_frequency={min_frequency}: expected >= 1")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(DIGIT_GROUPS), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size - DIGIT_TOKENS,
        min_frequency=min_frequency,
        special_tokens=[EOS, PAD],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator((_NO_DIGITS.sub("", t) for t in texts), trainer=trainer)
    spec = json.loads(tok.to_str())
    vocab: dict[str, int] = spec["model"]["vocab"]
    merges: list[list[str]] = spec["model"]["merges"]
    space = "\u0120"  # the byte-level alphabet's spelling of " "
    digits = [str(d) for d in range(10)]
    new = [[space, d] for d in digits]  # " d" first, so that " 25" becomes " 2" + "5", then " 25"
    new += [[space + a, b] for a in digits for b in digits] + [[a, b] for a in digits for b in digits]
    for a, b in new:
        if a + b in vocab:  # the digit-free texts leave none; a guard for the contract
            raise AssertionError(f"digit group {a + b!r} learned from digit-free text")
        vocab[a + b] = len(vocab)
        merges.append([a, b])
    if len(vocab) > vocab_size:
        raise AssertionError(f"tokenizer has {len(vocab)} tokens, more than vocab_size={vocab_size}")
    return wrap(Tokenizer.from_str(json.dumps(spec)))


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
