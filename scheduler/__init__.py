"""The job contract every process shares, and routing.

The contract: `jobs` (the one Job model), `record` (every change of a job's Redis record, and the
state machine), `keys` (every Redis key and queue name), `stream` (a job's token stream and the
feed), `backlog` (admission counts), `queue` (the Celery app and the API's Enqueuer), `registry`
(worker heartbeats), `notify` and `webhooks` (webhook events, endpoints and delivery records).
Routing: `routing` (which queue a job goes to) and `modality` (text, code or mixed). Imports only
`host` of LocalMoE's packages (tests/test_layers.py).
"""
