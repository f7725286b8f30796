"""The rooms of app/ keep their imports one way: engine <- consumer, api <- workload <- cli."""

import ast

from stack import REPO

# Room -> the rooms (or single modules, like api.schema) its modules may import; a room may
# always import itself. The top-level modules settings, log and handlers are rooms of their own.
ALLOWED = {
    "settings": set(),
    "log": {"settings", "engine"},
    "handlers": {"settings", "engine"},
    "engine": {"settings"},
    "consumer": {"settings", "engine", "handlers", "log"},
    "api": {"settings", "engine"},
    "workload": {"settings", "engine", "api.schema"},
    "cli": {"settings", "engine", "handlers", "log", "consumer", "api", "workload"},
}


def room_of(module: str) -> str:
    """`app.engine.queue` -> `engine`, `app.settings` -> `settings`."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def imports_of(source: str) -> set[str]:
    """Every `app.` module a source imports, at the top or inside a function."""
    found = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names if alias.name.startswith("app.")}
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("app"):
            if node.module == "app":
                found |= {f"app.{alias.name}" for alias in node.names}
            else:
                found.add(node.module)
    return found


def violations(tree: dict[str, str]) -> list[str]:
    """`module imports module` for each import across rooms that ALLOWED does not list."""
    found = []
    for module, source in sorted(tree.items()):
        room = room_of(module)
        if room not in ALLOWED:
            continue
        allowed = ALLOWED[room] | {room}
        for imported in sorted(imports_of(source)):
            if room_of(imported) not in allowed and imported.removeprefix("app.") not in allowed:
                found.append(f"{module} imports {imported}")
    return found


def app_tree() -> dict[str, str]:
    tree = {}
    for path in (REPO / "app").rglob("*.py"):
        parts = path.relative_to(REPO).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        tree[".".join(parts)] = path.read_text()
    return tree


def test_the_rooms_import_one_way() -> None:
    """No module of app/ imports from a room above its own."""
    assert violations(app_tree()) == []


def test_an_engine_module_importing_the_api_is_caught() -> None:
    """The check fails the day an engine module imports the API or the consumer."""
    tree = app_tree()
    tree["app.engine.queue"] += "\nfrom app.api.app import create_app\n"
    tree["app.engine.inspect"] += "\ndef f() -> None:\n    import app.consumer.slots\n"
    assert violations(tree) == [
        "app.engine.inspect imports app.consumer.slots",
        "app.engine.queue imports app.api.app",
    ]


def test_the_consumer_and_the_api_do_not_import_each_other() -> None:
    """The consumer and the API share the engine, never each other's modules."""
    tree = {"app.api.stream": "from app.consumer.tally import Tally\n"}
    tree["app.consumer.process"] = "from app.api import prometheus\n"
    assert violations(tree) == [
        "app.api.stream imports app.consumer.tally",
        "app.consumer.process imports app.api",
    ]


def test_every_module_is_in_a_room() -> None:
    """A new module lands in one of the rooms (or is the package's own face)."""
    homeless = [
        m for m in app_tree() if room_of(m) not in ALLOWED and m not in {"app", "app.__main__"}
    ]
    assert homeless == []
