"""The operator's commands: `evq dead list|replay|purge`, `evq event`, `evq pause`,
`evq resume`, `evq top`. They make the same engine calls as the API's routes."""

import asyncio
import sys
import time
from typing import Annotated

import orjson
import typer
from rich.console import Console, Group
from rich.live import Live
from rich.table import Table

from app.cli.support import run, settings_or_exit
from app.engine import MAX_ACCOUNT_ID, dead, open_queue
from app.engine.dead import Selection
from app.engine.inspect import Snapshot, event_state, snapshot

dead_app = typer.Typer(
    no_args_is_help=True,
    add_completion=False,
    help="Dead letters: list, replay or purge them.",
    rich_markup_mode="markdown",
)

Account = Annotated[
    int | None, typer.Option("--account", min=1, max=MAX_ACCOUNT_ID, help="Of this account.")
]
EventIds = Annotated[
    list[str] | None, typer.Option("--event-id", help="With this event id (repeatable).")
]
All = Annotated[bool, typer.Option("--all", help="Every dead letter.")]


def _selection(everything: bool, account: int | None, event_ids: list[str] | None) -> Selection:
    """The dead letters the options name; a usage error unless exactly --all or a filter."""
    narrowed = account is not None or bool(event_ids)
    if everything == narrowed:
        typer.echo("evq: say which dead letters: --all, or --account and/or --event-id", err=True)
        raise typer.Exit(2)
    return Selection(account, frozenset(event_ids) if event_ids else None)


@dead_app.command("list")
def dead_list(
    account: Account = None,
    event_ids: EventIds = None,
    offset: Annotated[int, typer.Option(min=0)] = 0,
    limit: Annotated[int, typer.Option(min=1, help="Show at most this many.")] = 50,
    as_json: Annotated[bool, typer.Option("--json", help="One JSON object per line.")] = False,
) -> None:
    """Dead letters with their errors, oldest first."""
    settings = settings_or_exit()
    selection = Selection(account, frozenset(event_ids) if event_ids else None)

    async def main() -> tuple[int, list[dict[str, object]]]:
        async with open_queue(settings) as queue:
            return await dead.dead_letters(queue, offset, limit, selection)

    total, items = run(main(), settings)
    for item in items:
        if as_json:
            typer.echo(orjson.dumps(item).decode())
        else:
            typer.echo(
                f"account {item['account']} seq {item['seq']} event {item['event_id']!r}"
                f" after {item['attempts']} attempts: {item['error']}"
            )
    typer.echo(f"{len(items)} of {total} dead letters shown", err=True)


@dead_app.command("replay")
def dead_replay(
    everything: All = False, account: Account = None, event_ids: EventIds = None
) -> None:
    """Queue dead letters again at the head of their accounts, in seq order; a parked account
    goes on. Their deliveries are logged as replays."""
    settings = settings_or_exit()
    selection = _selection(everything, account, event_ids)

    async def main() -> int:
        async with open_queue(settings) as queue:
            return await dead.replay(queue, selection)

    typer.echo(f"replayed {run(main(), settings)} dead letters")


@dead_app.command("purge")
def dead_purge(
    everything: All = False,
    account: Account = None,
    event_ids: EventIds = None,
    yes: Annotated[bool, typer.Option("--yes", help="Do not ask for confirmation.")] = False,
) -> None:
    """Delete dead letters for good (asks first on a terminal)."""
    settings = settings_or_exit()
    selection = _selection(everything, account, event_ids)

    async def count() -> int:
        async with open_queue(settings) as queue:
            return (await dead.dead_letters(queue, 0, 0, selection))[0]

    if not yes:
        if not sys.stdin.isatty():
            typer.echo("evq: purge deletes for good: confirm with --yes", err=True)
            raise typer.Exit(2)
        typer.confirm(f"Delete {run(count(), settings)} dead letters for good?", abort=True)

    async def main() -> int:
        async with open_queue(settings) as queue:
            return await dead.purge(queue, selection)

    typer.echo(f"purged {run(main(), settings)} dead letters")


