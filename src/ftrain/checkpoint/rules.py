"""What may change on resume: one table of rules, the check of a checkpoint against it.

Every checkpoint records the facts of its run (``run_facts``): the task and its arguments, the
seed, the global batch, fingerprints of the data, the optimisation settings. On resume each
fact is compared with this run's under ``RULES``, the one table read by the check and by the
docs (``python -m ftrain.checkpoint.rules`` prints it as Markdown; docs/design/resume-rules.md
carries it):

- refuse: the run could not continue the same sample sequence or the same model; exit 2 with
  every difference listed.
- apply: the new value takes effect from the resumed step on and the log says so; where it
  changes the arithmetic, it warns that the run is no longer bitwise-equal to an uninterrupted
  one.
- anything not in the table (save cadence, loader workers, ...) may change freely; each change
  is logged.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field, fields
from typing import Any

from ..config import DEFAULT_TASK, Config, flag
from ..runtime.exitcodes import InputError
from ..runtime.numerics import differences
from ..tasks import Task, TaskError, TaskRef, options_class
from .format import Loaded, Manifest

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Rule:
    fact: str  # key in run_facts()
    name: str  # what the user knows it as
    action: str  # "refuse" or "apply"
    why: str


RULES: tuple[Rule, ...] = (
    Rule("task", "--task", "refuse", "another task trains another model on other data"),
    Rule("task_args", "--task-args and the task's own options (the built-in task's: "
         "--dataset, --model, --width, --depth, --synthetic-*-size)", "refuse",
         "the model or the data would differ"),
    Rule("seed", "--seed", "refuse", "the data order, the initial weights and the synthetic data "
         "derive from it: the rest of the epoch would repeat and skip samples"),
    Rule("global_batch_size", "--batch-size", "refuse", "global batch k would hold other samples"),
    Rule("data_train", "training data fingerprint", "refuse",
         "the training data changed under the same name (length or sampled items)"),
    Rule("data_eval", "eval data fingerprint", "refuse",
         "the evaluation data changed under the same name"),
    Rule("augmentation", "augmentation version", "refuse",
         "the augmented samples would differ from the checkpoint's run"),
    Rule("init_from", "--init-from (the file's digest)", "refuse",
         "the run started from other weights (compared when --init-from is given)"),
    Rule("optimizer", "--optimizer", "refuse", "the optimizer state would not fit (compared "
         "when the task uses the default optimizer)"),
    Rule("optimizer_class", "the optimizer's class (the task's own)", "refuse",
         "the optimizer state would not fit"),
    Rule("optimizer_groups", "the optimizer's param groups and hyperparameters (the task's "
         "own; the rates and momenta --lr, --momentum and --weight-decay scale excepted)",
         "refuse", "loading the checkpoint would silently put its values back"),
    Rule("scheduler", "--scheduler", "refuse", "the schedule state would not fit (compared when "
         "the task uses the default schedule, as are --lr-step-epochs and --lr-gamma)"),
    Rule("scheduler_class", "the schedule's class (the task's own)", "refuse",
         "the schedule state would not fit"),
    Rule("lr_step_epochs", "--lr-step-epochs", "refuse", "the step schedule keeps its state"),
    Rule("lr_gamma", "--lr-gamma", "refuse", "the step schedule keeps its state"),
    Rule("parallel", "--parallel", "apply", "converted on load: a ddp checkpoint's whole "
         "tensors are sliced into each rank's shards, an fsdp checkpoint's shards assembled "
         "whole on every rank; the gradients are reduced in another order from then on"),
    Rule("world_size", "world size", "apply", "must divide --batch-size; the same sample "
         "sequence continues (gradients are summed in another order)"),
    Rule("lr", "--lr", "apply", "every param group's learning rate (and the schedule's base) is "
         "scaled by new/old after loading"),
    Rule("momentum", "--momentum", "apply", "every param group's momentum (AdamW: beta1) is "
         "scaled by new/old after loading"),
    Rule("weight_decay", "--weight-decay", "apply", "every param group's weight decay is scaled "
         "by new/old after loading"),
    Rule("grad_accum", "--grad-accum", "apply", "same samples per step, split into another "
         "number of micro-batches"),
    Rule("clip_grad_norm", "--clip-grad-norm", "apply", "clipping from the resumed step on"),
    Rule("precision", "--precision", "apply", "autocast from the resumed step on (fp16: a "
         "fresh gradient scaler when the checkpoint has none)"),
    Rule("epochs", "--epochs", "apply", "the LR schedule stretches to the new end"),
)
_BY_FACT = {r.fact: r for r in RULES}
# The built-in task's CIFAR-10 augmentation before tasks existed (a hand-written crop/flip).
LEGACY_CIFAR_AUGMENTATION = "seeded crop/flip/1"
# Applied changes that alter the arithmetic of the steps to come.
NOT_BITWISE = ("lr", "momentum", "weight_decay", "grad_accum", "clip_grad_norm", "precision",
               "parallel")
# Config fields the table covers (compared as facts), or that never count as changes.
_NOT_FREE = {"task", "task_args", "seed", "batch_size", "optimizer", "scheduler", "init_from",
             "lr_step_epochs", "lr_gamma", "lr", "momentum", "weight_decay", "grad_accum",
             "clip_grad_norm", "precision", "epochs", "config", "resume", "storage_options",
             "parallel", "task_options"}


def run_facts(cfg: Config, ref: TaskRef, task: Task, world_size: int,
              data: dict[str, dict[str, Any]], numerics: dict[str, Any]) -> dict[str, Any]:
    """What a checkpoint records of its run, to be compared on resume. ``numerics``: the
    numeric environment (numerics.numeric_environment), compared apart from RULES: a change
    is allowed and said."""
    return {"numerics": numerics, "task": ref.target, "task_args": ref.args, "seed": cfg.seed,
            "global_batch_size": cfg.batch_size, "data_train": data["train"],
            "data_eval": data["eval"], "augmentation": task.augmentation,
            "optimizer": cfg.optimizer, "scheduler": cfg.scheduler,
            "lr_step_epochs": cfg.lr_step_epochs, "lr_gamma": cfg.lr_gamma,
            "world_size": world_size, "lr": cfg.lr, "momentum": cfg.momentum,
            "weight_decay": cfg.weight_decay, "grad_accum": cfg.grad_accum,
            "clip_grad_norm": cfg.clip_grad_norm, "precision": cfg.precision,
            "epochs": cfg.epochs, "parallel": cfg.parallel}


# Param-group values a schedule changes as it runs, or --lr, --momentum and --weight-decay
# scale on resume (applied), or that only choose an implementation: not compared.
_GROUP_KEYS_FREE = {"params", "lr", "initial_lr", "max_lr", "min_lr", "momentum", "betas",
                    "base_momentum", "max_momentum", "weight_decay", "foreach", "fused",
                    "capturable", "differentiable"}
# Facts of the default optimizer and schedule (the flags), compared only when the task uses
# them; the task's own are compared by class and param groups.
_DEFAULT_OPTIMIZER_FACTS = ("optimizer",)
_DEFAULT_SCHEDULE_FACTS = ("scheduler", "lr_step_epochs", "lr_gamma")


def optimizer_facts(task: Task, optimizer: Any, scheduler: Any) -> dict[str, Any]:
    """What a checkpoint records of the optimizer and the schedule: whether they are the
    task's own, their classes and the optimizer's param groups (hyperparameters only)."""
    def plain(v: Any) -> Any:
        if isinstance(v, (list, tuple)):
            return [plain(x) for x in v]
        if hasattr(v, "item") and getattr(v, "numel", lambda: 0)() == 1:
            return v.item()
        return v if isinstance(v, (int, float, str, bool)) or v is None else repr(v)

    def name(obj: Any) -> str:
        return f"{type(obj).__module__}.{type(obj).__qualname__}"

    groups = [{k: plain(v) for k, v in sorted(g.items()) if k not in _GROUP_KEYS_FREE}
              for g in optimizer.param_groups]
    return {"own_optimizer": type(task).configure_optimizer is not Task.configure_optimizer,
            "own_scheduler": type(task).configure_scheduler is not Task.configure_scheduler,
            "optimizer_class": name(optimizer), "optimizer_groups": groups,
            "scheduler_class": name(scheduler)}


def _group_differences(before: list[dict[str, Any]], after: list[dict[str, Any]]) -> str:
    if len(before) != len(after):
        return f"{len(before)} param groups in the checkpoint, {len(after)} now"
    out = []
    for i, (b, a) in enumerate(zip(before, after, strict=True)):
        out += [f"group {i} {k} {b.get(k)!r} -> {a.get(k)!r}" for k in sorted({*b, *a})
                if k not in _GROUP_KEYS_FREE and b.get(k) != a.get(k)]
    return ", ".join(out)


def checkpoint_task(train_state: dict[str, Any], manifest: Manifest) -> TaskRef:
    """The task a checkpoint was trained with (checkpoints written before tasks existed were
    the built-in task; their arguments come from the recorded configuration)."""
    rec = manifest.task or train_state.get("task")
    if rec:
        return TaskRef.from_dict(rec)
    from ..tasks import builtin

    margs = manifest.model_args or train_state.get("model_args") or {}
    return TaskRef(DEFAULT_TASK, builtin.legacy_task_args(train_state.get("config", {}), margs))


def checkpoint_facts(loaded: Loaded) -> dict[str, Any]:
    """The run facts a checkpoint recorded; derived from its configuration for checkpoints
    written before the facts were recorded (facts that cannot be known are left out)."""
    ts = loaded.train_state
    if "run" in ts:
        facts = dict(ts["run"])
        # Written before --parallel existed: a ddp checkpoint.
        facts.setdefault("parallel", "fsdp" if loaded.sharded else "ddp")
        return facts
    old = ts.get("config", {})
    ref = checkpoint_task(ts, loaded.manifest)
    facts = {"task": ref.target, "task_args": ref.args, "seed": ts.get("seed", old.get("seed")),
             "global_batch_size": ts.get("global_batch_size"),
             "world_size": ts.get("world_size"), "grad_accum": 1, "clip_grad_norm": 0.0,
             "precision": "fp32", "parallel": "ddp",
             "augmentation": LEGACY_CIFAR_AUGMENTATION if ref.args.get("dataset") == "cifar10"
             else "none"}  # before tasks, the built-in task's CIFAR-10 crop and flip
    for key in ("optimizer", "scheduler", "lr_step_epochs", "lr_gamma", "lr", "momentum",
                "weight_decay", "epochs"):
        if key in old:
            facts[key] = old[key]
    return facts


@dataclass
class Verdict:
    refusals: list[str]
    applied: dict[str, tuple[Any, Any]]  # fact -> (checkpoint's value, this run's)
    free: list[str]  # other configuration changes, for the log
    # Changes of the numeric environment ("cpu_capability AVX2 -> AVX512"): training goes
    # on, no longer bitwise equal to an uninterrupted run.
    numerics: list[str] = field(default_factory=list)


def check(loaded: Loaded, new: dict[str, Any], cfg: Config) -> Verdict:
    """Compare a checkpoint's facts with this run's under RULES."""
    old = checkpoint_facts(loaded)
    verdict = Verdict([], {}, [])
    own_opt, own_sched = new.get("own_optimizer"), new.get("own_scheduler")
    skip = (_DEFAULT_OPTIMIZER_FACTS if own_opt else ("optimizer_class", "optimizer_groups")) \
        + (_DEFAULT_SCHEDULE_FACTS if own_sched else ("scheduler_class",))
    for rule in RULES:
        if rule.fact in skip or rule.fact not in old or rule.fact not in new \
                or old[rule.fact] == new[rule.fact]:
            continue
        before, after = old[rule.fact], new[rule.fact]
        if rule.fact == "optimizer_groups":
            changed = _group_differences(before, after)
            if changed:
                verdict.refusals.append(f"{rule.name}: {changed} ({rule.why})")
            continue
        if rule.action == "apply":
            verdict.applied[rule.fact] = (before, after)
        elif rule.fact == "task_args":
            verdict.refusals.extend(_args_differences(new["task"], before, after))
        elif rule.fact.startswith("data_"):
            verdict.refusals.append(f"{rule.name}: checkpoint {_fp(before)}, now {_fp(after)} "
                                    f"({rule.why})")
        else:
            verdict.refusals.append(f"{rule.name}: checkpoint {before!r}, now {after!r} "
                                    f"({rule.why})")
    verdict.numerics = differences(old.get("numerics"), new["numerics"])
    old_cfg = loaded.train_state.get("config", {})
    for key, value in cfg.to_dict().items():
        if key not in _NOT_FREE and key in old_cfg and old_cfg[key] != value:
            verdict.free.append(f"{flag(key)}: {old_cfg[key]!r} -> {value!r}")
    return verdict


def _args_differences(target: str, before: dict[str, Any], after: dict[str, Any]) -> list[str]:
    own = _option_names(target)
    out = []
    for key in sorted({*before, *after}):
        if before.get(key) != after.get(key):
            name = flag(key) if key in own else f"--task-args {key}"
            out.append(f"{name}: checkpoint {before.get(key)!r}, now {after.get(key)!r} (the "
                       "model or the data would differ)")
    return out


def _option_names(target: str) -> set[str]:
    """The task's own options, named by their flags in a refusal."""
    try:
        options = options_class(target)
    except TaskError:
        return set()
    return {f.name for f in fields(options)} if options is not None else set()


