"""The OpenAI-compatible HTTP server (`falconet serve`): FastAPI + uvicorn over the engine.

app.py        routes, streaming, disconnects, error handlers: `create_app(engine, name)`
protocol.py   request bodies as pydantic models (rules from falconet.sampling.RULES),
              body reading, OpenAI-shaped errors
generation.py validated bodies -> token ids, context checks, one SamplingParams per choice
responses.py  response bodies and stream chunks (logprobs objects: falconet/generate.py)
rag_routes.py /v1/rag/* over a RAG store (`--rag-store`)
metrics.py    Prometheus metrics (prometheus_client, one registry per app)
serve.py      ServerSettings and the uvicorn loop behind the CLI
"""
