"""OpenAI's two logprobs formats (chat's `content` list, the legacy completions' parallel lists)
over the target's logprobs that the decoders report (cllm.decoding.logprobs)."""

from __future__ import annotations

from functools import lru_cache

from cllm.decoding.logprobs import TokenLogprob


class TokenStrings:
    """Each token's text and raw bytes. Byte-level BPE tokens are byte sequences, so a token that
    holds part of a UTF-8 character gets its real bytes (its text shows U+FFFD), as OpenAI's `bytes`."""

    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer
        backend = getattr(tokenizer, "backend_tokenizer", None)
        self.byte_level = type(getattr(backend, "decoder", None)).__name__ == "ByteLevel"
        self.text = lru_cache(maxsize=65536)(self._text)
        self.bytes = lru_cache(maxsize=65536)(self._bytes)

    def _text(self, token_id: int) -> str:
        return self.tokenizer.decode([token_id])

    def _bytes(self, token_id: int) -> list[int]:
        if self.byte_level:
            piece = self.tokenizer.convert_ids_to_tokens(token_id)
            table = _byte_values()
            if piece is not None and all(c in table for c in piece):
                return [table[c] for c in piece]
        return list(self._text(token_id).encode())


@lru_cache(maxsize=1)
def _byte_values() -> dict[str, int]:
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    return {char: byte for byte, char in bytes_to_unicode().items()}


def chat_content(strings: TokenStrings, entries: list[TokenLogprob]) -> list[dict]:
    """Chat's `logprobs.content`: one object per token, its top alternatives inside."""

    def one(token: int, logprob: float) -> dict:
        return {"token": strings.text(token), "logprob": logprob, "bytes": strings.bytes(token)}

    return [one(e.token, e.logprob) | {"top_logprobs": [one(i, v) for i, v in e.top]} for e in entries]


def completion_logprobs(strings: TokenStrings, token_ids: list[int], entries: list[TokenLogprob | None],
                        offset: int = 0) -> dict:
    """The legacy API's parallel lists over `token_ids`; an entry None (the prompt's first token)
    has no logprob. `text_offset` counts characters from `offset` on, each token's text after
    the ones before."""
    tokens = [strings.text(token) for token in token_ids]
    offsets = []
    for text in tokens:
        offsets.append(offset)
        offset += len(text)
    return {
        "tokens": tokens,
        "token_logprobs": [e.logprob if e is not None else None for e in entries],
        "top_logprobs": [{strings.text(i): v for i, v in e.top} if e is not None else None for e in entries],
        "text_offset": offsets,
    }
