"""The task API in-process: a task that cannot be imported or built is refused with the import
string named (users' tasks trained, recorded and rebuilt for real:
tests/integration/test_tasks.py)."""

from __future__ import annotations

import pytest

from ftrain.tasks import TaskError, TaskRef, load_task


def test_load_task_names_the_import_string_that_failed():
    with pytest.raises(TaskError, match=r"--task nosuch\.mod:Task: cannot import module "
                                        r"'nosuch\.mod' .*Install the package"):
        load_task(TaskRef("nosuch.mod:Task", {}))
    with pytest.raises(TaskError, match="has no attribute 'Nope'"):
        load_task(TaskRef("tests.harness.tasks:Nope", {}))
    with pytest.raises(TaskError, match=r"--task-args \{\"width\": 3\} do not fit"):
        load_task(TaskRef("tests.harness.tasks:ToyTask", {"width": 3}))
    with pytest.raises(TaskError, match="returned a int, not an ftrain.Task"):
        load_task(TaskRef("json:loads", {"s": "1"}))
