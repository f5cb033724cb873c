"""`ddpm-pipe promote`: move a registry alias to a version only when its evaluation beats the holder's.

The gate reads the keyed results `ddpm-pipe evaluate` stores as version tags
(``ddpm.eval.<result key>`` = value). Two results are compared only when their keys are equal, in the
metric's direction (``ddpm.metrics.better``), and the candidate must win by more than ``min_delta``.
Which key: ``--metric`` may be a full result key; a bare metric name uses the candidate's latest
evaluation of it when the holder has the same key, else the holder's latest, else the first common
key in sorted order. With no holder, any evaluated version takes the alias (recorded with the key of
its latest evaluation of the metric, not that of a sampler-table row or of one class).

``--against MODEL`` (a ``models:/NAME/VERSION`` or ``models:/NAME@ALIAS`` of any registered name, an
alias pinned once) compares the candidate with that version instead of the alias holder: a
distilled student against its teacher. The two are compared on the same yardstick (equal keys once
the sampling settings, ``sampler``/``steps``/``eta``/``spacing``, are left out: a 4-step student
against its teacher's own 20-step sampler), and ``--min-delta`` may then be negative: the candidate
may be worse by at most that much.

Every decision is recorded on the candidate version as tags ``ddpm.promote.<alias>.<field>`` (the
latest) and ``ddpm.promote.<alias>.history.<UTC time>`` (one JSON line per decision). Aliases only;
MLflow 3 deprecates stages.

Moving the alias is a compare-and-set (:func:`_move`; MLflow has no conditional alias write): the
decision is recorded first (``pending``), the alias re-read before and after it is set, and a
promotion that raced another one (the alias moved since the gate read it, or another candidate is
being promoted from the same holder) is refused with exit 3, the alias put back when it is still ours.
"""

from __future__ import annotations

import json
from datetime import datetime, timedelta, timezone
from typing import Any

from mlflow.tracking import MlflowClient

from ddpm.metrics import better, direction, parse_result_key
from pipelines import tracking
from pipelines.errors import RefusedError, UsageError
from pipelines.names import check_name
from pipelines.registry import EVAL_TAG, LAST_TAG
from pipelines.settings import resolve

SAMPLING = ("sampler", "steps", "eta", "spacing")  # what --against leaves out of a key: how it was sampled
RACE_WINDOW = timedelta(minutes=2)  # a pending decision this recent, from the same holder, is a rival in flight
STAMP = "%Y%m%dT%H%M%S%fZ"


def promote_command(name: str, version: str | None = None, alias: str = "champion", metric: str = "kid",
                    min_delta: float = 0.0, force: bool = False, reason: str | None = None,
                    against: str | None = None) -> dict[str, Any]:
    """Move ``alias`` of registered model ``name`` to ``version`` (default: the latest) if it wins
    (against the alias holder, or the model ``against``: the module docstring).

    :raises RefusedError: (exit 3) the candidate does not beat the holder, or no comparable
        evaluation exists; the message gives both numbers or what is missing.
    """
    check_name(name, "--name")
    check_gate(metric, min_delta, negative_ok=against is not None)
    tracking.configure(resolve())
    c = tracking.client()
    if against is not None:
        return _promote_against(c, name, version, alias, metric, min_delta, against)
    try:
        model = c.get_registered_model(name)
    except Exception as e:
        raise UsageError(f"registered model {name!r} not found: {str(e).splitlines()[0]}") from None
    version, candidate = _candidate(c, name, version)
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


def check_gate(metric: str, min_delta: float, prefix: str = "--", negative_ok: bool = False) -> None:
    """The gate's settings, before anything is read: a known metric (or result key) and a
    non-negative ``min_delta`` unless ``negative_ok`` (exit 2); ``prefix`` is how the caller's user
    spells the options (``--metric``, a workflow file's ``promote.metric``)."""
    try:
        direction(metric)
    except ValueError as e:
        raise UsageError(f"{prefix}metric: {e}") from None
    if min_delta < 0 and not negative_ok:
        also = " (a negative one is a tolerance, only with --against)" if prefix == "--" else ""
        raise UsageError(f"{prefix}{'min-delta' if prefix == '--' else 'min_delta'} must be >= 0{also}, got {min_delta}")


def _gate(c: MlflowClient, name: str, decision: dict[str, Any], cand_evals: dict[str, float],
          hold_evals: dict[str, float]) -> dict[str, Any]:
    """Promote the candidate if its evaluation wins under a key both share (or there is no holder),
    else record the refusal and raise :class:`RefusedError`."""
    alias, version, holder = decision["alias"], decision["candidate_version"], decision["holder_version"]
    metric, min_delta, key = decision["metric"], decision["min_delta"], decision.get("key")
    label = metric if "/" in metric else f"{metric!r}"
    if not cand_evals:
        _refuse_unevaluated(c, name, version, decision, label)
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


