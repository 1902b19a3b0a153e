"""The files under etc/ parse with the real loaders and say what the docs promise."""

from __future__ import annotations

import configparser
import http.client
import importlib.util
import json
import os
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import time
import tomllib
from typing import Any

import attr
import yaml
from twisted.trial.unittest import SkipTest, SynchronousTestCase

from tests.logcheck import assert_no_unhandled

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def etc(name: str) -> str:
    return os.path.join(ROOT, "etc", name)


def read(path: str) -> str:
    with open(path, encoding="utf-8") as handle:
        return handle.read()


def unit(name: str) -> configparser.ConfigParser:
    parser = configparser.ConfigParser(strict=True, interpolation=None, delimiters=("=",))
    parser.optionxform = str  # type: ignore[assignment,method-assign]
    parser.read_string(read(etc(name)))
    return parser


class RelayExampleTests(SynchronousTestCase):
    def test_loads_with_defaults(self) -> None:
        """etc/relay.toml loads with the relay's loader and states every default."""
        from lpa.relay.config import RelayConfig, load_relay_config

        config = load_relay_config(etc("relay.toml"), environ={})
        self.assertEqual(config, RelayConfig(database_url=config.database_url))

    def test_every_key(self) -> None:
        """Every key the relay reads appears in the example."""
        from lpa.relay import config as relay_config

        document = tomllib.loads(read(etc("relay.toml")))
        for section, key, _, _ in relay_config._KEYS.values():
            self.assertIn(key, document.get(section, {}), f"{section}.{key} missing")


class AgentExampleTests(SynchronousTestCase):
    def loader(self):  # type: ignore[no-untyped-def]
        from lpa.agent import config

        return config

    def test_loads_with_defaults(self) -> None:
        """etc/agent.yaml loads without warnings and states exactly the embedded defaults."""
        config = self.loader()
        loaded = config.load_agent_config(etc("agent.yaml"))
        defaults = config.parse_agent_config("")
        self.assertEqual(tuple(loaded.warnings), ())
        self.assertEqual(attr.evolve(loaded, source=defaults.source), defaults)

    def test_every_key(self) -> None:
        """Every key of the agent's config tree appears in the example."""
        config = self.loader()
        document = yaml.safe_load(read(etc("agent.yaml")))

        def walk(node: Any, tree: dict[str, Any], prefix: str) -> None:
            for field in attr.fields(type(node)):
                if field.name in ("source", "warnings"):
                    continue
                value = getattr(node, field.name)
                self.assertIn(field.name, tree, f"{prefix}{field.name} missing")
                if attr.has(type(value)):
                    walk(value, tree[field.name], f"{prefix}{field.name}.")

        walk(config.parse_agent_config(""), document, "")


#: systemd sandbox directives: each one a unit keeps needs a comment line giving its reason
SANDBOX = frozenset({
    "ProtectSystem", "ProtectHome", "PrivateTmp", "PrivateDevices", "PrivateNetwork",
    "PrivateUsers", "PrivateMounts", "PrivateIPC", "ProtectHostname", "ProtectClock",
    "ProtectKernelTunables", "ProtectKernelModules", "ProtectKernelLogs", "ProtectControlGroups",
    "ProtectProc", "ProcSubset", "ReadOnlyPaths", "ReadOnlyDirectories", "InaccessiblePaths",
    "InaccessibleDirectories", "TemporaryFileSystem", "NoNewPrivileges", "CapabilityBoundingSet",
    "SystemCallFilter", "SystemCallArchitectures", "MemoryDenyWriteExecute", "RestrictNamespaces",
    "RestrictAddressFamilies", "RestrictSUIDSGID", "RestrictRealtime", "LockPersonality",
    "DevicePolicy", "DeviceAllow", "IPAddressDeny", "DynamicUser", "RootDirectory", "RootImage",
})

