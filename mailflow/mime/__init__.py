"""mailflow's one MIME/text layer: header fields, parameters, decoding, text, parts.

Every parser here is linear in its input or bounded by a documented cap with an
observable effect (``Structure.truncated``, ``AddressList.truncated``); nothing
raises on malformed input, and no text it returns holds a lone surrogate.

* :mod:`.fields`: header blocks, fields, unfolding, ``split_header_fields``;
* :mod:`.params`: Content-Type/Content-Disposition parameters, RFC 2231;
* :mod:`.decode`: transfer encodings, the charset policy, RFC 2047 words;
* :mod:`.addresses`: address lists (From, To, Cc);
* :mod:`.text`: HTML to text, element names, URL host names;
* :mod:`.links`: links in HTML (anchors with their visible text, src, form actions)
  and bare URLs in text;
* :mod:`.walk`: the MIME walk into leaf :class:`Part` objects (:class:`Structure`);
* :mod:`.filetype`: what a part really is, from its content (magic bytes);
* :mod:`.edit`: replacing whole parts (stripping an attachment);
* :mod:`.context`: one message version's header block and structure, shared by all
  plugins through ``MessageContext.mime`` / ``.fields`` (walked once per body).

Plugins: ``message.mime`` (the :class:`Structure`), ``message.fields`` (the
top-level :class:`HeaderBlock`), ``mailflow.mime.view(message)`` for both
(docs/mime.md).
"""

from mailflow.mime.addresses import MAX_ADDRESSES, Address, AddressList, parse_addresses
from mailflow.mime.context import (
    MessageView,
    body_text,
    header_addresses,
    header_values,
    parts,
    structure,
    view,
)
from mailflow.mime.decode import (
    decode_base64,
    decode_charset,
    decode_transfer,
    decode_uu,
    decode_words,
    header_text,
)
from mailflow.mime.edit import can_replace, note_entity, replace_parts
from mailflow.mime.fields import (
    Fields,
    HeaderBlock,
    parse_fields,
    split_entity,
    split_header_fields,
    unfold,
)
from mailflow.mime.filetype import (
    DANGEROUS_KINDS,
    EXTENSION_KINDS,
    KINDS,
    FileType,
    detect,
    extension,
    part_type,
)
from mailflow.mime.links import MAX_URL_CHARS, Link, LinkScan, html_links, text_urls
from mailflow.mime.params import param_values, parse_params, unquote
from mailflow.mime.text import (
    MAX_HOST_CHARS,
    collapse_blanks,
    decode_part,
    element_names,
    html_to_text,
    url_hosts,
    visible_text,
)
from mailflow.mime.walk import (
    MAX_DEPTH,
    MAX_PARTS,
    MAX_TEXT_CHARS,
    OPAQUE_TYPE,
    Part,
    Structure,
    parse,
    parse_body,
)

__all__ = [
    "DANGEROUS_KINDS",
    "EXTENSION_KINDS",
    "KINDS",
    "MAX_ADDRESSES",
    "MAX_DEPTH",
    "MAX_HOST_CHARS",
    "MAX_PARTS",
    "MAX_TEXT_CHARS",
    "MAX_URL_CHARS",
    "OPAQUE_TYPE",
    "Address",
    "AddressList",
    "Fields",
    "FileType",
    "HeaderBlock",
    "Link",
    "LinkScan",
    "MessageView",
    "Part",
    "Structure",
    "body_text",
    "can_replace",
    "collapse_blanks",
    "decode_base64",
    "decode_charset",
    "decode_part",
    "decode_transfer",
    "decode_uu",
    "decode_words",
    "detect",
    "element_names",
    "extension",
    "header_addresses",
    "header_text",
    "header_values",
    "html_links",
    "html_to_text",
    "note_entity",
    "param_values",
    "parse",
    "parse_addresses",
    "parse_body",
    "parse_fields",
    "parse_params",
    "part_type",
    "parts",
    "replace_parts",
    "split_entity",
    "split_header_fields",
    "structure",
    "text_urls",
    "unfold",
    "unquote",
    "url_hosts",
    "view",
    "visible_text",
]
