"""Delivery: durable spool, queue runner, and transports (Maildir, LMTP, relay, MX)."""
