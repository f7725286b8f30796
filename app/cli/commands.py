"""The `evq` command line (and `gen`, the same as `evq gen`): parses, then calls the app."""

import contextlib
import glob
import sys
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, TypeVar

import orjson
import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from app import handlers, log
from app.cli import operate as cli_ops
from app.cli import progress
from app.cli.support import run, settings_or_exit
from app.consumer import process
from app.engine import UNREACHABLE, inspect, open_queue
from app.engine.inspect import event_state
from app.settings import Settings
from app.workload.generator import (
    Pattern,
    PushSummary,
    Via,
    WorkloadFileError,
    longest_chain,
    lower_bound_s,
    open_target,
    planned_events,
    read_events,
    shared_prefix,
    workload,
    write_events,
)
from app.workload.plot import PlotUnavailable, draw
from app.workload.report import Run, read_log, render, resolve, summarize

T = TypeVar("T")
DEFAULT_API = "http://127.0.0.1:8000"
# A slot holds a connection only for one round trip, so a few dozen serve hundreds of slots.
SLOT_CONNECTIONS = 32
WAIT_RIDE_OUT_S = 10.0  # connection faults `evq wait` rides out before Redis first answers
HELP = """evq: per-account ordered event processing on Redis.

Events of one account are handled one after another, in the order they were accepted; many
accounts run in parallel. Settings come from the environment or a .env file in the working
directory (.env.example lists them all, docs/configuration.md explains them).

Start here: `make demo` runs the whole job locally. By hand: `evq consume` runs a consumer,
`evq api` the HTTP API, `gen` pushes a workload, `evq wait` waits for the drain and `evq report`
proves the order from the event log.
"""
app = typer.Typer(
    no_args_is_help=True, add_completion=False, help=HELP, rich_markup_mode="markdown"
)


@app.command()
def consume(
    burst: Annotated[bool, typer.Option(help="Exit once no account has work left.")] = False,
) -> None:
    """Run one consumer process with CONCURRENCY slots until SIGTERM or SIGINT.

    Exits 1 after a forced stop (a second signal) or when its slots keep failing.
    """
    settings = settings_or_exit()
    try:
        handler = handlers.load(settings)
    except handlers.HandlerUnusable as exc:
        typer.echo(f"evq: {exc}", err=True)
        raise typer.Exit(2) from exc

    async def main() -> bool:
        pool_size = min(settings.concurrency, SLOT_CONNECTIONS) + 4
        # Open the pools before the first claim, so the first wave of acks does not pay for it.
        async with open_queue(
            settings, pool_size, True, pool_size, ride_out_s=settings.lease_seconds
        ) as queue:
            consumer = await process.consume(queue, handler, settings, burst)
        return consumer.forced or consumer.failing

    if run(main(), settings):
        raise typer.Exit(1)


