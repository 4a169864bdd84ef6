"""What every entry point shares: `--recipe`, repeatable `--set`, and one-line errors.

A user's mistake (a bad recipe, a missing path) ends the program with a single line on stderr
and exit status 2, before any work starts; a traceback is kept for the platform's own bugs.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Callable

from pipelines.config import Recipe, RecipeError, load_recipe


class UserError(Exception):
    """Bad input from the user (paths, data, arguments): reported in one line, no traceback."""


def recipe_parser(description: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--recipe", default=None,
                        help="shipped recipe name or YAML path (default: the embedded 'local' recipe)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a recipe field, e.g. --set training.max_steps=100 (repeatable)")
    parser.add_argument("--output", default=None, help="output directory (default: from the recipe)")
    parser.add_argument("--address", default=None,
                        help="Ray cluster address (default: RAY_ADDRESS, else a local Ray)")
    return parser


def parse_recipe(args: argparse.Namespace) -> Recipe:
    return load_recipe(args.recipe, args.overrides)


def main_wrapper(main: Callable[[list[str] | None], int | None]) -> Callable[[list[str] | None], None]:
    def run(argv: list[str] | None = None) -> None:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        try:
            code = main(argv)
        except (RecipeError, UserError) as exc:
            print(f"error: {exc}", file=sys.stderr)
            sys.exit(2)
        except KeyboardInterrupt:
            print("interrupted", file=sys.stderr)
            sys.exit(130)
        sys.exit(code or 0)

    return run
