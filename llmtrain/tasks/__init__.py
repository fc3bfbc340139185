"""The tasks of the one training loop, by name. Each is a `Task` (tasks/base.py) in its own file;
adding one means adding its file and one line here. Looked up by name so that importing the
registry imports no task (the CLI and Ray workers resolve only the one they run)."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from llmtrain.errors import UserError

if TYPE_CHECKING:  # the registry itself stays cheap to import (submit and --help read TASKS)
    from llmtrain.tasks.base import Task

TASKS = {
    "pretrain": "llmtrain.tasks.pretrain:PretrainTask",
    "sft": "llmtrain.tasks.sft:SFTTask",
    "dpo": "llmtrain.tasks.dpo:DPOTask",
}


def get_task(name: str) -> Task:
    if name not in TASKS:
        raise UserError(f"unknown task {name!r}; choose one of {', '.join(TASKS)}")
    module, cls = TASKS[name].split(":")
    return getattr(importlib.import_module(module), cls)()
