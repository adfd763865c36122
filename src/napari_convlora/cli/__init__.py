"""``napari-convlora``: the command line. One module per command family (``train``, ``adapt``, ``blockwise``,
``demo``; ``main`` builds the parser and runs predict, evaluate, info and export). Nothing here imports torch until
a command runs."""

from .main import build_parser, console_main, main

__all__ = ["build_parser", "console_main", "main"]
