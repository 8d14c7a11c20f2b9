"""The promotion gate, the registry moves (promote, rollback) and the A/B plan.

A new version always gets the ``challenger`` alias (``register``). It becomes ``champion`` only
when :func:`decide` says so from its evaluation: against an existing champion, the lower bound
of the paired-bootstrap interval of ΔR@K must clear ``min_delta_ci_low`` and no slice or probe
may lose more than ``max_regression``; with no champion yet, R@K must reach ``absolute_bar``.
An evaluation that is not complete never promotes. The champion it replaces keeps the alias
``previous_champion`` (and the new version a ``previous_champion`` tag), which is what
:func:`rollback` restores.
"""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import dataclass, field
from statistics import NormalDist

from components.common.config import RegisterConfig

log = logging.getLogger(__name__)
CHAMPION, PREVIOUS = "champion", "previous_champion"


@dataclass
class Decision:
    promote: bool
    metric: str
    reasons: list[str] = field(default_factory=list)
    champion_version: str = ""

    @property
    def verdict(self) -> str:
        return "promote" if self.promote else "hold"

    def markdown(self, rule: str) -> str:
        return "\n".join([f"# Promotion decision: **{self.verdict}**", "", f"Rule: {rule}", "",
                          *[f"- {r}" for r in self.reasons], ""])


def rule_text(cfg: RegisterConfig) -> str:
    return (f"at least {cfg.min_eval_queries} evaluated test queries; "
            f"against a champion: lower bound of the paired-bootstrap interval of "
            f"Δ{cfg.promote_metric} > {cfg.min_delta_ci_low} and no slice or probe "
            f"Δ{cfg.promote_metric} below "
            f"−{cfg.max_regression}; without one: {cfg.promote_metric} ≥ {cfg.absolute_bar}")


def _metric(metrics: dict, wanted: str) -> tuple[str, list[str]]:
    """The R@K the rule reads: the configured one, else the largest K evaluated (a small pool
    has no R@100)."""
    if wanted in metrics:
        return wanted, []
    present = sorted((int(k[2:]) for k in metrics if k.startswith("R@")), reverse=True)
    if not present:
        return wanted, []
    return f"R@{present[0]}", [f"{wanted} was not evaluated (candidate pool of "
                               f"{metrics.get('pool_size')} notes); the rule reads R@{present[0]}"]


def decide(metrics: dict, cfg: RegisterConfig) -> Decision:
    """Promote or hold, with every reason spelled out."""
    status = metrics.get("status")
    if status != "complete":
        return Decision(False, cfg.promote_metric,
                        [f"evaluation status is {status!r}, not 'complete': never promoted"])
    queries = int(metrics.get("n_queries", 0) or 0)
    if queries < cfg.min_eval_queries:
        return Decision(False, cfg.promote_metric,
                        [f"{queries} test queries evaluated, below register.min_eval_queries = "
                         f"{cfg.min_eval_queries}: too little evidence to promote"])
    metric, notes = _metric(metrics, cfg.promote_metric)
    if metric not in metrics:
        return Decision(False, metric, [*notes, "no R@K in the evaluation: nothing to decide on"])
    value = metrics[metric]
    champion = str(metrics.get("champion_version", "") or "")
    if not champion:
        ok = value >= cfg.absolute_bar
        return Decision(ok, metric, [*notes, f"no champion yet; {metric} = {value:.4f} "
                                     f"{'≥' if ok else '<'} the bar {cfg.absolute_bar}"])
    reasons = list(notes)
    low = metrics.get(f"delta/{metric}/ci_low")
    if low is None:
        return Decision(False, metric, [*reasons, f"no Δ{metric} interval against champion "
                                        f"version {champion}: not promoted"], champion)
    delta = metrics[f"delta/{metric}"]
    better = low > cfg.min_delta_ci_low
    reasons.append(f"Δ{metric} vs champion version {champion} = {delta:+.4f}, interval "
                   f"[{low:+.4f}, {metrics[f'delta/{metric}/ci_high']:+.4f}]: lower bound "
                   f"{'>' if better else '≤'} {cfg.min_delta_ci_low}")
    regressions = [(key[len("delta/"):-len(metric) - 1], v) for key, v in metrics.items()
                   if key.startswith(("delta/slice/", "delta/probe/")) and key.endswith(
                       f"/{metric}") and v < -cfg.max_regression]
    for name, v in regressions:
        reasons.append(f"{name} regresses: Δ{metric} = {v:+.4f} < −{cfg.max_regression}")
    if not regressions:
        reasons.append(f"no slice or probe loses more than {cfg.max_regression} {metric}")
    return Decision(better and not regressions, metric, reasons, champion)


