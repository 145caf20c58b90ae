"""The word-level tokenizer of the embedded toy and the tiny test families (digits one per token)."""
from __future__ import annotations

import transformers as T
from tokenizers import Tokenizer, models, pre_tokenizers, trainers


def word_tokenizer(specials: list[str], words, *, additional: list[str] | None = None,
                   **kwargs) -> T.PreTrainedTokenizerFast:
    """A word-level tokenizer: ids 0, 1 are <unk>, <pad>, then `specials`, then `words` as trained.

    additional: the additional special tokens (default: all of `specials`); kwargs go to
    PreTrainedTokenizerFast (chat_template, bos/eos tokens, extra_special_tokens, padding side).
    """
    tok = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Whitespace(), pre_tokenizers.Digits(individual_digits=True)])
    trainer = trainers.WordLevelTrainer(special_tokens=["<unk>", "<pad>", *specials])
    tok.train_from_iterator(list(words), trainer)
    return T.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", pad_token="<pad>",
                                     additional_special_tokens=specials if additional is None else additional, **kwargs)