@app.command()
def gen(
    events: Annotated[int, typer.Option(min=1, help="How many events to push.")] = 10_000,
    accounts: Annotated[
        int, typer.Option(min=1, help="Accounts 1..N to spread them over.")
    ] = 1_000,
    pattern: Annotated[Pattern, typer.Option(help="Workload shape.")] = "bursty",
    seed: Annotated[int, typer.Option(help="Random seed: same seed, same workload.")] = 42,
    rate: Annotated[
        float, typer.Option(min=0, help="Events per second; 0 = as fast as possible.")
    ] = 0,
    batch: Annotated[
        int, typer.Option(min=1, max=10_000, help="Events per round trip (--via ws: per frame).")
    ] = 1_000,
    slots: Annotated[
        int | None, typer.Option(min=1, help="W for the bound; default: live consumers' slots.")
    ] = None,
    via: Annotated[
        Via,
        typer.Option(
            help="Push into Redis directly, through the API's batch route, or over WebSocket"
            " streams (/ws/events)."
        ),
    ] = "redis",
    api_url: Annotated[
        str, typer.Option(help="Base URL of the API (--via api, --via ws).")
    ] = DEFAULT_API,
    connections: Annotated[
        int,
        typer.Option(
            min=1, max=256, help="--via ws: streams in parallel (each account keeps to one)."
        ),
    ] = 1,
    source: Annotated[
        Path | None,
        typer.Option(
            "--from",
            help="Send the events of this JSON Lines file, in its order, instead of generating"
            " them (--events, --accounts, --pattern and --seed then do not apply).",
        ),
    ] = None,
    out: Annotated[
        Path | None,
        typer.Option(help="Write the workload to this JSON Lines file instead of sending it."),
    ] = None,
) -> None:
    """Generate a workload (or read one) and push it into Redis, through the API, or over
    WebSocket streams; or record it to a file."""
    settings = settings_or_exit()
    if connections > 1 and via != "ws":
        raise typer.BadParameter(
            "only --via ws sends over several connections", param_hint="--connections"
        )
    run_id = uuid.uuid4().hex[:12]
    if source is None:
        plan = planned_events(workload(pattern, events, accounts, seed), run_id)
        described = {"pattern": pattern, "seed": seed, "id_prefix": f"{run_id}-"}
    else:
        try:
            plan = read_events(source)
        except WorkloadFileError as exc:
            raise typer.BadParameter(str(exc), param_hint="--from") from exc
        described = {"source": str(source), "id_prefix": shared_prefix(plan)}
    if out is not None:
        try:
            write_events(out, plan)
        except OSError as exc:
            raise typer.BadParameter(
                f"cannot write {out}: {exc.strerror}", param_hint="--out"
            ) from exc
        typer.echo(f"wrote {len(plan)} events to {out}")
        return
    chain = longest_chain([e.account for e in plan])
    run_log = log.configure(settings)

    async def main() -> tuple[PushSummary, int]:
        async with open_target(settings, via, api_url, connections) as target:
            total_slots = slots or await target.live_slots() or settings.concurrency
            run_log.info(
                "run_started",
                run_id=run_id,
                events=len(plan),
                accounts=len({e.account for e in plan}),
                **described,
                via=via,
                slots=total_slots,
                longest_chain=chain,
                process_s=settings.process_seconds,
            )
            with _progress_bar(len(plan)) as advance:
                summary = await target.send(plan, batch, rate, advance)
        run_log.info("run_pushed", run_id=run_id, accepted=summary.accepted)
        return summary, total_slots

    summary, total_slots = run(main(), settings)
    bound = lower_bound_s(len(plan), chain, total_slots, settings.process_seconds)
    refused = f", {summary.refused} refused (MAX_BACKLOG_PER_ACCOUNT)" if summary.refused else ""
    typer.echo(
        f"run {run_id}: {summary.accepted} accepted, {summary.duplicates} duplicates{refused}, "
        f"{len(plan) / summary.elapsed_s:,.0f} events/s over {summary.elapsed_s:.2f} s\n"
        f"longest chain {chain} events; lower bound with W={total_slots} slots and "
        f"PROCESS_SECONDS={settings.process_seconds:g}: {bound:.1f} s"
    )