def yardstick(key: str) -> str:
    """A result key without its sampling settings (:data:`SAMPLING`): what was measured, on what data
    and features, with how many samples; two models' results on one yardstick share it."""
    metric, deps = parse_result_key(key)
    return "/".join([metric, *(f"{k}:{v}" for k, v in sorted(deps.items()) if k not in SAMPLING)])


def _promote_against(c: MlflowClient, name: str, version: str | None, alias: str, metric: str,
                     min_delta: float, against: str) -> dict[str, Any]:
    """The gate against the pinned model ``against`` (module docstring): the candidate's latest
    evaluation of ``metric`` against the reference's latest on the same yardstick."""
    from pipelines.registry.models import describe

    if not against.startswith("models:/"):
        raise UsageError(f"--against must be a registered model (models:/NAME/VERSION or models:/NAME@ALIAS), "
                         f"got {against!r}")
    ref = describe(against)
    if ref["version"] is None:
        raise UsageError(f"--against {against!r} is not a registered model version")
    ref_uri = f"models:/{ref['name']}/{ref['version']}"
    version, candidate = _candidate(c, name, version)
    if (ref["name"], ref["version"]) == (name, version):
        raise UsageError(f"--against {against!r} is the candidate itself")
    ref_tags = c.get_model_version(ref["name"], ref["version"]).tags
    holder = _holder(c, name, alias)
    base = metric.split("/", 1)[0]  # the metric's name, without a full key's settings
    cand_evals, ref_evals = _evaluations(candidate.tags, metric), _evaluations(ref_tags, base)
    decision: dict[str, Any] = {"alias": alias, "candidate_version": version, "holder_version": holder,
                                "against": ref_uri, "metric": metric, "min_delta": min_delta}
    label = metric if "/" in metric else f"{metric!r}"
    if not cand_evals:
        _refuse_unevaluated(c, name, version, decision, label)
    last = candidate.tags.get(LAST_TAG + base)
    key = metric if "/" in metric else (last if last in cand_evals else sorted(cand_evals)[0])
    same = {k: v for k, v in ref_evals.items() if yardstick(k) == yardstick(key)}
    if not same:
        decision.update(decision="refused", why="no comparable evaluation", key=key)
        _record(c, name, version, decision)
        raise RefusedError(
            f"refused: {ref_uri} has no evaluation of {label} on the yardstick of {key} (the same data, "
            f"features and sample count); evaluate it with the same --num, e.g. `ddpm-pipe evaluate "
            f"--model {ref_uri} --num {parse_result_key(key)[1].get('num', '...')}`")
    ref_last = ref_tags.get(LAST_TAG + base)
    ref_key = ref_last if ref_last in same else sorted(same)[0]
    cand, hold = cand_evals[key], same[ref_key]
    decision.update(key=key, against_key=ref_key, candidate_value=cand, holder_value=hold)
    if holder == version:
        decision["decision"] = "unchanged"
        _record(c, name, version, decision)
        return _result(name, decision, f"{name} version {version} already holds @{alias}; nothing to do")
    how = (f"{metric} {cand:.6g} ({_sampling(key)}) against {hold:.6g} of {ref_uri} ({_sampling(ref_key)}); "
           f"{direction(key)} is better, min delta {min_delta:g}")
    if not better(key, cand, hold, min_delta):
        decision.update(decision="refused", why="not better")
        _record(c, name, version, decision)
        raise RefusedError(f"refused: version {version} has {how}")
    decision["decision"] = "promoted"
    _move(c, name, alias, version, holder, decision)
    return _result(name, decision, f"@{alias} of {name} -> version {version}: {how}")


def _sampling(key: str) -> str:
    """The sampling settings of a result key, in words (``ddim 4 steps, trailing``)."""
    deps = parse_result_key(key)[1]
    eta = f", eta {deps['eta']}" if deps.get("eta") not in (None, "0", "0.0") else ""
    grid = f", {deps['spacing']}" if "spacing" in deps else ""
    return f"{deps.get('sampler', '?')} {deps.get('steps', '?')} steps{eta}{grid}"


def _refuse_unevaluated(c: MlflowClient, name: str, version: str, decision: dict[str, Any], label: str) -> None:
    """Record and raise the refusal of a candidate with no evaluation of the metric."""
    decision.update(decision="refused", why="candidate not evaluated")
    _record(c, name, version, decision)
    raise RefusedError(f"refused: {name} version {version} has no evaluation of {label}; "
                       f"run `ddpm-pipe evaluate --model models:/{name}/{version}` first")