_SYSTEM_DIRS = ("/usr", "/etc", "/var", "/boot", "/lib", "/bin", "/sbin", "/opt", "/proc", "/sys")


def _off(value: str) -> bool:
    return value.strip().lower() in ("", "no", "false", "0", "off")


def _names_system_dir(value: str) -> bool:
    paths = [word.lstrip("-+") for word in value.split()]
    return any(p == d or p.startswith(d + "/") or p == "/" for p in paths for d in _SYSTEM_DIRS)


#: what a unit that runs the host's package manager must not set: key -> (refused?, why)
AGENT_DENY: dict[str, tuple[object, str]] = {
    "ProtectSystem": (lambda v: not _off(v), "dpkg/rpm write /usr, /etc and /boot"),
    "ProtectHome": (lambda v: not _off(v), "maintainer scripts reach /root and /home"),
    "ReadOnlyPaths": (_names_system_dir, "package managers write the system directories"),
    "ReadOnlyDirectories": (_names_system_dir, "package managers write the system directories"),
    "InaccessiblePaths": (_names_system_dir, "package managers use the system directories"),
    "TemporaryFileSystem": (_names_system_dir, "package managers use the system directories"),
    "ProtectKernelModules": (lambda v: not _off(v), "hides /usr/lib/modules: kernel installs"),
    "ProtectKernelTunables": (lambda v: not _off(v), "read-only /proc/sys: sysctl in scripts"),
    "ProtectKernelLogs": (lambda v: not _off(v), "a mount namespace for every package run"),
    "ProtectControlGroups": (lambda v: not _off(v), "a mount namespace for every package run"),
    "ProtectProc": (lambda v: v.strip() not in ("", "default"), "needrestart reads /proc"),
    "ProcSubset": (lambda v: v.strip() not in ("", "all"), "needrestart and sysctl use /proc"),
    "ProtectClock": (lambda v: not _off(v), "implies DeviceAllow: grub-install loses the disk"),
    "ProtectHostname": (lambda v: not _off(v), "maintainer scripts would see a stale hostname"),
    "PrivateDevices": (lambda v: not _off(v), "grub-install and initramfs hooks need devices"),
    "DevicePolicy": (lambda v: v.strip() not in ("", "auto"), "package runs need devices"),
    "DeviceAllow": (lambda v: True, "any DeviceAllow closes the other devices"),
    "PrivateTmp": (lambda v: not _off(v), "removed on stop under a run that outlives the agent"),
    "PrivateMounts": (lambda v: not _off(v), "mounts of a package run must reach the host"),
    "PrivateUsers": (lambda v: not _off(v), "maintainer scripts chown to every user"),
    "PrivateNetwork": (lambda v: not _off(v), "package managers download"),
    "NoNewPrivileges": (lambda v: not _off(v), "maintainer scripts run set-user-ID programs"),
    "CapabilityBoundingSet": (lambda v: True, "maintainer scripts need every capability"),
    "SystemCallFilter": (lambda v: True, "package scripts mount, swapon and load modules"),
    "SystemCallArchitectures": (lambda v: True, "multiarch packages run foreign binaries"),
    "MemoryDenyWriteExecute": (lambda v: not _off(v), "JIT runtimes in maintainer scripts"),
    "RestrictNamespaces": (lambda v: not _off(v), "package hooks may use namespaces"),
    "RestrictSUIDSGID": (lambda v: not _off(v), "dpkg installs set-user-ID programs"),
    "RestrictAddressFamilies": (lambda v: True, "package hooks use netlink and others"),
    "LockPersonality": (lambda v: not _off(v), "setarch/linux32 in maintainer scripts"),
    "IPAddressDeny": (lambda v: True, "package managers download"),
    "DynamicUser": (lambda v: not _off(v), "the package manager runs as root"),
    "RootDirectory": (lambda v: True, "the package manager must see the host"),
    "RootImage": (lambda v: True, "the package manager must see the host"),
}


