"""`ddpm-pipe promote`: move a registry alias to a version only when its evaluation beats the holder's.

The gate reads the keyed results `ddpm-pipe evaluate` stores as version tags
(``ddpm.eval.<result key>`` = value). Two results are compared only when their keys are equal, in the
metric's direction (``ddpm.metrics.better``), and the candidate must win by more than ``min_delta``.
Which key: ``--metric`` may be a full result key; a bare metric name uses the candidate's latest
evaluation of it when the holder has the same key, else the holder's latest, else the first common
key in sorted order. With no holder, any evaluated version takes the alias (recorded with the key of
its latest evaluation of the metric, not that of a sampler-table row or of one class).

Every decision is recorded on the candidate version as tags ``ddpm.promote.<alias>.<field>`` (the
latest) and ``ddpm.promote.<alias>.history.<UTC time>`` (one JSON line per decision). Aliases only;
MLflow 3 deprecates stages.
"""

from __future__ import annotations

import json
from datetime import datetime, timezone
from typing import Any

from mlflow.tracking import MlflowClient

from ddpm.metrics import better, direction
from pipelines import tracking
from pipelines.errors import RefusedError, UsageError
from pipelines.names import check_name
from pipelines.registry import EVAL_TAG, LAST_TAG
from pipelines.settings import resolve


def promote_command(name: str, version: str | None = None, alias: str = "champion", metric: str = "kid",
                    min_delta: float = 0.0, force: bool = False, reason: str | None = None) -> dict[str, Any]:
    """Move ``alias`` of registered model ``name`` to ``version`` (default: the latest) if it wins.

    :raises RefusedError: (exit 3) the candidate does not beat the holder, or no comparable
        evaluation exists; the message gives both numbers or what is missing.
    """
    check_name(name, "--name")
    check_gate(metric, min_delta)
    tracking.configure(resolve())
    c = tracking.client()
    try:
        model = c.get_registered_model(name)
    except Exception as e:
        raise UsageError(f"registered model {name!r} not found: {str(e).splitlines()[0]}") from None
    version = str(version) if version is not None else _latest(c, name)
    try:
        candidate = c.get_model_version(name, version)
    except Exception as e:
        raise UsageError(f"{name} version {version} not found: {str(e).splitlines()[0]}") from None
    holder = model.aliases.get(alias)
    holder = str(holder) if holder is not None else None
    hold_tags = c.get_model_version(name, holder).tags if holder else {}
    cand_evals, hold_evals = _evaluations(candidate.tags, metric), _evaluations(hold_tags, metric)
    decision: dict[str, Any] = {"alias": alias, "candidate_version": version, "holder_version": holder,
                                "metric": metric, "min_delta": min_delta}
    key = _pick_key(metric, cand_evals, hold_evals, candidate.tags, hold_tags)
    if key is None and holder is None and candidate.tags.get(LAST_TAG + metric) in cand_evals:
        key = candidate.tags[LAST_TAG + metric]  # no holder: the candidate's latest evaluation of it
    if key is not None:
        decision.update(key=key, candidate_value=cand_evals.get(key), holder_value=hold_evals.get(key))
    if holder == version:
        decision["decision"] = "unchanged"
        _record(c, name, version, decision)
        return _result(name, decision, f"{name} version {version} already holds @{alias}; nothing to do")
    if force:
        decision.update(decision="forced", reason=reason or "no reason given")
        _move(c, name, alias, version, holder, decision)
        return _result(name, decision, f"forced @{alias} of {name} to version {version} "
                       f"(was {holder or 'unset'}); reason recorded: {decision['reason']}")
    return _gate(c, name, decision, cand_evals, hold_evals)


def check_gate(metric: str, min_delta: float, prefix: str = "--") -> None:
    """The gate's settings, before anything is read: a known metric (or result key) and a
    non-negative ``min_delta`` (exit 2); ``prefix`` is how the caller's user spells the options
    (``--metric``, a workflow file's ``promote.metric``)."""
    try:
        direction(metric)
    except ValueError as e:
        raise UsageError(f"{prefix}metric: {e}") from None
    if min_delta < 0:
        raise UsageError(f"{prefix}{'min-delta' if prefix == '--' else 'min_delta'} must be >= 0, got {min_delta}")


