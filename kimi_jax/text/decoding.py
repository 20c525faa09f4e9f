"""How a run picks each token and when it stops: the object the engine's generate loop is given.

Stopping, checked after every token, first rule that holds:

* ``eos``: the token is the end-of-sequence token (config.json ``eos_token_id`` and the
  tokenizer's ``eos_token``), unless ``generate.ignore_eos``;
* ``end_of_turn``: for a chat prompt, the token the chat template ends a turn with (also not with
  ``generate.ignore_eos``);
* ``stop_string``: the generated text (special tokens left out) contains one of ``generate.stop``;
* ``max_new_tokens``: the run generated that many tokens.

Every rule is a function of the generated tokens alone, so a resumed run, a replay and verify
reach the same verdict.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from kimi_jax.text.sampling import Sampling, greedy_token, sample_token
from kimi_jax.text.tokenizer import Tokenizer

MAX_NEW_TOKENS = "max_new_tokens"


@dataclasses.dataclass(frozen=True)
class Decoding:
    sampling: Sampling | None = None  # None: greedy
    stop_tokens: tuple[tuple[int, str], ...] = ()  # (token id, reason), e.g. (163585, "eos")
    stop_strings: tuple[str, ...] = ()
    tokenizer: Tokenizer | None = None  # needed for stop strings

    def choose(self, step: int, logits: np.ndarray) -> int:
        if self.sampling is None:
            return greedy_token(logits)
        return sample_token(logits, self.sampling, step)[0]

    def stop_reason(self, generated: list[int]) -> dict[str, Any] | None:
        """Why generation stops after ``generated`` (the tokens so far), or None to go on."""
        if not generated:
            return None
        for token, reason in self.stop_tokens:
            if generated[-1] == token:
                return {"reason": reason, "token": token}
        if self.stop_strings and self.tokenizer is not None:
            text = self.tokenizer.decode(generated, skip_special=True)
            for string in self.stop_strings:
                if string in text:
                    return {"reason": "stop_string", "string": string}
        return None

    def final_reason(self, generated: list[int]) -> dict[str, Any]:
        """Why a run that generated ``generated`` ended: a stop rule, else the token budget."""
        return self.stop_reason(generated) or {"reason": MAX_NEW_TOKENS}

    def settings(self) -> dict[str, Any]:
        """The stop rules as the ledger records them."""
        return {"tokens": [[t, r] for t, r in self.stop_tokens], "strings": list(self.stop_strings)}