def _version_of(client, name: str, alias: str) -> str | None:
    from mlflow.exceptions import MlflowException

    try:
        return str(client.get_model_version_by_alias(name, alias).version)
    except MlflowException:
        return None


def promote(client, name: str, version: str, reason: str = "gate") -> dict:
    """Make ``version`` the champion; the one it replaces becomes ``previous_champion``."""
    current = _version_of(client, name, CHAMPION)
    if current == str(version):
        log.info("%s version %s is already the champion", name, version)
        return {"champion": current, "previous_champion": _version_of(client, name, PREVIOUS)}
    client.set_registered_model_alias(name, CHAMPION, str(version))
    client.set_model_version_tag(name, str(version), "promoted_at",
                                 time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
    client.set_model_version_tag(name, str(version), "promoted_by", reason)
    if current:
        client.set_registered_model_alias(name, PREVIOUS, current)
        client.set_model_version_tag(name, str(version), PREVIOUS, current)
    log.info("%s version %s is the champion (previous: %s)", name, version, current or "none")
    return {"champion": str(version), "previous_champion": current}


def rollback(client, name: str) -> dict:
    """Give ``champion`` back to the ``previous_champion``; the demoted version is tagged."""
    previous = _version_of(client, name, PREVIOUS)
    current = _version_of(client, name, CHAMPION)
    if previous is None:
        raise LookupError(f"{name} has no '{PREVIOUS}' alias: nothing to roll back to")
    client.set_registered_model_alias(name, CHAMPION, previous)
    if current:
        client.set_model_version_tag(name, current, "rolled_back",
                                     time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
    before = client.get_model_version(name, previous).tags.get(PREVIOUS)
    if before and before != previous:
        client.set_registered_model_alias(name, PREVIOUS, before)
    else:
        client.delete_registered_model_alias(name, PREVIOUS)
    log.info("%s: champion rolled back from version %s to %s", name, current, previous)
    return {"champion": previous, "demoted": current, "previous_champion": before}


def sample_size(p_control: float, p_treatment: float, alpha: float, power: float) -> int | None:
    """Queries per arm for a two-sided two-proportion z-test (pooled variance under H0):
    n = (z₁₋α/₂·√(2·p̄(1−p̄)) + z₁₋β·√(p₁(1−p₁) + p₂(1−p₂)))² / (p₁ − p₂)². None when the
    proportions are equal (no detectable effect)."""
    if p_control == p_treatment:
        return None
    z = NormalDist()
    za, zb = z.inv_cdf(1 - alpha / 2), z.inv_cdf(power)
    p_bar = (p_control + p_treatment) / 2
    num = (za * math.sqrt(2 * p_bar * (1 - p_bar))
           + zb * math.sqrt(p_control * (1 - p_control) + p_treatment * (1 - p_treatment))) ** 2
    return math.ceil(num / (p_treatment - p_control) ** 2)


def ab_plan(metrics: dict, decision: Decision, cfg: RegisterConfig, challenger: dict,
            champion: dict | None) -> dict:
    """Both arms, traffic split, metrics and the queries per arm needed to see the offline
    effect online (the offline R@K difference taken as the effect size)."""
    metric = decision.metric
    plan = {"model_name": cfg.model_name, "decision": decision.verdict,
            "arms": {"challenger": challenger}, "primary_metric": cfg.ab_primary_metric,
            "guardrail_metrics": list(cfg.ab_guardrail_metrics), "offline_metric": metric,
            "alpha": cfg.ab_alpha, "power": cfg.ab_power,
            "sample_size_formula": sample_size.__doc__.split("\n")[1].strip()}
    if champion is None:
        plan |= {"traffic": {"challenger": 1.0},
                 "note": "no champion yet: the challenger serves alone once promoted"}
        return plan
    p1, p2 = metrics.get(f"champion/{metric}"), metrics.get(metric)
    n = sample_size(p1, p2, cfg.ab_alpha, cfg.ab_power) if None not in (p1, p2) else None
    share = cfg.ab_traffic_challenger
    plan |= {"arms": {"champion": champion, "challenger": challenger},
             "traffic": {"champion": round(1 - share, 4), "challenger": share},
             "offline_effect": {"champion": p1, "challenger": p2,
                                "difference": None if n is None else p2 - p1},
             "queries_per_arm": n,
             "total_queries": None if n is None else math.ceil(n / min(share, 1 - share))}
    return plan


def ab_markdown(plan: dict) -> str:
    lines = [f"# A/B plan for {plan['model_name']} (gate: {plan['decision']})", "",
             "| arm | version | model | index | dim | index parameters | traffic |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for arm, a in plan["arms"].items():
        lines.append(f"| {arm} | {a.get('version')} | `{a.get('model_uri')}` | "
                     f"`{a.get('index_uri')}` | {a.get('dim')} | "
                     f"{json.dumps(a.get('index_params', {}))} | {plan['traffic'].get(arm, 0)} |")
    lines += ["", f"Primary metric: {plan['primary_metric']}; guardrails: "
              f"{', '.join(plan['guardrail_metrics'])}.", ""]
    if plan.get("queries_per_arm"):
        eff = plan["offline_effect"]
        lines += [f"Offline {plan['offline_metric']}: champion {eff['champion']:.4f}, challenger "
                  f"{eff['challenger']:.4f}. To detect that difference at α = {plan['alpha']} "
                  f"(two-sided) with power {plan['power']}: **{plan['queries_per_arm']:,} queries "
                  f"per arm**, {plan['total_queries']:,} in all at this split.", "",
                  f"Formula: {plan['sample_size_formula']}", ""]
    elif "note" in plan:
        lines += [plan["note"], ""]
    else:
        lines += ["The offline metric does not differ: no sample size detects a zero effect.", ""]
    return "\n".join(lines)


def decision_tags(decision: Decision, cfg: RegisterConfig) -> dict[str, str]:
    return {"decision": decision.verdict, "decision_reasons": " | ".join(decision.reasons)[:5000],
            "promotion_rule": rule_text(cfg), "decision_metric": decision.metric,
            "compared_with_champion": decision.champion_version or "none"}



def version_metrics(client, name: str, version: str) -> dict:
    """The evaluation a version was registered with (``evaluation/metrics.json`` of its run)."""
    import mlflow

    mv = client.get_model_version(name, version)
    path = mlflow.artifacts.download_artifacts(run_id=mv.run_id,
                                               artifact_path="evaluation/metrics.json",
                                               tracking_uri=client._tracking_client.tracking_uri)
    with open(path) as f:
        return json.load(f)


def manual_promote(client, name: str, version: str, cfg: RegisterConfig, *, force: bool = False
                   ) -> tuple[dict, list[str]]:
    """``notellm2 promote``: the gate's checks on the version's own evaluation, and that it was
    compared with today's champion; ``force`` overrides both (and says so in the tags)."""
    metrics = version_metrics(client, name, version)
    decision = decide(metrics, cfg)
    problems = [] if decision.promote else decision.reasons
    current = _version_of(client, name, CHAMPION)
    if current and current != str(version) and decision.champion_version != current:
        problems.append(f"version {version} was evaluated against champion "
                        f"{decision.champion_version or 'none'}, but the champion is now "
                        f"{current}: evaluate it again (notellm2 compare) or use --force")
    if problems and not force:
        raise PermissionError("not promoted:\n  " + "\n  ".join(problems))
    moved = promote(client, name, version, reason="manual --force" if problems else "manual")
    return moved, problems
