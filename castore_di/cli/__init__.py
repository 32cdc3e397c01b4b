"""The ``castore`` command line.

Global options choose the services: ``--config FILE`` (or ``CASTORE_CONFIG``) with
``--blob-service``/``--directory-service`` instance names (``default`` otherwise), or URL
shorthands ``--blob-service-addr``/``--directory-service-addr``. With nothing given, the
embedded on-disk default under the user's data directory is used.

Exit codes: 0 success; 1 a runtime error (storage, integrity, not found); 2 usage or
configuration error; 3 nothing checked (``fsck``/``gc`` on a backend without a check);
130 interrupted; 141 (128 + SIGPIPE, what a shell shows for a program killed by SIGPIPE)
when the reader of standard output went away, e.g. ``castore cat … | head``: nothing is
printed then, not even a message.
"""

from __future__ import annotations

import importlib
import io
import os
import select
import sys
from collections.abc import Awaitable, Callable
from typing import TypeVar

import click

from castore_di.cli.context import CliContext, console_startup, resume_gc
from castore_di.errors import CastoreError, ConfigError, describe

__all__ = ["main", "cli", "run_async", "pass_ctx", "NothingCheckedError"]

T = TypeVar("T")

EXIT_OK = 0
EXIT_ERROR = 1
EXIT_USAGE = 2
EXIT_NOTHING_CHECKED = 3
EXIT_INTERRUPTED = 130
EXIT_CLOSED_STDOUT = 141

pass_ctx = click.make_pass_decorator(CliContext)


class NothingCheckedError(CastoreError):
    """fsck or gc found nothing it could check for a selected service (exit code 3)."""


_EPILOG = """\b
Exit codes:
  0    success
  1    runtime error: storage or integrity failure, not found, a refused
       file (fifo, socket, device) or destination (not empty, exists)
  2    usage or configuration error: bad option or digest, invalid config
  3    nothing checked: fsck or gc on a backend that has no check (or nothing
       to collect); a script can tell it from "verified"
  130  interrupted
  141  standard output was closed by its reader (e.g. `| head`), no message
Errors are one line on stderr; --verbose adds the traceback."""


# Where each command lives, so a command imports only its own module (``castore ls`` does
# not load the server or the config checker). A name missing here is found by loading
# every module in ``_load_commands``.
_COMMANDS = {
    "cat": "inspect", "check": "check", "export": "transfer", "fsck": "maintain", "gc": "maintain",
    "forget": "roots", "graph": "check", "import": "transfer", "ls": "inspect", "mount": "mount",
    "prune": "roots", "roots": "roots", "schema": "check", "serve": "serve", "stat": "inspect",
}


class _StdoutClosed(Exception):
    """Standard output's reader went away (raised instead of click's own EPIPE handling)."""


class _LazyGroup(click.Group):
    def invoke(self, ctx: click.Context) -> object:
        try:
            return super().invoke(ctx)
        except BrokenPipeError as e:
            if _stdout_closed():
                raise _StdoutClosed() from e
            raise

    def list_commands(self, ctx: click.Context) -> list[str]:
        _load_commands()
        return super().list_commands(ctx)

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        if cmd_name not in self.commands:
            module = _COMMANDS.get(cmd_name)
            if module is not None:
                importlib.import_module(f"castore_di.cli.{module}")
            if cmd_name not in self.commands:
                _load_commands()
        return super().get_command(ctx, cmd_name)


@click.group(cls=_LazyGroup, context_settings={"help_option_names": ["-h", "--help"], "auto_envvar_prefix": "CASTORE"},
             epilog=_EPILOG)
@click.option("--config", "config_path", type=click.Path(dir_okay=False), envvar="CASTORE_CONFIG",
              help="Config file (YAML, JSON or TOML). Env: CASTORE_CONFIG.")
@click.option("--blob-service", default="default", show_default=True, help="Blob service instance name.")
@click.option("--directory-service", default="default", show_default=True, help="Directory service instance name.")
@click.option("--blob-service-addr", help="Blob service URL, e.g. memory:// or grpc+http://127.0.0.1:8000.")
@click.option("--directory-service-addr", help="Directory service URL.")
@click.option("-v", "--verbose", is_flag=True, help="Show tracebacks on errors.")
@click.version_option(package_name="castore_di")
@click.pass_context
def cli(ctx: click.Context, config_path: str | None, blob_service: str, directory_service: str,
        blob_service_addr: str | None, directory_service_addr: str | None, verbose: bool) -> None:
    """Content-addressed storage: import, export, inspect and serve castore trees."""
    ctx.obj = CliContext(
        config_path=config_path,
        blob_name=blob_service,
        directory_name=directory_service,
        blob_addr=blob_service_addr,
        directory_addr=directory_service_addr,
        verbose=verbose,
    )


