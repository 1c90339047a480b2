"""HTTP routes, one thin module per area."""
from service.routes import admin_reload, demo, events, health, items, metrics, recommend

ROUTERS = (recommend.router, events.router, health.router, metrics.router, demo.router, items.router,
           admin_reload.router)
