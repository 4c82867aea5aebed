"""`python -m gpu_service`: serve on HOST:PORT from the settings (`python -m gpu_service models ...`: the model store)."""

from __future__ import annotations

import sys

import uvicorn
from pydantic import ValidationError

from gpu_service.errors import ConfigurationError
from gpu_service.settings import Settings, describe_error


def main(argv: list[str] | None = None) -> int:
    """Start uvicorn with the app; a misconfiguration exits 2 with one line that names the setting."""
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["models"]:
        from gpu_service.models.cli import main as models_main

        return models_main(argv[1:])
    if argv:
        print(f"gpu_service: unknown arguments {argv}; usage: python -m gpu_service [models fetch|verify|list [ENGINE]]",
              file=sys.stderr)
        return 2
    try:
        settings = Settings()
        from gpu_service.app import create_app

        app = create_app(settings)
    except ValidationError as exc:
        print(f"gpu_service: {describe_error(exc)}", file=sys.stderr)
        return 2
    except ConfigurationError as exc:
        print(f"gpu_service: {exc}", file=sys.stderr)
        return 2
    uvicorn.run(app, host=settings.host, port=settings.port, log_config=None, access_log=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
