"""Automation: when each asset materialises, said as Dagster's declarative conditions.

- Training and inference run on the crons in deployments.yaml (`on_cron` on a client's `state` and `predictions`,
  and on the datasets they read);
- a pex is rebuilt when its content key (its code version) changes, or when the base below it did;
- a client's model is retrained when its version's pex was rebuilt or when the client now runs another version
  (its `state`'s code version is that version's content key), and predicts again after every training.

N.B. `code_version_changed` is true only on the tick that sees the new code version, so each redeploy condition
holds `since_last_handled`: from that tick until the asset is requested. Code versions change when the code location
reloads; the redeploy sensor reloads it when the tree changes (orchestrator/sensors.py).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable

from dagster import AssetKey, AssetSelection, AssetSpec, AutomationCondition

from orchestrator.assets import BASE_GROUP, BASE_KEY, VERSIONS_GROUP, dataset_key, predictions_key, state_key
from orchestrator.deployments import Deployments

__all__ = ["conditions"]

Condition = AutomationCondition


def _handled(condition: Condition) -> Condition:
    """True from the tick that sees ``condition`` until the asset is requested, and never while it runs."""
    return condition.since_last_handled() & ~AutomationCondition.in_progress()


def _any(conditions: Iterable[Condition]) -> Condition | None:
    result = None
    for condition in conditions:
        result = condition if result is None else result | condition
    return result


def rebuild(allow: AssetSelection) -> Condition:
    """A code version that changed, or a dependency in ``allow`` updated (or about to be, in this tick)."""
    updated = AutomationCondition.any_deps_updated().allow(allow)
    return _handled(AutomationCondition.code_version_changed() | updated).with_label("redeploy")


def _on_crons(crons: Iterable[str], ignore: AssetSelection | None) -> Condition | None:
    """`on_cron` for each cron, with dependencies in ``ignore`` not required to have updated since the tick."""
    parts = []
    for cron in sorted(set(crons)):
        condition = AutomationCondition.on_cron(cron)
        parts.append(condition.ignore(ignore) if ignore is not None else condition)
    return _any(parts)


def _trained(state: AssetKey) -> Condition:
    """The client's state exists, is not being trained, and was trained by the code the client runs now: a cron's
    prediction waits for a redeploy's training (which predicts after it) instead of failing on a stale state."""
    stale = (
        AutomationCondition.code_version_changed().since(AutomationCondition.newly_updated())
        | AutomationCondition.in_progress()
        | AutomationCondition.missing()
    )
    return (~AutomationCondition.any_deps_match(stale).allow(AssetSelection.assets(state))).with_label("trained")


def conditions(deployments: Deployments, version_keys: Iterable[AssetKey]) -> dict[AssetKey, Condition]:
    """Asset key -> its automation condition, for the base, every model version and every client's assets."""
    # N.B. Groups, not key lists: every client's condition carries these selections into the code location's
    # snapshot, and a list of every version's key made it 5x larger at 100 models x 50 clients.
    versions = AssetSelection.groups(VERSIONS_GROUP)
    pexes = AssetSelection.groups(VERSIONS_GROUP, BASE_GROUP)
    found: dict[AssetKey, Condition] = {BASE_KEY: _handled(AutomationCondition.code_version_changed())}
    for key in version_keys:
        found[key] = rebuild(AssetSelection.assets(BASE_KEY)) | AutomationCondition.on_missing()
    readers: dict[AssetKey, list[str]] = defaultdict(list)
    for d in deployments.all():
        state, predictions = state_key(d), predictions_key(d)
        train, predict = d.schedules.get("train"), d.schedules.get("predict")
        for dataset in d.inputs.values():
            readers[dataset_key(d.client, dataset)] += [c for c in (train, predict) if c]
        found[state] = _any(filter(None, [rebuild(versions), _on_crons([train] if train else [], pexes)]))
        on_cron = _on_crons([predict] if predict else [], pexes | AssetSelection.assets(state))
        on_cron = on_cron & _trained(state) if on_cron is not None else None
        after_training = _handled(AutomationCondition.any_deps_updated().allow(AssetSelection.assets(state)))
        found[predictions] = _any(filter(None, [after_training.with_label("after training"), on_cron]))
    for key, crons in readers.items():
        if condition := _on_crons(crons, None):
            found[key] = condition
    return found


def with_conditions(spec: AssetSpec, found: dict[AssetKey, Condition]) -> AssetSpec:
    condition = found.get(spec.key)
    return spec.replace_attributes(automation_condition=condition) if condition is not None else spec
