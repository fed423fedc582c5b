"""OpenAI-compatible HTTP serving: `moetron serve MODEL_DIR` (see docs/serving.md).

protocol.py   request schemas, validation, translation to engine inputs (SamplingParams)
responses.py  response bodies and stream chunks from the engine's cumulative outputs
async_engine  one thread owns the synchronous engine; asyncio streams per request
api.py        FastAPI routes, errors in OpenAI's shape, SSE
metrics.py    Prometheus text for /metrics
server.py     process: load the engine, run uvicorn, drain on SIGTERM
"""
