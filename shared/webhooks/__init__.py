"""Webhooks: signed, durable, SSRF-guarded notifications of job events.

- `outbox`: record an event in the job's transaction (`enqueue_job_event`), nudge the queue after commit
  (`publish_deliveries`), list and redeliver.
- `delivery`: one HTTP attempt (`attempt_delivery`) and the scan for due retries (`dispatch_due`).
- `signing`: Standard Webhooks headers and the per-API-key secret.
- `ssrf`: `check_webhook_url`, run at submit and before every attempt.
The sender runs in its own light Celery app, `worker.webhook_sender.app`, on the `webhooks` queue.
"""
