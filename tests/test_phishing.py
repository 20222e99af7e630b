"""The phishing plugin: URL extraction through the MIME layer, its signals, URIBL
lookups on the loopback DNS server, and its bounds (counted, not timed).

Serve tests run a real server on 127.0.0.1 and read the delivered copy; "score
added" is checked through ``actions.add_header`` (X-Spam-Flag) and a reject
threshold, and the symbols through ``check``'s report (what ``check --json`` prints).
"""

from __future__ import annotations

import email
import pickle
from pathlib import Path

import pytest
from mailflow_plugins.phishing import SCORES, PhishingPlugin, PhishingSettings
from mailflow_plugins.phishing.lookalike import lookalike_of, within_distance
from mailflow_plugins.phishing.uribl import meanings
from mailflow_plugins.phishing.urls import (
    decode_idn,
    numeric_ip,
    parse_url,
    registered_domain,
    skeleton,
)

from mailflow import mime
from mailflow.app import App
from mailflow.check import check_message, report
from mailflow.config import ConfigError
from mailflow.testing import running_server, send
from mailflow.testing_dns import dns_server

HAM = Path(__file__).parent / "messages" / "corpus" / "ham"
REDIRECTS = frozenset({"url", "u", "q"})


def html_message(html: str, sender: str = "PayPal <service@mailer.example>") -> bytes:
    return (
        f"From: {sender}\r\nTo: bob@ourcorp.example\r\nSubject: Your account\r\n"
        "MIME-Version: 1.0\r\nContent-Type: text/html; charset=utf-8\r\n\r\n"
        f"<html><body><p>Dear customer,</p>{html}</body></html>\r\n"
    ).encode()


PAYPAL = html_message(
    '<p>Please confirm: <a href="http://198.51.100.9/login.php">https://www.paypal.com</a></p>'
)
CLEAN = html_message(
    '<p>See <a href="https://www.paypal.com/signin">https://www.paypal.com</a> or '
    '<a href="https://www.paypal.com/help">our help pages</a>.</p>'
)


def symbols_of(result_details: dict) -> set[str]:
    return set(result_details.get("findings", {}))


def analyse(raw: bytes, **settings) -> tuple[set[str], dict]:
    plugin = PhishingPlugin(PhishingSettings(**settings))
    result = plugin.result(plugin.analyse(mime.MessageView(raw)))
    return {s.name for s in result.symbols}, result.details


# --- URLs -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("host", "ip"),
    [
        ("3232235777", "192.168.1.1"),
        ("0xC0A80001", "192.168.0.1"),
        ("0300.0250.0.1", "192.168.0.1"),
        ("0xc0.0xa8.0x00.0x01", "192.168.0.1"),
        ("192.168.1", "192.168.0.1"),
        ("198.51.100.9", "198.51.100.9"),
    ],
)
def test_numeric_ips_as_browsers_read_them(host, ip):
    assert numeric_ip(host) == ip


@pytest.mark.parametrize(
    "host", ["1e3", "256.1.1.1", "99999999999", "09.1.1.1", "1..2", "paypal.com"]
)
def test_names_that_are_not_addresses(host):
    assert numeric_ip(host) is None


def test_userinfo_trick_reads_the_real_host():
    url = parse_url("https://paypal.com@evil.example/login", "a.href", REDIRECTS)
    assert url is not None
    assert (url.host, url.userinfo, url.domain) == ("evil.example", "paypal.com", "evil.example")
    assert "userinfo" in url.flags


def test_obfuscated_ip_is_flagged_and_canonical():
    url = parse_url("http://0xC0A80001/x", "text", REDIRECTS)
    assert url is not None and url.ip == "192.168.0.1"
    assert {"ip", "obfuscated-ip"} <= set(url.flags)


def test_punycode_is_decoded_and_skeleton_folds_confusables():
    host = decode_idn("xn--pypal-4ve.com")
    assert host == "p\u0430ypal.com"  # Cyrillic a
    assert skeleton(host) == "paypal.com"
    assert skeleton("rnicrosoft") == skeleton("microsoft")


