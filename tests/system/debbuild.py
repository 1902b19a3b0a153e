"""lpa's .debs for the package tests: built once per test run, cached per source tree.

:func:`artefacts` builds this tree and a copy of it one version up with ``debian/make-deb``
(cached under the test cache's ``debs/`` by a hash of the source files, so an unchanged tree is
not built again), and makes or finds this week's minimal Debian root
(:func:`tests.system.debroot.root_tarball`).  Each stage prints how long it took.
"""

from __future__ import annotations

import atexit
import contextlib
import importlib.machinery
import importlib.util
import os
import re
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from types import ModuleType
from typing import Any

from twisted.trial.unittest import SkipTest

import lpa
from tests.system import CHECKOUT as REPO
from tests.system import debroot


def script(name: str) -> ModuleType:
    """Import one of the Python scripts of debian/ (they have no .py suffix)."""
    path = os.path.join(REPO, "debian", name)
    loader = importlib.machinery.SourceFileLoader(name.replace("-", "_"), path)
    spec = importlib.util.spec_from_loader(loader.name, loader)
    assert spec is not None
    module = importlib.util.module_from_spec(spec)
    loader.exec_module(module)
    return module


def _read(path: str) -> str:
    with open(path, encoding="utf-8") as f:
        return f.read()


_TOOLS = {
    "dpkg-buildpackage": "dpkg-dev", "dpkg-scanpackages": "dpkg-dev", "dh": "debhelper",
    "dh_virtualenv": "dh-virtualenv", "mmdebstrap": "mmdebstrap", "lintian": "lintian",
    "unshare": "util-linux", "chroot": "coreutils",
}
_built: dict[str, Any] = {}


@contextlib.contextmanager
def stage(name: str) -> Iterator[None]:
    """Print how long a stage took (CI's log shows where the minutes go)."""
    started = time.monotonic()
    try:
        yield
    finally:
        print(f"\n  deb stage {name}: {time.monotonic() - started:.1f} s", flush=True)


def require() -> None:
    if os.geteuid() != 0:
        raise SkipTest("building and installing Debian packages into a chroot needs root")
    missing = sorted({pkg for tool, pkg in _TOOLS.items() if shutil.which(tool) is None})
    if missing:
        raise SkipTest(f"missing tools: apt-get install {' '.join(missing)} (.ci/run does)")


def _build(source: str, name: str) -> str:
    """The .debs of ``source`` (built, or from the cache): the directory holding them."""
    cache = debroot.cache_dir()
    out = tempfile.mkdtemp(prefix=f"lpa-debs-{name}-", dir="/var/tmp")
    atexit.register(shutil.rmtree, out, True)
    log = os.path.join(cache, "logs", f"build-{name}.log")
    os.makedirs(os.path.dirname(log), exist_ok=True)
    completed = subprocess.run(
        ["/usr/bin/python3", os.path.join(REPO, "debian", "make-deb"), "--source", source,
         "--out", out, "--cache", os.path.join(cache, "debs"), "--log", log],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, check=False)
    if completed.returncode != 0:
        raise AssertionError(f"make-deb failed: {completed.stdout}\n{debroot.tail(log)}")
    print(f"\n  {completed.stdout.strip()}", flush=True)
    os.chmod(out, 0o755)
    return out


def bumped_version(version: str) -> str:
    """A version above ``version``: its release with the last number plus one."""
    match = re.match(r"^(\d+(?:\.\d+)*)", version)
    assert match is not None, version
    parts = match.group(1).split(".")
    return ".".join([*parts[:-1], str(int(parts[-1]) + 1)])


def _bumped_tree(version: str) -> str:
    """A copy of the package sources at ``version`` (__version__ and a changelog entry)."""
    make_deb = script("make-deb")
    tree = tempfile.mkdtemp(prefix="lpa-src-bumped-", dir="/var/tmp")
    make_deb.stage(make_deb.Path(REPO), make_deb.source_files(make_deb.Path(REPO)),
                   make_deb.Path(tree))
    init = os.path.join(tree, "lpa", "__init__.py")
    text = re.sub(r'^__version__ = "[^"]+"$', f'__version__ = "{version}"', _read(init),
                  flags=re.M)
    with open(init, "w") as f:
        f.write(text)
    changelog = os.path.join(tree, "debian", "changelog")
    entry = (f"lpa ({script('check-version').debian_version(version)}) bookworm; "
             "urgency=medium\n\n  * Test build one version up, for the upgrade test.\n\n"
             " -- lpa maintainers <maintainers@lpa.example>  Mon, 30 Nov 2026 12:00:00 +0000\n\n")
    with open(changelog, "w") as f:
        f.write(entry + _read(os.path.join(REPO, "debian", "changelog")))
    return tree


def artefacts() -> dict[str, Any]:
    """Both builds and the root tarball, made once per test run."""
    require()
    if not _built:
        version = lpa.__version__
        with stage("build (or cached .debs)"):
            v1 = _build(REPO, "current")
        with stage("build one version up (or cached .debs)"):
            tree = _bumped_tree(bumped_version(version))
            try:
                v2 = _build(tree, "bumped")
            finally:
                shutil.rmtree(tree, ignore_errors=True)
        with stage("minimal bookworm root (mmdebstrap, or this week's tarball)"):
            log = os.path.join(debroot.cache_dir(), "logs", "mmdebstrap.log")
            tarball = debroot.root_tarball(log)
        _built.update(v1=v1, v2=v2, version=version, bumped=bumped_version(version),
                      tarball=tarball)
    return _built


def debs(directory: str) -> dict[str, str]:
    """package name -> .deb path in ``directory``."""
    found = {}
    for name in os.listdir(directory):
        if name.endswith(".deb"):
            found[name.split("_", 1)[0]] = os.path.join(directory, name)
    return found
