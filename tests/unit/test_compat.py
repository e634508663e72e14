"""Compatibility check on resume, in-process: the rules' verdicts on recorded run facts (what is
refused, what is applied), the rules table that docs/design/resume-rules.md shows, and changed
hyperparameters really applied (in real runs: tests/integration/test_compat.py)."""

from __future__ import annotations

from ftrain.checkpoint import Loaded, Manifest
from ftrain.checkpoint.rules import RULES, check, markdown_table, run_facts
from ftrain.config import load_config
from ftrain.tasks import Task, task_ref
from tests.harness.processes import ROOT


def test_legacy_cifar_checkpoint_refuses_the_new_augmentation():
    """Checkpoints written before the torchvision v2 augmentation recorded none; for CIFAR-10
    they count as the old hand-written one, and a resume would change the samples."""
    cfg = config("--dataset", "cifar10", "--model", "resnet18")
    # Before tasks, the built-in task's flags were recorded at the configuration's top level.
    ts = {"config": {**cfg.to_dict(), "dataset": "cifar10", "model": "resnet18"},
          "world_size": 1, "global_batch_size": 256, "seed": 0}
    loaded = Loaded("step_0000000010", "mem://x/step_0000000010", MANIFEST10, {}, ts)
    from ftrain.tasks import ImageClassification

    facts = run_facts(cfg, task_ref(cfg), ImageClassification("cifar10", "resnet18"), 1,
                      {"train": None, "eval": None}, NUMERICS)
    v = check(loaded, facts, cfg)
    assert len(v.refusals) == 1 and v.refusals[0].startswith(
        "augmentation version: checkpoint 'seeded crop/flip/1', now 'torchvision-v2")


# ---------------------------------------------------------------------------- in-process
MANIFEST10 = Manifest(format_version=2, step=10, epoch=0, state_file="state.pt",
                      train_state_file="train_state.json")
NUMERICS = {"torch": "2.14.1", "device_type": "cpu", "deterministic": False,
            "cpu_capability": "AVX2", "intra_op_threads": 1}


def config(*argv: str):
    return load_config(list(argv), environ={})


def _facts(cfg, world_size: int) -> dict:
    data = {"train": {"len": 2048, "digest": "aa"}, "eval": {"len": 512, "digest": "bb"}}
    return run_facts(cfg, task_ref(cfg), Task(), world_size, data, NUMERICS)


def _loaded(argv: list[str], world_size: int) -> Loaded:
    cfg = config(*argv)
    ts = {"config": cfg.to_dict(), "run": _facts(cfg, world_size), "world_size": world_size,
          "global_batch_size": cfg.batch_size}
    return Loaded("step_0000000010", "mem://x/step_0000000010", MANIFEST10, {}, ts)


def test_rules_table_is_the_one_in_the_resume_rules_doc():
    page = (ROOT / "docs" / "design" / "resume-rules.md").read_text()
    assert markdown_table() in page, ("docs/design/resume-rules.md: replace its table with the "
                                      "output of python -m ftrain.checkpoint.rules")
    assert {r.action for r in RULES} == {"refuse", "apply"}


def test_world_size_change_is_applied_batch_change_refused():
    loaded = _loaded(["--batch-size", "64"], world_size=4)
    cfg = config("--batch-size", "64")
    v = check(loaded, _facts(cfg, 2), cfg)
    assert v.refusals == [] and v.applied == {"world_size": (4, 2)}
    cfg = config("--batch-size", "128")
    v = check(loaded, _facts(cfg, 4), cfg)
    assert len(v.refusals) == 1 and v.refusals[0].startswith("--batch-size: checkpoint 64, now 128")


def test_seed_and_data_changes_are_refused_with_both_values():
    loaded = _loaded([], world_size=1)
    cfg = config("--seed", "7")
    facts = _facts(cfg, 1)
    facts["data_train"] = {"len": 2048, "digest": "cc"}
    v = check(loaded, facts, cfg)
    assert any(r.startswith("--seed: checkpoint 0, now 7") for r in v.refusals), v.refusals
    assert any("training data fingerprint: checkpoint 2048 items, digest aa, now 2048 items, "
               "digest cc" in r for r in v.refusals), v.refusals


def test_checkpoint_without_recorded_facts_is_the_builtin_task():
    """Checkpoints written before tasks existed: the facts come from their configuration."""
    cfg = config()
    ts = {"config": cfg.to_dict(), "world_size": 1, "global_batch_size": 256, "seed": 0,
          "model_args": {"name": "cnn", "in_channels": 1, "image_size": 28, "num_classes": 10}}
    loaded = Loaded("step_0000000010", "mem://x/step_0000000010", MANIFEST10, {}, ts)
    v = check(loaded, _facts(cfg, 1), cfg)
    assert v.refusals == [] and v.applied == {}
    cfg = config("--model", "mlp")
    v = check(loaded, _facts(cfg, 1), cfg)
    assert any(r.startswith("--model: checkpoint 'cnn', now 'mlp'") for r in v.refusals)


def test_changed_lr_momentum_weight_decay_are_really_applied():
    """Optimizer.load_state_dict restores the checkpoint's values; the resume then writes the
    new ones into every param group and the schedule's base, and the schedule goes on from
    there: the LR after resuming with --lr 0.1 is twice the one of the 0.05 run."""
    import torch

    from ftrain.checkpoint.resume import apply_hyperparameters

    def parts(lr: float, momentum: float, wd: float):
        model = torch.nn.Linear(3, 2)
        opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum, weight_decay=wd)
        return opt, torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=20)

    opt, sched = parts(0.05, 0.9, 1e-4)
    for _ in range(5):
        opt.step()
        sched.step()
    saved_opt, saved_sched = opt.state_dict(), sched.state_dict()
    sched.step()
    lr_next_old = opt.param_groups[0]["lr"]

    opt2, sched2 = parts(0.1, 0.5, 2e-4)
    opt2.load_state_dict(saved_opt)
    sched2.load_state_dict(saved_sched)
    assert opt2.param_groups[0]["momentum"] == 0.9  # the trap: the old values came back
    apply_hyperparameters(opt2, sched2, {"lr": (0.05, 0.1), "momentum": (0.9, 0.5),
                                         "weight_decay": (1e-4, 2e-4)})
    g = opt2.param_groups[0]
    assert g["momentum"] == 0.5 and abs(g["weight_decay"] - 2e-4) < 1e-18
    assert g["initial_lr"] == 0.1
    sched2.step()
    assert abs(opt2.param_groups[0]["lr"] - 2 * lr_next_old) < 1e-12