def unit_lines(name: str) -> list[str]:
    return read(etc(name)).splitlines()


def uncommented(name: str) -> list[str]:
    """Sandbox directives of ``name`` not preceded by a comment line giving the reason."""
    lines = unit_lines(name)
    found = []
    for number, line in enumerate(lines):
        key = line.split("=", 1)[0].strip()
        if "=" in line and not line.startswith("#") and key in SANDBOX:
            previous = lines[number - 1].strip() if number else ""
            if not previous.startswith("#") or len(previous.lstrip("# ")) < 10:
                found.append(key)
    return found


class UnitTests(SynchronousTestCase):
    def test_agent_unit_lets_package_runs_work(self) -> None:
        """The agent's unit sets nothing that blocks a package manager, its maintainer scripts,
        kernel and module installs or needrestart."""
        service = unit("lpa-agent.service")["Service"]
        refused = [f"{key}={service[key]} ({why})" for key, (deny, why) in AGENT_DENY.items()
                   if key in service and deny(service[key])]  # type: ignore[operator]
        self.assertEqual(refused, [])
        self.assertEqual(service["User"], "root")
        self.assertEqual(service["Restart"], "on-failure")
        self.assertIn("lpa-agent --config", service["ExecStart"])
        # package runs are transient units of their own (lpa.agent.detached), so mixed only
        # ever kills the agent's read-only queries
        self.assertEqual(service["KillMode"], "mixed")

    def test_agent_unit_says_how_job_units_relate_to_it(self) -> None:
        """The unit's comment names the job units, their KillMode and why a restart of the
        agent cannot reach them; the agent builds those units as the comment says."""
        from lpa.agent.detached import UNIT_PROPERTIES, unit_name

        text = read(etc("lpa-agent.service"))
        comment = " ".join(line.lstrip("# ") for line in text.splitlines()
                           if line.startswith("#"))
        self.assertIn("lpa-job-<job id>-<n>.service", comment)
        self.assertIn("outside this unit's cgroup", comment)
        self.assertIn("systemd-run --collect, KillMode=process", comment)
        self.assertEqual(UNIT_PROPERTIES, ("KillMode=process",))
        self.assertTrue(unit_name("j", 1).startswith("lpa-job-"))
        service = unit("lpa-agent.service")["Service"]
        self.assertNotIn("Delegate", service)  # the job units are systemd's, not the agent's

    def test_deny_list_catches_the_old_unit(self) -> None:
        """The deny-list refuses what the agent's unit used to set."""
        old = {"ProtectHome": "true", "PrivateTmp": "true", "ProtectKernelModules": "true",
               "ProtectKernelTunables": "true", "ProtectClock": "true",
               "SystemCallFilter": "@system-service", "RestrictNamespaces": "true",
               "ProtectSystem": "full", "ReadOnlyPaths": "-/boot /srv"}
        refused = {key for key, value in old.items() if AGENT_DENY[key][0](value)}  # type: ignore[operator]
        self.assertEqual(refused, set(old))
        self.assertFalse(AGENT_DENY["ProtectSystem"][0]("no"))  # type: ignore[operator]
        self.assertFalse(AGENT_DENY["ReadOnlyPaths"][0]("/srv/data"))  # type: ignore[operator]

    def test_reload(self) -> None:
        """Both units reload with SIGHUP, so `systemctl reload` works as the README says."""
        for name in ("lpa-agent.service", "lpa-relay.service"):
            self.assertEqual(unit(name)["Service"]["ExecReload"], "/bin/kill -HUP $MAINPID", name)

    def test_relay_unit(self) -> None:
        """The relay unit restarts on failure, runs as its own user, fully read-only."""
        service = unit("lpa-relay.service")["Service"]
        self.assertEqual(service["Restart"], "on-failure")
        self.assertEqual((service["User"], service["Group"]), ("lpa-relay", "lpa-relay"))
        for key in ("ProtectSystem", "ProtectHome", "PrivateTmp", "PrivateDevices",
                    "NoNewPrivileges", "CapabilityBoundingSet", "SystemCallFilter",
                    "ProtectKernelModules", "ProtectKernelTunables", "RestrictNamespaces"):
            self.assertIn(key, service)
        self.assertEqual(service["ProtectSystem"], "strict")
        self.assertEqual(service["CapabilityBoundingSet"], "")
        self.assertIn("lpa-relay --config", service["ExecStart"])

    def test_every_hardening_directive_has_its_reason(self) -> None:
        """Each sandbox directive either unit keeps has a comment line above it saying why."""
        for name in ("lpa-agent.service", "lpa-relay.service"):
            self.assertEqual(uncommented(name), [], name)

    def test_systemd_analyze_verify(self) -> None:
        """`systemd-analyze verify` accepts both units without a warning (unknown keys …)."""
        analyze = shutil.which("systemd-analyze")
        if analyze is None:
            raise SkipTest("systemd-analyze is not installed here")
        twistd = os.path.join(os.path.dirname(sys.executable), "twistd")
        if not os.access(twistd, os.X_OK):
            raise SkipTest(f"{twistd} (for ExecStart=) is not installed beside this interpreter")
        directory = os.path.abspath(self.mktemp())
        os.makedirs(directory)
        paths = []
        for name in ("lpa-agent.service", "lpa-relay.service"):
            path = os.path.join(directory, name)
            with open(path, "w", encoding="utf-8") as handle:
                handle.write(read(etc(name)).replace("/opt/lpa/bin/twistd", twistd))
            paths.append(path)
        done = subprocess.run([analyze, "verify", "--man=no", *paths], capture_output=True,
                              text=True, timeout=120, check=False)
        self.assertEqual((done.returncode, done.stderr.strip()), (0, ""), done.stdout)


