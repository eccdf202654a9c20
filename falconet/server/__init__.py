"""The OpenAI-compatible HTTP server (`falconet serve`): FastAPI + uvicorn over the engine.

app.py        routes, streaming, disconnects, error handlers: `create_app(engine, name)`
protocol.py   request bodies as pydantic models (rules from falconet.request_rules.RULES),
              body reading, OpenAI-shaped errors
generation.py validated bodies -> token ids, context checks, one SamplingParams per choice
responses.py  response bodies and stream chunks (logprobs objects: falconet/generate.py)
rag_routes.py /v1/rag/* over a RAG store (`--rag-store`)
collections.py  multi-user mode: each request's RAG store is one of its caller's collections
gate.py       security headers, users' keys and sessions, CSRF, rate limit, audit records
account_routes.py  sign-in (/v1/auth/session) and admin routes (/v1/admin/*)
conversation_routes.py  the web app's conversations, per user (/v1/conversations)
webapp.py     the web app: the static files in web/, served at /
metrics.py    Prometheus metrics (prometheus_client, one registry per app)
serve.py      ServerSettings and the uvicorn loop behind the CLI
timeouts.py   deadlines on request heads and bodies (a slow client holds no worker)
workers.py    worker threads for a request's CPU work (the event loop never computes)
"""

# Defaults of the --timeout-* flags (see timeouts.py), here so that the CLI can name
# them without importing the web stack.
HEAD_TIMEOUT_S = 10.0
BODY_TIMEOUT_S = 30.0
KEEP_ALIVE_S = 5.0  # uvicorn's default
SESSION_HOURS = 12.0  # a sign-in session's lifetime (--session-hours)
