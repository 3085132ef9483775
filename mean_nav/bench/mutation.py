"""`mean-nav bench mutation`: how many wrong programs does the test suite catch?

For each safety-critical module it applies one realistic single-point change at a time (a
comparison turned `<` -> `<=`, an operand dropped from `a or b`, a sign removed, a constant
off by one, a guard `if` that never fires, an assignment deleted, `radians()` forgotten,
`floor` for `ceil`, ...) and runs the module's test files against the mutant. A mutant is
killed when the tests fail (or hang past a timeout). Mutants on lines the tests never execute
are counted as survivors without running. It prints the kill rate per module and every
survivor with its line, so a reviewer can judge which survivors are equivalent programs.

Each mutant runs in a forked child that imports the mutated module in place of the file on
disk (nothing is written to the source tree), so an interrupted run leaves no trace. A
benchmark, not part of CI: expect tens of minutes for all modules on 2 cores.
"""
from __future__ import annotations

import argparse
import ast
import copy
import importlib
import importlib.util
import json
import os
import random
import signal
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import tqdm

ROOT = Path(__file__).resolve().parents[2]

# module -> the test files that pin it (paths relative to the repository root), the fast
# hand-computed ones first: with -x most mutants die in the first second
TARGETS: dict[str, list[str]] = {
    "mean_nav.nav.filter": ["tests/test_pinned_filter.py", "tests/test_filter.py", "tests/test_filter_tilt.py",
                            "tests/test_pinned_defaults.py"],
    "mean_nav.nav.refine": ["tests/test_pinned_refine.py", "tests/test_refine.py", "tests/test_features.py",
                            "tests/test_pinned_defaults.py"],
    # refine's ratio test and no-data border live in nav/features/ since the extractor split
    "mean_nav.nav.features.ratio_test": ["tests/test_pinned_refine.py", "tests/test_features.py"],
    "mean_nav.nav.features.opencv_image": ["tests/test_pinned_refine.py", "tests/test_features.py"],
    "mean_nav.nav.gps_time": ["tests/test_pinned_mavlink.py"],
    "mean_nav.nav.mavlink_io": ["tests/test_pinned_mavlink.py", "tests/test_mavlink.py"],
    "mean_nav.nav.camera_model": ["tests/test_pinned_camera_model.py", "tests/test_camera_model.py"],
    "mean_nav.geo.tiles": ["tests/test_pinned_tiles.py", "tests/test_tiles.py"],
}
# modules mutated only in some functions (plus their module-level constants): mavlink_io's
# connection and reader threads are exercised by the SITL tests; the encoding is pinned here
SCOPES: dict[str, set[str]] = {
    "mean_nav.nav.mavlink_io": {"implausible", "satellites_for_accuracy", "dop_for_accuracy", "_finite_or",
                                "send_estimate", "_send_gps_input", "_send_global_position_sensor"},
}

_COMPARE_SWAPS = {ast.Lt: [ast.LtE], ast.LtE: [ast.Lt], ast.Gt: [ast.GtE], ast.GtE: [ast.Gt],
                  ast.Eq: [ast.NotEq], ast.NotEq: [ast.Eq], ast.In: [ast.NotIn], ast.NotIn: [ast.In],
                  ast.Is: [ast.IsNot], ast.IsNot: [ast.Is]}
_BINOP_SWAPS = {ast.Add: [ast.Sub], ast.Sub: [ast.Add], ast.Mult: [ast.Div], ast.Div: [ast.Mult],
                ast.FloorDiv: [ast.Div], ast.Mod: [ast.FloorDiv],
                ast.BitOr: [ast.BitAnd], ast.BitAnd: [ast.BitOr], ast.MatMult: [ast.Mult]}
_CALLS_DROPPED = {"radians", "degrees", "abs", "round", "floor", "ceil", "sqrt", "exp", "remainder"}
_CALL_SWAPS = {"floor": "ceil", "ceil": "floor", "min": "max", "max": "min"}
_QUIET_CALLEES = {"log", "logger", "logging", "warnings", "print"}   # messages, not behaviour
# array shapes: an index or shape off by one only crashes, which every test notices
_SHAPE_CALLEES = {"eye", "zeros", "ones", "full", "empty", "reshape", "stack", "concatenate", "transpose"}
# imported before forking so that each mutant's child starts in a fraction of a second
PRELOAD = ["numpy", "cv2", "pyproj", "rasterio", "yaml", "pymavlink.mavutil", "pytest", "tqdm"]


