"""yum backend (CentOS/RHEL 7): dnf's commands with yum's spellings.

Differences from dnf: ``update`` instead of ``upgrade``, ``updateinfo list updates`` /
``updateinfo list cves`` for advisories, ``needs-restarting -r`` from yum-utils, and no weak
dependencies or ``--allowerasing`` (``no_recommends`` and ``force`` change nothing on yum).
``--security`` is built into yum 3.4 (RHEL 7).  The repair after an interrupted transaction is
``yum check duplicates``, then ``package-cleanup --cleandupes`` (yum-utils);
``yum-complete-transaction`` is not run: it replays a journal of the whole transaction, packages
the job was not asked for included.
"""

from __future__ import annotations

from lpa.agent.backends.dnf import DnfBackend
from lpa.agent.model import JobRequest


class YumBackend(DnfBackend):
    name = "yum"
    binary = "yum"
    upgrade_verb = "update"

    def options(self, verb: str, request: JobRequest) -> list[str]:
        return ["--security"] if request.security_only else []

    def advisory_argvs(self) -> list[list[str]]:
        base = [self.binary, "-q", "updateinfo", "list"]
        return [[*base, "updates"], [*base, "cves"]]

    def available_argv(self, name: str) -> list[str]:
        return [self.binary, "-q", "list", "available", "--", name]

    def needs_restarting_argv(self) -> list[str]:
        return ["needs-restarting", "-r"]

    def duplicates_check_argv(self) -> list[str]:
        return [self.binary, "check", "duplicates"]

    def duplicates_repair_argv(self) -> list[str]:
        return ["package-cleanup", "--cleandupes", "-y"]
