"""Every development task of the ALQ workspace.

``nox -s tests`` runs every package's tests that can run on this machine,
``nox -s "tests(core)"`` one package; ``nox -s demo`` runs the main job;
``nox -s docs`` builds the documentation site.
Each session builds its own virtual environment from scratch.
"""

from __future__ import annotations

from pathlib import Path

import nox

nox.needs_version = ">=2024.3.2"
nox.options.sessions = ["tests", "lint"]
nox.options.reuse_existing_virtualenvs = False

ROOT = Path(__file__).parent
CONSTRAINTS = ("-c", str(ROOT / "constraints" / "cpu.txt"))
PACKAGES = {
    "core": ["./packages/alq-core[test]"],
    # triton on CPU runs the GPU kernels in its interpreter, so CI checks their bytes too.
    "torch": ["./packages/alq-core", "./packages/alq-torch[test,triton]"],
    "cupy": ["./packages/alq-core", "./packages/alq-cupy[test]"],
    # the GPU machine's scripts in benchmarks/, on their CPU paths (they rot otherwise: CI has no GPU)
    "scripts": ["./packages/alq-core", "./packages/alq-torch[triton]"],
}
TEST_PATHS = {name: f"packages/alq-{name}/tests" for name in ("core", "torch", "cupy")} | {
    "scripts": "benchmarks/test_scripts.py"
}
TOOLS = ["pytest>=7", "hypothesis>=6.80", "pytest-benchmark>=4"]


@nox.session(python="3.11")
@nox.parametrize("package", list(PACKAGES), ids=list(PACKAGES))
def tests(session: nox.Session, package: str) -> None:
    """Install one package (and what it needs) from scratch and run its tests (``scripts``: the benchmark
    scripts' CPU smoke tests, with alq-torch)."""
    session.install(*CONSTRAINTS, *PACKAGES[package], *TOOLS)
    # Multi-process Gloo tests start several torch processes on small machines: one thread each.
    session.env.setdefault("OMP_NUM_THREADS", "1")
    session.run("pytest", TEST_PATHS[package], "-q", *session.posargs)


@nox.session(python="3.11")
def lint(session: nox.Session) -> None:
    """Ruff: lint every package, the benchmarks and this file."""
    session.install("ruff>=0.6")
    session.run("ruff", "check", "packages", "benchmarks", "noxfile.py", *session.posargs)


@nox.session(python="3.11", default=False)
def typecheck(session: nox.Session) -> None:
    """mypy --strict on every package's src/ (configured in pyproject.toml)."""
    session.install(
        *CONSTRAINTS, "./packages/alq-core", "./packages/alq-torch[triton]", "./packages/alq-cupy", *TOOLS, "mypy>=1.10"
    )
    session.run("mypy", *session.posargs)


@nox.session(python="3.11", default=False)
def bench(session: nox.Session) -> None:
    """pytest-benchmark suites; pass e.g. ``-- --benchmark-autosave`` or ``--benchmark-compare``."""
    session.install(*CONSTRAINTS, "./packages/alq-core", "./packages/alq-torch", "./packages/alq-cupy", *TOOLS)
    session.run("pytest", "benchmarks", "--benchmark-only", "--benchmark-columns=median,iqr,ops", *session.posargs)


@nox.session(python="3.11", default=False)
def demo(session: nox.Session) -> None:
    """The main job: all methods at 3 bits on the built-in digits data, table and plots."""
    session.install(*CONSTRAINTS, "./packages/alq-core", "./packages/alq-torch")
    session.run("alq-train", *session.posargs)


# The documentation toolchain, pinned to minor ranges known to build this site with --strict:
# mkdocs 1.6 (its 1.x config and validation keys), Material 9.x (theme.font: false, no plugins that
# download at build time), mkdocstrings 1.x with the Python handler 2.x (static analysis through
# griffe: nothing is imported, so alq_cupy documents without CuPy). Upper bounds keep a new major
# release from breaking CI's build overnight.
DOCS = ["mkdocs>=1.6,<2", "mkdocs-material>=9.5,<10", "mkdocstrings[python]>=1.0,<2", "mkdocstrings-python>=2.0,<3"]


@nox.session(python="3.11", default=False)
def docs(session: nox.Session) -> None:
    """The documentation site (mkdocs.yml, docs/): ``mkdocs build --strict``, API pages from the docstrings."""
    session.install(*CONSTRAINTS, "./packages/alq-core", "./packages/alq-torch", "./packages/alq-cupy", *DOCS)
    session.env["NO_MKDOCS_2_WARNING"] = "1"  # Material's end-of-life banner, printed on every build
    session.run("mkdocs", "build", "--strict", *session.posargs)
