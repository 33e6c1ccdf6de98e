"""A FastAPI app for the two-process hot-parameter tests: ``YMGUARD_TEST_*`` settings."""

from __future__ import annotations

import os

from fastapi import FastAPI

from ymguard import Guard, GuardMiddleware

guard = Guard(
    {
        "key_prefix": os.environ["YMGUARD_TEST_PREFIX"],
        "resources": {
            "POST /kill/{course_id}": {
                "param_flow": [
                    {
                        "param": "course_id",
                        "qps": 3,
                        "duration_seconds": 3600,
                        "items": {"42": 0},
                    }
                ]
            },
        },
    },
    storage=os.environ["YMGUARD_TEST_REDIS"],
)
app = FastAPI()
app.add_middleware(GuardMiddleware, guard=guard)
guard.install(app)


@app.get("/health")
async def health() -> dict[str, int]:
    return {"pid": os.getpid()}


@app.post("/kill/{course_id}")
async def kill(course_id: int) -> dict[str, int]:
    return {"course": course_id, "pid": os.getpid()}
