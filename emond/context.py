"""What a node's API handlers work with, built once per process and passed down."""

from __future__ import annotations

from dataclasses import dataclass

from prometheus_client import CollectorRegistry

from emond.auth import Authenticator
from emond.config import NodeConfig
from emond.db import Database
from emond.feeds import Feeds
from emond.feedstore import FeedStore, FeedWriter
from emond.inputs import Inputs
from emond.pools import BoundedPool
from emond.redis import Redis
from emond.refusals import Refusals
from emond.users import Users


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
