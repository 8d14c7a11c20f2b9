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

from components.common.config import EvalConfig, RegisterConfig

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


LOCK_TAG = "notellm2.promotion_lock"


class RegistryLock:
    """A lease on the registry's aliases of one model, held as a registered-model tag
    (``<token> <expiry>``) so that promote, the pipeline's promotion and rollback never move
    aliases at the same time. MLflow has no compare-and-set; the lease is taken by writing the
    tag, waiting ``settle`` seconds and reading it back: of two contenders that both saw it free,
    only the later writer reads its own token. That holds as long as one registry write takes
    less than ``settle``. A lease not released (a killed task) lapses after ``ttl`` seconds."""

    def __init__(self, client, name: str, *, ttl: float = 120.0, settle: float = 0.5,
                 wait: float = 300.0):
        import uuid

        self.client, self.name, self.ttl, self.settle, self.wait = client, name, ttl, settle, wait
        self.token = uuid.uuid4().hex

    def _holder(self) -> tuple[str, float]:
        value = self.client.get_registered_model(self.name).tags.get(LOCK_TAG, "")
        token, _, expiry = value.partition(" ")
        try:
            return token, float(expiry)
        except ValueError:
            return "", 0.0

    def __enter__(self):
        deadline = time.time() + self.wait
        while True:
            token, expiry = self._holder()
            if not token or token == self.token or expiry < time.time():
                self.client.set_registered_model_tag(self.name, LOCK_TAG,
                                                     f"{self.token} {time.time() + self.ttl}")
                time.sleep(self.settle)
                if self._holder()[0] == self.token:
                    return self
            if time.time() > deadline:
                raise TimeoutError(f"{self.name}: the registry lease ({LOCK_TAG}) is held by "
                                   f"{token} for {max(0.0, expiry - time.time()):.0f} s more; "
                                   "another promotion is running")
            time.sleep(self.settle * (1 + (hash(self.token) % 100) / 100))

    def __exit__(self, *exc):
        if self._holder()[0] == self.token:
            self.client.delete_registered_model_tag(self.name, LOCK_TAG)


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def _move(client, name: str, version: str, current: str | None, reason: str) -> dict:
    """Champion to ``version``; ``current`` becomes previous_champion. Tags first, then
    previous_champion, then champion, so a retry after any of the writes finishes the move:
    a version that already is the champion gets previous_champion from its own tag."""
    version = str(version)
    if current == version:
        before = client.get_model_version(name, version).tags.get(PREVIOUS)
        if before and _version_of(client, name, PREVIOUS) != before:
            client.set_registered_model_alias(name, PREVIOUS, before)  # a retried move
        log.info("%s version %s is already the champion", name, version)
        return {"champion": version, "previous_champion": _version_of(client, name, PREVIOUS)}
    client.set_model_version_tag(name, version, "promoted_at", _now())
    client.set_model_version_tag(name, version, "promoted_by", reason)
    if current:
        client.set_model_version_tag(name, version, PREVIOUS, current)
        client.set_registered_model_alias(name, PREVIOUS, current)
    client.set_registered_model_alias(name, CHAMPION, version)
    log.info("%s version %s is the champion (previous: %s)", name, version, current or "none")
    return {"champion": version, "previous_champion": current}


def promote(client, name: str, version: str, reason: str = "gate") -> dict:
    """Make ``version`` the champion, unconditionally (under the registry lease); the one it
    replaces becomes ``previous_champion``."""
    with RegistryLock(client, name):
        return _move(client, name, str(version), _version_of(client, name, CHAMPION), reason)


def promote_checked(client, name: str, version: str, compared_with: str, cfg: RegisterConfig,
                    eval_cfg: EvalConfig | None = None, reason: str = "pipeline gate") -> dict:
    """The pipeline's promotion: a compare-and-set on ``champion``. Under the registry lease the
    champion is read again; when it is still ``compared_with`` (the version the gate's decision
    compared against, "" for none) the aliases move. When another run moved it meanwhile, the
    version is decided again against the new champion from both evaluations' per-query ranks
    (:func:`redecide`, the same rule on the same queries) and moves only if that passes;
    otherwise it is held and the reason is written to its ``promotion_refused`` tag. Returns
    {"champion", "previous_champion", "promoted", "reasons"}."""
    version = str(version)
    with RegistryLock(client, name):
        current = _version_of(client, name, CHAMPION)
        if current == version:
            return _move(client, name, version, current, reason) | {"promoted": True,
                                                                    "reasons": []}
        reasons = []
        if (current or "") != (compared_with or ""):
            decision = redecide(client, name, version, current, cfg, eval_cfg)
            reasons = [f"the champion moved from {compared_with or 'none'} to {current} after "
                       f"the decision; decided again against {current}:", *decision.reasons]
            client.set_model_version_tag(name, version, "redecided_against", str(current))
            client.set_model_version_tag(name, version, "redecision_reasons",
                                         " | ".join(reasons)[:5000])
            if not decision.promote:
                client.set_model_version_tag(name, version, "decision", "hold")
                client.set_model_version_tag(name, version, "promotion_refused",
                                             " | ".join(reasons)[:5000])
                log.warning("%s version %s not promoted: %s", name, version, " ".join(reasons))
                return {"champion": current, "previous_champion":
                        _version_of(client, name, PREVIOUS), "promoted": False,
                        "reasons": reasons}
        return _move(client, name, version, current, reason) | {"promoted": True,
                                                                "reasons": reasons}


