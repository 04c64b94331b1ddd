"""The web dashboard: /admin/ui/ (behind the admin token) and /meter/ui/ (a key holder's own page).

Server-rendered HTML (jinja2, autoescaped) and SVG charts; every file it needs ships in this package.
"""

from proxy.ui.views import make_meter_ui, make_ui, mount

__all__ = ["make_meter_ui", "make_ui", "mount"]
