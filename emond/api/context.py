"""What a node's API handlers work with, built once per process and passed down."""

from __future__ import annotations

from dataclasses import dataclass

from prometheus_client import CollectorRegistry

from emond.meta.auth import Authenticator
from emond.config import NodeConfig
from emond.meta.db import Database
from emond.meta.feeds import Feeds
from emond.storage.feedstore import FeedStore, FeedWriter
from emond.meta.inputs import Inputs
from emond.pools import BoundedPool
from emond.redis import Redis
from emond.meta.refusals import Refusals
from emond.meta.users import Users


@dataclass
class NodeContext:
    config: NodeConfig
    db: Database
    redis: Redis
    users: Users
    auth: Authenticator
    feeds: Feeds
    inputs: Inputs
    store: FeedStore
    render: BoundedPool  # threads formatting read answers
    writer: FeedWriter
    refusals: Refusals
    registry: CollectorRegistry
