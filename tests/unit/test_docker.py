"""The container files: every image, command and option the compose file names exists in the project."""

from __future__ import annotations

import re
from pathlib import Path

import yaml

from mesh.cli import build_parser

ROOT = Path(__file__).resolve().parents[2]
DOCKER = ROOT / "docker"


def subcommand_options(name: str) -> set[str]:
    parser = build_parser()
    sub = next(a for a in parser._subparsers._actions if a.dest == "command").choices[name]
    return {flag for action in sub._actions for flag in action.option_strings}


def test_every_image_exists_for_each_platform():
    for name in ("donor-cpu", "donor-cuda", "donor-rocm", "gateway"):
        text = (DOCKER / f"{name}.Dockerfile").read_text()
        assert re.search(r"^USER mesh$", text, flags=re.M), f"{name} must not run as root"
        assert "VOLUME /cache" in text and "HF_HOME=/cache" in text
        entrypoint = re.search(r'^ENTRYPOINT \["mesh", "(\w+)"\]$', text, flags=re.M)
        assert entrypoint and entrypoint.group(1) in ("serve", "gateway")
        for sources in re.findall(r"^COPY (.+) \S+$", text, flags=re.M):
            for copied in sources.split():
                assert (ROOT / copied).exists(), f"{name} copies {copied}, which does not exist"
    assert "rocm/pytorch" in (DOCKER / "donor-rocm.Dockerfile").read_text()
    assert "cuda" in (DOCKER / "donor-cuda.Dockerfile").read_text().split("\n")[3].lower()


def test_compose_commands_and_options_exist():
    compose = yaml.safe_load((DOCKER / "compose.yaml").read_text())
    services = compose["services"]
    assert {"bootstrap", "donor-a", "donor-b", "gateway"} <= set(services)
    scripts = (ROOT / "pyproject.toml").read_text()
    assert 'mesh = "mesh.cli:main"' in scripts
    for name, service in services.items():
        dockerfile = ROOT / "docker" / Path(service["build"]["dockerfile"]).name
        assert dockerfile.exists(), f"{name}: {dockerfile} is missing"
        entrypoint = service.get("entrypoint") or re.search(r'^ENTRYPOINT (\[.*\])$', dockerfile.read_text(),
                                                             flags=re.M).group(1)
        if isinstance(entrypoint, str):
            entrypoint = yaml.safe_load(entrypoint)
        assert entrypoint[0] == "mesh"
        options = subcommand_options(entrypoint[1])
        for arg in service.get("command", []):
            if arg.startswith("--"):
                assert arg in options, f"{name}: `mesh {entrypoint[1]}` has no option {arg}"
        # Named volumes start with the image's ownership of the mount point: it must exist and be mesh's.
        for mount in service.get("volumes", []):
            target = mount.split(":")[1]
            assert re.search(rf"^RUN .*mkdir [^&]*{target}\b.*chown mesh [^&]*{target}\b", dockerfile.read_text(),
                             flags=re.M), f"{name}: {dockerfile.name} does not give {target} to the mesh user"
        for variable in service.get("environment", {}):
            assert variable.startswith("MESH_")
            assert variable in (ROOT / "mesh" / "cli.py").read_text(), f"{name}: {variable} is read by no option"


def test_peer_address_files_are_read(tmp_path):
    from mesh.cli import _peers

    path = tmp_path / "bootstrap.addr"
    path.write_text("/ip4/10.0.0.2/tcp/31337/p2p/QmA\n/ip4/127.0.0.1/tcp/31337/p2p/QmA\n")
    assert _peers([f"@{path}", "/ip4/1.2.3.4/tcp/1/p2p/QmB"]) == [
        "/ip4/10.0.0.2/tcp/31337/p2p/QmA", "/ip4/127.0.0.1/tcp/31337/p2p/QmA", "/ip4/1.2.3.4/tcp/1/p2p/QmB"]