@dataclass
class Mutant:
    index: int
    line: int
    description: str
    statement_start: int     # the statement holding it: coverage is judged per statement
    statement_end: int
    status: str = "pending"    # killed | timeout | survived | not covered
    seconds: float = 0.0


def _callee_name(func: ast.expr) -> str:
    if isinstance(func, ast.Name):
        return func.id
    if isinstance(func, ast.Attribute):
        return func.attr
    return ""


class _Mutator(ast.NodeTransformer):
    """Walks a module in a fixed order; with target=None it lists the mutation points,
    with target=k it applies the k-th one and nothing else."""

    def __init__(self, target: int | None = None, scope: set[str] | None = None):
        self.target = target
        self.scope = scope
        self._function: str | None = None   # the function being walked (outermost)
        self._in_class = 0
        self.points: list[tuple[int, str, int, int]] = []   # line, description, statement lines
        self._statement = (0, 0)
        self._depth = 0        # function nesting: module-level assignments are not deleted

    def visit(self, node):
        if not isinstance(node, ast.stmt):
            return super().visit(node)
        outer, self._statement = self._statement, (node.lineno, node.end_lineno)
        try:
            return super().visit(node)
        finally:
            self._statement = outer

    def _offer(self, node: ast.AST, description: str) -> bool:
        if self.scope is not None:
            at_module_level = self._function is None and not self._in_class
            if not (at_module_level or self._function in self.scope):
                return False
        self.points.append((node.lineno, description, *self._statement))
        return len(self.points) - 1 == self.target

    # --- what is not behaviour --------------------------------------------------------
    def visit_Expr(self, node):
        if isinstance(node.value, ast.Constant) and isinstance(node.value.value, str):
            return node     # docstring
        node = self.generic_visit(node)
        if isinstance(node.value, ast.Call) and self._is_quiet(node.value):
            return node
        if self._offer(node, f"delete `{ast.unparse(node)[:60]}`"):
            return ast.Pass()
        return node

    def _is_quiet(self, call: ast.Call) -> bool:
        f = call.func
        while isinstance(f, ast.Attribute):
            f = f.value
        return isinstance(f, ast.Name) and f.id in _QUIET_CALLEES

    def visit_Call(self, node):
        if self._is_quiet(node):
            return node
        if _callee_name(node.func) in _SHAPE_CALLEES:
            return node
        if _callee_name(node.func) == "bounded":
            # a config default: mutate the value, not the validation limits (the config layer's)
            node.args = [self.visit(a) for a in node.args]
            for k in node.keywords:
                if k.arg == "default_factory":
                    k.value = self.visit(k.value)
            return node
        node = self.generic_visit(node)
        name = _callee_name(node.func)
        if name in _CALLS_DROPPED and len(node.args) == 1 and not node.keywords:
            if self._offer(node, f"`{name}(x)` -> `x`"):
                return node.args[0]
        if name in _CALL_SWAPS:
            if self._offer(node, f"`{name}` -> `{_CALL_SWAPS[name]}`"):
                new = copy.deepcopy(node)
                if isinstance(new.func, ast.Name):
                    new.func.id = _CALL_SWAPS[name]
                else:
                    new.func.attr = _CALL_SWAPS[name]
                return new
        return node

    def visit_Raise(self, node):
        return node          # error messages
    visit_JoinedStr = visit_Raise
    visit_Import = visit_ImportFrom = visit_Global = visit_Nonlocal = visit_Raise

    def visit_AnnAssign(self, node):
        if node.value is not None:
            node.value = self.visit(node.value)
        return node

    def visit_FunctionDef(self, node):
        node.args.defaults = [self.visit(d) for d in node.args.defaults]
        node.args.kw_defaults = [d if d is None else self.visit(d) for d in node.args.kw_defaults]
        self._depth += 1
        outer = self._function
        self._function = outer or node.name
        node.body = [self.visit(s) for s in node.body]
        self._function = outer
        self._depth -= 1
        return node

    def visit_Subscript(self, node):
        # constant indices (F[0, 2], x[:2]) off by one only crash or read a neighbour's slot;
        # computed ones (image[r:r + t]) are mutated like any expression
        node.value = self.visit(node.value)
        node.slice = self._visit_index(node.slice)
        return node

    def _visit_index(self, part):
        if isinstance(part, ast.Constant):
            return part
        if isinstance(part, ast.Tuple):
            part.elts = [self._visit_index(e) for e in part.elts]
            return part
        if isinstance(part, ast.Slice):
            for name in ("lower", "upper", "step"):
                piece = getattr(part, name)
                if piece is not None:
                    setattr(part, name, self._visit_index(piece))
            return part
        return self.visit(part)

    def visit_ClassDef(self, node):
        self._in_class += 1
        node.body = [self.visit(s) for s in node.body]
        self._in_class -= 1
        return node

    # --- mutations --------------------------------------------------------------------
    def visit_Compare(self, node):
        node = self.generic_visit(node)
        for i, op in enumerate(node.ops):
            for alt in _COMPARE_SWAPS.get(type(op), []):
                if self._offer(node, f"comparison {type(op).__name__} -> {alt.__name__}"):
                    new = copy.deepcopy(node)
                    new.ops[i] = alt()
                    return new
        return node

    def visit_BinOp(self, node):
        node = self.generic_visit(node)
        if isinstance(node.op, ast.Mod) and isinstance(node.left, ast.Constant) and isinstance(node.left.value, str):
            return node   # %-formatting
        for alt in _BINOP_SWAPS.get(type(node.op), []):
            if self._offer(node, f"`{ast.unparse(node)[:50]}`: {type(node.op).__name__} -> {alt.__name__}"):
                new = copy.deepcopy(node)
                new.op = alt()
                return new
        return node

    def visit_AugAssign(self, node):
        node = self.generic_visit(node)
        for alt in _BINOP_SWAPS.get(type(node.op), []):
            if self._offer(node, f"`{ast.unparse(node)[:50]}`: {type(node.op).__name__}= -> {alt.__name__}="):
                new = copy.deepcopy(node)
                new.op = alt()
                return new
        if self._offer(node, f"delete `{ast.unparse(node)[:60]}`"):
            return ast.Pass()
        return node

    def visit_UnaryOp(self, node):
        node = self.generic_visit(node)
        if isinstance(node.op, (ast.USub, ast.Not, ast.Invert)):
            if self._offer(node, f"drop `{type(node.op).__name__}` in `{ast.unparse(node)[:50]}`"):
                return node.operand
        return node

    def visit_BoolOp(self, node):
        node = self.generic_visit(node)
        alt = ast.Or if isinstance(node.op, ast.And) else ast.And
        if self._offer(node, f"`{type(node.op).__name__}` -> `{alt.__name__}` in `{ast.unparse(node)[:50]}`"):
            new = copy.deepcopy(node)
            new.op = alt()
            return new
        for i, value in enumerate(node.values):
            if self._offer(node, f"drop operand `{ast.unparse(value)[:50]}` of `{type(node.op).__name__}`"):
                rest = [v for k, v in enumerate(node.values) if k != i]
                return rest[0] if len(rest) == 1 else ast.BoolOp(op=node.op, values=rest)
        return node

    def visit_Constant(self, node):
        v = node.value
        if isinstance(v, bool):
            if self._offer(node, f"{v} -> {not v}"):
                return ast.Constant(not v)
        elif isinstance(v, int):
            if self._offer(node, f"constant {v} -> {v + 1}"):
                return ast.Constant(v + 1)
        elif isinstance(v, float):
            alt = 1.0 if v == 0.0 else (0.0 if v == 0.5 else v * 2)
            if self._offer(node, f"constant {v!r} -> {alt!r}"):
                return ast.Constant(alt)
        return node

    def visit_If(self, node):
        node.test = self.visit(node.test)
        node.body = [self.visit(s) for s in node.body]
        node.orelse = [self.visit(s) for s in node.orelse]
        if self._offer(node, f"`if {ast.unparse(node.test)[:50]}` never taken"):
            new = copy.deepcopy(node)
            new.test = ast.Constant(False)
            return new
        return node

    def visit_Assign(self, node):
        node = self.generic_visit(node)
        if self._depth and self._offer(node, f"delete `{ast.unparse(node)[:60]}`"):
            return ast.Pass()
        return node