def _candidate(c: MlflowClient, name: str, version: str | None) -> tuple[str, Any]:
    """The candidate's version (default: the latest) and its model version; exit 2 when missing."""
    version = str(version) if version is not None else _latest(c, name)
    try:
        return version, c.get_model_version(name, version)
    except Exception as e:
        raise UsageError(f"{name} version {version} not found: {str(e).splitlines()[0]}") from None


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
    stamp = datetime.now(timezone.utc).strftime(STAMP)
    decision["time"] = stamp
    prefix = f"ddpm.promote.{decision['alias']}."
    for field in ("decision", "key", "candidate_value", "holder_version", "holder_value", "against",
                  "against_key", "min_delta", "reason", "why", "time"):
        if decision.get(field) is not None:
            c.set_model_version_tag(name, version, prefix + field, str(decision[field]))
    c.set_model_version_tag(name, version, f"{prefix}history.{stamp}", json.dumps(decision, default=str))


def _move(c: MlflowClient, name: str, alias: str, version: str, holder: str | None, decision: dict[str, Any]) -> None:
    """Move ``alias`` from ``holder`` (what the gate compared against) to ``version``, as a compare-and-set.

    1. Record the decision first, as ``pending``: a job killed from here on leaves it on the version.
    2. Re-read the alias: moved since the gate read it -> refused (the candidate was not compared
       against the new holder).
    3. Set it, then look for a rival: another version whose decision for this alias is ``pending``
       from the same holder, recorded within :data:`RACE_WINDOW` of ours. Two jobs that both pass
       step 2 each see the other so (each recorded before its step 2, which came before either
       set the alias). Re-read the alias. A rival, or an alias that is no longer ours, means the
       promotions raced: the alias goes back to ``holder`` if it is still ours, and this one is
       refused (exit 3); a re-run compares against whatever holds it then.
    4. Record the final decision.
    """
    pending = {**decision, "decision": "pending"}
    _record(c, name, version, pending)
    since = _holder(c, name, alias)
    if since != holder:
        _lost(c, name, version, decision, f"@{alias} moved to version {since or 'unset'} while this promotion "
              f"was deciding against version {holder or 'unset'}")
    try:
        c.set_registered_model_alias(name, alias, version)
    except Exception as e:
        decision.update(decision="refused", why=f"alias not set: {str(e).splitlines()[0]}")
        _record(c, name, version, decision)
        raise UsageError(f"cannot set alias {alias!r}: {str(e).splitlines()[0]}") from None
    rivals = _rivals(c, name, alias, version, holder, pending["time"])
    after = _holder(c, name, alias)
    if rivals or after != version:
        if after == version:  # ours, but not settled: put back what the gate compared against
            if holder is None:
                c.delete_registered_model_alias(name, alias)
            else:
                c.set_registered_model_alias(name, alias, holder)
        who = f"version(s) {', '.join(rivals)} being promoted from the same holder" if rivals else \
            f"version {after or 'unset'} set it meanwhile"
        _lost(c, name, version, decision, f"another promotion of @{alias} raced this one ({who}); "
              f"@{alias} is at version {_holder(c, name, alias) or 'unset'}")
    decision.pop("time", None)
    _record(c, name, version, decision)
    if holder is not None:
        c.set_model_version_tag(name, holder, f"ddpm.promote.{alias}.replaced_by", version)


def _holder(c: MlflowClient, name: str, alias: str) -> str | None:
    """The version ``alias`` of ``name`` points to now (read from the server), or None."""
    found = c.get_registered_model(name).aliases.get(alias)
    return str(found) if found is not None else None


def _rivals(c: MlflowClient, name: str, alias: str, version: str, holder: str | None, stamp: str) -> list[str]:
    """Other versions whose latest decision for ``alias`` is a pending promotion from ``holder``,
    recorded within :data:`RACE_WINDOW` of ``stamp`` (older: a job killed mid-way, not a rival)."""
    prefix, ours = f"ddpm.promote.{alias}.", datetime.strptime(stamp, STAMP)
    found = []
    for mv in c.search_model_versions(f"name = {tracking.quote(name)}"):
        tags = mv.tags or {}
        if str(mv.version) == version or tags.get(prefix + "decision") != "pending":
            continue
        try:
            when = datetime.strptime(tags.get(prefix + "time", ""), STAMP)
        except ValueError:
            continue
        if tags.get(prefix + "holder_version") == holder and abs(when - ours) <= RACE_WINDOW:
            found.append(str(mv.version))
    return sorted(found, key=int)


def _lost(c: MlflowClient, name: str, version: str, decision: dict[str, Any], why: str) -> None:
    """Record that this promotion lost a race and raise :class:`RefusedError` (exit 3)."""
    decision.pop("time", None)
    decision.update(decision="refused", why="raced another promotion")
    _record(c, name, version, decision)
    raise RefusedError(f"refused: {why}. Nothing was promoted by this job; run promote again to compare "
                       f"version {version} against the current holder")


def _result(name: str, decision: dict[str, Any], message: str) -> dict[str, Any]:
    return {"message": message, "name": name, **decision}
