"""OpenAI-compatible endpoints: /v1/models, /v1/completions and /v1/chat/completions.

Every request becomes an ordinary job through `api.jobs.accept` (validation, admission, routing,
the Celery queue), so priority, backpressure and cancel work as for /v1/jobs. The answer is read
from the job's Redis stream: waited for whole, or relayed as OpenAI's server-sent chunks. A client
that goes away before the end cancels its job.

Behaviour follows vLLM's OpenAI server. Differences from OpenAI, each refused with a 400 rather
than silently ignored: one choice only (n=1), one prompt per request, no logprobs / echo / suffix
/ best_of / logit_bias / penalties / tools, and text-only message content. Extensions: `top_k`,
`priority`, `modality` and `ignore_eos`. Errors are `{"error": {message, type, param, code}}`;
bad input is a 400 (as with OpenAI), a 429 keeps its Retry-After.

The package is split as vLLM splits its OpenAI entrypoint: `protocol` (request and response
models), `errors` (OpenAI's error shape), `chat_template` (messages → prompt), `streaming` (a
job's answer, whole or as chunks) and `serving` (the routes).
"""
