"""The SMTP front end: aiosmtpd's protocol -> the transaction model -> spool.

Mirrors :mod:`mailflow.milter`:

* :mod:`~mailflow.smtp.handler`: the command hooks, each a step of
  :class:`mailflow.transaction.Transaction`, and storing the message before the 250;
* :mod:`~mailflow.smtp.protocol`: one connection (limits, timers, the DATA reader,
  STARTTLS, pipelined replies): aiosmtpd's ``SMTP`` with the members it overrides
  (tests/test_aiosmtpd_contract.py holds aiosmtpd to them);
* :mod:`~mailflow.smtp.data`: message data scanned and stored block by block;
* :mod:`~mailflow.smtp.auth`: the PLAIN and LOGIN mechanisms;
* :mod:`~mailflow.smtp.received`: the Received trace field;
* :mod:`~mailflow.smtp.policy`: connection limits and address syntax;
* :mod:`~mailflow.smtp.listen`: the listeners.
"""

from mailflow.smtp.handler import Handler
from mailflow.smtp.listen import (
    bound_addresses,
    make_tls_context,
    protocol_factory,
    start_servers,
)
from mailflow.smtp.protocol import MailflowSMTP

__all__ = ["Handler", "MailflowSMTP", "bound_addresses", "make_tls_context",
    "protocol_factory",
    "start_servers",
]
