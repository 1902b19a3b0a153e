import re

from setuptools import find_packages, setup


def _version() -> str:
    """The one version of lpa: ``__version__`` in ``lpa/__init__.py`` (also the packages')."""
    with open("lpa/__init__.py", encoding="utf-8") as f:
        match = re.search(r'^__version__ = "([^"]+)"$', f.read(), re.M)
    if match is None:
        raise RuntimeError("lpa/__init__.py has no __version__ line")
    return match.group(1)


with open("README.rst", encoding="utf-8") as readme:
    LONG_DESCRIPTION = readme.read()

setup(
    name="lpa",
    version=_version(),
    description="Linux patch agent (lpa-agent) and live job-status relay (lpa-relay)",
    long_description=LONG_DESCRIPTION,
    long_description_content_type="text/x-rst",
    python_requires=">=3.11",
    # lpa.sql and lpa.relay.static hold data files only (the migrations, the status page), listed
    # as packages so setuptools ships them without warning that they look importable
    packages=[*find_packages(exclude=["tests", "tests.*", "bench", "bench.*"]), "lpa.sql",
              "lpa.relay.static", "twisted.plugins"],
    package_data={"twisted": ["plugins/lpa_plugins.py"], "lpa.sql": ["*.sql"],
                  "lpa.relay.static": ["*"]},
    include_package_data=True,
    install_requires=[
        "Twisted[tls]>=24.10,<27",
        "autobahn>=24.4,<27",
        "txaio>=23.1,<27",
        "treq>=24.9,<27",
        "txpostgres>=1.7,<2",
        "psycopg2-binary>=2.9.9,<3",
        "pyOpenSSL>=24.2,<27",
        "service-identity>=24.1,<27",
        "klein>=24.8,<25",
        "cryptography>=43,<51",
        "PyYAML>=6.0,<7",
        "attrs>=23.1",
        "zope.interface>=6",
        "prometheus_client>=0.20,<1",
    ],
    extras_require={
        # websockets: an independent client the interoperability tests speak to the agent with;
        # ruff, mypy (+ mypy-zope, stubs): `make lint`, pinned to a minor release so a new rule
        # or inference cannot fail CI on its own; docutils: the documents parse without a warning
        "test": ["websockets>=13,<18", "kosoku>=0.1,<0.2", "h2>=4.1,<5", "docutils>=0.21,<0.24",
                 "ruff>=0.17,<0.18", "mypy>=2.4,<2.5", "mypy-zope>=1.0.17,<1.1",
                 "types-PyYAML>=6.0", "types-psycopg2>=2.9", "types-docutils>=0.21"],
    },
    entry_points={"console_scripts": ["lpa = lpa.tools.cli:main"]},
)