def _fp(fp: Any) -> str:
    if isinstance(fp, dict):
        return f"{fp.get('len')} items, digest {fp.get('digest')}"
    return repr(fp)


def markdown_table() -> str:
    """RULES as the Markdown table of docs/design/resume-rules.md."""
    lines = ["| what | on resume | why |", "|---|---|---|"]
    for r in RULES:
        action = "refused (exit 2)" if r.action == "refuse" else (
            "applied, with a warning: no longer bitwise-equal" if r.fact in NOT_BITWISE
            else "applied")
        lines.append(f"| {r.name} | {action} | {r.why} |")
    lines.append("| anything else (save cadence, workers, logging, ...) | applied, logged | |")
    return "\n".join(lines)


def refuse_or_log(loaded: Loaded, verdict: Verdict, global_batch: int) -> None:
    """Rank 0: raise InputError listing every refusal, else log what the resume changes."""
    if verdict.refusals:
        raise InputError(f"cannot resume from {loaded.uri}: it is incompatible with this run:\n  "
                         + "\n  ".join(verdict.refusals) + "\nUse the original settings, or "
                         "--resume never with a new --checkpoint-dir")
    for change in verdict.free:
        log.info("resume: allowed change: %s", change)
    if verdict.numerics:
        log.warning("resume: the numeric environment changed (%s): training continues "
                    "correctly, but from step %s on this run is no longer bitwise equal to an "
                    "uninterrupted one (bitwise resume needs the same hardware and software); "
                    "the history records it as not_bitwise", ", ".join(verdict.numerics),
                    loaded.manifest.step)
    for fact, (before, after) in verdict.applied.items():
        rule = _BY_FACT[fact]
        if fact == "world_size":
            log.info("resume: allowed change: world size %s -> %s (per-rank batch %d)", before,
                     after, global_batch // after)
        elif fact in NOT_BITWISE:
            log.warning("resume: applying %s %r -> %r (%s); from here on this run is no longer "
                        "bitwise-equal to an uninterrupted one", rule.name, before, after,
                        rule.why)
        else:
            log.info("resume: applying %s %r -> %r (%s)", rule.name, before, after, rule.why)


def main() -> None:
    """``python -m ftrain.checkpoint.rules``: print the rules as a Markdown table."""
    print(markdown_table())


if __name__ == "__main__":
    main()
