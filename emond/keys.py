"""Every Redis key name emond uses, in one place.

The names are a storage format: data already in Redis (and emoncms.org's
``feed:lastvalue:`` / ``input:lastvalue:`` / ``process:`` keys) is read by
them, so they never change. Modules build keys only through these
functions; nothing else spells a key.

Queues are named ``in:<n>`` (input queue n) and ``st:<id>`` (the storage
queue of server id); a queue's stream, lease, fencing counter, sequence
counter and dead letters are keys derived from that name.
"""

from __future__ import annotations

import hashlib

# -- queues (emond.queue) ------------------------------------------------------------


def input_queue(queue: int) -> str:
    """The name of input queue ``queue`` (its lease and fence are named after it)."""
    return f"in:{queue}"


def storage_queue(server: int) -> str:
    """The name of the storage queue of storage server ``server``."""
    return f"st:{server}"


def stream(name: str) -> str:
    """The Redis stream holding a queue's elements."""
    return f"emond:{name}"


def input_stream(queue: int) -> str:
    return stream(input_queue(queue))


def storage_stream(server: int) -> str:
    return stream(storage_queue(server))


def storage_seq(server: int) -> str:
    """The counter numbering a storage queue's batches."""
    return f"emond:seq:{storage_queue(server)}"


def lease(name: str) -> str:
    """A queue's lease: ``owner:token`` with a TTL."""
    return f"emond:lease:{name}"


def fence(name: str) -> str:
    """A queue's fencing counter: every new lease holder gets a larger token."""
    return f"emond:fence:{name}"


def dead_letters(stream_key: str) -> str:
    """Where the elements of a stream that kept failing are set aside for an operator."""
    return f"emond:dead:{stream_key}"


CONSUMERS = "emond:consumers"  # sorted set: live input consumers, scored by when their announcement expires
INPUT_LAYOUT = "emond:input:layout"  # the input queue layout recorded at first start

# -- process state (emond.process.state) ------------------------------------------


def input_lastvalue(inputid: int) -> str:
    """Hash {time, value}: an input's last value (emoncms.org's name)."""
    return f"input:lastvalue:{inputid}"


def feed_lastvalue(feedid: int) -> str:
    """Hash {time, value}: a feed's last accepted value (emoncms.org's name)."""
    return f"feed:lastvalue:{feedid}"


def feed_disk(feedid: int) -> str:
    """Hash {time, value}: a feed's last value applied to its file."""
    return f"feed:disk:{feedid}"


def step_times(inputid: int) -> str:
    """Hash ``index:process`` -> time of the last packet each stateful step of an input applied."""
    return f"emond:step:{inputid}"


def process_state(name: str, feedid: int) -> str:
    """Hash {time, value} a process keeps per feed (emoncms.org's ``process:<name>:<feed>``)."""
    return f"process:{name}:{int(feedid)}"


def user_hold(userid: int) -> str:
    """Set in a shard's Redis while a user moves onto it: its consumer parks the user's packets."""
    return f"emond:hold:{userid}"


def user_held(userid: int) -> str:
    """The stream of a user's packets parked while it moves here, in the order accepted."""
    return f"emond:held:{userid}"


def user_held_first(userid: int) -> str:
    """On a moving user's new shard: the packets its old shard parked, gathered there before
    they go in front of those parked here (they were accepted before them)."""
    return f"emond:held-first:{userid}"


def moved_chunk(userid: int, entry_id: str) -> str:
    """Marks a chunk of a moving user's parked packets (up to ``entry_id``) as added to its new shard."""
    return f"emond:moved:{userid}:{entry_id}"


USER_MOVED = "emond:user-moved"  # pub/sub channel on the central Redis: a user's shard changed (payload: its id)


def user_version(userid: int) -> str:
    """Bumped when a user's inputs or process lists change: consumers reload what they cached."""
    return f"emond:user:ver:{userid}"


# -- accounts (emond.meta.auth) and refusals (emond.meta.refusals) --------------------------------


def apikey(digest: str) -> bytes:
    """The cached owner of an API key, by the key's sha256 digest."""
    return b"emond:apikey:" + digest.encode()


# Bumped whenever cached key owners are dropped (a key replaced, an account disabled): a key
# looked up in the database before that is not cached after it (emond.meta.auth).
APIKEY_EPOCH = b"emond:apikey:epoch"


def session(token: bytes) -> bytes:
    """A session, by the sha256 of its cookie's token (the token itself is never stored)."""
    return b"emond:session:" + hashlib.sha256(token).hexdigest().encode()


SESSION_GENERATION_PREFIX = "emond:session:gen:"  # + userid; a Lua script appends the user id itself


def session_generation(userid: int) -> str:
    """A user's session generation: grows when the password changes, ending older sessions."""
    return f"{SESSION_GENERATION_PREFIX}{userid}"


def login_throttle(kind: str, who: str) -> bytes:
    """A counter of login (or registration) attempts of one kind, by the sha256 of who makes them."""
    return f"emond:login:{kind}:{hashlib.sha256(who.encode()).hexdigest()}".encode()


def refused_counts(userid: int) -> str:
    """Hash reason -> count of a user's refused datapoints."""
    return f"emond:refused:{userid}"


def refused_last(userid: int) -> str:
    """List: a user's last refusals."""
    return f"emond:refused:last:{userid}"
