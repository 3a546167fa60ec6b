"""One decoder and its settings, as written on the command line: `hf`, `ar`, `jacobi:N[:INIT[:G]]`,
`lookahead:W:N:G[:D]`, `hf-pld[:K]` (transformers' prompt-lookup decoding), `hf-assisted`
(transformers' assisted generation with a draft model) and `llamacpp` (llama.cpp on the model's
GGUF file, a reference row of `cllm bench`)."""

from __future__ import annotations

from dataclasses import dataclass

from cllm.errors import CllmError

INIT_STRATEGIES = ("prompt", "repeat", "pad", "lookup")
KINDS = ("hf", "ar", "jacobi", "lookahead", "hf-pld", "hf-assisted", "llamacpp")
USAGE = "use hf, ar, jacobi:N[:INIT[:G]], lookahead:W:N:G[:D], hf-pld[:K], hf-assisted or llamacpp"


@dataclass(frozen=True)
class DecoderSpec:
    kind: str
    block_size: int = 1  # jacobi: n
    init: str = "prompt"  # jacobi: the initial guess
    window: int = 5  # lookahead: W
    ngram: int = 4  # lookahead, and jacobi's candidates: N
    candidates: int | None = None  # n-grams verified per step; None: 5 for lookahead, 0 for jacobi
    draft: int = 0  # lookahead: D, the prompt-lookup draft's length (0: none)
    lookup_tokens: int = 10  # hf-pld: prompt_lookup_num_tokens

    @property
    def verified(self) -> int:
        """Candidates per step (G)."""
        return self.candidates if self.candidates is not None else (5 if self.kind == "lookahead" else 0)

    @property
    def label(self) -> str:
        if self.kind == "jacobi":
            label = f"jacobi:{self.block_size}"
            if self.verified:
                return f"{label}:{self.init}:{self.verified}"
            return label + ("" if self.init == "prompt" else f":{self.init}")
        if self.kind == "lookahead":
            return f"lookahead:{self.window}:{self.ngram}:{self.verified}" + (f":{self.draft}" if self.draft else "")
        if self.kind == "hf-pld":
            return f"hf-pld:{self.lookup_tokens}"
        return self.kind

    def decoder_kwargs(self) -> dict:
        """The keyword arguments of this decoder's function beyond the common ones."""
        if self.kind == "jacobi":
            extra = {"candidates": self.verified, "ngram": self.ngram} if self.verified else {}
            return {"block_size": self.block_size, "init": self.init} | extra
        if self.kind == "lookahead":
            return {"window": self.window, "ngram": self.ngram, "candidates": self.verified, "draft": self.draft}
        if self.kind == "hf-pld":
            return {"lookup_tokens": self.lookup_tokens}
        return {}

    @classmethod
    def parse(cls, text: str) -> DecoderSpec:
        kind, *fields = text.split(":")
        if kind not in KINDS:
            raise CllmError(f"unknown decoder {text!r}; {USAGE}")
        if kind == "jacobi":
            if len(fields) > 3:
                raise CllmError(f"too many fields in {text!r}; jacobi:N[:INIT[:G]]")
            block_size = _number(fields[0] if fields else "16", text, "block size")
            init = fields[1] if len(fields) > 1 and fields[1] else "prompt"
            if init not in INIT_STRATEGIES:
                raise CllmError(f"unknown initial guess {init!r} in {text!r}; choose one of {', '.join(INIT_STRATEGIES)}")
            candidates = _number(fields[2], text, "number of candidates") if len(fields) > 2 else 0
            return cls("jacobi", block_size, init, candidates=candidates or None)
        if kind == "lookahead":
            if len(fields) not in (0, 3, 4):
                raise CllmError("lookahead takes window, n-gram size, candidates and optionally a draft length: "
                                f"lookahead:W:N:G[:D], got {text!r}")
            if not fields:
                return cls("lookahead")
            names = ("window", "n-gram size", "candidates", "draft length")
            window, ngram, candidates, *draft = (_number(f, text, name) for f, name in zip(fields, names))
            if ngram < 2:
                raise CllmError(f"the n-gram size must be >= 2 in {text!r}")
            return cls("lookahead", window=window, ngram=ngram, candidates=candidates, draft=draft[0] if draft else 0)
        if kind == "hf-pld":
            if len(fields) > 1:
                raise CllmError(f"hf-pld takes one field, the lookup length: hf-pld[:K], got {text!r}")
            return cls("hf-pld", lookup_tokens=_number(fields[0], text, "lookup length") if fields else 10)
        if fields:
            raise CllmError(f"decoder {kind} takes no settings, got {text!r}")
        return cls(kind)


def _number(text: str, spec: str, what: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise CllmError(f"bad {what} in {spec!r}") from None
    if value < 1:
        raise CllmError(f"the {what} must be >= 1 in {spec!r}")
    return value
