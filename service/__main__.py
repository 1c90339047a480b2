"""`python -m service`: serve the configured bundle with uvicorn (settings from GENREC_* env vars)."""
from __future__ import annotations

import logging

from service.app import create_app
from service.config import Settings
from service.server import serve


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    settings = Settings()
    # One worker process: the batcher only batches what one process sees; scale out with replicas.
    serve(create_app(settings), settings)


if __name__ == "__main__":
    main()
