"""Package discovery for the wheel (metadata lives in pyproject.toml).

``tgnstream`` is the one import package. The service folders at the repository root install as
its subpackages (``ingest/`` -> ``tgnstream.ingest``), so the layout shows the services while
imports name one package. Every package below them is found, never listed by hand.
"""

from pathlib import Path

from setuptools import find_packages, setup

ROOT = Path(__file__).resolve().parent
#: Folders at the root that install as ``tgnstream.<name>``.
SERVICE_FOLDERS = ("ingest", "model_server", "trainer")


def _packages() -> tuple[list[str], dict[str, str]]:
    packages = find_packages(where=str(ROOT), include=["tgnstream", "tgnstream.*"])
    package_dir: dict[str, str] = {}
    for folder in SERVICE_FOLDERS:
        name = f"tgnstream.{folder}"
        package_dir[name] = folder
        packages.append(name)
        packages += [f"{name}.{sub}" for sub in find_packages(where=str(ROOT / folder))]
    return sorted(packages), package_dir


PACKAGES, PACKAGE_DIR = _packages()

setup(packages=PACKAGES, package_dir=PACKAGE_DIR)