def event(
    account: Annotated[int, typer.Argument(min=1, max=MAX_ACCOUNT_ID)],
    event_id: Annotated[str, typer.Argument()],
) -> None:
    """Where one event is: pending at position N, in flight, dead with its error, or acked.
    Exits 1 when evq does not know it."""
    settings = settings_or_exit()

    async def main() -> dict[str, object] | None:
        async with open_queue(settings) as queue:
            return await event_state(queue, account, event_id)

    found = run(main(), settings)
    if found is None:
        typer.echo(
            f"evq: event {event_id!r} of account {account} is not known: never accepted, or"
            " settled and forgotten",
            err=True,
        )
        raise typer.Exit(1)
    typer.echo(orjson.dumps(found).decode())


def pause(account: Annotated[int, typer.Argument(min=1, max=MAX_ACCOUNT_ID)]) -> None:
    """Hold an account: it keeps accepting events but is not claimed; a consumer holding it
    lets go after its current event."""
    settings = settings_or_exit()

    async def main() -> tuple[str, bool]:
        async with open_queue(settings) as queue:
            return await queue.pause(account)

    before, held = run(main(), settings)
    state = f"already {before}" if before else "paused"
    tail = ": its consumer lets go after the current event" if held else ""
    typer.echo(f"account {account} {state}{tail}")


def resume(account: Annotated[int, typer.Argument(min=1, max=MAX_ACCOUNT_ID)]) -> None:
    """Make a paused or parked account claimable at once (a parked one goes on past its dead
    letter, which stays)."""
    settings = settings_or_exit()

    async def main() -> str:
        async with open_queue(settings) as queue:
            return await queue.resume(account)

    before = run(main(), settings)
    typer.echo(
        f"account {account} resumed (was {before})"
        if before
        else f"account {account} was not paused"
    )


def top(
    once: Annotated[bool, typer.Option("--once", help="Print one frame and exit.")] = False,
    every: Annotated[float, typer.Option(min=0.1, help="Seconds between frames.")] = 1.0,
) -> None:
    """A live view of the queue: the dashboard's numbers in the terminal (Ctrl-C ends it)."""
    settings = settings_or_exit()

    async def main() -> None:
        async with open_queue(settings) as queue:
            before = await snapshot(queue, settings.lease_seconds)
            if once:
                Console().print(_frame(before, None))
                return
            with Live(_frame(before, None), auto_refresh=False) as live:
                while True:
                    await asyncio.sleep(every)
                    now = await snapshot(queue, settings.lease_seconds)
                    live.update(_frame(now, before), refresh=True)
                    before = now

    try:
        run(main(), settings)
    except KeyboardInterrupt:
        return


def _frame(now: Snapshot, before: Snapshot | None) -> Group:
    """The numbers, the consumers and the longest backlogs as rich tables."""
    stats = now.stats
    rate = "-"
    if before is not None and now.at > before.at:
        rate = f"{(stats['acked'] - before.stats['acked']) / (now.at - before.at):,.0f}/s"
    oldest = now.oldest_event_age_s
    clock = time.strftime("%H:%M:%S", time.localtime(now.at))
    numbers = Table("", "", title=f"evq  {clock}", show_header=False)
    for name, value in (
        ("backlog", f"{stats['backlog']:,}"),
        ("acked/s", rate),
        ("busy slots", f"{now.busy} / {now.slots}"),
        ("waiting accounts", f"{stats['ready']:,}"),
        ("oldest event", "-" if oldest is None else f"{oldest:,.1f} s"),
        ("dead letters", f"{stats['dead_letters']:,}"),
        ("paused / parked", f"{stats['paused']} / {stats['parked']}"),
        ("accepted / refused", f"{stats['accepted']:,} / {stats['refused']:,}"),
        ("acked / dead", f"{stats['acked']:,} / {stats['dead']:,}"),
    ):
        numbers.add_row(name, value)
    consumers = Table("consumer", "busy", "slots", "heartbeat", title="consumers")
    for c in now.consumers:
        consumers.add_row(c.name, str(c.busy), str(c.slots), f"{c.heartbeat_age_s:.1f} s ago")
    longest = Table("account", "pending", title="longest backlogs")
    for account, backlog in now.longest:
        longest.add_row(str(account), f"{backlog:,}")
    return Group(numbers, consumers, longest)
