"""`python -m services.predictor [UVICORN OPTIONS]`: the predictor under uvicorn, its settings checked first.

With `--workers`, uvicorn's parent never loads the app, and it starts a worker again each time one dies: a wrong
setting had each worker exit as it started, naming the variable, and the parent start another, for ever."""

from __future__ import annotations

import sys

import uvicorn

from shared.settings import settings_for

FACTORY = "services.predictor.app:create_app"


def main() -> None:
    settings_for("predictor")
    uvicorn.main.main(args=["--factory", FACTORY, *sys.argv[1:]], prog_name="python -m services.predictor")


if __name__ == "__main__":
    main()
