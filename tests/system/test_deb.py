"""lpa's Debian packages: versions, units, lintian, and a life in a fresh Debian root.

The packaging files are checked first without building anything. Then (as root, with dpkg-dev,
debhelper, dh-virtualenv, mmdebstrap and lintian, which ``.ci/run`` installs) both packages are
built twice with ``debian/make-deb`` — this tree, and a copy whose version is one higher — and
installed into a fresh minimal Debian root (:mod:`tests.system.debroot`), where the test follows an
operator: install, run the agent over mutual TLS and the relay against PostgreSQL, upgrade the
agent with the command the agent's refusal names, purge. Builds, the root and lintian's verdict are
cached (see :mod:`tests.system.debroot`); each stage prints its time.

The agent in the root only answers health, refuses the self-upgrade and runs a patch job with
``packages: []``, which runs no package-manager command.
"""

from __future__ import annotations

import hashlib
import itertools
import os
import re
import shutil
import subprocess
import sys
import tempfile
from urllib.parse import urlsplit

from twisted.trial.unittest import SkipTest, SynchronousTestCase

import lpa
from lpa.tools.demo_processes import free_port
from tests import pg
from tests.system import CHECKOUT as REPO
from tests.system import debroot
from tests.system.debbuild import artefacts, debs, script, stage

PACKAGES = ("lpa-agent", "lpa-relay")


def _read(path: str) -> str:
    with open(path, encoding="utf-8") as f:
        return f.read()


