"""PromQL templates over the model servers' metrics, used by the demo, the tests and the benchmarks.

They use the operator's placeholders; Prometheus labels each model server's series with the
``service`` it stands for.
"""

from __future__ import annotations

ERROR_RATE = (
    'sum(rate(model_requests_total{service="{{ service }}",code="500"}[{{ window }}])) / '
    'sum(rate(model_requests_total{service="{{ service }}"}[{{ window }}]))'
)
P95_LATENCY = (
    "histogram_quantile(0.95, sum by (le) (rate(model_request_duration_seconds_bucket"
    '{service="{{ service }}"}[{{ window }}])))'
)
DRIFT = 'max(model_drift_score{service="{{ service }}"})'
POSITIVE = 'sum(increase(model_feedback_total{service="{{ service }}",feedback="positive"}[{{ window }}]))'
FEEDBACK = 'sum(increase(model_feedback_total{service="{{ service }}"}[{{ window }}]))'
REQUESTS = 'sum(increase(model_requests_total{service="{{ service }}"}[{{ window }}]))'
