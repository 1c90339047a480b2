"""GET /metrics: Prometheus exposition of this app's registry."""
from __future__ import annotations

from fastapi import APIRouter, Response

from service.deps import MetricsDep

router = APIRouter(tags=["metrics"])


@router.get("/metrics", response_class=Response, summary="Prometheus metrics")
async def metrics(service_metrics: MetricsDep) -> Response:
    body, content_type = service_metrics.render()
    return Response(content=body, media_type=content_type)