@contextmanager
def _progress_bar(total: int) -> Iterator[Callable[[int], None]]:
    """A progress bar on a terminal (nothing otherwise); yields the function that advances it."""
    columns = (TextColumn("pushing"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, disable=not sys.stderr.isatty()) as bar:
        task = bar.add_task("push", total=total)
        yield lambda n: bar.advance(task, n)


@app.command()
def api() -> None:
    """Serve the HTTP API on API_HOST:API_PORT (OpenAPI docs at /docs)."""
    settings = settings_or_exit()

    async def check() -> None:
        """Refuse an evicting Redis or another SHARDS at once; a Redis down now is the
        API's 503s until it answers."""
        with contextlib.suppress(*UNREACHABLE):
            async with open_queue(settings):
                pass

    from app.api import server  # noqa: PLC0415 (the web stack loads only for this command)

    try:
        server.check_exposure(settings)
    except server.OpenToTheNetwork as exc:
        typer.echo(f"evq api: {exc}", err=True)
        raise typer.Exit(2) from exc
    run(check(), settings)
    server.serve(settings)


@app.command()
def token() -> None:
    """Print the API token (API_TOKEN, or the file API_TOKEN_FILE names): what a client sends
    as `Authorization: Bearer <token>`. Exits 1 when none is set."""
    settings = settings_or_exit()
    if settings.api_token is None:
        typer.echo(
            "evq: no API token: API_TOKEN is unset (and API_TOKEN_FILE names no file)", err=True
        )
        raise typer.Exit(1)
    typer.echo(settings.api_token.get_secret_value())


@app.command()
def stats() -> None:
    """Print the queue counters as JSON."""
    settings = settings_or_exit()

    async def main() -> None:
        async with open_queue(settings) as queue:
            typer.echo(orjson.dumps(await inspect.stats(queue)).decode())

    run(main(), settings)


@app.command()
def wait(
    timeout: Annotated[
        float, typer.Option(min=0, help="Give up after this many seconds; 0 = never.")
    ] = 0,
    consumers: Annotated[
        int | None,
        typer.Option(min=1, help="Instead: wait until this many consumers send heartbeats."),
    ] = None,
) -> None:
    """Wait until no account has pending or in-flight events, showing progress."""
    settings = settings_or_exit()

    async def main() -> bool:
        async with open_queue(settings, ride_out_s=WAIT_RIDE_OUT_S) as queue:
            if consumers:
                return await progress.wait_consumers(queue, consumers, settings, timeout)
            return await progress.wait_drained(queue, timeout, sys.stderr)

    if not run(main(), settings):
        what = f"{consumers} live consumers" if consumers else "drained"
        typer.echo(f"evq: still not {what} after {timeout:g} s", err=True)
        raise typer.Exit(1)


@app.command()
def report(
    logs: Annotated[
        list[str] | None,
        typer.Argument(
            metavar="[LOG]...",
            help="Event logs (files or quoted globs), one per host or shared; default EVENT_LOG.",
        ),
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False,
    plot: Annotated[
        Path | None, typer.Option(help="Draw concurrency and the longest accounts to a PNG.")
    ] = None,
    all_runs: Annotated[
        bool, typer.Option("--all", help="The whole log, not just the latest gen run.")
    ] = False,
    slots: Annotated[
        int | None, typer.Option(min=1, help="W for the bound; default: what gen recorded.")
    ] = None,
) -> None:
    """Prove per-account order from the event logs and measure the run against its bound.

    Consumers on several hosts each write their own log: name them all (or a glob) and the
    report proves order across them. Exits 1 when an order violation or a lost event is found,
    or a line of the logs could not be read.
    """
    settings = settings_or_exit()
    named = _log_files(logs or [str(settings.event_log)])
    paths = [older for path in named for older in log.rotated(path)]  # oldest first
    run = read_log(paths, latest_run=not all_runs)
    if not run.attempts:
        names = ", ".join(map(str, paths))
        typer.echo(f"evq: no handled event in {names} yet (are consumers running?)", err=True)
    run, waiting = _from_redis(settings, run)
    found = summarize(run, waiting, slots)
    typer.echo(orjson.dumps(found.as_json()).decode() if as_json else render(found))
    if plot:
        try:
            draw(run, found, plot)
        except PlotUnavailable as exc:
            typer.echo(f"evq: {exc}", err=True)
            raise typer.Exit(2) from exc
        typer.echo(f"plot written to {plot}", err=True)
    if not found.ok:
        raise typer.Exit(1)


def _log_files(names: list[str]) -> list[Path]:
    """The files `names` stand for, globs expanded; a usage error for one that names none."""
    paths: list[Path] = []
    for name in names:
        found = sorted(Path(p) for p in glob.glob(name)) if glob.has_magic(name) else [Path(name)]
        found = [path for path in found if path.is_file()]
        if not found:
            typer.echo(f"evq: no event log at {name}", err=True)
            raise typer.Exit(2)
        paths += found
    return paths


def _from_redis(settings: Settings, logged: Run) -> tuple[Run, int | None]:
    """`logged` with the attempts whose outcome line is missing resolved against Redis, and how
    many events of the run (ids starting with its prefix) Redis still holds; the run as read
    and None without a reachable Redis."""

    async def main() -> tuple[Run, int | None]:
        async with open_queue(settings) as queue:
            resolved = await resolve(logged, lambda a, e, s: event_state(queue, a, e, s))
            if logged.id_prefix is None:
                return resolved, None
            return resolved, await inspect.waiting(queue, logged.id_prefix)

    if logged.id_prefix is None and not logged.settling:
        return logged, None
    try:
        return run(main(), settings)
    except typer.Exit:
        return logged, None


app.add_typer(cli_ops.dead_app, name="dead")
for command in (cli_ops.event, cli_ops.pause, cli_ops.resume, cli_ops.top):
    app.command()(command)

gen_app = typer.Typer(add_completion=False, rich_markup_mode="markdown")
gen_app.command()(gen)


def main() -> None:
    """Entry point of `evq`."""
    app()


def gen_main() -> None:
    """Entry point of `gen`."""
    gen_app()
