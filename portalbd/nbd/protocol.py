"""The NBD codec: one import point for the wire vocabulary and both roles.

The codec is sans-I/O: bytes in, events and bytes out, no sockets and no
event loop, so every rule is tested and fuzzed without a server and the
same code serves, simulates and tests. It lives in small modules:

- :mod:`portalbd.nbd.wire`: magic numbers, flags, commands, errors,
  struct layouts and limits;
- :mod:`portalbd.nbd.handshake`: the fixed newstyle handshake,
  :class:`ServerHandshake` and :class:`ClientHandshake`;
- :mod:`portalbd.nbd.transmission`: requests (:class:`RequestDecoder`,
  :func:`check_request`, :func:`encode_request`) and the server's reply
  encoders;
- :mod:`portalbd.nbd.replies`: the client's :class:`ReplyDecoder`.

Callers write ``from portalbd.nbd import protocol as p`` and use ``p.*``.
"""

from __future__ import annotations

from portalbd.nbd.handshake import *  # noqa: F403
from portalbd.nbd.replies import *  # noqa: F403
from portalbd.nbd.transmission import *  # noqa: F403
from portalbd.nbd.wire import *  # noqa: F403
