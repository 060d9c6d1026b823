"""``make demo``, third rollout: better on average, harmed in one region, rolled back naming it.

The team fixes v3's errors (modelVersion 3.1.0): its positive-feedback rate is 0.80 in three of the
four regions the model servers label (``region``: north, south, east, west) and 2x the margin below
stable's 0.62 in the west (0.32), so the candidate is better overall (0.68 vs 0.62 pooled). The
comparison names the segment label ("no cohort left behind"): every region gets its own always-valid
verdict (Holm across regions), and one region shown worse than the margin rolls the candidate back
even though the pooled comparison would pass.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from tests.harness.stack import Stack

if TYPE_CHECKING:
    from tests.harness.demo import Narrator

REGIONS = ("north", "south", "east", "west")
HARMED = "west"
MARGIN = 0.15
STABLE_RATE = 0.62
CANDIDATE_RATES = {"north": 0.80, "south": 0.80, "east": 0.80, HARMED: STABLE_RATE - 2 * MARGIN}
SEG_POSITIVE = (
    'sum(increase(model_segment_feedback_total{service="{{ service }}",region="{{ segment }}",'
    'feedback="positive"}[{{ window }}]))'
)
SEG_FEEDBACK = (
    'sum(increase(model_segment_feedback_total{service="{{ service }}",'
    'region="{{ segment }}"}[{{ window }}]))'
)


def rollout_doc(prom: str, stable: str, candidate: str) -> dict[str, Any]:
    """The same ModelRollout object (the route's owner), a new revision: candidate v3 at 3.1.0."""
    comparison = {
        "name": "positive-feedback",
        "successes": SEG_POSITIVE,
        "trials": SEG_FEEDBACK,
        "test": "nonInferiority",
        "margin": MARGIN,
        "segments": {"label": "region", "values": list(REGIONS), "minSamples": 100},
    }
    return {
        "apiVersion": "mlrollouts.io/v1alpha1",
        "kind": "ModelRollout",
        "metadata": {"name": "fraud-scorer", "namespace": "ml"},
        "spec": {
            "stable": {"service": stable},
            "candidate": {"service": candidate, "modelVersion": "3.1.0"},
            "trafficRouting": {"gatewayAPI": {"httpRoute": "fraud-scorer"}},
            "steps": [{"setWeight": 50}, {"analysis": {"duration": "10s"}}, {"setWeight": 100}],
            "analysis": {
                "interval": "5s",
                "window": "15s",
                "prometheus": {"address": prom, "timeout": "2s"},
                # No error-rate guardrail here: v3's errors from rollout 2 are still inside the window
                # when this rollout starts, and this story is about the per-region comparison alone.
                "comparisons": [comparison],
            },
        },
    }


def segment_rows(obj: dict[str, Any]) -> list[dict[str, Any]]:
    """The per-region rows of the segmented comparison in ``status.lastAnalysis``."""
    for m in (obj.get("status") or {}).get("lastAnalysis") or []:
        if m.get("name") == "positive-feedback" and m.get("segments"):
            return list(m["segments"])
    return []


def _num(x: Any, fmt: str) -> str:
    return "-" if not isinstance(x, int | float) else format(x, fmt)


def story(stack: Stack, n: Narrator, stable: str, candidate: str) -> bool:
    """Run the third rollout; print its per-region verdict table and rollback reason. True when it is
    rolled back naming the harmed region."""
    assert stack.prom is not None
    stack.servers[candidate].set(error_rate=0.0, positive_rate=0.74, segment_positive_rate=CANDIDATE_RATES)
    n.say(
        "the team fixes v3 (3.1.0): positive feedback 0.80 in north, south and east but "
        f"{CANDIDATE_RATES[HARMED]:.2f} in the {HARMED} (stable {STABLE_RATE}): better on average, "
        f"worse by 2x the margin ({MARGIN}) in one region; the comparison judges every region"
    )
    stack.apply(rollout_doc(stack.prom.url, stable, candidate))
    generation = stack.get("modelrollouts", "fraud-scorer")["metadata"]["generation"]
    obj = n.watch(("RolledBack", "Promoted", "Aborted"), 180, generation)
    st = obj["status"]
    n.say(f"==> rollout 3 ended {st['phase']}")
    print("\n================ rollout 3: no cohort left behind ================")
    print(f"{'region':<8}{'n cand/stable':>15}{'difference':>12}{'CI':>22}{'Holm p':>9}  verdict")
    for r in segment_rows(obj):
        ci = f"[{_num(r.get('ciLow'), '+.3f')}, {_num(r.get('ciHigh'), '+.3f')}]"
        n_ = f"{_num(r.get('candidateN'), '.0f')}/{_num(r.get('stableN'), '.0f')}"
        print(
            f"{r.get('segment', '?'):<8}{n_:>15}{_num(r.get('difference'), '+.3f'):>12}"
            f"{ci:>22}{_num(r.get('pValue'), '.3g'):>9}  {r.get('status')}"
        )
    print(f"phase: {st['phase']}; rollback reason: {st.get('message')}")
    print(f"HTTPRoute weights: {stack.wait_route({stable: 100, candidate: 0})}\n")
    return st["phase"] == "RolledBack" and HARMED in (st.get("message") or "")
