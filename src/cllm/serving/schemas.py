"""The OpenAI request bodies the server accepts, validated strictly (a string is not a number),
with the fields it does not implement refused when they would change the answer."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from cllm.errors import CllmError


class RequestError(CllmError):
    """A refused request: its one-line message and the field it is about (the error's `param`)."""

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


class _Strict(BaseModel):
    # Unknown fields are ignored (clients send many); known ones must have the right JSON type.
    model_config = ConfigDict(strict=True, extra="ignore")

    @model_validator(mode="before")
    @classmethod
    def _null_is_absent(cls, data):
        """`"stream": null` means what leaving `stream` out means (OpenAI's clients and others send it)."""
        return {key: value for key, value in data.items() if value is not None} if isinstance(data, dict) else data


def _joined(content: str | list[TextPart]) -> str:
    return content if isinstance(content, str) else "".join(part.text for part in content)


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class Message(_Strict):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart]

    @property
    def text(self) -> str:
        return _joined(self.content)


class Prediction(_Strict):
    """OpenAI's Predicted Outputs: text the answer is expected to be close to (a file to edit)."""

    type: Literal["content"]
    content: str | list[TextPart]

    @property
    def text(self) -> str:
        return _joined(self.content)


class StreamOptions(_Strict):
    include_usage: bool = False


class _Generation(_Strict):
    model: str
    max_tokens: int | None = Field(None, ge=0)  # 0: only with echo (the prompt scored, nothing generated)
    max_completion_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, allow_inf_nan=False)
    top_p: float | None = Field(None, gt=0, le=1, allow_inf_nan=False)
    top_k: int | None = Field(None, ge=-1)  # not OpenAI's; vLLM and llama.cpp take it too, -1 (vLLM's) is off
    seed: int | None = Field(None, ge=0, lt=2**63)
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = 1
    prediction: Prediction | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict | None = None
    # Refused rather than ignored: each would change what the client gets back.
    tools: list | None = None
    tool_choice: str | dict | None = None
    functions: list | None = None
    function_call: str | dict | None = None
    response_format: dict | None = None

    @model_validator(mode="after")
    def _supported(self):
        if self.top_k == -1:
            self.top_k = 0
        for name in ("tools", "functions"):
            if getattr(self, name):
                raise ValueError(f"{name}: not supported: this server does no tool or function calling")
        for name in ("tool_choice", "function_call"):
            if getattr(self, name) not in (None, "none"):
                raise ValueError(f"{name}: not supported: this server does no tool or function calling")
        if self.response_format is not None and self.response_format.get("type") != "text":
            raise ValueError("response_format: only {\"type\": \"text\"} is supported (no JSON mode or schema)")
        if self.n != 1:
            raise ValueError("n: only n = 1 is supported")
        if self.max_tokens == 0 and not getattr(self, "echo", False):
            raise ValueError("max_tokens: must be at least 1 (0 only with echo on /v1/completions)")
        for name in ("presence_penalty", "frequency_penalty"):
            if getattr(self, name) not in (None, 0):
                raise ValueError(f"{name}: not supported (only 0)")
        if self.logit_bias:
            raise ValueError("logit_bias: not supported")
        if isinstance(self.stop, list) and len(self.stop) > 4:
            raise ValueError("stop: at most 4 sequences")
        return self

    @property
    def stop_strings(self) -> list[str]:
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)

    @property
    def token_limit(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    @property
    def top_logprobs_wanted(self) -> int | None:
        """How many top tokens to report beside each generated token's logprob (None: no logprobs)."""
        return None

    @property
    def prompt_logprobs_wanted(self) -> int | None:
        """The same for the prompt's tokens (echo)."""
        return None


class ChatCompletionRequest(_Generation):
    messages: list[Message] = Field(min_length=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)

    @model_validator(mode="after")
    def _logprobs(self):
        if self.top_logprobs is not None and not self.logprobs:
            raise ValueError("top_logprobs: needs logprobs: true")
        return self

    @property
    def top_logprobs_wanted(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None


MAX_PROMPTS = 16  # prompts in one /v1/completions request


class CompletionRequest(_Generation):
    # OpenAI's four forms: a string, token ids, and a batch of either
    prompt: str | list[str] | list[int] | list[list[int]]
    echo: bool = False
    logprobs: int | None = Field(None, ge=0, le=5)  # the legacy API's: how many top tokens, 0: the chosen only
    suffix: str | None = None

    @model_validator(mode="after")
    def _prompts(self):
        if not 1 <= len(self.prompts) <= MAX_PROMPTS:
            raise ValueError(f"prompt: give 1 to {MAX_PROMPTS} prompts")
        if len(self.prompts) > 1 and self.stream:
            raise ValueError("prompt: stream one prompt at a time (a batch of prompts is answered whole)")
        if self.echo and self.stream:
            raise ValueError("echo: not with stream (ask without stream)")
        if self.suffix:
            raise ValueError("suffix: not supported")
        return self

    @property
    def top_logprobs_wanted(self) -> int | None:
        return self.logprobs

    @property
    def prompt_logprobs_wanted(self) -> int | None:
        return self.logprobs if self.echo else None

    @property
    def prompts(self) -> list[str | list[int]]:
        """Each prompt: a text, or token ids."""
        if isinstance(self.prompt, str):
            return [self.prompt]
        if self.prompt and all(isinstance(item, int) for item in self.prompt):
            return [list(self.prompt)]
        return list(self.prompt)


def parse(model: type[_Strict], body: bytes):
    """The validated request, or CllmError with one readable line (the 400's message)."""
    try:
        return model.model_validate_json(body)
    except ValidationError as exc:
        error = exc.errors()[0]
        where = ".".join(str(part) for part in error["loc"])
        message = error["msg"].removeprefix("Value error, ")
        if error["type"] == "json_invalid":
            raise RequestError(f"the body is not valid JSON: {error.get('ctx', {}).get('error', message)}") from None
        param = where or (message.split(":")[0] if ":" in message else None)  # checks across fields name theirs
        raise RequestError(f"{where}: {message}" if where and not message.startswith(where) else message,
                           param) from None
