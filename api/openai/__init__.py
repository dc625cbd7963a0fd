"""OpenAI-compatible endpoints: /v1/models, /v1/completions, /v1/chat/completions, /v1/files and
/v1/batches.

Every request becomes an ordinary job through `api.jobs.accept` (validation, admission, routing,
the Celery queue), so priority, backpressure and cancel work as for /v1/jobs. The answer is read
from the job's Redis stream: waited for whole, or relayed as OpenAI's server-sent chunks. A client
that goes away before the end cancels its job.

Behaviour follows vLLM's OpenAI server: n choices (one job, its n sequences generated together),
logprobs, echo, penalties, logit_bias, seed, structured outputs (response_format,
structured_outputs, guided_*), tools and tool calls, a reasoning model's reasoning, and vLLM's
extensions (top_k, min_p, min_tokens, stop_token_ids, ignore_eos, skip_special_tokens,
include_stop_str_in_output, continuous usage, chat_template_kwargs, continue_final_message),
plus LocalMoE's `priority` and `modality`. Refused with a 400 rather than silently ignored: more
than one prompt per request, suffix, best_of > 1, and content parts other than text. Errors are
`{"error": {message, type, param, code}}`; bad input is a 400 (as with OpenAI), a 429 keeps its
Retry-After.

The package is split as vLLM splits its OpenAI entrypoint: `protocol` (request and response
models), `errors` (OpenAI's error shape), one module per endpoint (`models`, `completions`,
`chat`, `tokenize`) over `serving` (what they share: intake, the served model), `chat_template`
(messages and tools → prompt), `tools` (tool-call formats: parsing, streaming, the grammar that
forces calls), `logprobs` and `streaming` (a job's answer, whole or as chunks). Files (a batch's
input) have `files` (the routes) over `upload` (the multipart body, streamed to disk),
`batch_input` (the line format, checked as it arrives) and `file_store` (the bytes on disk, the
records in Redis); batches have `batches` (the routes) over `batch_runs` (which API process
runs which batch: leases, taking over), `batch_runner` (one run: each line an ordinary job through
the routes' own code) and `batch_store` (the record, its status transitions, the per-line ledger).
"""
