"""Checks on built wheels and the sdist (``make wheels-check``; CI runs it on its wheel).

    python scripts/check_wheels.py [--sdist SDIST] WHEEL...

For each wheel:
- its tag is ``cp310-abi3`` and ``abi3audit --strict`` finds no symbol outside CPython
  3.10's stable ABI, so one wheel serves 3.10 and every later CPython;
- ``auditwheel show`` finds it consistent with the platform policy in its file name
  (``manylinux_2_17`` = manylinux2014, or ``musllinux_1_2``) and with no external library
  other than the ones that policy allows;
- it holds every file of ``python/`` (``py.typed`` and ``_core.pyi`` among them), the
  extension ``celeriac/_core*.so`` and pyproject's console scripts.

With ``--sdist``: the sdist builds into a wheel in a fresh venv (pip's isolated build, with
maturin from the registry), and that wheel holds the same files. ``MATURIN_PEP517_ARGS``
chooses its cargo profile (default here ``--profile ci``: no fat LTO) and the compiled
dependencies of ``target/`` are reused through ``CARGO_TARGET_DIR``.
"""

from __future__ import annotations

import argparse
import configparser
import json
import os
import pathlib
import re
import subprocess
import sys
import tempfile
import venv
import zipfile

if sys.version_info >= (3, 11):
    import tomllib
else:  # the Makefile installs tomli into a 3.10 venv
    import tomli as tomllib  # type: ignore[import-not-found,unused-ignore]

REPO = pathlib.Path(__file__).resolve().parent.parent
#: The platform policies the wheels are built for (scripts/build_wheels.sh).
POLICIES = re.compile(r"^(manylinux_2_17|musllinux_1_2)_(x86_64|aarch64)$")


def python_files() -> set[str]:
    src = REPO / "python"
    return {
        path.relative_to(src).as_posix()
        for path in src.rglob("*")
        if path.is_file() and "__pycache__" not in path.parts and not path.name.endswith(".so")
    }


def missing_contents(wheel_path: pathlib.Path) -> list[str]:
    """What the wheel lacks of python/, the extension and the console scripts."""
    with zipfile.ZipFile(wheel_path) as wheel:
        names = set(wheel.namelist())
        entry_points = configparser.ConfigParser(delimiters=("=",))
        for name in names:
            if name.endswith(".dist-info/entry_points.txt"):
                entry_points.read_string(wheel.read(name).decode())
    missing = sorted(python_files() - names)
    for required in ("celeriac/py.typed", "celeriac/_core.pyi"):
        if required not in names and required not in missing:
            missing.append(required)
    if not any(n.startswith("celeriac/_core") and n.endswith(".so") for n in names):
        missing.append("celeriac/_core*.so")
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())
    for script, target in pyproject["project"]["scripts"].items():
        if entry_points.get("console_scripts", script, fallback=None) != target:
            missing.append(f"console script {script} = {target}")
    return missing


def wheel_tags(wheel_path: pathlib.Path) -> tuple[str, str, set[str]]:
    """(python tag, abi tag, platform tags) from the wheel's file name."""
    _name, _version, python_tag, abi_tag, platforms = wheel_path.name[: -len(".whl")].split("-")
    return python_tag, abi_tag, set(platforms.split("."))


