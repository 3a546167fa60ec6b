"""What the server is configured with (`ServeSettings`) and what every handler needs (`Service`)."""

from __future__ import annotations

from dataclasses import dataclass

from cllm.decoding.sampling import GREEDY, Sampling
from cllm.serving.engine import Engine
from cllm.serving.logprobs import TokenStrings
from cllm.serving.metrics import Metrics


@dataclass(frozen=True)
class ServeSettings:
    served_name: str
    decoder_label: str
    default_max_tokens: int = 256
    sampling: Sampling = GREEDY  # for requests that name no temperature / top_p / top_k
    request_timeout: float = 300.0
    max_body_bytes: int = 1 << 20  # checked before the body is parsed (or tokenized): 413 above it
    api_key: str | None = None  # when set, /v1 needs `Authorization: Bearer <api_key>` (401 otherwise)
    cors_origins: tuple[str, ...] = ()  # browser origins allowed to call the API ("*": any)
    keepalive_seconds: float = 15.0  # an SSE comment after this long without a chunk (proxies drop idle streams)

    @property
    def fingerprint(self) -> str:
        """OpenAI's system_fingerprint: what produced the answer (the decoder shapes speed, not text)."""
        return "cllm-" + "".join(c if c.isalnum() else "_" for c in self.decoder_label)


@dataclass
class Service:
    """What every handler needs: the engine, the settings, the metrics."""

    engine: Engine
    settings: ServeSettings
    metrics: Metrics
    strings: TokenStrings  # token texts and bytes, for logprobs
    latency_average: float = 1.0  # seconds, a running mean for Retry-After
