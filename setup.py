"""Package layout that pyproject.toml cannot express: the click front end lives in the
repo's ``cli/`` folder but installs as ``ai4s_jobq_cli`` (a top-level ``cli`` package would
collide with anything else of that name).  Everything else is in pyproject.toml."""

from setuptools import find_packages, setup

setup(
    packages=find_packages(include=["ai4s_jobq", "ai4s_jobq.*"]) + ["ai4s_jobq_cli"],
    package_dir={"ai4s_jobq_cli": "cli"},
    package_data={
        "ai4s_jobq": ["py.typed"],
        "ai4s_jobq.dashboard": ["templates/*.html", "static/*.css", "static/*.js"],
    },
)
