"""The OpenAI-compatible HTTP server (`falconet serve`): FastAPI + uvicorn over the engine.

app.py        routes, streaming, disconnects, error handlers: `create_app(engine, name)`
protocol.py   request bodies -> validated SamplingParams; OpenAI-shaped errors
responses.py  response bodies, stream chunks, logprobs
metrics.py    Prometheus text exposition
serve.py      ServerSettings and the uvicorn loop behind the CLI
"""