def _gate(c: MlflowClient, name: str, decision: dict[str, Any], cand_evals: dict[str, float],
          hold_evals: dict[str, float]) -> dict[str, Any]:
    """Promote the candidate if its evaluation wins under a key both share (or there is no holder),
    else record the refusal and raise :class:`RefusedError`."""
    alias, version, holder = decision["alias"], decision["candidate_version"], decision["holder_version"]
    metric, min_delta, key = decision["metric"], decision["min_delta"], decision.get("key")
    label = metric if "/" in metric else f"{metric!r}"
    if not cand_evals:
        decision.update(decision="refused", why="candidate not evaluated")
        _record(c, name, version, decision)
        raise RefusedError(f"refused: {name} version {version} has no evaluation of {label}; "
                           f"run `ddpm-pipe evaluate --model models:/{name}/{version}` first")
    if holder is None:
        decision["decision"] = "promoted"
        decision.setdefault("key", sorted(cand_evals)[0])
        decision.setdefault("candidate_value", cand_evals[decision["key"]])
        _move(c, name, alias, version, holder, decision)
        return _result(name, decision, f"@{alias} of {name} -> version {version} (no holder yet; "
                       f"{decision['key']} = {decision['candidate_value']:.6g})")
    if key is None:
        decision.update(decision="refused", why="no comparable evaluation")
        _record(c, name, version, decision)
        raise RefusedError(
            f"refused: no comparable evaluation of {label} between version {version} and the holder of "
            f"@{alias}, version {holder} (results compare only under equal keys); candidate has "
            f"{sorted(cand_evals) or 'none'}, holder has {sorted(hold_evals) or 'none'}")
    cand, hold = cand_evals[key], hold_evals[key]
    if not better(key, cand, hold, min_delta):
        decision.update(decision="refused", why="not better")
        _record(c, name, version, decision)
        raise RefusedError(
            f"refused: version {version} has {metric} = {cand:.6g}, holder of @{alias} (version {holder}) "
            f"has {hold:.6g}; {direction(key)} is better and the gain must exceed {min_delta:g} (key {key})")
    decision["decision"] = "promoted"
    _move(c, name, alias, version, holder, decision)
    return _result(name, decision, f"@{alias} of {name} -> version {version}: {metric} {cand:.6g} beats "
                   f"{hold:.6g} of version {holder} ({direction(key)} is better, min delta {min_delta:g}; key {key})")


def _latest(c: MlflowClient, name: str) -> str:
    versions = c.search_model_versions(f"name = {tracking.quote(name)}")
    if not versions:
        raise UsageError(f"registered model {name!r} has no versions")
    return str(max(int(v.version) for v in versions))


def _evaluations(tags: dict[str, str], metric: str) -> dict[str, float]:
    """``{result key: value}`` of this metric (or exactly this key) from a version's tags."""
    out = {}
    for tag, value in tags.items():
        if not tag.startswith(EVAL_TAG):
            continue
        key = tag[len(EVAL_TAG):]
        if (key == metric) if "/" in metric else (key.split("/", 1)[0] == metric):
            try:
                out[key] = float(value)
            except ValueError:
                continue
    return out


def _pick_key(metric: str, cand: dict[str, float], hold: dict[str, float], cand_tags: dict[str, str],
              hold_tags: dict[str, str]) -> str | None:
    common = set(cand) & set(hold)
    if not common:
        return None
    for tags in (cand_tags, hold_tags):
        last = tags.get(LAST_TAG + metric)
        if last in common:
            return last
    return sorted(common)[0]


def _record(c: MlflowClient, name: str, version: str, decision: dict[str, Any]) -> None:
    """Tag the candidate with the decision: the latest fields plus one history entry."""
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S%fZ")
    decision["time"] = stamp
    prefix = f"ddpm.promote.{decision['alias']}."
    for field in ("decision", "key", "candidate_value", "holder_version", "holder_value", "min_delta",
                  "reason", "why", "time"):
        if decision.get(field) is not None:
            c.set_model_version_tag(name, version, prefix + field, str(decision[field]))
    c.set_model_version_tag(name, version, f"{prefix}history.{stamp}", json.dumps(decision, default=str))


def _move(c: MlflowClient, name: str, alias: str, version: str, holder: str | None, decision: dict[str, Any]) -> None:
    try:
        c.set_registered_model_alias(name, alias, version)
    except Exception as e:
        raise UsageError(f"cannot set alias {alias!r}: {str(e).splitlines()[0]}") from None
    _record(c, name, version, decision)
    if holder is not None:
        c.set_model_version_tag(name, holder, f"ddpm.promote.{alias}.replaced_by", version)


def _result(name: str, decision: dict[str, Any], message: str) -> dict[str, Any]:
    return {"message": message, "name": name, **decision}