def list_mutants(source: str, scope: set[str] | None = None) -> list[Mutant]:
    m = _Mutator(scope=scope)
    m.visit(ast.parse(source))
    return [Mutant(i, *point) for i, point in enumerate(m.points)]


def mutated_code(source: str, index: int, filename: str, scope: set[str] | None = None):
    tree = _Mutator(target=index, scope=scope).visit(ast.parse(source))
    ast.fix_missing_locations(tree)
    return compile(tree, filename, "exec")


def _install_mutant(module_name: str, code) -> None:
    """Put the mutated module in sys.modules before anything imports the real one."""
    package_name, _, attr = module_name.rpartition(".")
    package = importlib.import_module(package_name)
    spec = importlib.util.spec_from_file_location(module_name, code.co_filename)
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module
    exec(code, module.__dict__)
    setattr(package, attr, module)


def _forget_project_modules() -> None:
    """Drop every mean_nav module from sys.modules (third-party ones stay preloaded), so the
    tests import the project afresh, around the mutant."""
    for name in [k for k in sys.modules if k == "mean_nav" or k.startswith("mean_nav.")]:
        del sys.modules[name]


def _spawn_pytest(test_files: list[str], module_name: str | None, code, timeout_s: float,
                  trace_file: Path | None = None) -> int:
    """Fork; the child (optionally mutated, optionally line-traced) runs pytest quietly and
    exits with pytest's status (SIGALRM after timeout_s). Returns the child's pid."""
    pid = os.fork()
    if pid == 0:   # child
        try:
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, 1)
            os.dup2(devnull, 2)
            signal.alarm(max(1, int(timeout_s)))
            # `bench` imports every benchmark, and with them the localizer, the filter and the
            # camera model: modules imported before the mutant would keep the real functions
            # (`from .filter import ...`) and their module-level lines would never be traced
            _forget_project_modules()
            if code is not None:
                _install_mutant(module_name, code)
            lines: set[int] = set()
            if trace_file is not None:
                target = str(Path(importlib.util.find_spec(module_name).origin))

                def tracer(frame, event, arg):
                    if frame.f_code.co_filename != target:
                        return None

                    def local(frame, event, arg):
                        lines.add(frame.f_lineno)
                        return local
                    lines.add(frame.f_lineno)
                    return local
                import threading
                sys.settrace(tracer)
                threading.settrace(tracer)
            import pytest
            rc = pytest.main(["-x", "-q", "-p", "no:cacheprovider", "--no-header", *test_files])
            if trace_file is not None:
                sys.settrace(None)
                trace_file.write_text(json.dumps(sorted(lines)))
            os._exit(int(rc))
        except BaseException:  # noqa: BLE001 - a child must never return into the parent's code
            os._exit(99)
    return pid


