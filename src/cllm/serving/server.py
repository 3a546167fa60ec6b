"""Running the app under uvicorn, with a shutdown that lets running requests finish."""

from __future__ import annotations

import threading
import time

import uvicorn

from cllm.serving.api import create_app
from cllm.serving.engine import Engine
from cllm.serving.settings import ServeSettings


class GracefulServer(uvicorn.Server):
    """On the first SIGINT/SIGTERM: refuse new requests (503), let the running ones finish for up
    to `grace` seconds, end the rest with an error event and [DONE], then stop. A second signal
    stops at once."""

    def __init__(self, config: uvicorn.Config, engine: Engine, grace: float) -> None:
        super().__init__(config)
        self.engine, self.grace = engine, grace
        self._draining = False

    def handle_exit(self, sig, frame) -> None:
        if self._draining:
            return super().handle_exit(sig, frame)
        self._draining = True
        self.engine.stop_accepting()
        threading.Thread(target=self._drain, args=(sig, frame), name="cllm-drain", daemon=True).start()

    def _drain(self, sig, frame) -> None:
        deadline = time.monotonic() + self.grace
        while not self.engine.idle() and time.monotonic() < deadline:
            time.sleep(0.05)
        self.engine.cancel_all("shutdown")
        while not self.engine.idle() and time.monotonic() < deadline + 5:
            time.sleep(0.05)
        time.sleep(0.2)  # the last events reach their streams before the connections close
        super().handle_exit(sig, frame)


def serve(engine: Engine, settings: ServeSettings, host: str, port: int, grace: float = 30.0,
          log_level: str = "info") -> None:
    config = uvicorn.Config(create_app(engine, settings), host=host, port=port, log_level=log_level,
                            timeout_graceful_shutdown=5, access_log=log_level == "debug")
    GracefulServer(config, engine, grace).run()