def run_async(ctx: CliContext, fn: Callable[[], Awaitable[T]], *, loopless: bool = False) -> T:
    """Run a command's coroutine; the container is closed afterwards.

    With ``loopless`` (a read command whose services allow it: :meth:`CliContext.loopless`)
    it runs without an event loop, and asyncio is not even imported (:mod:`castore_di._loopless`).
    """

    async def runner() -> T:
        try:
            return await fn()
        finally:
            await ctx.aclose()

    if loopless:
        from castore_di._loopless import run_loopless

        return run_loopless(runner())
    import asyncio  # not at module level: ``castore --help`` does without it

    return asyncio.run(runner())


def _load_commands() -> None:
    # Each command lives in its own module and registers itself on ``cli``.
    for name in ("check", "serve", "transfer", "inspect", "maintain", "mount", "roots"):
        try:
            importlib.import_module(f"castore_di.cli.{name}")
        except ModuleNotFoundError as e:
            if e.name != f"castore_di.cli.{name}":
                raise


def main(argv: list[str] | None = None) -> None:
    """Entry point of the ``castore`` console script."""
    if argv is not None:  # called from a program (tests): its collector is left alone
        _main(argv)
        return
    # The console script's own process: start-up without collections until the command's
    # services exist (CliContext resumes them), and without dependency-injector's web extras.
    console_startup()
    try:
        _main(argv)
    finally:
        resume_gc()


def _main(argv: list[str] | None) -> None:
    verbose = "-v" in (argv or sys.argv[1:]) or "--verbose" in (argv or sys.argv[1:])
    # Text that the output encoding cannot hold is escaped, never a crash (names are quoted
    # before they get here; this covers everything else under e.g. PYTHONIOENCODING=ascii).
    for stream in (sys.stdout, sys.stderr):
        if isinstance(stream, io.TextIOWrapper):
            stream.reconfigure(errors="backslashreplace")
    try:
        try:
            cli.main(args=argv, prog_name="castore", standalone_mode=False)
            sys.stdout.flush()
        except BrokenPipeError:
            if not _stdout_closed():
                raise
            raise _StdoutClosed() from None
    except _StdoutClosed:
        _silence_stdout()
        sys.exit(EXIT_CLOSED_STDOUT)
    except click.exceptions.Abort:
        click.echo("castore: interrupted", err=True)
        sys.exit(EXIT_INTERRUPTED)
    except click.ClickException as e:
        e.show()
        sys.exit(EXIT_USAGE if isinstance(e, click.UsageError) else e.exit_code)
    except KeyboardInterrupt:
        click.echo("castore: interrupted", err=True)
        sys.exit(EXIT_INTERRUPTED)
    except ConfigError as e:
        _report(e, verbose)
        sys.exit(EXIT_USAGE)
    except NothingCheckedError as e:
        _report(e, verbose)
        sys.exit(EXIT_NOTHING_CHECKED)
    except (CastoreError, OSError) as e:
        _report(e, verbose)
        sys.exit(EXIT_ERROR)
    except Exception as e:  # an unexpected bug: one line unless --verbose
        _report(e, verbose, prefix=f"internal error ({type(e).__name__})")
        sys.exit(EXIT_ERROR)
    sys.exit(EXIT_OK)


def _stdout_closed() -> bool:
    """Whether standard output is a pipe whose reader is gone (not some other broken pipe)."""
    try:
        fd = sys.stdout.fileno()
        poller = select.poll()
        poller.register(fd, select.POLLOUT)
        return any(events & (select.POLLERR | select.POLLHUP) for _fd, events in poller.poll(0))
    except (AttributeError, OSError, ValueError):
        return True  # no usable stdout at all: nothing to say either


def _silence_stdout() -> None:
    # What is still buffered would fail again at exit ("Exception ignored ..."): point
    # the descriptor at /dev/null so the final flush succeeds quietly.
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (AttributeError, OSError, ValueError):
        pass


def _report(e: BaseException, verbose: bool, prefix: str | None = None) -> None:
    if verbose:
        import traceback  # not at start-up: only --verbose prints one

        traceback.print_exception(e)
    from castore_di._redact import redact_text  # its patterns are compiled for errors only

    message = describe(e)
    # One line whatever the message (YAML parser errors span several); --verbose has it all.
    message = redact_text(" ".join(part.strip() for part in message.splitlines() if part.strip()))
    click.echo(f"castore: {prefix + ': ' if prefix else ''}{message}", err=True)