def test_redirector_chain_is_followed_as_far_as_visible():
    url = parse_url(
        "https://r.example/out?u=https%3A%2F%2Ft.example%2Fgo%3Furl%3Dhttp%253A%252F%252F"
        "203.0.113.5%252Fpay",
        "a.href",
        REDIRECTS,
    )
    assert url is not None
    hosts = [url.host] + [u.host for u in url.inner] + [v.host for u in url.inner for v in u.inner]
    assert hosts == ["r.example", "t.example", "203.0.113.5"]


def test_relative_and_mailto_links_are_not_urls():
    for raw in ("/path", "mailto:a@b.example", "#top", "javascript:void(0)", "cid:x"):
        assert parse_url(raw, "a.href", REDIRECTS) is None


def test_registered_domain_uses_the_public_suffix_list():
    assert registered_domain("www.paypal.co.uk") == ("paypal", "co.uk")
    assert registered_domain("mail.ourcorp.example") == ("ourcorp", "example")


# --- look-alikes ------------------------------------------------------------------------


def test_bounded_edit_distance():
    assert within_distance("ourcorp", "0urcorp", 1)
    assert within_distance("ourcorp", "ourcrop", 2)
    assert not within_distance("ourcorp", "ourcrop", 1)
    assert not within_distance("a" * 63, "b" * 63, 2)  # stops early: a band, not a table


def test_lookalikes_of_a_protected_domain():
    protected = {"ourcorp.example": ("ourcorp", "example")}
    assert lookalike_of("0urcorp.example", protected) is not None
    assert lookalike_of("ourcorp.com", protected) is not None  # same name, other suffix
    assert lookalike_of("ourc\u043erp.example", protected) is not None  # Cyrillic o
    assert lookalike_of("www.ourcorp.example", protected) is None  # ours
    assert lookalike_of("unrelated.example", protected) is None


# --- URIBL answers ----------------------------------------------------------------------


def test_return_code_meanings():
    assert meanings(["127.0.0.2"], {"127.0.0.2": "listed"}, {}) == ["listed"]
    assert meanings(["127.0.0.3"], {"127.0.0.2": "listed"}, {}) == []
    assert meanings(["127.0.0.10"], {}, {2: "phish", 4: "malware", 8: "spam"}) == [
        "phish",
        "spam",
    ]
    assert meanings(["127.255.255.254"], {}, {}) == []  # "query refused": not a listing
    assert meanings(["192.0.2.1"], {}, {}) == []  # not a block list answer


# --- signals without a server -----------------------------------------------------------


def test_the_paypal_case():
    found, details = analyse(PAYPAL)
    assert {"PHISHING_LINK_MISMATCH", "PHISHING_URL_IP"} <= found
    reasons = details["findings"]["PHISHING_LINK_MISMATCH"]
    assert reasons == ["text shows paypal.com, link goes to 198.51.100.9"]
    first = details["urls"][0]
    assert first["url"] == "http://198.51.100.9/login.php"
    assert first["text"] == "https://www.paypal.com" and first["flagged"] is True


def test_same_domain_links_and_plain_words_raise_nothing():
    found, _ = analyse(CLEAN)
    assert found == set()


def test_redirect_to_the_shown_domain_is_no_mismatch():
    found, _ = analyse(
        html_message(
            '<a href="https://click.tracker.example/r?url=https%3A%2F%2Fwww.paypal.com%2F">'
            "www.paypal.com</a>"
        )
    )
    assert "PHISHING_LINK_MISMATCH" not in found
    assert "PHISHING_REDIRECTOR" in found


