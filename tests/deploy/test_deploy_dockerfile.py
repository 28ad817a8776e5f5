"""The Dockerfile, checked offline with BuildKit's own parser (the `dockerfile` package): it
parses, copies only files that exist and that .dockerignore lets through, installs the torch the
project pins, runs as a non-root user with the `gplr` entry point, and agrees with the compose
file on build arguments, state directory and metrics port.
"""
from __future__ import annotations

import fnmatch
import re
import tomllib
from pathlib import Path

import dockerfile

from tests.deploy.deploy_helpers import REPO, compose_model

DOCKERFILE = REPO / "Dockerfile"
_INSTRUCTIONS = {"FROM", "ARG", "ENV", "RUN", "COPY", "ADD", "WORKDIR", "USER", "VOLUME", "EXPOSE",
                 "ENTRYPOINT", "CMD", "LABEL", "HEALTHCHECK", "SHELL", "STOPSIGNAL", "ONBUILD"}


def commands(text: str | None = None) -> list[dockerfile.Command]:
    return list(dockerfile.parse_string(text) if text is not None else dockerfile.parse_file(str(DOCKERFILE)))


def stages() -> list[list[dockerfile.Command]]:
    """Commands per build stage (global ARGs before the first FROM are dropped)."""
    out: list[list[dockerfile.Command]] = []
    for cmd in commands():
        if cmd.cmd == "FROM":
            out.append([])
        if out:
            out[-1].append(cmd)
    return out


def build_args() -> dict[str, str]:
    args = {}
    for cmd in commands():
        if cmd.cmd == "ARG":
            name, _, default = cmd.value[0].partition("=")
            args[name] = default
    return args


def dockerignore_allows(path: str) -> bool:
    """Docker's rule: the last matching .dockerignore pattern decides (`!` re-includes)."""
    allowed = True
    for line in (REPO / ".dockerignore").read_text().splitlines():
        pattern = line.strip()
        if not pattern or pattern.startswith("#"):
            continue
        negate = pattern.startswith("!")
        pattern = pattern.lstrip("!").rstrip("/")
        if fnmatch.fnmatch(path, pattern) or path.startswith(pattern + "/"):
            allowed = negate
    return allowed


def problems(cmds: list[dockerfile.Command]) -> list[str]:
    """What BuildKit would reject beyond the syntax its parser already checked."""
    found = [f"line {c.start_line}: unknown instruction {c.cmd}" for c in cmds if c.cmd not in _INSTRUCTIONS]
    found += [f"line {c.start_line}: {c.cmd} without arguments" for c in cmds if not any(c.value)]
    first = next((c for c in cmds if c.cmd != "ARG"), None)
    if first is None or first.cmd != "FROM":
        found.append("the first instruction after global ARGs must be FROM")
    return found


def test_dockerfile_parses_into_valid_instructions() -> None:
    assert problems(commands()) == []
    for broken in ("RUN echo\nFROM x", "FROM x\nCOPY", "FROM x\nCOPPY a b", "FROM x\nEXPOSE"):
        assert problems(commands(broken)), broken


def test_base_image_and_torch_pin() -> None:
    args = build_args()
    assert args["PYTHON_IMAGE"] == "python:3.11-slim"
    assert args["TORCH_VARIANT"] == "cpu"
    make_pin = re.search(r"torch==([0-9.]+)", (REPO / "Makefile").read_text())
    assert make_pin and args["TORCH_VERSION"] == make_pin.group(1)
    runs = " ".join(c.value[0] for c in commands() if c.cmd == "RUN")
    assert 'download.pytorch.org/whl/${TORCH_VARIANT}' in runs
    assert runs.index("torch==") < runs.index("pip install .")  # torch first, from its index


def test_copied_sources_exist_and_reach_the_context() -> None:
    copied = [src for cmd in commands() if cmd.cmd == "COPY" and not any(f.startswith("--from") for f in cmd.flags)
              for src in cmd.value[:-1]]
    import tomllib

    setup = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]
    modules = {f"{m}.py" for m in setup.get("py-modules", [])}  # what the wheel installs: all of it
    assert {"pyproject.toml", "core", "streams", "recsys"} | modules <= set(copied)
    assert "gplr_stream.py" in modules
    for src in copied:
        if any(c in src for c in "*?["):  # optional files: whatever matches must get through
            matches = [str(p.relative_to(REPO)) for p in REPO.glob(src)]
        else:
            assert (REPO / src).exists(), f"COPY {src}: no such file in the repository"
            matches = [src]
        for path in matches:
            assert dockerignore_allows(path), f"COPY {path}: excluded by .dockerignore"
    for private in (".venv", "tests", ".git", "data-dir", ".env"):
        assert not dockerignore_allows(private), f".dockerignore lets {private} into the build context"
    packages = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]["find"]
    assert {p.rstrip("*") for p in packages["include"]} <= set(copied)


def test_runtime_stage_is_non_root_with_gplr_entry_point() -> None:
    runtime = stages()[-1]
    users = [c.value[0] for c in runtime if c.cmd == "USER"]
    assert users and users[-1] not in {"root", "0"}
    (entry,) = [c for c in runtime if c.cmd == "ENTRYPOINT"]
    assert entry.json and list(entry.value) == ["gplr"]
    scripts = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
    assert "gplr" in scripts


def test_image_agrees_with_compose(compose_bin: Path) -> None:
    runtime = stages()[-1]
    env = {}
    for cmd in runtime:
        if cmd.cmd == "ENV":
            env.update(zip(cmd.value[::2], cmd.value[1::2]))
    exposed = {v for c in runtime if c.cmd == "EXPOSE" for v in c.value}
    volumes = {v for c in runtime if c.cmd == "VOLUME" for v in c.value}
    services = compose_model(compose_bin, "gpu")["services"]
    for name in ("worker", "trainer", "trainer-gpu", "topics"):
        svc = services[name]
        assert svc["environment"]["GPLR_DATA_DIR"] == env["GPLR_DATA_DIR"]
        assert svc["environment"]["GPLR_METRICS_PORT"] in exposed
        assert set(svc["build"].get("args", {})) <= set(build_args())
    assert env["GPLR_DATA_DIR"] in volumes  # each worker replica gets its own anonymous volume
