"""The `attribution` command line.

Each area of the package contributes its own commands from a small `cli` module, so this file
only assembles them. Heavy libraries (torch, faiss, transformers) are imported inside the
commands, which keeps `attribution --help` instant.
"""

from __future__ import annotations

import importlib
import sys

import click

from attribution import __version__
from attribution.errors import UserError

# Modules that expose `commands: list[click.Command]`, in the order they appear in --help.
COMMAND_MODULES = (
    "attribution.corpus.cli",
    "attribution.train.cli",
    "attribution.variants.cli",
    "attribution.analysis.cli",
    "attribution.report.cli",
    "attribution.workflows.cli",
)


class _Group(click.Group):
    """Turns a UserError into one `error: ...` line and exit status 2, with no traceback."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except UserError as exc:
            click.echo(f"error: {exc}", err=True)
            sys.exit(2)

    def list_commands(self, ctx):  # keep registration order
        return list(self.commands)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="attribution")
def main() -> None:
    """Value every training document of a language model inside one training run.

    \b
    Typical session:
      attribution corpus build builtin --out corpora/builtin
      attribution run --corpus builtin --out runs/demo
      attribution report runs/demo --out reports/demo
    """


def _register() -> None:
    for name in COMMAND_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name == name:  # that area has not landed yet
                continue
            raise
        for command in module.commands:
            main.add_command(command)


_register()


def entry() -> None:
    """The `attribution` console script: heavy commands get allocator settings first (see `memory`)."""
    from attribution.memory import reexec_with_reusing_malloc

    reexec_with_reusing_malloc(sys.argv[1:])
    main(prog_name="attribution")


if __name__ == "__main__":
    main(prog_name="attribution")