def test_impersonation_of_a_protected_person():
    raw = html_message("<p>Please wire it today.</p>", sender='"Jane  BOSS" <ceo@gmail.example>')
    found, _ = analyse(raw, protected_names=["Jane Boss"], protected_domains=["ourcorp.example"])
    assert "PHISHING_IMPERSONATION" in found
    # The same name from our own domain is the person herself.
    own = html_message("<p>hi</p>", sender='"Jane Boss" <jane@ourcorp.example>')
    assert (
        analyse(own, protected_names=["Jane Boss"], protected_domains=["ourcorp.example"])[0]
        == set()
    )


def test_display_name_showing_our_domain():
    raw = html_message("<p>x</p>", sender='"IT ourcorp.example" <helpdesk@evil.example>')
    found, _ = analyse(raw, protected_domains=["ourcorp.example"])
    assert "PHISHING_DISPLAY_DOMAIN" in found


def test_lookalike_sender_and_link():
    raw = html_message(
        '<a href="https://ourc0rp.example/reset">reset your password</a>',
        sender="IT <it@0urcorp.example>",
    )
    found, details = analyse(raw, protected_domains=["ourcorp.example"])
    assert "PHISHING_LOOKALIKE_DOMAIN" in found
    reasons = " ".join(details["findings"]["PHISHING_LOOKALIKE_DOMAIN"])
    assert "0urcorp.example" in reasons and "ourc0rp.example" in reasons


def test_idn_homograph_userinfo_form_and_obfuscated_ip():
    found, _ = analyse(
        html_message(
            '<a href="http://xn--pypal-4ve.com/">PayPal</a>'
            '<a href="https://paypal.com@evil.example/">log in</a>'
            '<form action="https://collect.evil.example/p"><input name=pw></form>'
            '<img src="http://0xC0A80001/pixel.gif">'
        )
    )
    assert {
        "PHISHING_IDN_HOMOGRAPH",
        "PHISHING_URL_USERINFO",
        "PHISHING_FORM_OFFSITE",
        "PHISHING_URL_OBFUSCATED_IP",
    } <= found


def test_bare_urls_in_plain_text():
    raw = (
        b"From: a@mailer.example\r\nSubject: x\r\n\r\n"
        b"Log in at http://3232235777/login or https://paypal.com@evil.example/ now.\r\n"
    )
    found, _ = analyse(raw)
    assert {"PHISHING_URL_OBFUSCATED_IP", "PHISHING_URL_USERINFO"} <= found


def test_scores_can_be_changed_and_unknown_symbols_are_refused():
    plugin = PhishingPlugin(PhishingSettings(scores={"PHISHING_URL_IP": 0.5}))
    result = plugin.result(plugin.analyse(mime.MessageView(PAYPAL)))
    scores = {s.name: s.score for s in result.symbols}
    assert scores == {"PHISHING_URL_IP": 0.5, "PHISHING_LINK_MISMATCH": 5.0}
    assert result.score == 5.5
    with pytest.raises(ValueError, match="unknown symbol"):
        PhishingSettings(scores={"PHISHING_TYPO": 1.0})


def test_results_pickle_for_worker_processes():
    plugin = PhishingPlugin()
    result = plugin.result(plugin.analyse(mime.MessageView(PAYPAL)))
    assert pickle.loads(pickle.dumps(result)).details == result.details


def test_no_false_positive_on_the_ham_slice():
    # Every ham message of the test corpus, with the corpus' own domains protected
    # (the worst case for look-alikes): no symbol at all.
    plugin = PhishingPlugin(
        PhishingSettings(protected_domains=["example.com", "example.org", "spamassassin.org"])
    )
    files = sorted(HAM.iterdir())
    assert len(files) >= 100
    fired = {}
    for path in files:
        found = plugin.analyse(mime.MessageView(path.read_bytes()))
        if found.reasons:
            fired[path.name] = found.reasons
    assert fired == {}


# --- bounds (counted, not timed) --------------------------------------------------------


