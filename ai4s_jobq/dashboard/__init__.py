"""Seeing a queue: the ``jobq dashboard`` web page and the ``jobq top`` terminal view.

Both read the same two sources — the queue's counts (every backend) and its outcome
ledger (when it has one) — through :mod:`.snapshot`, and differ only in rendering:
:mod:`.render` + :mod:`.charts` (server-side HTML and SVG, served by :mod:`.server`)
and :mod:`.top` (rich).  Without a ledger (Service Bus without ``--ledger``) both
show what the counts alone can: depth over time, the net drain rate, the dead-letter
list.  Templates and static assets ship in the package (``templates/``, ``static/``);
nothing is fetched from a CDN, so the page works on an offline machine.

The web page needs the ``ai4s_jobq[dashboard]`` extra (Jinja2); ``jobq top`` needs
nothing beyond the core dependencies.
"""
