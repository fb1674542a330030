"""Dashboard: a live page on the operator's port (``GET /dashboard``, docs/dashboard.md).

``feed``: the proxy's own counters (its Prometheus metric objects, read in place, never
scraped over HTTP) sampled by one asyncio timer into fixed-size rings, and the snapshot the
page is sent once a second over server-sent events; the callers refused by a quota or a
budget, or left at 80 % of one by an admitted call, kept by their tags in a bounded recent
set. ``routes``: the page, its static files
and its event stream, behind ``FAL_PROXY_ADMIN_TOKEN`` when one is set.

May import: errors, policy, observe, limits, config, upstream.
"""

from .feed import Feed, NearLimits
from .routes import DashboardRoutes

__all__ = ["DashboardRoutes", "Feed", "NearLimits"]
