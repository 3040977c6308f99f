"""The repository's shape: the card's files at the top and the machinery in one package, imports
that run one way, and functions a reader can hold in mind."""

import ast

from conftest import REPO

TOP = {"train.py", "evaluate.py", "predict.py", "model.py", "data.py", "utils.py", "hubconf.py"}
SCRIPTS = {"train", "evaluate", "predict"}


def product():
    """{module name: its path}: the top's modules and the package's."""
    modules = {path.stem: path for path in REPO.glob("*.py")}
    modules |= {f"twophase.{p.stem}": p for p in (REPO / "twophase").glob("*.py")}
    return modules


def local_imports(path, names):
    """The modules of `names` that the file at `path` imports, anywhere in it."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
            found |= {f"{node.module}.{alias.name}" for alias in node.names}
    return found & set(names)


def test_the_top_holds_the_cards_files_and_the_rest_is_one_package():
    assert {path.name for path in REPO.glob("*.py")} == TOP
    assert (REPO / "twophase" / "__init__.py").is_file()
    assert not [p for p in (REPO / "twophase").iterdir() if p.is_dir() and p.name != "__pycache__"]


def test_nothing_imports_a_script_and_no_imports_run_in_a_circle():
    modules = product()
    graph = {
        name: local_imports(path, modules) - {"twophase.__init__"} for name, path in modules.items()
    }
    for name, imported in graph.items():
        assert not imported & SCRIPTS, f"{name} imports the script(s) {imported & SCRIPTS}"
    done, path = set(), []

    def visit(name):
        assert name not in path, (
            f"an import circle: {' -> '.join(path[path.index(name) :] + [name])}"
        )
        if name in done:
            return
        path.append(name)
        for other in sorted(graph[name]):
            visit(other)
        path.pop()
        done.add(name)

    for name in sorted(graph):
        visit(name)


def test_train_reads_as_the_method_and_every_function_is_short_with_few_parameters():
    source = (REPO / "train.py").read_text()
    assert len(source.splitlines()) < 500
    for name, path in product().items():
        for node in ast.walk(ast.parse(path.read_text())):
            if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            args = node.args
            params = [a for a in args.posonlyargs + args.args + args.kwonlyargs]
            params = [a for a in params if a.arg not in ("self", "cls")]
            params += [a for a in (args.vararg, args.kwarg) if a is not None]
            lines = node.end_lineno - node.lineno + 1
            assert lines <= 80, f"{name}.{node.name}: {lines} lines"
            assert len(params) <= 8, f"{name}.{node.name}: {len(params)} parameters"
            if name == "train" and node.name == "main":
                assert lines <= 60, f"train.main: {lines} lines"


def test_the_cards_data_and_model_sit_below_the_package():
    """The import graph runs one way: the package builds on data.py and model.py, which import
    of it only leaves (the cache, the CSV reader: modules that import nothing of the product but
    utils), so each can be read and lifted with the few files it names. model.py, whose weights'
    normalisation is its own, imports nothing of the package."""
    modules = product()
    graph = {
        name: local_imports(path, modules) - {"twophase.__init__"} for name, path in modules.items()
    }
    assert not {n for n in graph["model"] if n.startswith("twophase")}
    for used in sorted(n for n in graph["data"] if n.startswith("twophase.")):
        assert graph[used] <= {"utils"}, f"data imports {used}, which imports {graph[used]}"
