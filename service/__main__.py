"""`python -m service`: serve the configured bundle with uvicorn (settings from GENREC_* env vars)."""
from __future__ import annotations

import logging

import uvicorn

from service.app import create_app
from service.config import Settings


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    settings = Settings()
    # One worker process: the batcher only batches what one process sees; scale out with replicas.
    uvicorn.run(create_app(settings), host=settings.host, port=settings.port, access_log=settings.access_log,
                timeout_graceful_shutdown=int(settings.drain_timeout_s) + 5)


if __name__ == "__main__":
    main()
