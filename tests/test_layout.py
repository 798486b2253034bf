"""The package's layers: every module imports only from its own package or the layers below."""

import ast
from pathlib import Path

import gspo_cli

PACKAGE = Path(gspo_cli.__file__).parent
# Lower number, lower layer. `config` is the schema: it imports nothing from the package, so all may use it.
LAYERS = {"config": -1, "algo": 0, "data": 1, "models": 1, "report": 1, "rollout": 2, "train": 3, "top": 4}


def layer_of(module: str) -> str:
    """'gspo_cli.train.loop' -> 'train'; top-level modules (cli, launch, evaluate, ...) -> 'top'."""
    name = module.split(".")[1]
    return name if name in LAYERS else "top"


def imported_modules(path: Path) -> set[str]:
    """Every `gspo_cli...` module a file imports, at the top or inside a function."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("gspo_cli"):
            found |= {node.module} if node.module != "gspo_cli" else {f"gspo_cli.{a.name}" for a in node.names}
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("gspo_cli")}
    return found


def module_name(path: Path) -> str:
    return ".".join(("gspo_cli", *path.relative_to(PACKAGE).with_suffix("").parts))


def test_imports_point_down_only():
    upward = []
    for path in PACKAGE.rglob("*.py"):
        own = layer_of(module_name(path))
        for target in imported_modules(path):
            other = layer_of(target)
            if other != own and LAYERS[other] >= LAYERS[own]:
                upward.append(f"{module_name(path)} ({own}) imports {target} ({other})")
    assert not upward, "\n".join(upward)


def test_top_level_holds_at_most_eight_modules():
    top = sorted(p.name for p in PACKAGE.glob("*.py"))
    assert len(top) <= 8, top


def test_every_package_says_what_lives_there():
    for init in PACKAGE.rglob("__init__.py"):
        assert ast.get_docstring(ast.parse(init.read_text())), f"{init} has no docstring"