def test_a_megabyte_line_of_url_starts_is_read_once():
    text = "http://a." * 120_000  # 1 MB, one line
    scan = mime.text_urls(text, limit=100_000)
    assert scan.tags == len(scan.links)  # one search step per URL found
    assert all(len(link.url) <= mime.MAX_URL_CHARS for link in scan.links)
    assert len(scan.links) <= len(text) // mime.MAX_URL_CHARS + 1
    raw = b"From: a@x.example\r\nSubject: x\r\n\r\n" + text.encode() + b"\r\n"
    _, details = analyse(raw)
    assert details["counts"]["urls"] <= 200


def test_a_hundred_thousand_anchors_stop_at_the_cap():
    html = '<a href="http://h{0}.example/">http://h{0}.example/</a>'
    markup = "".join(html.format(i) for i in range(100_000))
    scan = mime.html_links(markup, limit=500)
    assert scan.truncated and len(scan.links) == 500
    assert scan.tags <= 501  # the scan stopped at the cap
    _, details = analyse(html_message(markup), max_urls=300)
    counts = details["counts"]
    assert counts["urls"] == 300 and counts["truncated"] is True
    assert len(details["urls"]) == 20  # max_details


def test_deep_nesting_and_unclosed_tags_are_one_pass():
    deep = "<div>" * 200_000 + '<a href="http://198.51.100.9/">https://www.paypal.com</a>'
    scan = mime.html_links(deep)
    assert [link.text for link in scan.links] == ["https://www.paypal.com"]
    assert scan.tags == 1  # <div> is not a link element: skipped by the regex, in C
    unclosed = "<a " * 300_000  # no ">": no tag at all
    assert mime.html_links(unclosed).tags == 0
    no_close = '<a href="http://x.example/">' * 50_000  # anchors never closed
    scan = mime.html_links(no_close, limit=100_000)
    assert len(scan.links) == 50_000
    assert all(link.text == "" for link in scan.links)


def test_anchor_text_is_bounded():
    markup = '<a href="http://x.example/">' + "word " * 100_000 + "</a>"
    [link] = mime.html_links(markup).links
    assert len(link.text) <= mime.links.MAX_ANCHOR_TEXT


# --- through serve ----------------------------------------------------------------------

PLUGIN = "plugins:\n  - name: phishing\n    settings: {{protected_names: ['Jane Boss']{extra}}}\n"


def serve_config(make_config, extra: str = "", head: str = "", actions: str = "add_header: 4"):
    return make_config(
        f"local_domains: [ourcorp.example]\nactions: {{{actions}}}\n{head}"
        + PLUGIN.format(extra=extra)
    )


async def test_serve_paypal_mismatch_scores(make_config):
    async with running_server(serve_config(make_config)) as srv:
        assert await send(srv.port, "a@mailer.example", ["bob@ourcorp.example"], PAYPAL) == {}
        assert await send(srv.port, "a@mailer.example", ["bob@ourcorp.example"], CLEAN) == {}
        phish, clean = await srv.wait_delivered("bob@ourcorp.example", count=2)
    assert email.message_from_bytes(phish)["X-Spam-Flag"] == "YES"
    assert email.message_from_bytes(clean)["X-Spam-Flag"] is None


async def test_serve_rejects_over_the_threshold(make_config):
    config = serve_config(make_config, actions="reject: 7")
    async with running_server(config) as srv:
        with pytest.raises(Exception, match="550"):
            await send(srv.port, "a@mailer.example", ["bob@ourcorp.example"], PAYPAL)


async def test_serve_impersonation_and_lookalike(make_config):
    config = serve_config(make_config)
    ceo = html_message("<p>Urgent transfer</p>", sender='"Jane Boss" <ceo@gmail.example>')
    lookalike = html_message("<p>Reset</p>", sender="IT <it@0urcorp.example>")
    async with running_server(config) as srv:
        for raw in (ceo, lookalike):
            assert await send(srv.port, "a@mailer.example", ["bob@ourcorp.example"], raw) == {}
        delivered = await srv.wait_delivered("bob@ourcorp.example", count=2)
    assert all(email.message_from_bytes(m)["X-Spam-Flag"] == "YES" for m in delivered)
    app = App(config)
    await app.startup()
    try:
        for raw, symbol in (
            (ceo, "PHISHING_IMPERSONATION"),
            (lookalike, "PHISHING_LOOKALIKE_DOMAIN"),
        ):
            ctx = await check_message(app, raw, recipients=["bob@ourcorp.example"])
            entry = report(ctx)["plugins"]["phishing"]
            assert symbol in [s["name"] for s in entry["symbols"]]
            assert entry["findings"][symbol]
    finally:
        await app.shutdown()


