"""The web dashboard: /admin/ui/ (behind the admin token) and /meter/ui/ (a key holder's own page).

Server-rendered HTML (jinja2, autoescaped) and SVG charts; every file it needs ships in this package.

    dashboard.py   the admin pages (/admin/ui/)         meter.py    a key holder's page (/meter/ui/)
    pages.py       what both share: headers, templates, forms, the session guard, static files
    session.py     signed session cookies and CSRF tokens
    data.py        the overview's figures, from reports.usage_report
    svg.py         charts as SVG
"""

from proxy.ui.dashboard import make_ui
from proxy.ui.meter import make_meter_ui
from proxy.ui.pages import mount

__all__ = ["make_meter_ui", "make_ui", "mount"]
