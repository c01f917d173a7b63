"""twistd plugins: ``twistd emond`` and ``twistd emond-storage`` (thin: see emond.app.tap)."""

from twisted.application.service import ServiceMaker

emond = ServiceMaker(
    "emond",
    "emond.app.tap",
    "emond node: input and feed API, input queues, storage senders",
    "emond",
)
emondStorage = ServiceMaker(
    "emond-storage",
    "emond.app.storage_tap",
    "emond storage server: feed files, the TLS stream, reads",
    "emond-storage",
)
