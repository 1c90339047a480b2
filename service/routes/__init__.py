"""HTTP routes, one thin module per area."""
from service.routes import admin_reload, demo, events, health, metrics, recommend

ROUTERS = (recommend.router, events.router, health.router, metrics.router, demo.router, admin_reload.router)
