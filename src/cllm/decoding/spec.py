"""One decoder and its settings, as written on the command line: `hf`, `ar`, `jacobi:N[:INIT[:G]]`,
`drafted:N[:INIT[:G]]` (Jacobi verified by the model, its guesses drafted by a second one),
`lookahead:W:N:G[:D]`, `hf-pld[:K]` (transformers' prompt-lookup decoding), `hf-assisted`
(transformers' assisted generation with a draft model) and `llamacpp` (llama.cpp on the model's
GGUF file, a reference row of `cllm bench`).

Every decoder kind is registered here once (`KINDS`): its spec parser, where its function lives
and what it supports. This module imports no torch, so the CLI builds its choices from it;
`cllm.decoding.api.decode` is the one place that turns a spec into a call.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from cllm.errors import CllmError

INIT_STRATEGIES = ("prompt", "repeat", "pad", "lookup")


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
    def row_columns(self) -> int:
        """Columns one row feeds per step at full width (a server's column budget narrows it)."""
        if self.kind == "lookahead":
            return 1 + (self.window + self.verified) * (self.ngram - 1) + self.draft
        return self.block_size if self.kind in ("jacobi", "drafted") else 1

    @property
    def kind_info(self) -> DecoderKind:
        if self.kind not in KINDS:
            raise CllmError(f"unknown decoder {self.kind!r}; {USAGE}")
        return KINDS[self.kind]

    @property
    def label(self) -> str:
        if self.kind in ("jacobi", "drafted"):
            label = f"{self.kind}:{self.block_size}"
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
        if self.kind in ("jacobi", "drafted"):
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
        return KINDS[kind].parse(text, fields)


@dataclass(frozen=True)
class DecoderKind:
    """A registered decoder: its name, how its spec is parsed and the function that runs it.

    function: "module:attribute" of the decoder function, imported only when it decodes (None:
        not a function of a torch model, such as llamacpp). per_row_seeds: the function takes one
        seed per row (cllm's decoders) rather than one for the batch (transformers' generate).
    servable: lets rows join and leave a running batch (a `BatchControl`). compilable: has the
        compiled path. batched: decodes several prompts in one call. needs_draft: verifies the
        drafts of a second model (`draft_model`).
    """

    name: str
    parse: Callable[[str, list[str]], DecoderSpec]
    function: str | None
    per_row_seeds: bool = True
    servable: bool = False
    compilable: bool = False
    batched: bool = True
    needs_draft: bool = False


def _parse_plain(text: str, fields: list[str]) -> DecoderSpec:
    if fields:
        raise CllmError(f"decoder {text.split(':')[0]} takes no settings, got {text!r}")
    return DecoderSpec(text)


def _parse_jacobi(text: str, fields: list[str], kind: str = "jacobi") -> DecoderSpec:
    if len(fields) > 3:
        raise CllmError(f"too many fields in {text!r}; {kind}:N[:INIT[:G]]")
    block_size = _number(fields[0] if fields else "16", text, "block size")
    init = fields[1] if len(fields) > 1 and fields[1] else "prompt"
    if init not in INIT_STRATEGIES:
        raise CllmError(f"unknown initial guess {init!r} in {text!r}; choose one of {', '.join(INIT_STRATEGIES)}")
    candidates = _number(fields[2], text, "number of candidates") if len(fields) > 2 else 0
    return DecoderSpec(kind, block_size, init, candidates=candidates or None)


def _parse_drafted(text: str, fields: list[str]) -> DecoderSpec:
    return _parse_jacobi(text, fields, "drafted")


def _parse_lookahead(text: str, fields: list[str]) -> DecoderSpec:
    if len(fields) not in (0, 3, 4):
        raise CllmError("lookahead takes window, n-gram size, candidates and optionally a draft length: "
                        f"lookahead:W:N:G[:D], got {text!r}")
    if not fields:
        return DecoderSpec("lookahead")
    names = ("window", "n-gram size", "candidates", "draft length")
    window, ngram, candidates, *draft = (_number(f, text, name) for f, name in zip(fields, names))
    if ngram < 2:
        raise CllmError(f"the n-gram size must be >= 2 in {text!r}")
    return DecoderSpec("lookahead", window=window, ngram=ngram, candidates=candidates, draft=draft[0] if draft else 0)


def _parse_pld(text: str, fields: list[str]) -> DecoderSpec:
    if len(fields) > 1:
        raise CllmError(f"hf-pld takes one field, the lookup length: hf-pld[:K], got {text!r}")
    return DecoderSpec("hf-pld", lookup_tokens=_number(fields[0], text, "lookup length") if fields else 10)


def _number(text: str, spec: str, what: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise CllmError(f"bad {what} in {spec!r}") from None
    if value < 1:
        raise CllmError(f"the {what} must be >= 1 in {spec!r}")
    return value


KINDS: dict[str, DecoderKind] = {kind.name: kind for kind in (
    DecoderKind("ar", _parse_plain, "cllm.decoding.ar:ar", servable=True, compilable=True),
    DecoderKind("jacobi", _parse_jacobi, "cllm.decoding.jacobi:jacobi", servable=True, compilable=True),
    DecoderKind("drafted", _parse_drafted, "cllm.decoding.jacobi:drafted", servable=True, needs_draft=True),
    DecoderKind("lookahead", _parse_lookahead, "cllm.decoding.lookahead:lookahead", servable=True, compilable=True),
    DecoderKind("hf", _parse_plain, "cllm.decoding.hf:hf_generate", per_row_seeds=False),
    DecoderKind("hf-pld", _parse_pld, "cllm.decoding.hf:hf_pld", per_row_seeds=False, batched=False),
    DecoderKind("hf-assisted", _parse_plain, "cllm.decoding.hf:hf_assisted", per_row_seeds=False, batched=False,
                needs_draft=True),
    DecoderKind("llamacpp", _parse_plain, None, per_row_seeds=False, batched=False),
)}
DECODER_NAMES = tuple(name for name, kind in KINDS.items() if kind.function is not None)
SERVABLE = tuple(name for name, kind in KINDS.items() if kind.servable)
USAGE = ("use hf, ar, jacobi:N[:INIT[:G]], drafted:N[:INIT[:G]] (with a drafter), lookahead:W:N:G[:D], hf-pld[:K], "
         "hf-assisted or llamacpp")