def _exit_code(status: int) -> int:
    """A wait status as the exit code, or -signal when the child was killed."""
    return -os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status)


def mutate_module(module_name: str, test_files: list[str], limit: int | None = None, jobs: int = 1,
                  sample: int | None = None, seed: int = 0) -> list[Mutant]:
    path = Path(importlib.util.find_spec(module_name).origin)
    source = path.read_text(encoding="utf-8")
    scope = SCOPES.get(module_name)
    mutants = list_mutants(source, scope)
    if limit is not None:
        mutants = mutants[:limit]
    if sample is not None and sample < len(mutants):
        # the same mutants for the same source, module and seed: runs compare
        picked = sorted(random.Random(f"{module_name}:{seed}").sample(range(len(mutants)), sample))
        print(f"{module_name}: a random sample of {sample} of its {len(mutants)} mutants (seed {seed})")
        mutants = [mutants[i] for i in picked]
    with tempfile.TemporaryDirectory() as tmp:
        trace_file = Path(tmp) / "lines.json"
        t0 = time.perf_counter()
        _, status = os.waitpid(_spawn_pytest(test_files, module_name, None, 1800, trace_file), 0)
        rc = _exit_code(status)
        baseline_s = time.perf_counter() - t0
        if rc != 0:
            print(f"{module_name}: skipped, its tests fail without any mutation (pytest exit {rc}); "
                  f"run `python -m pytest {' '.join(test_files)}` and fix them first")
            return []
        covered = set(json.loads(trace_file.read_text()))
    timeout_s = max(20.0, 4.0 * baseline_s)
    for m in mutants:
        if not covered.intersection(range(m.statement_start, m.statement_end + 1)):
            m.status = "not covered"
    to_run = [m for m in mutants if m.status == "pending"]
    running: dict[int, tuple[Mutant, float]] = {}
    bar = tqdm.tqdm(total=len(to_run), desc=module_name.rsplit(".", 1)[-1], unit="mutant", leave=False,
                    mininterval=5.0)
    def spawn(m: Mutant) -> int:
        return _spawn_pytest(test_files, module_name, mutated_code(source, m.index, str(path), scope), timeout_s)

    try:
        _run_all(to_run, running, bar, spawn, jobs)
    finally:   # interrupted: no mutant child outlives the run
        for pid in running:
            os.kill(pid, signal.SIGKILL)
        bar.close()
    return mutants