URIBL_ZONES = (
    ", uribl_zones: [{zone: uribl.test, codes: {'127.0.0.2': listed}, score: 6},"
    " {zone: multi.test, symbol: SURBL_MULTI, bitmask: {2: phishing, 4: malware}}]"
)


async def test_serve_uribl_listed_domain(make_config):
    records = {
        "evil.example.uribl.test": [("A", "127.0.0.2")],
        "evil.example.multi.test": [("A", "127.0.0.6")],
        "9.100.51.198.multi.test": [("A", "127.0.0.2")],
    }
    raw = html_message(
        '<a href="https://login.evil.example/x">Sign in</a> '
        '<a href="https://fine.example/">fine</a> <img src="http://198.51.100.9/p.gif">'
    )
    async with dns_server(records) as dns:
        config = serve_config(make_config, URIBL_ZONES, head=dns.config_yaml(timeout=1.0))
        async with running_server(config) as srv:
            assert await send(srv.port, "a@mailer.example", ["bob@ourcorp.example"], raw) == {}
            [delivered] = await srv.wait_delivered("bob@ourcorp.example")
        assert email.message_from_bytes(delivered)["X-Spam-Flag"] == "YES"
        assert dns.queried("evil.example.uribl.test", "A")
        assert dns.queried("fine.example.multi.test", "A")
        assert not dns.queried("ourcorp.example.uribl.test")  # our own domain: never
        app = App(config)
        await app.startup()
        try:
            ctx = await check_message(app, raw, recipients=["bob@ourcorp.example"])
        finally:
            await app.shutdown()
    entry = report(ctx)["plugins"]["phishing"]
    scores = {s["name"]: s["score"] for s in entry["symbols"]}
    assert scores["URIBL_URIBL"] == 6
    assert scores["SURBL_MULTI"] == 4.0
    listed = entry["uribl"]["listed"]
    assert listed["URIBL_URIBL"] == ["evil.example in uribl.test: listed"]
    assert sorted(listed["SURBL_MULTI"]) == [
        "198.51.100.9 in multi.test: phishing",
        "evil.example in multi.test: phishing, malware",
    ]
    assert entry["uribl"]["errors"] == []


async def test_uribl_failure_is_no_signal_and_noted(make_config):
    raw = html_message('<a href="https://a.example/">a</a> <a href="https://b.example/">b</a>')
    async with dns_server({}) as dns:
        dns.servfail_names.add("a.example.uribl.test")
        dns.timeout_names.add("b.example.uribl.test")
        config = serve_config(
            make_config,
            ", uribl_budget: 0.5, uribl_zones: [{zone: uribl.test, ips: false}]",
            head=dns.config_yaml(timeout=2.0),
        )
        app = App(config)
        await app.startup()
        try:
            ctx = await check_message(app, raw, recipients=["bob@ourcorp.example"])
        finally:
            await app.shutdown()
    entry = report(ctx)["plugins"]["phishing"]
    assert entry.get("symbols", []) == []
    assert report(ctx)["action"] == "accept"
    errors = " ".join(entry["uribl"]["errors"])
    assert "a.example.uribl.test" in errors and "unanswered within 0.5s" in errors


