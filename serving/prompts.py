"""How the text endpoints (/v1/completions, /tokenize) read a prompt into the tokens the model sees.

A prompt is text or token ids. Text is read as the exported transformers tokenizer
(sharing/hf_export.py) and vLLM read it: a special token's name ("<|bos|>") is that
token, so a harness that decodes its token ids to text and sends the text gets the
same ids back. Chat messages never go through here: a user's "<|bos|>" stays text.

Every document the model was trained on starts with <|bos|>, so a prompt without one
is read after one (`add_special_tokens`, vLLM's name for the switch, on by default);
that token is the server's, not the prompt's: echo and /tokenize with
add_special_tokens false leave it out, and the prompt's first token is scored given
it. A harness that counts the tokens it sent (lm-evaluation-harness's local-completions)
so finds its continuation where it put it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from nanochat.conversation import BOS, END_OF_ANSWER, chat_template
from nanochat.tokenizer import Tokenizer
from serving.api_request import ApiError


@dataclass
class Prompt:
    tokens: list[int]  # what the model reads
    added: int  # leading tokens the server put before the client's (0 or 1: the <|bos|>)
    shown: str  # the client's prompt as text (what echo repeats)

    @property
    def own(self) -> list[int]:
        """The client's tokens."""
        return self.tokens[self.added :]


def read_prompt(tokenizer: Tokenizer, prompt: str | list[int], add_bos: bool, where: str) -> Prompt:
    """The Prompt for text or token ids; ApiError (400, naming `where`) for ids outside the vocabulary
    or an empty list of ids."""
    if isinstance(prompt, str):
        own, shown = encode_text(tokenizer, prompt), prompt
    else:
        check_ids(tokenizer, prompt, where)
        own, shown = list(prompt), tokenizer.decode(prompt)
    bos = tokenizer.get_bos_token_id()
    added = [bos] if add_bos and own[:1] != [bos] else []
    if not added and not own:
        raise ApiError(400, f"{where} is empty (with add_special_tokens false, nothing precedes it)", where)
    return Prompt(added + own, len(added), shown)


def encode_text(tokenizer: Tokenizer, text: str) -> list[int]:
    """Ids of `text`, special-token names becoming those tokens and the rest ordinary text."""
    specials = tokenizer.get_special_tokens()
    ids: list[int] = []
    for i, piece in enumerate(special_names(tokenizer).split(text)):
        if i % 2:  # split() puts each name it cut at between the texts around it
            ids.append(specials[piece])
        elif piece:
            ids += tokenizer.encode(piece)
    return ids


def special_names(tokenizer: Tokenizer) -> re.Pattern:
    # longest first, so no name is cut at a shorter one it starts with
    names = sorted(tokenizer.get_special_tokens(), key=len, reverse=True)
    return re.compile("(" + "|".join(map(re.escape, names)) + ")")


def check_ids(tokenizer: Tokenizer, ids: list[int], where: str) -> None:
    vocab = tokenizer.get_vocab_size()
    bad = next((i for i, token in enumerate(ids) if not 0 <= token < vocab), None)
    if bad is not None:
        raise ApiError(400, f"{where}[{bad}] is token id {ids[bad]}, outside the vocabulary [0, {vocab})", where)


def tokenizer_info(tokenizer: Tokenizer, context: int) -> dict:
    """GET /tokenizer_info as vLLM answers it (the fields lm-evaluation-harness's RemoteTokenizer reads)."""
    return {
        "tokenizer_class": "nanochat",
        "bos_token": BOS,
        "eos_token": END_OF_ANSWER,  # where an answer ends, as the exported tokenizer_config.json says
        "pad_token": BOS,
        "model_max_length": context,
        "vocab_size": tokenizer.get_vocab_size(),
        "chat_template": chat_template(),  # the one the exported tokenizer_config.json holds
    }
