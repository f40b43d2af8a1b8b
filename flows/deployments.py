"""booksmith's deployments, defined once: `booksmith serve` (flows/serve.py) serves this table
from one process, and prefect.yaml (for `prefect deploy --all` and a worker, as the compose
stack runs them) must say the same (tests/test_deployments.py compares the two).
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any

from prefect import Flow


@dataclass(frozen=True)
class Deployment:
    name: str
    entrypoint: str  # the flow's file and function, as prefect.yaml names it
    description: str
    takes_config: bool = False  # the run config's path is a parameter
    nightly: bool = False  # on the config's schedule (`schedule.cron`), one run at a time

    def flow(self) -> Flow[Any, Any]:
        path, name = self.entrypoint.split(":")
        module = "booksmith." + path.removesuffix(".py").replace("/", ".")
        flow: Flow[Any, Any] = getattr(importlib.import_module(module), name)
        return flow


DEPLOYMENTS = (
    Deployment(
        "nightly",
        "flows/nightly.py:nightly",
        "One dataset version from the configured topics; dedups against every earlier version.",
        takes_config=True,
        nightly=True,
    ),
    Deployment(
        "expand-topics",
        "flows/expand.py:expand_topics",
        "Grow seed topics into a topic tree file (pass topics and output).",
        takes_config=True,
    ),
    Deployment(
        "export",
        "flows/export.py:export_flow",
        "Copy a version (or the newest under an output directory) to a URL.",
    ),
    Deployment(
        "train", "flows/train.py:train_flow", "Train the bundled Phi model on a dataset version."
    ),
)