async def test_uribl_lookups_are_bounded_per_message(make_config):
    links = "".join(f'<a href="https://d{i}.example/">{i}</a>' for i in range(50))
    async with dns_server({}) as dns:
        config = serve_config(
            make_config,
            ", uribl_max_lookups: 7, uribl_zones: [{zone: uribl.test}]",
            head=dns.config_yaml(),
        )
        app = App(config)
        await app.startup()
        try:
            ctx = await check_message(app, html_message(links), recipients=["bob@ourcorp.example"])
        finally:
            await app.shutdown()
        assert len([q for q in dns.queries if q[0].endswith("uribl.test")]) == 7
    uribl = report(ctx)["plugins"]["phishing"]["uribl"]
    assert (uribl["queried"], uribl["skipped"]) == (7, 43)


async def test_serve_in_a_worker_process(make_config):
    config = make_config(
        "local_domains: [ourcorp.example]\nactions: {add_header: 4}\n"
        "isolation: {processes: 1}\nplugins:\n  - {name: phishing, isolate: true}\n"
    )
    async with running_server(config) as srv:
        assert await send(srv.port, "a@mailer.example", ["bob@ourcorp.example"], PAYPAL) == {}
        [delivered] = await srv.wait_delivered("bob@ourcorp.example")
    assert email.message_from_bytes(delivered)["X-Spam-Flag"] == "YES"


def test_bad_settings_are_config_errors(make_config):
    with pytest.raises(ConfigError, match="max_urls"):
        App(make_config("plugins: [{name: phishing, settings: {max_urls: 0}}]"))
    with pytest.raises(ConfigError, match="symbol"):
        App(
            make_config(
                "plugins: [{name: phishing, settings: {uribl_zones: [{zone: z, symbol: bad}]}}]"
            )
        )


def test_every_symbol_is_documented():
    page = (Path(__file__).parent.parent / "docs" / "plugins" / "phishing.md").read_text()
    for name, score in SCORES.items():
        assert f"`{name}`" in page and f"| {score:g} |" in page


def test_check_json_shows_the_findings(tmp_path):
    import json

    from click.testing import CliRunner

    from mailflow.cli import main

    config = tmp_path / "mailflow.yaml"
    config.write_text(
        f"local_domains: [ourcorp.example]\nqueue: {{directory: {tmp_path / 'spool'}}}\n"
        "plugins: [{name: phishing}]\n"
    )
    eml = tmp_path / "paypal.eml"
    eml.write_bytes(PAYPAL)
    result = CliRunner().invoke(main, ["check", "--json", "-c", str(config), str(eml)])
    entry = json.loads(result.stdout)["plugins"]["phishing"]
    assert {s["name"]: s["score"] for s in entry["symbols"]} == {
        "PHISHING_LINK_MISMATCH": 5.0,
        "PHISHING_URL_IP": 2.0,
    }
    assert entry["findings"]["PHISHING_LINK_MISMATCH"] == [
        "text shows paypal.com, link goes to 198.51.100.9"
    ]
    assert entry["urls"][0]["text"] == "https://www.paypal.com"


@pytest.mark.parametrize("text", ["invoice.pdf", "Quarterly-Report.docx", "node.js"])
def test_link_text_naming_a_file_is_no_mismatch(text):
    # File-sharing links show the file's name: a dot in the text is not a domain.
    found, _ = analyse(html_message(f'<a href="https://files.mailer.example/d/1">{text}</a>'))
    assert "PHISHING_LINK_MISMATCH" not in found


@pytest.mark.parametrize("text", ["paypal.com", "https://intranet.corp/x", "www.shop.example"])
def test_link_text_naming_a_domain_still_mismatches(text):
    found, _ = analyse(html_message(f'<a href="https://files.mailer.example/d/1">{text}</a>'))
    assert "PHISHING_LINK_MISMATCH" in found


def test_details_show_a_few_of_many_inner_urls():
    inner = "&".join(f"u=http%3A%2F%2Fh{i}.example%2F" for i in range(40))
    _, details = analyse(html_message(f'<a href="http://r.example/?{inner}">x</a>'))
    entry = details["urls"][0]
    assert len(entry["redirects_to"]) == 5 and entry["redirects_more"] == 35
