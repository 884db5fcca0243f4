"""Automation: when each asset materialises, said as Dagster's declarative conditions.

- Training and inference run on the crons in deployments.yaml (`on_cron` on a client's `state` and `predictions`,
  and on the datasets they read);
- a pex is rebuilt when its content key (its code version) changes: a model's key includes the base's, so a new
  base rebuilds every model version;
- a client's model is retrained when the code version of its `state` changes: that is the content key of the
  version it runs, so an edit, a new base and a client moved to another version all retrain; and it predicts in
  the run of every automated training.

N.B. `code_version_changed` is true only on the tick that sees the new code version, so each redeploy condition
holds it from that tick until the asset is requested (`_newly_true_since`). Code versions change when the code location
reloads; the redeploy sensor reloads it when the tree changes (orchestrator/sensors.py).

N.B. Every asset's condition is written into the code location's snapshot, node by node: at 100 models x 50 clients
they were half of its 61 MB and a third of its load time. So conditions select by group and kind, never by key,
and one object serves every asset with the same crons; and each tree holds only the parts that change a decision.
"""

from __future__ import annotations

import functools
from collections import defaultdict
from collections.abc import Iterable

from dagster import AssetKey, AssetSelection, AssetSpec, AutomationCondition

from orchestrator.assets import (
    BASE_GROUP,
    BASE_KEY,
    STATE_KIND,
    VERSIONS_GROUP,
    dataset_key,
    predictions_key,
    state_key,
)
from orchestrator.deployments import Deployments

__all__ = ["conditions"]

Condition = AutomationCondition
PEXES = AssetSelection.groups(VERSIONS_GROUP, BASE_GROUP)
# N.B. A prediction's dependencies are its client's datasets and its state: the state is the one of kind STATE_KIND.
STATE = AssetSelection.kind(STATE_KIND)


def _any(conditions: Iterable[Condition]) -> Condition | None:
    result = None
    for condition in conditions:
        result = condition if result is None else result | condition
    return result


def _newly_true_since(trigger: Condition, reset: Condition) -> Condition:
    """``trigger`` since ``reset``, where a tick with both keeps ``trigger``.

    N.B. `code_version_changed` carries no timestamp, so in Dagster's `since` a reset in the same tick wins: a reload
    landing in the tick that sees the previous redeploy's materialisation (a user's next edit, right after the last
    one took effect) was lost. Here that tick keeps the change, at the cost of one more run at most.
    """
    return trigger.since(reset & ~trigger)


def redeploy() -> Condition:
    """The asset's code version changed, until the asset is requested, and never while it runs: its content key,
    which includes the base's key, so a new base, a model's edit and a client moved to another version are all a
    change of the code versions of what they affect."""
    changed = _newly_true_since(AutomationCondition.code_version_changed(), AutomationCondition.newly_requested())
    return (changed & ~AutomationCondition.in_progress()).with_label("redeploy")


def _on_crons(crons: Iterable[str], ignore: AssetSelection | None) -> Condition | None:
    """`on_cron` for each cron, with dependencies in ``ignore`` not required to have updated since the tick."""
    parts = []
    for cron in crons:
        condition = AutomationCondition.on_cron(cron)
        parts.append(condition.ignore(ignore) if ignore is not None else condition)
    return _any(parts)


def _trained() -> Condition:
    """The client's state exists and was trained by the code the client runs now: a cron's prediction waits for a
    redeploy's training (which predicts in its run) instead of failing on a stale state."""
    changed = _newly_true_since(AutomationCondition.code_version_changed(), AutomationCondition.newly_updated())
    stale = changed | AutomationCondition.missing()
    return (~AutomationCondition.any_deps_match(stale).allow(STATE)).with_label("trained")


@functools.cache
def _state(train: str | None) -> Condition:
    return _any(filter(None, [redeploy(), _on_crons((train,) if train else (), PEXES)]))


@functools.cache
def _dataset(crons: tuple[str, ...]) -> Condition | None:
    return _on_crons(crons, None)


@functools.cache
def _predictions(predict: str | None) -> Condition:
    """In the run of every automated training; and on its cron once the state is current."""
    with_training = AutomationCondition.any_deps_match(AutomationCondition.will_be_requested()).allow(STATE)
    on_cron = _on_crons((predict,) if predict else (), PEXES | STATE)
    return _any(filter(None, [with_training.with_label("with training"), on_cron & _trained() if on_cron else None]))


def conditions(deployments: Deployments, version_keys: Iterable[AssetKey]) -> dict[AssetKey, Condition]:
    """Asset key -> its automation condition, for the base, every model version and every client's assets."""
    found: dict[AssetKey, Condition] = {BASE_KEY: redeploy()}
    found |= dict.fromkeys(version_keys, redeploy() | AutomationCondition.on_missing())
    readers: dict[AssetKey, set[str]] = defaultdict(set)
    for d in deployments.all():
        train, predict = d.schedules.get("train"), d.schedules.get("predict")
        for dataset in d.inputs.values():
            readers[dataset_key(d.client, dataset)] |= {c for c in (train, predict) if c}
        found[state_key(d)], found[predictions_key(d)] = _state(train), _predictions(predict)
    for key, crons in readers.items():
        if condition := _dataset(tuple(sorted(crons))):
            found[key] = condition
    return found


def with_conditions(spec: AssetSpec, found: dict[AssetKey, Condition]) -> AssetSpec:
    condition = found.get(spec.key)
    return spec.replace_attributes(automation_condition=condition) if condition is not None else spec