def audit_platform(wheel_path: pathlib.Path) -> list[str]:
    """auditwheel's verdict on the platform policy, against the wheel's own tags."""
    _python_tag, _abi_tag, platforms = wheel_tags(wheel_path)
    claimed = {tag for tag in platforms if POLICIES.match(tag)}
    if not claimed:
        return [f"platform tags {sorted(platforms)}: none of manylinux_2_17 / musllinux_1_2"]
    command = [sys.executable, "-m", "auditwheel", "show", "--json", str(wheel_path)]
    with tempfile.TemporaryDirectory() as no_libraries:
        if any(tag.startswith("musllinux") for tag in claimed):
            # This host's libraries are glibc's: a musl wheel is judged against none of them.
            command[4:4] = ["--ldpaths", no_libraries]
        shown = subprocess.run(command, capture_output=True, text=True, check=False)
    if shown.returncode != 0:
        return [f"auditwheel show failed: {shown.stderr.strip() or shown.stdout.strip()}"]
    report = json.loads(shown.stdout)
    consistent = report["overall_tag"]
    external = sorted(report.get("external_libs") or {})
    print(f"  auditwheel: consistent with {consistent}; libraries to bundle: {external or 'none'}")
    problems = []
    if consistent not in claimed:
        problems.append(f"auditwheel: consistent with {consistent}, not with {sorted(claimed)}")
    if external:
        problems.append(f"auditwheel: links libraries outside the policy: {external}")
    return problems


def audit_abi3(wheel_path: pathlib.Path) -> list[str]:
    python_tag, abi_tag, _platforms = wheel_tags(wheel_path)
    problems = []
    if (python_tag, abi_tag) != ("cp310", "abi3"):
        problems.append(f"tagged {python_tag}-{abi_tag}, not cp310-abi3")
    audit = subprocess.run(
        [sys.executable, "-m", "abi3audit", "--strict", "--summary", str(wheel_path)],
        capture_output=True,
        text=True,
        check=False,
    )
    summary = " ".join((audit.stdout + audit.stderr).split())
    print(f"  abi3audit: {summary}")
    if audit.returncode != 0:
        problems.append("abi3audit: symbols outside the stable ABI of CPython 3.10")
    return problems


def check_wheel(wheel_path: pathlib.Path) -> list[str]:
    print(f"{wheel_path.name}:")
    problems = audit_abi3(wheel_path) + audit_platform(wheel_path)
    if missing := missing_contents(wheel_path):
        problems.append(f"lacks: {', '.join(missing)}")
    else:
        print("  contents: all of python/, the extension and the console scripts")
    return problems


def check_sdist(sdist: pathlib.Path) -> list[str]:
    """Build the sdist into a wheel in a fresh venv, as pip does for a user without a wheel."""
    print(f"{sdist.name}: building it in a fresh venv")
    with tempfile.TemporaryDirectory(prefix="celeriac-sdist-") as tmp:
        env_dir = pathlib.Path(tmp) / "venv"
        venv.create(env_dir, with_pip=True)
        env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "PYTHONPATH")}
        env.setdefault("MATURIN_PEP517_ARGS", "--profile ci")
        env.setdefault("CARGO_TARGET_DIR", str(REPO / "target"))
        env["PIP_DISABLE_PIP_VERSION_CHECK"] = "1"
        out = pathlib.Path(tmp) / "out"
        build = [str(env_dir / "bin" / "python"), "-m", "pip", "wheel", "-q", "--no-deps"]
        build += ["--no-binary", "celeriac", "-w", str(out), str(sdist.resolve())]
        if subprocess.run(build, cwd=tmp, env=env, check=False).returncode != 0:
            return [f"{sdist.name} does not build in a fresh venv"]
        built = sorted(out.glob("celeriac-*.whl"))
        if len(built) != 1:
            return [f"{sdist.name} built {len(built)} wheels"]
        if missing := missing_contents(built[0]):
            return [f"the wheel built from {sdist.name} lacks: {', '.join(missing)}"]
        print(f"  builds in a fresh venv into {built[0].name}, with all of python/")
    return []


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("wheels", nargs="*", type=pathlib.Path)
    parser.add_argument("--sdist", type=pathlib.Path)
    args = parser.parse_args()
    if not args.wheels and not args.sdist:
        parser.error("nothing to check")
    failures = {}
    for wheel_path in args.wheels:
        if problems := check_wheel(wheel_path):
            failures[wheel_path.name] = problems
    if args.sdist and (problems := check_sdist(args.sdist)):
        failures[args.sdist.name] = problems
    for name, problems in failures.items():
        for problem in problems:
            print(f"FAILED {name}: {problem}", file=sys.stderr)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
