"""``input/...`` routes (being written)."""

from __future__ import annotations

from emond.api import Router
from emond.context import NodeContext


def add_input_routes(router: Router, ctx: NodeContext) -> None:
    pass