def version_file(client, name: str, version: str, artifact: str) -> str:
    """A local copy of an artifact of the run a version was registered from."""
    import mlflow

    mv = client.get_model_version(name, version)
    return mlflow.artifacts.download_artifacts(
        run_id=mv.run_id, artifact_path=artifact,
        tracking_uri=client._tracking_client.tracking_uri)


def redecide(client, name: str, version: str, champion: str | None, cfg: RegisterConfig,
             eval_cfg: EvalConfig | None = None) -> Decision:
    """The gate's decision for ``version`` against ``champion`` without embedding again: both
    evaluations' per-query ranks (``evaluation/query_ranks.parquet``) on the identical queries,
    the paired bootstrap of :func:`compare_ranks`, then :func:`decide`. Not comparable (no
    ranks, other queries or pool): a hold that says so."""
    from mlflow.exceptions import MlflowException

    from components.evaluate.compare import compare_ranks
    from components.evaluate.run import QUERY_RANKS, read_query_ranks

    mine = version_metrics(client, name, version)
    base = {k: v for k, v in mine.items()
            if not k.startswith(("delta/", "champion/")) and k != "champion_version"}
    if not champion:
        return decide(base, cfg)
    try:
        ranks = [read_query_ranks(version_file(client, name, v, f"evaluation/{QUERY_RANKS}"))
                 for v in (version, champion)]
        theirs = version_metrics(client, name, champion)
    except (MlflowException, OSError, ValueError) as e:  # pyarrow's ArrowInvalid is one
        return Decision(False, cfg.promote_metric, [
            f"no per-query ranks to compare version {version} with {champion} ({e}); "
            "evaluate again against the new champion (notellm2 compare)"], str(champion))
    same = (mine.get("pool_size") == theirs.get("pool_size") and set(ranks[0]) == set(ranks[1])
            and all(ranks[0][k][["query_id", "target_id"]].equals(
                ranks[1][k][["query_id", "target_id"]]) for k in ranks[0]))
    if not same:
        return Decision(False, cfg.promote_metric, [
            f"versions {version} and {champion} were evaluated on different queries or pools: "
            "not comparable; evaluate again against the new champion (notellm2 compare)"],
            str(champion))
    ks = sorted(int(k[2:]) for k in mine if k.startswith("R@"))
    a, b = ({k: v["rank"].to_numpy() for k, v in r.items()} for r in ranks)
    ev = eval_cfg or EvalConfig()
    delta = compare_ranks(a, b, ks, int(mine.get("pool_size", 0)),
                          resamples=ev.bootstrap_resamples, seed=ev.bootstrap_seed,
                          level=ev.ci_level)
    return decide(base | delta | {"champion_version": str(champion)}, cfg)


def rollback(client, name: str) -> dict:
    """Give ``champion`` back to the ``previous_champion``; the demoted version is tagged."""
    with RegistryLock(client, name):
        return _rollback(client, name)


def _rollback(client, name: str) -> dict:
    previous = _version_of(client, name, PREVIOUS)
    current = _version_of(client, name, CHAMPION)
    if previous is None:
        raise LookupError(f"{name} has no '{PREVIOUS}' alias: nothing to roll back to")
    if previous == current:  # a retried rollback that moved champion already
        current = None
    client.set_registered_model_alias(name, CHAMPION, previous)
    if current:
        client.set_model_version_tag(name, current, "rolled_back", _now())
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
    with open(version_file(client, name, version, "evaluation/metrics.json")) as f:
        return json.load(f)


def manual_promote(client, name: str, version: str, cfg: RegisterConfig, *, force: bool = False
                   ) -> tuple[dict, list[str]]:
    """``notellm2 promote``: the gate's checks on the version's own evaluation, and that it was
    compared with today's champion; ``force`` overrides both (and says so in the tags)."""
    metrics = version_metrics(client, name, version)
    decision = decide(metrics, cfg)
    problems = [] if decision.promote else decision.reasons
    with RegistryLock(client, name):
        current = _version_of(client, name, CHAMPION)
        if current and current != str(version) and decision.champion_version != current:
            problems.append(f"version {version} was evaluated against champion "
                            f"{decision.champion_version or 'none'}, but the champion is now "
                            f"{current}: evaluate it again (notellm2 compare) or use --force")
        if problems and not force:
            raise PermissionError("not promoted:\n  " + "\n  ".join(problems))
        moved = _move(client, name, str(version), current,
                      "manual --force" if problems else "manual")
    return moved, problems
