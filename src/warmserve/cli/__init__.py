"""The `warmserve` command line: one verb per job of the product (serve, simulate, bench,
predict, models). Each module registers its verbs on the shared app."""

from warmserve.cli import analysis, models, serving  # noqa: F401 (register the verbs)
from warmserve.cli.common import app


def main() -> None:
    app()


__all__ = ["app", "main"]
