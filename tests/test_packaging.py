"""The Bento and its container (issue 11, section 1).

One `make bento` equivalent per module (the project's wheel, then `bentoml build` into a temporary BentoML
home: about 5 s), then its contents: bento.yaml, the service source, models/, the pinned requirements, the
generated Dockerfile (CUDA base image, uv, system packages, the build-time check of the `cxrgen` command), the
wheel with the console script and entry points that the Kubernetes Jobs run, and `bentoml serve` of the Bento.
Building the image itself needs a container builder and the registries; where there is none the test says so.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import pytest
import yaml

from service_support import DEFAULT_VERSION, REPO, service_env

BIN = Path(sys.executable).parent
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())


def _bentofile() -> dict:
    return yaml.safe_load((REPO / "bentofile.yaml").read_text())


@pytest.fixture(scope="module")
def bento(tmp_path_factory):
    """(path of the built Bento, its tag, the environment that built it)."""
    root = tmp_path_factory.mktemp("bento")
    env = {k: v for k, v in os.environ.items() if k != "PROMETHEUS_MULTIPROC_DIR"}
    env.update(service_env(root, CXRGEN_WARMUP=0))
    # 1. The wheel, where bentofile.yaml expects it (as `make bento` does; dist/ is git-ignored).
    for old in (REPO / "dist").glob("cxrgen-*.whl"):
        old.unlink()
    wheel = subprocess.run([str(BIN / "pip"), "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", "dist", "."],
                           cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert wheel.returncode == 0, wheel.stderr[-3000:]
    # 2. The Bento.
    built = subprocess.run([str(BIN / "bentoml"), "build", ".", "--output", "tag"], cwd=REPO, env=env,
                           capture_output=True, text=True, timeout=600)
    assert built.returncode == 0, built.stdout[-3000:] + built.stderr[-3000:]
    tag = re.search(r"__tag__:(\S+)", built.stdout).group(1)
    assert tag.startswith("cxrgen:")
    path = root / "bentoml" / "bentos" / "cxrgen" / tag.split(":")[1]
    assert path.is_dir()
    return path, tag, env


def test_the_bentofile_ships_the_wheel_pyproject_builds():
    name, version = PYPROJECT["project"]["name"], PYPROJECT["project"]["version"]
    assert _bentofile()["python"]["wheels"] == [f"dist/{name}-{version}-py3-none-any.whl"]


def test_bento_yaml_and_source(bento):
    path, tag, _ = bento
    meta = yaml.safe_load((path / "bento.yaml").read_text())
    assert meta["service"] == "service.service:CXRGen" and meta["name"] == "cxrgen"
    assert meta["bentoml_version"] == "1.4.39" and meta["labels"]["project"] == "cxrgen"
    assert meta["docker"]["base_image"].startswith("nvidia/cuda:13.")
    src = path / "src"
    for rel in ("service/service.py", "service/security.py", "service/static/ui.html", "training/cli.py",
                "training/feedback/migrations/script.py.mako", "training/align/prompts/heldout.jsonl",
                "export/ort.py", "models/default/model_index.json", "models/default/cxrgen_manifest.json",
                "models/rewards/plausibility/reward_manifest.json"):
        assert (src / rel).is_file(), rel
    assert (src / "models" / "default" / "unet").is_dir()
    assert not list(src.rglob("__pycache__")) and not (src / "var").exists() and not (src / "runs").exists()
    # Every reward folder of the repository is in the Bento (the service scores with all of them).
    rewards = {p.name for p in (REPO / "models" / "rewards").iterdir() if p.is_dir()}
    assert rewards and rewards <= {p.name for p in (src / "models" / "rewards").iterdir()}


def test_requirements_carry_every_pin(bento):
    from packaging.requirements import Requirement

    path, _, _ = bento
    want = [Requirement(x) for x in (REPO / "requirements-serve.txt").read_text().splitlines()
            if x.strip() and not x.startswith("#")]
    got = {}
    for line in (path / "env" / "python" / "requirements.txt").read_text().splitlines():
        if line.strip() and not line.startswith(("#", "-")):
            r = Requirement(line)
            got[r.name.lower()] = r
    for r in want:
        assert str(r.specifier).startswith("=="), f"{r} is not pinned"
        have = got.get(r.name.lower())
        assert have is not None, f"{r.name} missing from the Bento's requirements"
        assert have.specifier == r.specifier and have.extras == r.extras, (r, have)


def test_dockerfile_uses_a_cuda_base_image_and_installs_the_project(bento):
    path, _, _ = bento
    docker = (path / "env" / "docker" / "Dockerfile").read_text()
    base = re.search(r"^FROM (\S+)", docker, re.M).group(1)
    assert re.fullmatch(r"nvidia/cuda:13\.\d+\.\d+-(base|runtime|cudnn-runtime)-ubuntu\d+\.\d+", base), base
    # torch's wheels and the image agree on the CUDA major version.
    torch_pin = next(d for d in PYPROJECT["project"]["dependencies"] if d.startswith("torch=="))
    import torch

    if torch.__version__.startswith(torch_pin.split("==")[1]) and torch.version.cuda:
        assert base.split(":")[1].split(".")[0] == torch.version.cuda.split(".")[0]
    # The virtualenv is Python 3.11 (pyproject's requires-python), made by uv, which the template provides.
    assert "uv venv -p 3.11" in docker and re.search(r"COPY --from=ghcr\.io/astral-sh/uv:\d+\.\d+\.\d+ ", docker)
    assert re.search(r"apt-get install .*ca-certificates", docker)
    assert "env/python/install.sh" in docker  # requirements, then env/python/wheels/*.whl
    assert "RUN cxrgen --help" in docker and "cxrgen.commands" in docker  # the build fails without the command
    # The user the Kubernetes manifests pin (runAsUser 1034) and the Bento path the seed-models Job reads.
    assert "BENTO_USER_UID=1034" in docker and re.search(r"^USER bentoml", docker, re.M)
    assert "BENTO_PATH=/home/bentoml/bento" in docker
    k8s = (REPO / "k8s" / "base" / "deployment.yaml").read_text()
    assert "runAsUser: 1034" in k8s
    assert "/home/bentoml/bento" in (REPO / "k8s" / "base" / "scripts" / "seed-models.sh").read_text()


def _wheel_entry_points(whl: Path) -> dict[str, dict[str, str]]:
    import configparser

    with zipfile.ZipFile(whl) as z:
        name = next(n for n in z.namelist() if n.endswith(".dist-info/entry_points.txt"))
        cp = configparser.ConfigParser(delimiters=("=",))
        cp.optionxform = str
        cp.read_string(z.read(name).decode())
    return {s: {k: v.strip() for k, v in cp[s].items()} for s in cp.sections()}


def test_the_wheel_has_the_cxrgen_command_and_its_plugins(bento):
    path, _, _ = bento
    wheels = list((path / "env" / "python" / "wheels").glob("cxrgen-*.whl"))
    assert len(wheels) == 1, wheels
    eps = _wheel_entry_points(wheels[0])
    assert eps["console_scripts"] == PYPROJECT["project"]["scripts"]
    assert eps["cxrgen.commands"] == PYPROJECT["project"]["entry-points"]["cxrgen.commands"]
    assert eps["cxrgen.backends"] == PYPROJECT["project"]["entry-points"]["cxrgen.backends"]
    with zipfile.ZipFile(wheels[0]) as z:
        names = set(z.namelist())
        meta = z.read(next(n for n in names if n.endswith(".dist-info/METADATA"))).decode()
    for rel in ("training/cli.py", "service/service.py", "export/ort.py", "service/static/ui.html",
                "training/feedback/migrations/script.py.mako", "training/align/prompts/heldout.jsonl"):
        assert rel in names, rel
    assert not any(n.startswith(("models/", "tests/")) for n in names)  # the weights travel in src/models
    # The wheel asks for the same pins as the requirements (so installing it after them changes nothing).
    requires = {x.split(":", 1)[1].strip().split(";")[0].strip() for x in meta.splitlines()
                if x.startswith("Requires-Dist:") and "extra ==" not in x}
    norm = lambda s: re.sub(r"\[([^\]]+)\]", lambda m: "[" + ",".join(sorted(m.group(1).split(","))) + "]", s)  # noqa: E731
    assert {norm(d) for d in PYPROJECT["project"]["dependencies"]} == {norm(r.replace(" ", "")) for r in requires}


def test_every_cxrgen_command_the_k8s_pods_run_is_in_the_wheel(bento):
    path, _, _ = bento
    commands = set(_wheel_entry_points(next((path / "env" / "python" / "wheels").glob("*.whl")))["cxrgen.commands"])
    used = set()
    for f in (REPO / "k8s").rglob("*.yaml"):
        for doc in yaml.safe_load_all(f.read_text()):
            for c in _containers(doc):
                cmd = [*c.get("command", []), *c.get("args", [])]
                if cmd and cmd[0] == "cxrgen":
                    used.add(cmd[1])
    for f in (REPO / "k8s").rglob("*.sh"):  # the scripts the other pods run (`sh /scripts/...`)
        used |= set(re.findall(r"^\s*(?:exec\s+)?(?:until\s+)?cxrgen\s+([a-z]+)", f.read_text(), re.M))
    assert {"store", "augment", "loop"} <= used, used  # the parse found the Jobs' commands
    assert used <= commands, used - commands


def _containers(doc):
    """Every container spec anywhere in a manifest (Deployments, Jobs, CronJobs, ...)."""
    if isinstance(doc, dict):
        for key in ("containers", "initContainers"):
            if isinstance(doc.get(key), list):
                yield from (c for c in doc[key] if isinstance(c, dict))
        for v in doc.values():
            yield from _containers(v)
    elif isinstance(doc, list):
        for v in doc:
            yield from _containers(v)


def test_bentoml_serve_the_bento(bento, tmp_path):
    import httpx

    from service_support import KEYS_ENV, auth, free_port, wait_ready

    _, tag, env = bento
    port = free_port()
    proc = subprocess.Popen([str(BIN / "bentoml"), "serve", tag, "--port", str(port)], cwd=tmp_path,
                            env={**env, "CXRGEN_API_KEYS": KEYS_ENV}, stdout=subprocess.DEVNULL,
                            stderr=subprocess.STDOUT, start_new_session=True)
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=120) as c:
            wait_ready(c.get)
            r = c.post("/generate", json={"prompt": "Cardiomegaly.", "steps": 2}, headers=auth("client"))
            assert r.status_code == 200, r.text
            assert r.json()["model_version"] == DEFAULT_VERSION
    finally:
        proc.terminate()
        proc.wait(30)


def _builder() -> str | None:
    """A container builder that can run here: docker or podman with a reachable daemon, or buildah."""
    for name in ("docker", "podman"):
        if shutil.which(name) and subprocess.run([name, "info"], capture_output=True, timeout=30).returncode == 0:
            return name
    return "buildah" if shutil.which("buildah") else None


@pytest.mark.slow
def test_containerize_the_bento(bento):
    """The image itself: needs a container builder and network access to Docker Hub, ghcr.io and PyPI."""
    builder = _builder()
    if builder is None:
        pytest.skip("no container builder here (docker / podman without a running daemon, no buildah): the "
                    "generated Dockerfile is checked instead (test_dockerfile_uses_a_cuda_base_image_...)")
    _, tag, env = bento
    out = subprocess.run([str(BIN / "bentoml"), "containerize", tag, "--backend", builder, "-t", "cxrgen:test"],
                         env=env, capture_output=True, text=True, timeout=3600)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    run = subprocess.run([builder, "run", "--rm", "--entrypoint", "cxrgen", "cxrgen:test", "store", "--help"],
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
