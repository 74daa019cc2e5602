"""Serving: an OpenAI-compatible HTTP server over the decode engine (``l2pd serve``; ``pip install
'l2pd[serve]'`` for FastAPI, uvicorn and prometheus_client).

``protocol`` checks request bodies, ``app`` holds the routes and the streaming, ``metrics`` the Prometheus
registry; ``serve`` starts engines and uvicorn.
"""

from __future__ import annotations

from typing import Any


def serve(engines: list[Any], tokenizer: Any, model_name: str, host: str = "127.0.0.1", port: int = 8000,
          max_queue: int = 256, request_timeout: float = 600.0, default_max_tokens: int = 256,
          drain: float = 30.0, log_level: str = "info") -> None:
    """Serve until SIGINT/SIGTERM: then stop accepting, let open requests finish for up to ``drain`` seconds,
    cancel the rest and exit."""
    import signal
    import threading

    import uvicorn

    from .app import Server, build_app

    server = Server(engines, tokenizer, model_name, max_queue, request_timeout, default_max_tokens, drain)
    config = uvicorn.Config(build_app(server), host=host, port=port, log_level=log_level,
                            timeout_graceful_shutdown=drain)
    if threading.current_thread() is threading.main_thread():
        # uvicorn drains on SIGTERM, then raises the signal again for the handler it found: a no-op here, so a
        # drained server exits with status 0 rather than dying of the signal
        signal.signal(signal.SIGTERM, lambda *_: None)
    uvicorn.Server(config).run()
