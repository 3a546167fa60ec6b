"""Token ids to the text a client sees: incremental detokenization and stop strings."""

from __future__ import annotations

from collections.abc import Sequence


class TextAssembler:
    """Turns a growing list of token ids into released text.

    The text grows by the tokenizers library's incremental decoder (`DecodeStream`: each token is
    decoded once, so a long answer costs linear time) where the tokenizer has one and decodes
    without clean-up; otherwise the whole output is decoded again for every new token. Text is
    held back while it ends in an unfinished UTF-8 character or could still turn into a stop
    string; a stop string ends the text before it. `flush` decodes the whole output once, so the
    final text is exactly `tokenizer.decode(token_ids, skip_special_tokens=True)`.
    """

    def __init__(self, tokenizer, stop: Sequence[str] = ()) -> None:
        self.tokenizer = tokenizer
        self.stop = [s for s in stop if s]
        self.token_ids: list[int] = []
        self.text = ""  # what the tokens so far decode to (an unfinished character left out)
        self.released = 0  # characters of the text already handed out
        self.stopped = False
        self._stream = _decode_stream(tokenizer)

    def add(self, token_ids: Sequence[int]) -> str:
        """The new text these tokens make releasable ('' if none yet)."""
        if self.stopped:
            return ""
        self.token_ids.extend(token_ids)
        self.text = self._grown(token_ids)
        cut = self._stop_at(self.text)
        if cut is not None:
            self.stopped = True
            return self._release(self.text, cut)
        return self._release(self.text, self._safe_end(self.text))

    def flush(self) -> str:
        """Everything left, at the end of the output."""
        if self.stopped:
            return ""
        text = self.tokenizer.decode(self.token_ids, skip_special_tokens=True)
        cut = self._stop_at(text)
        self.stopped = cut is not None
        return self._release(text, len(text) if cut is None else cut)

    def _grown(self, token_ids: Sequence[int]) -> str:
        if self._stream is not None:
            if token_ids:
                piece = self._stream.step(self.tokenizer.backend_tokenizer, list(token_ids))
                return self.text + (piece or "")
            return self.text
        return self.tokenizer.decode(self.token_ids, skip_special_tokens=True).rstrip("\ufffd")

    def _stop_at(self, text: str) -> int | None:
        if not self.stop:
            return None
        longest = max(map(len, self.stop))
        start = max(0, self.released - longest + 1)
        found = [i for i in (text.find(s, start) for s in self.stop) if i >= 0]
        return min(found) if found else None

    def _safe_end(self, text: str) -> int:
        """Where text stops being releasable: the start of a suffix that begins some stop string."""
        end = len(text)
        for stop in self.stop:
            for k in range(min(len(stop) - 1, len(text)), 0, -1):
                if text.endswith(stop[:k]):
                    end = min(end, len(text) - k)
                    break
        return end

    def _release(self, text: str, end: int) -> str:
        if end <= self.released:
            return ""
        piece = text[self.released : end]
        self.released = end
        return piece


def _decode_stream(tokenizer):
    """A `tokenizers.decoders.DecodeStream` when it decodes as `tokenizer.decode` does, else None."""
    try:
        from tokenizers.decoders import DecodeStream
    except ImportError:
        return None
    cleans_up = getattr(tokenizer, "clean_up_tokenization_spaces", True)  # decode() edits spaces: the stream would not
    if getattr(tokenizer, "backend_tokenizer", None) is None or cleans_up:
        return None
    return DecodeStream(skip_special_tokens=True)
