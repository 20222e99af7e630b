"""DKIM and ARC: the builtin plugins ``dkim``, ``dkim_sign``, ``arc`` and ``arc_seal``.

* :mod:`.verify`: ``dkim``, DKIM signature verification (RFC 6376, RFC 8463);
* :mod:`.sign`: ``dkim_sign``, DKIM signing of outgoing mail, ``mailflow dkim keygen``;
* :mod:`.arc`: ``arc``, ARC chain verification (RFC 8617);
* :mod:`.arc_seal`: ``arc_seal``, ARC sealing of forwarded mail;
* :mod:`.keys`: key files and DNS key records (generate, load, format);
* :mod:`.dns`: key records fetched up front through the shared resolver, for dkimpy.

Each plugin is its own entry point (pyproject.toml), so enabling one does not enable
the others; docs/plugins/dkim.md, dkim_sign.md, arc.md and arc_seal.md.
"""
