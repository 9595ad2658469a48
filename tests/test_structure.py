"""The shape of the code, checked: no import circles, files of one purpose, eviction sees the
cache only through its view, and `agree` encodes what it is given without truncation."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest
import torch

from ringmem.agree import agree
from ringmem.testing import spawn

ROOT = Path(__file__).resolve().parents[1] / "ringmem"


def _module(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> set[str]:
    """Modules of ringmem that `path` imports anywhere: in functions and under
    `if TYPE_CHECKING:` too (a circle hidden from the interpreter is still two modules that
    cannot be read, changed or tested one without the other)."""
    mod, tree = _module(path), ast.parse(path.read_text())
    pkg = mod if path.name == "__init__.py" else mod.rsplit(".", 1)[0]
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name.startswith("ringmem")}
        elif isinstance(node, ast.ImportFrom):
            base = pkg
            for _ in range(node.level - 1):
                base = base.rsplit(".", 1)[0]
            name = (base + ("." + node.module if node.module else "")) if node.level \
                else node.module or ""
            if name.startswith("ringmem"):
                out.add(name)
                out |= {f"{name}.{a.name}" for a in node.names}
    return out


def _graph() -> dict[str, set[str]]:
    files = {_module(p): p for p in ROOT.rglob("*.py")}
    graph = {}
    for mod, path in files.items():
        deps = {d for d in _imports(path) if d in files and d != mod}
        # importing a.b.c runs a/__init__ and a/b/__init__ first
        graph[mod] = deps | {p for d in deps for p in _parents(d) if p in files and p != mod}
    return graph


def _parents(mod: str) -> list[str]:
    parts = mod.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts))]


def test_no_import_circles() -> None:
    graph, cycles = _graph(), []
    state: dict[str, int] = {}

    def visit(m: str, stack: list[str]) -> None:
        state[m] = 1
        for d in sorted(graph[m]):
            # a package's __init__ importing its own submodules is how packages work
            if d.startswith(m + "."):
                continue
            if state.get(d) == 1:
                cycles.append(stack[stack.index(d):] + [d] if d in stack else [m, d])
            elif d not in state:
                visit(d, stack + [d])
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m, [m])
    assert not cycles, f"import circles: {cycles}"


def test_circle_check_counts_type_checking_imports() -> None:
    """cache/parts.py imports its types only under TYPE_CHECKING; the graph still sees them."""
    deps = _graph()["ringmem.cache.parts"]
    assert {"ringmem.cache.index", "ringmem.cache.paged", "ringmem.eviction.coordinator"} <= deps


def test_the_cache_has_the_parts_its_stages_take() -> None:
    """ShardedKVCache has every attribute of the protocols its stages are typed by."""
    from ringmem.cache import CacheConfig, ShardedKVCache
    from ringmem.cache.parts import Parts, Shards

    cache = ShardedKVCache(CacheConfig(num_layers=2, q_heads=2, kv_heads=1, head_dim=8,
                                       capacity=64, page_size=16, windows=(4, -1)))
    assert isinstance(cache, Shards) and isinstance(cache, Parts)
    assert not isinstance(object(), Shards)


def test_architecture_lists_every_module() -> None:
    """docs/architecture.md's module table names every module under ringmem/."""
    doc = (ROOT.parent / "docs" / "architecture.md").read_text()
    missing = [str(p.relative_to(ROOT)) for p in sorted(ROOT.rglob("*.py"))
               if f"`{p.relative_to(ROOT)}`" not in doc]
    assert not missing, f"modules missing from docs/architecture.md's table: {missing}"


def test_tiers_are_imported_only_inside_the_cache() -> None:
    """Outside ringmem/cache/, the tiers are reached through `ringmem.cache`'s exports."""
    graph = _graph()
    bad = {m: sorted(d for d in deps if d.startswith("ringmem.cache.tiers"))
           for m, deps in graph.items() if not m.startswith("ringmem.cache")}
    bad = {m: d for m, d in bad.items() if d}
    assert not bad, f"modules outside ringmem/cache importing the tiers: {bad}"


@pytest.mark.parametrize("package", ["cache", "eviction"])
def test_inference_files_stay_small(package: str) -> None:
    big = {p.name: n for p in (ROOT / package).rglob("*.py")
           if (n := len(p.read_text().splitlines())) > 400}
    assert not big, f"files over 400 lines in ringmem/{package}: {big}"