def _read_bytes(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


class VersionTests(SynchronousTestCase):
    def test_changelog_is_the_python_version(self) -> None:
        """debian/changelog's top entry carries lpa.__version__ (what make deb checks)."""
        check = script("check-version")
        self.assertEqual(check.changelog_version(check.Path(REPO)),
                         check.debian_version(lpa.__version__))
        completed = subprocess.run([sys.executable, os.path.join(REPO, "debian", "check-version"),
                                    REPO], stdout=subprocess.PIPE, text=True, check=False)
        self.assertEqual((completed.returncode, completed.stdout.strip()),
                         (0, check.debian_version(lpa.__version__)))

    def test_disagreement_stops_the_build(self) -> None:
        """A changelog behind __version__ makes check-version exit 1 naming both versions."""
        tree = self.mktemp()
        os.makedirs(os.path.join(tree, "lpa"))
        os.makedirs(os.path.join(tree, "debian"))
        with open(os.path.join(tree, "lpa", "__init__.py"), "w") as f:
            f.write('__version__ = "9.8.7"\n')
        shutil.copy(os.path.join(REPO, "debian", "changelog"), os.path.join(tree, "debian"))
        completed = subprocess.run(
            [sys.executable, os.path.join(REPO, "debian", "check-version"), tree],
            stderr=subprocess.PIPE, text=True, check=False)
        self.assertEqual(completed.returncode, 1)
        self.assertIn("9.8.7", completed.stderr)
        self.assertIn(script("check-version").debian_version(lpa.__version__), completed.stderr)

    def test_debian_versions_sort_like_python_ones(self) -> None:
        """Pre-, post- and dev releases map to Debian versions that sort as PEP 440 says."""
        check = script("check-version")
        ordered = ["0.2.0.dev1", "0.2.0a1.dev1", "0.2.0a1", "0.2.0rc1", "0.2.0", "0.2.0.post1",
                   "0.2.1"]
        mapped = [check.debian_version(v) for v in ordered]
        self.assertEqual(mapped, ["0.2.0~~dev1", "0.2.0~a1~~dev1", "0.2.0~a1", "0.2.0~rc1",
                                  "0.2.0", "0.2.0+post1", "0.2.1"])
        if shutil.which("dpkg") is None:
            raise SkipTest("dpkg is not installed: the Debian order itself is not checked")
        for lower, higher in itertools.pairwise(mapped):
            compared = subprocess.run(["dpkg", "--compare-versions", lower, "lt", higher],
                                      check=False)
            self.assertEqual(compared.returncode, 0, f"{lower} < {higher}")

    def test_setup_reads_the_version(self) -> None:
        """setup.py takes its version from lpa/__init__.py: there is no second copy."""
        completed = subprocess.run([sys.executable, "setup.py", "--version"], cwd=REPO,
                                   stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                                   check=False)
        self.assertEqual(completed.stdout.strip().splitlines()[-1], lpa.__version__)
        self.assertNotIn(lpa.__version__, _read(os.path.join(REPO, "setup.py")))


class UnitTests(SynchronousTestCase):
    def test_packaged_units_are_the_etc_units(self) -> None:
        """Each package's unit is etc/'s with the venv's and the docs' paths, nothing else."""
        unit_for = script("unit-for-package")
        for package in PACKAGES:
            text = _read(os.path.join(REPO, "etc", f"{package}.service"))
            packaged = unit_for.package_unit(package, text)
            body = packaged.split("\n", 2)[2]
            self.assertEqual(
                body, text.replace("/opt/lpa/", f"/opt/venvs/{package}/").replace(
                    "/usr/share/doc/lpa/", f"/usr/share/doc/{package}/"))
            self.assertNotIn("/opt/lpa/", packaged)
            exec_start = re.search(r"^ExecStart=(\S+)", packaged, re.M)
            assert exec_start is not None
            self.assertEqual(exec_start.group(1), f"/opt/venvs/{package}/bin/twistd")

    def test_unknown_path_stops_the_build(self) -> None:
        """A unit command under /opt outside the package's venv is an error, not a broken unit."""
        unit_for = script("unit-for-package")
        with self.assertRaises(ValueError):
            unit_for.package_unit("lpa-agent", "[Service]\nExecStart=/opt/other/bin/twistd x\n")


class MirrorTests(SynchronousTestCase):
    def test_mirror_of_this_machine(self) -> None:
        """The root comes from the mirror apt uses for bookworm, deb822 or one-line sources."""
        deb822 = self.mktemp()
        with open(deb822, "w") as f:
            f.write("Types: deb\nURIs: http://mirror.example/debian-security\n"
                    "Suites: bookworm-security\n\nTypes: deb\n"
                    "URIs: http://mirror.example/debian/\nSuites: bookworm bookworm-updates\n")
        one_line = self.mktemp()
        with open(one_line, "w") as f:
            f.write("# deb http://old.example/debian bookworm main\n"
                    "deb [arch=amd64] http://other.example/debian bookworm main\n")
        self.assertEqual(debroot.host_mirror([deb822]), "http://mirror.example/debian")
        self.assertEqual(debroot.host_mirror([one_line]), "http://other.example/debian")
        self.assertEqual(debroot.host_mirror([self.mktemp()]), debroot.DEFAULT_MIRROR)


class LintianTests(SynchronousTestCase):
    def test_no_errors_no_unexplained_warnings(self) -> None:
        """lintian finds no error and no warning (the justified ones are in *.lintian-overrides)."""
        built = artefacts()
        paths = [debs(built["v1"])[p] for p in PACKAGES]
        digest = hashlib.sha256(b"".join(_read_bytes(p) for p in paths)).hexdigest()[:24]
        cached = os.path.join(debroot.cache_dir(), "lintian", digest)
        with stage("lintian (or its cached verdict)"):
            if os.path.exists(cached):
                verdict = _read(cached)
            else:
                # run from the packages' directory: lintian fails when its working directory
                # is gone (a test run's temporary directory removed under it)
                completed = subprocess.run(["lintian", "--tag-display-limit", "0", *paths],
                                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                           text=True, check=False,
                                           cwd=os.path.dirname(paths[0]))
                verdict = f"exit {completed.returncode}\n{completed.stdout}"
                if completed.returncode == 0:  # only a clean verdict is kept: a failure reruns
                    os.makedirs(os.path.dirname(cached), exist_ok=True)
                    with open(cached + ".partial", "w") as f:
                        f.write(verdict)
                    os.replace(cached + ".partial", cached)
        tags = [line for line in verdict.splitlines() if re.match(r"^[EWX]: ", line)]
        self.assertEqual(tags, [], verdict)
        self.assertTrue(verdict.startswith("exit 0\n"), verdict)


# --- in a fresh root ------------------------------------------------------------------------

#: what apt and dpkg keep about any package (logs, databases, caches): not lpa's leftovers
NOISE = (
    "var/lib/dpkg/", "var/lib/apt/", "var/cache/apt/", "var/cache/debconf/", "var/log/",
    "var/cache/ldconfig/", "etc/ld.so.cache", "etc/passwd-", "etc/group-", "etc/shadow-",
    "etc/gshadow-", "etc/subuid-", "etc/subgid-",
)
POLICY_RC_D = "#!/bin/sh\n# the test's root: no service starts during package installs\nexit 101\n"


class InstalledPackagesTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.built = artefacts()
        self.work = tempfile.mkdtemp(prefix="lpa-deb-test-", dir="/var/tmp")
        self.addCleanup(shutil.rmtree, self.work, True)
        with stage("extract the root"):
            self.root = debroot.DebianRoot.extract(self.built["tarball"],
                                                   os.path.join(self.work, "root"))
        shutil.copy("/etc/resolv.conf", self.root.host_path("/etc/resolv.conf"))
        with open(self.root.host_path("/usr/sbin/policy-rc.d"), "w") as f:
            f.write(POLICY_RC_D)
        os.chmod(self.root.host_path("/usr/sbin/policy-rc.d"), 0o755)
        # what apt downloaded in earlier roots (python3 …): copied in now, new ones out later
        self.archives = os.path.join(debroot.cache_dir(), "apt-archives")
        os.makedirs(self.archives, exist_ok=True)
        for name in (n for n in os.listdir(self.archives) if n.endswith(".deb")):
            shutil.copy(os.path.join(self.archives, name),
                        self.root.host_path("/var/cache/apt/archives"))
        self.processes: list[debroot.RootProcess] = []
        self.addCleanup(self._stop_all)

    def _stop_all(self) -> None:
        for process in self.processes:
            if process.running:
                process.stop(30)

    def sh(self, script: str, *, debs: str | None = None,
           binds: list[tuple[str, str]] | None = None) -> str:
        """Run ``script`` in the root (with ``debs`` on /mnt); its output."""
        mounts = list(binds or [])
        if debs is not None:
            mounts.append((debs, "/mnt"))
        return self.root.run(script, binds=mounts)[1]

    def start(self, package: str, *, user: str = "root",
              binds: list[tuple[str, str]] | None = None) -> debroot.RootProcess:
        """Run the installed unit's ExecStart in the root, as the unit's User=."""
        command = debroot.unit_line(self.root, package, "ExecStart")
        if user != "root":
            command = f"setpriv --reuid={user} --regid={user} --init-groups {command}"
        log = os.path.join(self.work, f"{package}-{len(self.processes)}.log")
        process = self.root.spawn(f"exec {command}", log, binds=binds or [])
        self.processes.append(process)
        return process

    def start_agent(self, agent: debroot.AgentClient) -> debroot.RootProcess:
        process = self.start("lpa-agent")
        debroot.wait_for(lambda: agent.healthy() or not process.running,
                         "the agent's /api/v1/health", timeout=90)
        self.assertTrue(process.running, process.log())
        return process

    def test_install_run_upgrade_purge(self) -> None:
        """Install, run agent and relay, upgrade keeping config and history, purge to nothing."""
        v1, v2, version, bumped = (self.built[k] for k in ("v1", "v2", "version", "bumped"))
        debian_version = script("check-version").debian_version
        baseline = self.root.files()

        with stage("install both packages with apt-get"):
            names = debs(v1)
            install = "cd /mnt && apt-get install -y ./{}"
            try:
                out = self.sh(install.format(os.path.basename(names["lpa-agent"])), debs=v1)
            except AssertionError:  # this week's lists may name files the mirror has replaced
                self.sh("apt-get update -qq")
                out = self.sh(install.format(os.path.basename(names["lpa-agent"])), debs=v1)
            out += self.sh(install.format(os.path.basename(names["lpa-relay"])), debs=v1)
            downloaded = self.root.host_path("/var/cache/apt/archives")
            for name in os.listdir(downloaded):
                if name.endswith(".deb") and not os.path.exists(f"{self.archives}/{name}"):
                    shutil.copy(os.path.join(downloaded, name), self.archives)
        self.assertIn("lpa-agent is enabled but NOT started", out)
        self.assertIn("tls.ca_cert: /etc/linux_patch_api/certs/ca.pem: no such file", out)
        self.assertIn("lpa-relay is enabled but NOT started", out)
        self.assertIn("[database] url is still the example's", out)
        self.check_installed(version)

        with stage("agent: dev PKI, health over mutual TLS, a job, the self-upgrade refused"):
            job_id, agent_config = self.run_agent(version)

        with stage("relay: lpa db migrate and start against PostgreSQL"):
            relay_config = self.run_relay()

        with stage("upgrade: apt-get install --only-upgrade from a repository"):
            self.upgrade(v2, debian_version(bumped))
        self.assertEqual(_read(self.root.host_path("/etc/lpa/agent.yaml")), agent_config)
        self.assertEqual(_read(self.root.host_path("/etc/lpa/relay.toml")), relay_config)
        self.assertEqual(os.stat(self.root.host_path("/etc/lpa/relay.toml")).st_mode & 0o777,
                         0o640)
        self.assertEqual(self.sh("lpa --version").strip(), f"lpa {bumped}")

        with stage("agent after the upgrade: same config, same job history"):
            agent = debroot.AgentClient(self.root.host_path("/etc/lpa/pki"), self.port)
            process = self.start_agent(agent)
            status, health = agent.request("GET", "/api/v1/health")
            self.assertEqual(health["data"]["version"], bumped)
            status, job = agent.request("GET", f"/api/v1/jobs/{job_id}")
            self.assertEqual((status, job["data"]["status"]), (200, "completed"))
            process.stop()

        with stage("purge"):
            self.purge(baseline)

    def check_installed(self, version: str) -> None:
        """What the maintainer scripts made: command, venvs, state dir, user, units, caches."""
        self.assertEqual(self.sh("lpa --version").strip(), f"lpa {version}")
        self.assertEqual(self.sh("readlink -f /usr/bin/lpa").strip(),
                         "/opt/venvs/lpa-agent/bin/lpa")
        self.assertEqual(self.sh("/opt/venvs/lpa-relay/bin/lpa --version").strip(),
                         f"lpa {version}")
        for package in PACKAGES:
            venv = f"/opt/venvs/{package}"
            self.assertEqual(os.readlink(self.root.host_path(f"{venv}/bin/python3")),
                             "/usr/bin/python3")
            site = self.root.host_path(f"{venv}/lib/python3.11/site-packages")
            self.assertTrue(os.path.exists(f"{site}/twisted/plugins/dropin.cache"))
            self.assertTrue(os.path.isdir(f"{site}/lpa/__pycache__"))
            self.assertTrue(os.path.islink(self.root.host_path(
                f"/etc/systemd/system/multi-user.target.wants/{package}.service")))
            self.assertEqual(debroot.unit_line(self.root, package, "ExecStart").split()[0],
                             f"{venv}/bin/twistd")
        self.assertIn("Python 3.11.", self.sh("/usr/bin/python3 --version"))
        state = os.stat(self.root.host_path("/var/lib/lpa"))
        self.assertEqual((state.st_mode & 0o7777, state.st_uid), (0o700, 0))
        passwd = self.sh("getent passwd lpa-relay").strip().split(":")
        self.assertEqual((passwd[5], passwd[6]), ("/nonexistent", "/usr/sbin/nologin"))
        self.assertEqual(debroot.unit_line(self.root, "lpa-relay", "User"), "lpa-relay")
        config = os.stat(self.root.host_path("/etc/lpa/relay.toml"))
        self.assertEqual((config.st_mode & 0o777, config.st_gid), (0o640, int(passwd[3])))
        self.assertIn("/etc/lpa/agent.yaml", self.sh("dpkg-query -W -f='${Conffiles}' lpa-agent"))

    def run_agent(self, version: str) -> tuple[str, str]:
        """The agent from its unit, a dev PKI, health, a job; the job id and the edited config."""
        self.sh("lpa pki init /etc/lpa/pki")
        self.port = free_port()
        path = self.root.host_path("/etc/lpa/agent.yaml")
        text = _read(path).replace("/etc/linux_patch_api/certs/", "/etc/lpa/pki/")
        text = re.sub(r'^(  bind: )"0\.0\.0\.0"', r'\1"127.0.0.1"', text, count=1, flags=re.M)
        text = re.sub(r"^(  port: )12443", rf"\g<1>{self.port}", text, count=1, flags=re.M)
        with open(path, "w") as f:
            f.write(text)
        self.assertIn("/etc/lpa/agent.yaml: OK", self.sh("lpa config check /etc/lpa/agent.yaml"))

        agent = debroot.AgentClient(self.root.host_path("/etc/lpa/pki"), self.port)
        process = self.start_agent(agent)
        out = self.sh(f"LPA_CERT=/etc/lpa/pki/client.crt LPA_KEY=/etc/lpa/pki/client.key "
                      f"LPA_CA=/etc/lpa/pki/ca.pem lpa agent 127.0.0.1:{self.port} health")
        self.assertIn(version, out)
        self.assertTrue(agent.refuses_without_certificate())

        status, answer = agent.request("PUT", "/api/v1/packages/linux-patch-api", {})
        self.assertEqual((status, answer["error"]["code"]), (409, "UNSUPPORTED_ON_LPA"))
        self.assertIn("apt-get install --only-upgrade lpa-agent", answer["error"]["message"])
        status, answer = agent.request("POST", "/api/v1/patches/apply", {"packages": []})
        self.assertEqual(status, 202, answer)
        job_id = answer["data"]["job_id"]
        debroot.wait_for(
            lambda: agent.request("GET", f"/api/v1/jobs/{job_id}")[1]["data"]["status"]
            == "completed", f"job {job_id} to complete")
        status, jobs = agent.request("GET", "/api/v1/jobs")
        self.assertEqual([j["job_id"] for j in jobs["data"]["jobs"]], [job_id])
        self.assertEqual(process.stop(), 0, process.log())
        self.assertNotIn("Traceback", process.log())
        return job_id, text

    def run_relay(self) -> str:
        """``lpa db migrate`` and the relay (as lpa-relay) against the test cluster; its config."""
        dsn = pg.database(self)
        cluster = pg.cluster()
        database = urlsplit(dsn).path.lstrip("/")
        url = f"postgresql://postgres@/{database}?host=/run/postgresql&port={cluster.port}"
        socket = [(cluster.socket_dir, "/run/postgresql")]
        out = self.sh(f"lpa db migrate --dsn '{url}'", binds=socket)
        self.assertIn("up to date", out)

        path = self.root.host_path("/etc/lpa/relay.toml")
        text = re.sub(r'^url = ".*"$', f'url = "{url}"', _read(path), count=1, flags=re.M)
        text = text.replace("/etc/patch-manager/certs/client.crt", "/etc/lpa/pki/client.crt")
        text = text.replace("/etc/patch-manager/certs/client.key", "/etc/lpa/pki/client.key")
        text = text.replace("/etc/patch-manager/ca/ca.crt", "/etc/lpa/pki/ca.pem")
        with open(path, "w") as f:
            f.write(text)
        self.sh("chgrp lpa-relay /etc/lpa/pki/client.key && chmod 0640 /etc/lpa/pki/client.key")

        user = debroot.unit_line(self.root, "lpa-relay", "User")
        as_user = f"setpriv --reuid={user} --regid={user} --init-groups"
        self.assertIn("/etc/lpa/relay.toml: OK",
                      self.sh(f"{as_user} lpa config check /etc/lpa/relay.toml"))
        process = self.start("lpa-relay", user=user, binds=socket)
        debroot.wait_for(lambda: "relay store connected" in process.log() or not process.running,
                         "the relay's 'relay store connected'", timeout=90)
        self.assertTrue(process.running, process.log())
        pid = process.init_pid()
        with open(f"/proc/{pid}/status") as f:
            uid = re.search(r"^Uid:\s+(\d+)", f.read(), re.M)
        assert uid is not None
        self.assertEqual(int(uid.group(1)), int(self.sh(f"id -u {user}").strip()))
        self.assertEqual(process.stop(), 0, process.log())
        self.assertNotIn("plugin cache", process.log())
        self.assertNotIn("Traceback", process.log())
        return text

    def upgrade(self, v2: str, debian_version: str) -> None:
        """The step the agent's refusal names, against a repository holding the next version."""
        repo = os.path.join(self.work, "apt")
        os.makedirs(os.path.join(repo, "repo"))
        os.makedirs(os.path.join(repo, "sources.list.d"))
        for deb in debs(v2).values():
            shutil.copy(deb, os.path.join(repo, "repo"))
        with open(os.path.join(repo, "repo", "Packages"), "w") as f:
            subprocess.run(["dpkg-scanpackages", "--multiversion", "."], cwd=os.path.join(
                repo, "repo"), stdout=f, stderr=subprocess.DEVNULL, check=True)
        with open(os.path.join(repo, "sources.list.d", "lpa-test.list"), "w") as f:
            f.write("deb [trusted=yes] file:/mnt/repo ./\n")
        os.chmod(self.work, 0o755)
        apt = "apt-get -o Dir::Etc::SourceParts=/mnt/sources.list.d"
        out = self.sh(f"{apt} update -qq && {apt} install -y --only-upgrade lpa-agent", debs=repo)
        self.assertIn(f"Unpacking lpa-agent ({debian_version}) over", out)
        # apt upgrades the other binary package of the same source with it
        # (APT::Get::Upgrade-By-Source-Package), as docs/operations.rst says
        versions = self.sh("dpkg-query -W -f='${Package} ${Version}\\n' lpa-agent lpa-relay")
        self.assertEqual(versions.split("\n")[:2],
                         [f"lpa-agent {debian_version}", f"lpa-relay {debian_version}"], out)
        self.assertEqual(os.listdir(self.root.host_path("/etc/lpa")).count("agent.yaml.dpkg-dist"),
                         0)

    def purge(self, baseline: dict[str, str]) -> None:
        """apt-get purge (and autoremove): only the admin's PKI is left, which the test removes."""
        out = self.sh("apt-get purge -y lpa-agent lpa-relay && apt-get autoremove --purge -y")
        after = self.root.files()
        in_etc = sorted(p for p in after if p == "etc/lpa" or p.startswith("etc/lpa/"))
        self.assertEqual([p for p in in_etc if not p.startswith("etc/lpa/pki/")],
                         ["etc/lpa", "etc/lpa/pki"], out)
        shutil.rmtree(self.root.host_path("/etc/lpa"))  # the admin's certificates
        after = self.root.files()
        added = sorted(p for p in after if p not in baseline and not p.startswith(NOISE))
        removed = sorted(p for p in baseline if p not in after and not p.startswith(NOISE))
        with open(os.path.join(debroot.cache_dir(), "logs", "purge-diff.txt"), "w") as f:
            f.write("\n".join(["added:", *added, "removed:", *removed]))
        self.assertEqual((added, removed), ([], []), out[-3000:])
        self.assertEqual([p for p in after if re.search(r"(^|[/_.-])lpa($|[/_.-])", p)], [])
        for name in ("passwd", "group", "shadow", "gshadow"):
            self.assertNotIn("lpa-relay", _read(self.root.host_path(f"/etc/{name}")))
        self.assertIn("no alternatives for lpa", self.sh("update-alternatives --list lpa || true"))
