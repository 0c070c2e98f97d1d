"""Metrics (Prometheus), traces (OpenTelemetry, off by default) and event logs; see docs/operations.md.

The domain knows none of them: a write records `tx.count`, `tx.observe` and `tx.log` effects
(domain/tx.py), carried out after commit by effects.LocalEffects; the gRPC layer is observed by
an interceptor (interceptor.py); named writes by the Writer's `around` hook (domain/runner.py).
"""