def test_eviction_touches_no_private_member_of_another_object() -> None:
    bad = []
    for path in (ROOT / "eviction").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if (isinstance(node, ast.Attribute) and node.attr.startswith("_")
                    and not node.attr.startswith("__")
                    and not (isinstance(node.value, ast.Name) and node.value.id in
                             ("self", "cls"))):
                bad.append(f"{path.name}:{node.lineno} .{node.attr}")
        assert not any(m.startswith("ringmem.cache") for m in _imports(path)), path
    assert not bad, bad


def test_agree_single_rank_raises_own_error_only() -> None:
    agree("op", None, None, x=(1, "a", 2.5, torch.float16, None))
    with pytest.raises(KeyError, match="mine"):
        agree("op", None, KeyError("mine"), x=1)


def _agree_cases(rank: int, world: int) -> None:
    # equal values of every kind pass
    agree("same", None, None, i=7, f=0.1, s="zigzag", d=torch.bfloat16, n=None,
          t=(1, (2, "x"), -3.0), b=True, nan=float("nan"))
    # a differing string, float and nested tuple are all named with each rank's value
    with pytest.raises(ValueError) as e:
        agree("op", None, None, layout="zigzag" if rank else "stripe", scale=0.5 + rank,
              shape=(2, (8, rank)), same=1)
    msg = str(e.value)
    assert "op: arguments differ across ranks: layout (rank 0: stripe, rank 1: zigzag)" in msg
    assert "scale (rank 0: 0.5, rank 1: 1.5)" in msg
    assert "shape (rank 0: (2, (8, 0)), rank 1: (2, (8, 1)))" in msg and "same" not in msg
    # a signature too long for the row is refused on every rank, never truncated (the
    # old fixed-width rows cut tuples to 5 ints: these two would have compared equal)
    long = tuple(range(200)) + (rank,)
    with pytest.raises(ValueError, match="needs 40[0-9] words on rank\\(s\\) \\[0, 1\\], more "
                                         "than the 128 that fit"):
        agree("long", None, None, x=long)
    with pytest.raises(ValueError, match="arguments differ across ranks: x"):
        agree("long", None, None, max_words=512, x=long)
    # only rank 1 overflows: rank 0 does not wait, both raise
    with pytest.raises(ValueError, match="more than the 128 that fit"):
        agree("one", None, None, x=tuple(range(200)) if rank else (1,))
    # an unencodable value is this rank's error; the peer hears it was rejected
    want = "cannot encode a object" if rank else "rank\\(s\\) \\[1\\] rejected"
    with pytest.raises((TypeError, ValueError), match=want):
        agree("bad", None, None, x=object() if rank else 1)


def test_agree_encodes_and_compares_across_ranks() -> None:
    spawn(_agree_cases, 2, timeout=60)


def test_nothing_at_the_repository_root_is_importable() -> None:
    """`python -m` and torchrun put the current directory first on sys.path: a package or
    module at the root would shadow a PyPI project of the same name (`kernels` did, for
    transformers 5.25). Every package lives under ringmem/."""
    repo = ROOT.parent
    found = sorted(p.name for p in repo.iterdir()
                   if (p.is_dir() and (p / "__init__.py").exists() and p.name != "ringmem")
                   or (p.is_file() and p.suffix == ".py"))
    assert not found, f"importable from the repository root: {found}"


def test_script_folders_shadow_no_installed_module() -> None:
    """A script run as `python benchmarks/x.py` has benchmarks/ first on sys.path, and
    pytest puts tests/ there: a module in either named like an installed one (a former
    benchmarks/kernels.py hid the PyPI `kernels` from transformers) would shadow it."""
    import importlib.machinery
    import sys
    repo = ROOT.parent
    folders = [repo / "benchmarks", repo / "tests"]
    mine = {str(f) for f in folders} | {"", ".", str(repo)}
    path = [p for p in sys.path if p not in mine and Path(p or ".").resolve() not in
            {f.resolve() for f in folders} | {repo.resolve()}]
    clashes = sorted(f"{f.name}/{p.name}" for f in folders for p in f.glob("*.py")
                     if p.stem != "conftest" and (p.stem in sys.builtin_module_names or
                     importlib.machinery.PathFinder.find_spec(p.stem, path) is not None))
    assert not clashes, f"script modules that shadow installed ones: {clashes}"
