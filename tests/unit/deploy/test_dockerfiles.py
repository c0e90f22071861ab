"""The images, checked without a Docker engine: every Dockerfile builds from what it copies.

No image can be built here, so each Dockerfile is read as the builder would: every COPY
source exists in the build context (the repository root) and is not dropped by
.dockerignore, every stage a COPY --from names exists, every base is pinned by digest, the
final stage runs as a numeric non-root user, and what it runs exists: the Python modules
(the image's and the chart's), the Go container's in-repository imports, the Node
container's compiled entry point and the artifacts where its code looks for them.
"""

from __future__ import annotations

import fnmatch
import json
import re
import shlex
import tomllib
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

import pytest

from services.core.settings import REPO_ROOT

DOCKER_DIR = REPO_ROOT / "deploy" / "docker"
CHART_TEMPLATES = REPO_ROOT / "deploy" / "helm" / "rendezvous" / "templates"
DIGEST = re.compile(r"^[^@\s]+@sha256:[0-9a-f]{64}$")


@dataclass
class Stage:
    name: str
    base: str
    workdir: str = "/"
    # (sources, destination, --from stage or None, workdir at the time)
    copies: list[tuple[list[str], str, str | None, str]] = field(default_factory=list)
    user: str = ""
    runs: list[str] = field(default_factory=list)
    cmd: list[str] = field(default_factory=list)
    entrypoint: list[str] = field(default_factory=list)


def instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuations joined and comments dropped."""
    logical: list[str] = []
    current = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not current and (not line or line.startswith("#")):
            continue
        if line.startswith("#"):
            continue
        if line.endswith("\\"):
            current += line[:-1] + " "
            continue
        logical.append(current + line)
        current = ""
    result = []
    for line in logical:
        keyword, _, rest = line.partition(" ")
        result.append((keyword.upper(), rest.strip()))
    return result


def exec_form(arguments: str) -> list[str]:
    return list(json.loads(arguments)) if arguments.startswith("[") else shlex.split(arguments)


def parse(path: Path) -> list[Stage]:
    args: dict[str, str] = {}
    stages: list[Stage] = []
    for keyword, rest in instructions(path.read_text()):
        if keyword == "ARG":
            name, _, default = rest.partition("=")
            args.setdefault(name, default)
        elif keyword == "FROM":
            words = rest.split()
            base = re.sub(r"\$\{(\w+)\}", lambda m: args[m.group(1)], words[0])
            name = words[2] if len(words) == 3 and words[1].upper() == "AS" else str(len(stages))
            stages.append(Stage(name=name, base=base))
        elif keyword == "WORKDIR":
            stages[-1].workdir = str(PurePosixPath(stages[-1].workdir, rest))
        elif keyword == "COPY":
            words = shlex.split(rest)
            source_stage = None
            while words[0].startswith("--"):
                flag = words.pop(0)
                if flag.startswith("--from="):
                    source_stage = flag.removeprefix("--from=")
            stage = stages[-1]
            stage.copies.append((words[:-1], words[-1], source_stage, stage.workdir))
        elif keyword == "USER":
            stages[-1].user = rest
        elif keyword == "RUN":
            stages[-1].runs.append(rest)
        elif keyword == "CMD":
            stages[-1].cmd = exec_form(rest)
        elif keyword == "ENTRYPOINT":
            stages[-1].entrypoint = exec_form(rest)
    return stages


def ignored(path: str, patterns: list[str]) -> bool:
    """Whether .dockerignore drops `path` or a directory above it (the patterns used here)."""
    parts = PurePosixPath(path).parts
    prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    for pattern in patterns:
        bare = pattern.removeprefix("**/")
        for prefix in prefixes:
            if fnmatch.fnmatch(prefix, pattern) or (
                pattern.startswith("**/") and fnmatch.fnmatch(PurePosixPath(prefix).name, bare)
            ):
                return True
    return False


def dockerignore() -> list[str]:
    lines = (REPO_ROOT / ".dockerignore").read_text().splitlines()
    return [line.strip() for line in lines if line.strip() and not line.startswith("#")]


def destination(copy: tuple[list[str], str, str | None, str]) -> str:
    _, dest, _, workdir = copy
    return str(PurePosixPath(workdir, dest))


DOCKERFILES = sorted(DOCKER_DIR.glob("*.Dockerfile"))


def test_the_three_images_have_dockerfiles() -> None:
    assert [p.name for p in DOCKERFILES] == [
        "model-go.Dockerfile",
        "model-ts.Dockerfile",
        "python.Dockerfile",
    ]


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_every_copy_source_is_in_the_build_context(dockerfile: Path) -> None:
    patterns = dockerignore()
    stages = parse(dockerfile)
    names = [stage.name for stage in stages]
    for index, stage in enumerate(stages):
        for sources, _, source_stage, _ in stage.copies:
            if source_stage is not None:
                assert source_stage in names[:index], f"COPY --from={source_stage}: no such stage"
                continue
            for source in sources:
                assert (REPO_ROOT / source).exists(), f"{dockerfile.name}: COPY {source}: missing"
                assert not ignored(source, patterns), (
                    f"{dockerfile.name}: .dockerignore drops {source}"
                )


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_bases_are_pinned_and_the_image_runs_as_a_numeric_non_root_user(dockerfile: Path) -> None:
    stages = parse(dockerfile)
    for stage in stages:
        assert stage.base == "scratch" or DIGEST.match(stage.base), (
            f"{dockerfile.name}: FROM {stage.base} is not pinned by digest"
        )
    final = stages[-1]
    uid, _, gid = final.user.partition(":")
    assert uid.isdigit() and int(uid) != 0, f"{dockerfile.name}: USER {final.user!r}"
    assert not gid or (gid.isdigit() and int(gid) != 0)


def python_modules_run() -> set[str]:
    """`python -m services.X` in the Python image and in every chart template."""
    modules = set()
    final = parse(DOCKER_DIR / "python.Dockerfile")[-1]
    if final.cmd[:2] == ["python", "-m"]:
        modules.add(final.cmd[2])
    for template in CHART_TEMPLATES.glob("*.yaml"):
        modules |= set(re.findall(r"\[python, -m, (services\.[\w.]+)\]", template.read_text()))
    return modules


def test_every_python_module_the_image_and_chart_run_exists_in_the_image() -> None:
    modules = python_modules_run()
    assert {"services.rendezvous", "services.collector", "services.runner"} <= modules
    copied = {
        source
        for stage in parse(DOCKER_DIR / "python.Dockerfile")
        if stage.name == "build"
        for sources, _, source_stage, _ in stage.copies
        if source_stage is None
        for source in sources
    }
    for module in modules:
        main = REPO_ROOT.joinpath(*module.split(".")) / "__main__.py"
        assert main.is_file(), f"{module} has no __main__"
        assert module.split(".")[0] in copied, f"{module}: its package is not copied"


def test_the_python_image_copies_every_package_pyproject_installs() -> None:
    project = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())
    find = project["tool"]["setuptools"]["packages"]["find"]
    build = next(
        stage for stage in parse(DOCKER_DIR / "python.Dockerfile") if stage.name == "build"
    )
    copied = {source for sources, *_ in build.copies for source in sources}
    for where in find["where"]:
        for package in (REPO_ROOT / where).iterdir():
            if (package / "__init__.py").is_file() and any(
                fnmatch.fnmatch(package.name, pattern) for pattern in find["include"]
            ):
                relative = package.relative_to(REPO_ROOT).as_posix()
                assert relative in copied, f"{relative} is installed by pyproject but not copied"
    assert {"pyproject.toml", "README.md"} <= copied  # the build reads both


def test_the_go_image_copies_every_in_repository_package_the_container_imports() -> None:
    module = (REPO_ROOT / "go.mod").read_text().split()[1]
    build = next(s for s in parse(DOCKER_DIR / "model-go.Dockerfile") if s.name == "build")
    copied = [source for sources, *_ in build.copies for source in sources]
    pending, seen = ["services/models/go"], set()
    while pending:
        package = pending.pop()
        if package in seen:
            continue
        seen.add(package)
        assert any(package == c or package.startswith(c + "/") for c in copied), (
            f"the Go build needs {package}, which is not copied"
        )
        for source in (REPO_ROOT / package).glob("*.go"):
            if source.name.endswith("_test.go"):
                continue
            for imported in re.findall(rf'"{re.escape(module)}/([^"]+)"', source.read_text()):
                pending.append(imported)
    assert {"go.mod", "go.sum"} <= set(copied)
    assert "services/models/artifacts" in seen  # the embedded artifacts


def test_the_node_image_serves_the_compiled_entry_point_with_the_artifacts_where_it_looks() -> None:
    stages = parse(DOCKER_DIR / "model-ts.Dockerfile")
    final = stages[-1]
    tsconfig = (REPO_ROOT / "services/models/ts/tsconfig.json").read_text()
    assert '"outDir": "dist"' in tsconfig and '"rootDir": "."' in tsconfig
    assert final.entrypoint == ["node", "dist/main.js"]
    assert (REPO_ROOT / "services/models/ts/main.ts").is_file()
    # services/models/ts/src/diabetes.ts: ARTIFACT_DIR = dist/src/../../../artifacts.
    diabetes = (REPO_ROOT / "services/models/ts/src/diabetes.ts").read_text()
    assert 'resolve(__dirname, "..", "..", "..", "artifacts")' in diabetes
    expected = PurePosixPath(final.workdir, "dist/src").parent.parent.parent / "artifacts"
    artifacts = [c for c in final.copies if c[2] is None and c[1].rstrip("/").endswith("artifacts")]
    assert artifacts and PurePosixPath(destination(artifacts[0])) == expected
    committed = sorted(
        p.relative_to(REPO_ROOT).as_posix()
        for p in (REPO_ROOT / "services/models/artifacts").glob("diabetes-*.json")
    )
    assert sorted(artifacts[0][0]) == committed
    # The generated code the tsconfig compiles comes through services/models/ts/gen -> gen/ts.
    link = REPO_ROOT / "services/models/ts/gen"
    assert link.is_symlink() and link.resolve() == (REPO_ROOT / "gen/ts").resolve()
    build = next(stage for stage in stages if stage.name == "build")
    copied_to = {destination(c) for c in build.copies}
    gen_target = PurePosixPath(build.workdir, "gen").parent / PurePosixPath(str(link.readlink()))
    assert str(PurePosixPath(*_normalise(gen_target.parts))) in copied_to


def _normalise(parts: tuple[str, ...]) -> list[str]:
    out: list[str] = []
    for part in parts:
        if part == "..":
            out.pop()
        elif part != ".":
            out.append(part)
    return out


def test_every_image_carries_the_health_probe_the_chart_runs_on_a_tls_mesh() -> None:
    helpers = (CHART_TEMPLATES / "_helpers.tpl").read_text()
    probe = re.search(r"- (/\S*grpc-health-probe)\n", helpers)
    assert probe, "the chart's TLS probe names no grpc-health-probe path"
    for dockerfile in DOCKERFILES:
        stages = parse(dockerfile)
        final = stages[-1]
        copied = [c for c in final.copies if c[1] == probe.group(1)]
        assert copied, f"{dockerfile.name}: no {probe.group(1)} in the final image"
        sources, _, source_stage, _ = copied[0]
        builder = next(stage for stage in stages if stage.name == source_stage)
        assert any("grpc-health-probe@" in run and "GOBIN=/out" in run for run in builder.runs), (
            f"{dockerfile.name}: stage {source_stage} does not build {sources[0]}"
        )


def test_dockerignore_keeps_local_state_out_but_not_the_sources() -> None:
    patterns = dockerignore()
    for path in (
        ".venv/bin/python",
        "services/models/ts/node_modules/x",
        "services/models/ts/dist/main.js",
        "tools/bin/helm",
        ".run/mesh/state.json",
    ):
        assert ignored(path, patterns), path
    for path in ("services/rendezvous/app.py", "gen/ts/descriptors.ts", "go.sum"):
        assert not ignored(path, patterns), path