def _run_all(to_run: list[Mutant], running: dict, bar, spawn, jobs: int) -> None:
    """Keep `jobs` mutant children running until every mutant has its fate."""
    while to_run or running:
        while to_run and len(running) < jobs:
            m = to_run.pop(0)
            running[spawn(m)] = (m, time.perf_counter())
        pid, status = os.wait()
        if pid not in running:
            continue
        m, t0 = running.pop(pid)
        m.seconds = time.perf_counter() - t0
        rc = _exit_code(status)
        m.status = "survived" if rc == 0 else ("timeout" if rc == -signal.SIGALRM else "killed")
        bar.update(1)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--modules", nargs="+", default=list(TARGETS), choices=list(TARGETS),
                        metavar="MODULE", help="modules to mutate (default: all of " + ", ".join(TARGETS) + ")")
    parser.add_argument("--limit", type=int, default=None, help="only the first N mutants per module (a smoke run)")
    parser.add_argument("--list", action="store_true", help="list the mutants and exit")
    parser.add_argument("--json", type=Path, default=None, help="also write every mutant and its fate here")
    parser.add_argument("--jobs", type=int, default=1, help="mutants tested at once (one forked pytest each)")
    parser.add_argument("--sample", type=int, default=None,
                        help="test a random sample of N mutants per module (a loaded machine); the rate is the sample's")
    parser.add_argument("--seed", type=int, default=0, help="seed of --sample")


def run(args: argparse.Namespace) -> int:
    os.chdir(ROOT)
    for name in PRELOAD:
        importlib.import_module(name)
    results: dict[str, list[Mutant]] = {}
    for module_name in args.modules:
        files = [f for f in TARGETS[module_name] if (ROOT / f).is_file()]
        if not files:
            print(f"{module_name}: none of its test files exist ({' '.join(TARGETS[module_name])}); skipped")
            continue
        if args.list:
            source = Path(importlib.util.find_spec(module_name).origin).read_text(encoding="utf-8")
            for m in list_mutants(source, SCOPES.get(module_name))[:args.limit]:
                print(f"{module_name}:{m.line}  {m.description}")
            continue
        print(f"{module_name}: {len(files)} test files: {' '.join(files)}", flush=True)
        mutants = mutate_module(module_name, files, args.limit, max(1, args.jobs), args.sample, args.seed)
        if mutants:
            results[module_name] = mutants
            _print_module(module_name, mutants)
    if args.list:
        return 0
    print("\nkill rate per module (killed + timeout) / mutants:")
    for module_name, mutants in results.items():
        killed = sum(m.status in ("killed", "timeout") for m in mutants)
        print(f"  {module_name:28s} {killed:4d} / {len(mutants):4d} = {100.0 * killed / max(len(mutants), 1):5.1f} %")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({k: [asdict(m) for m in v] for k, v in results.items()}, indent=1))
    return 0


def _print_module(module_name: str, mutants: list[Mutant]) -> None:
    killed = sum(m.status in ("killed", "timeout") for m in mutants)
    print(f"{module_name}: {killed}/{len(mutants)} killed ({100.0 * killed / max(len(mutants), 1):.1f} %)")
    for m in mutants:
        if m.status in ("survived", "not covered"):
            print(f"  {m.status:11s} line {m.line:4d}: {m.description}")
    sys.stdout.flush()
