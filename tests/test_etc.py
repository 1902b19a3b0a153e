"""The files under etc/ parse with the real loaders and say what the docs promise (that the
daemons start from them: tests/system/test_etc_daemons.py)."""

from __future__ import annotations

import configparser
import os
import shutil
import subprocess
import sys
import tomllib
from typing import Any

import attr
import yaml
from twisted.trial.unittest import SkipTest, SynchronousTestCase

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