def _wait_exit(process: subprocess.Popen[bytes], timeout: float = 20) -> int:
    try:
        return process.wait(timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
        raise


def _get_data(context: ssl.SSLContext, host: str, port: int, path: str) -> Any:
    """GET one path over TLS with the stdlib; the envelope's data."""
    connection = http.client.HTTPSConnection(host, port, timeout=5, context=context)
    try:
        connection.request("GET", path)
        return json.loads(connection.getresponse().read())["data"]
    finally:
        connection.close()


class DaemonsStartTests(SynchronousTestCase):
    """The examples start the real daemons after only their paths are edited."""

    def start(self, tapname: str, config_text: str, *, own_pidfile: bool = False
              ) -> tuple[subprocess.Popen[bytes], str]:
        """Start ``twistd -n TAP --config FILE`` in a fresh directory; ``own_pidfile`` leaves
        out ``--pidfile`` so the daemon's default applies, with a live ``twistd.pid`` (this
        process's) in that directory, as another twistd daemon started there would leave."""
        from lpa.tools.demo_processes import daemon_env, twistd_argv

        directory = os.path.abspath(self.mktemp())
        os.makedirs(directory, exist_ok=True)
        config = os.path.join(directory, tapname + ".conf")
        with open(config, "w", encoding="utf-8") as handle:
            handle.write(config_text)
        log = os.path.join(directory, tapname + ".log")
        argv = twistd_argv(tapname, config, directory)
        if own_pidfile:
            argv = [arg for arg in argv if not arg.startswith("--pidfile=")]
            with open(os.path.join(directory, "twistd.pid"), "w") as handle:
                handle.write(str(os.getpid()))
        with open(log + ".stdout", "wb") as stdout:  # the child keeps its own copy
            process = subprocess.Popen(
                argv, env=daemon_env(), cwd=directory,
                stdin=subprocess.DEVNULL, stdout=stdout, stderr=subprocess.STDOUT)

        def stop() -> None:
            if process.poll() is None:
                process.kill()
                process.wait()

        self.addCleanup(stop)
        return process, log

    def wait_for(self, process: subprocess.Popen[bytes], log: str, text: str) -> None:
        deadline = time.monotonic() + 30
        while not os.path.exists(log) or text not in read(log):
            self.assertIsNone(process.poll(), read(log + ".stdout")[-2000:])
            self.assertLess(time.monotonic(), deadline, f"no {text!r} in {log}")
            time.sleep(0.1)

    def test_agent(self) -> None:
        """etc/agent.yaml with its certificate paths and state_dir edited serves /api/v1/health."""
        if importlib.util.find_spec("lpa.agent.tap") is None:
            raise SkipTest("lpa/agent/tap.py is not in the tree yet")
        with socket.socket() as probe:
            try:
                probe.bind(("0.0.0.0", 12443))
            except OSError:
                raise SkipTest("port 12443 (the example's) is in use here") from None
        from tests.certs import make_test_pki

        pki = make_test_pki(os.path.abspath(self.mktemp()))
        text = read(etc("agent.yaml"))
        for old, new in (("/etc/linux_patch_api/certs/ca.pem", pki.ca_cert),
                         ("/etc/linux_patch_api/certs/server.pem", pki.server_cert),
                         ("/etc/linux_patch_api/certs/server.key.pem", pki.server_key),
                         ("/etc/linux_patch_api/certs/crl.pem", pki.crl),
                         ('"/var/lib/lpa"', f'"{os.path.abspath(self.mktemp())}"')):
            self.assertIn(old, text)
            text = text.replace(old, new)
        process, log = self.start("lpa-agent", text, own_pidfile=True)
        context = ssl.create_default_context(cafile=pki.ca_cert)  # an independent client
        context.load_cert_chain(pki.good.cert, pki.good.key)
        deadline = time.monotonic() + 30
        while True:
            self.assertIsNone(process.poll(), read(log + ".stdout")[-2000:])
            try:
                health = _get_data(context, "localhost", 12443, "/api/v1/health")
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)
        self.assertEqual(health["status"], "healthy")
        process.send_signal(signal.SIGTERM)
        self.assertIn(_wait_exit(process), (0, -signal.SIGTERM))  # twistd re-raises the signal
        assert_no_unhandled(log, log + ".stdout")

    def test_relay(self) -> None:
        """etc/relay.toml with its database URL and certificate paths edited runs the relay."""
        if importlib.util.find_spec("lpa.relay.tap") is None:
            raise SkipTest("lpa/relay/tap.py is not in the tree yet")
        from tests import pg
        from tests.certs import make_test_pki

        dsn = pg.database(self, migrated=True)
        pki = make_test_pki(os.path.abspath(self.mktemp()))
        text = read(etc("relay.toml"))
        for old, new in (
                ("postgresql://patch_manager:CHANGE-ME@localhost:5432/patch_manager", dsn),
                ("/etc/patch-manager/certs/client.crt", pki.good.cert),
                ("/etc/patch-manager/certs/client.key", pki.good.key),
                ("/etc/patch-manager/ca/ca.crt", pki.ca_cert)):
            self.assertIn(old, text)
            text = text.replace(old, new)
        text = text.replace("[worker]\n", "[worker]\nhealth_poll_interval_secs = 300\n")
        process, log = self.start("lpa-relay", text, own_pidfile=True)
        self.wait_for(process, log, "lpa-relay started")
        self.assertIn("worker.health_poll_interval_secs is accepted but not used", read(log))
        self.assertTrue(os.path.exists(os.path.join(os.path.dirname(log), "lpa-relay.pid")))
        process.send_signal(signal.SIGHUP)  # systemctl reload lpa-relay
        self.wait_for(process, log, "SIGHUP: nothing to reload")
        process.send_signal(signal.SIGTERM)
        self.assertIn(_wait_exit(process), (0, -signal.SIGTERM))  # twistd re-raises the signal
        assert_no_unhandled(log, log + ".stdout")
