"""Config validation: every error names the file, the key path, the line and what was expected."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest
from click.testing import CliRunner

from mailflow.app import App
from mailflow.cli import main
from mailflow.config import (
    DEFAULT_CONFIG_NAME,
    ConfigError,
    load_config,
    parse_config,
    parse_listen,
)
from mailflow.testing import make_message, running_server, send


def errors(text: str, filename: str = "mailflow.yaml") -> list[str]:
    """The error lines ``parse_config`` reports for ``text`` (dedented)."""
    with pytest.raises(ConfigError) as info:
        parse_config(textwrap.dedent(text), filename)
    return [str(issue) for issue in info.value.issues]


# --- unknown keys, types, values ----------------------------------------------------------


def test_unknown_top_level_key_names_file_line_and_a_suggestion():
    assert errors("server: {}\nrelay_network: [10.0.0.0/8]\n") == [
        "mailflow.yaml:2: relay_network: unknown key (did you mean 'relay_networks'?)"
    ]


def test_unknown_nested_key_names_the_full_path_and_its_own_line():
    text = """\
        server:
          listen: ["127.0.0.1:2525"]
          tls:
            cert: /etc/ssl/a.pem
            key: /etc/ssl/a.key
            requre: true
        """
    assert errors(text) == [
        "mailflow.yaml:6: server.tls.requre: unknown key (did you mean 'require'?)"
    ]


def test_unknown_key_inside_a_list_item_and_a_mapping_value():
    text = """\
        relay:
          targets:
            smart:
              host: smtp.example.net
              prot: 587
        plugins:
          - name: example
            on-error: continue
        """
    assert errors(text) == [
        "mailflow.yaml:5: relay.targets.smart.prot: unknown key (did you mean 'port'?)",
        "mailflow.yaml:8: plugins[0].on-error: unknown key (did you mean 'on_error'?)",
    ]


def test_unknown_key_without_a_close_match_points_to_init():
    [error] = errors("zzz: 1\n")
    assert error == "mailflow.yaml:1: zzz: unknown key (see `mailflow init` for all keys)"


def test_wrong_type_says_what_was_expected_and_what_was_given():
    text = "server:\n  hostname: mx.example.com\n  max_recipients: many\n"
    assert errors(text) == [
        "mailflow.yaml:3: server.max_recipients: expected a whole number (got 'many')"
    ]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("server:\n  reverse_dns: maybe\n", "server.reverse_dns: expected true or false"),
        ("server: 5\n", "server: expected a mapping of keys (key: value) (got 5)"),
        ("local_domains: example.com\n", "local_domains: expected a list"),
        ("server:\n  max_recipients: 0\n", "expected a value greater than or equal to 1 (got 0)"),
        ("log:\n  format: xml\n", "log.format: expected 'text' or 'json' (got 'xml')"),
        (
            "relay:\n  targets:\n    smart: {}\n",
            "relay.targets.smart.host: required key is missing",
        ),
    ],
)
def test_value_errors(text, expected):
    [error] = errors(text)
    assert expected in error


def test_every_problem_is_reported_at_once():
    text = "server:\n  max_recipients: x\n  max_connections: y\nqueue:\n  workerz: 2\n"
    assert [e.split(": ")[0] for e in errors(text)] == [
        "mailflow.yaml:2",
        "mailflow.yaml:3",
        "mailflow.yaml:5",
    ]


# --- sizes and durations ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("1048576", 1048576),
        ("25M", 25 * 1024**2),
        ("25MB", 25 * 1024**2),
        ("1.5 GiB", 1536 * 1024**2),
        ("10k", 10240),
    ],
)
def test_sizes(value, expected):
    config = parse_config(f"server:\n  max_message_size: {value}\n")
    assert config.server.max_message_size == expected


@pytest.mark.parametrize(
    ("value", "expected"),
    [("30", 30.0), ("250ms", 0.25), ("5m", 300.0), ("2h", 7200.0), ("5d", 432000.0)],
)
def test_durations(value, expected):
    assert parse_config(f"queue:\n  lifetime: {value}\n").queue.lifetime == expected


def test_bad_size_and_duration_strings_say_which_forms_are_accepted():
    text = "server:\n  max_message_size: 25 parsecs\nqueue:\n  lifetime: forever\n"
    assert errors(text) == [
        "mailflow.yaml:2: server.max_message_size: expected a size such as 10485760, '25M' or "
        "'1G', got '25 parsecs'",
        "mailflow.yaml:4: queue.lifetime: expected a duration such as 30, '30s', '5m', '2h' or "
        "'5d', got 'forever'",
    ]


def test_negative_size_is_refused():
    [error] = errors("server:\n  max_message_size: -5\n")
    assert error.startswith("mailflow.yaml:2: server.max_message_size: expected a value greater")


# --- YAML-level problems ------------------------------------------------------------------


def test_yaml_syntax_error_names_the_line():
    [error] = errors('server:\n  hostname: mx\n  listen: ["127.0.0.1:25\nqueue: {}\n')
    assert error.startswith("mailflow.yaml:5: YAML syntax error: ")
    assert "quoted scalar (line 3)" in error


def test_bad_indentation_is_a_syntax_error_with_a_line():
    [error] = errors("server:\n  hostname: mx\n   listen: []\n")
    assert error.startswith("mailflow.yaml:3: YAML syntax error: mapping values are not allowed")


def test_duplicate_keys_are_errors_not_silently_merged():
    text = "server:\n  hostname: a\n  max_recipients: 5\n  hostname: b\n"
    assert errors(text) == [
        "mailflow.yaml:4: server.hostname: duplicate key (first given on line 2)"
    ]


def test_top_level_must_be_a_mapping():
    assert errors("- a\n- b\n") == ["mailflow.yaml:1: the top level must be a mapping of keys"]


def test_an_empty_file_means_all_defaults():
    config = parse_config("# nothing but a comment\n")
    assert config.server.listen == ["127.0.0.1:2525"]
    assert config.plugins == []


def test_unreadable_file_is_named(tmp_path):
    missing = tmp_path / "nope.yaml"
    with pytest.raises(ConfigError, match=r"nope\.yaml: cannot read: No such file"):
        load_config(missing)


def test_load_config_reports_the_path_it_was_given(tmp_path):
    path = tmp_path / "conf.yaml"
    path.write_text("server:\n  colour: blue\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert (
        str(info.value)
        == f"{path}:2: server.colour: unknown key (see `mailflow init` for all keys)"
    )


# --- cross-field checks -------------------------------------------------------------------


@pytest.mark.parametrize("item", ["localhost", "127.0.0.1", "127.0.0.1:99999", "[::1]", "a:b"])
def test_bad_listen_address(item):
    [error] = errors(f'server:\n  listen: ["{item}"]\n')
    assert error.startswith("mailflow.yaml:2: server.listen: listen address ")
    assert repr(item) in error


@pytest.mark.parametrize(
    ("item", "expected"),
    [("127.0.0.1:2525", ("127.0.0.1", 2525)), ("[::1]:25", ("::1", 25)), (":25", ("0.0.0.0", 25))],
)
def test_listen_address_forms(item, expected):
    assert parse_listen(item) == expected


def test_unknown_relay_target_in_default_and_routes():
    text = """\
        relay:
          default: smarthost
          targets:
            upstream: {host: smtp.example.net}
          routes:
            example.net: upstraem
            example.org: mx
        """
    assert errors(text) == [
        "mailflow.yaml:2: relay.default: unknown target 'smarthost'; expected one of "
        "['mx', 'none', 'upstream'] (targets are defined under relay.targets)",
        "mailflow.yaml:6: relay.routes.example.net: unknown target 'upstraem'; expected one of "
        "['mx', 'none', 'upstream'] (targets are defined under relay.targets)",
    ]


def test_lmtp_method_needs_a_target():
    [error] = errors("delivery:\n  method: lmtp\n")
    assert error == (
        "mailflow.yaml:1: delivery.lmtp: delivery.method is 'lmtp' but no delivery.lmtp "
        "target is set"
    )


def test_bad_relay_network():
    [error] = errors("relay_networks: [10.0.0.0/8, office]\n")
    assert "relay_networks: 'office' is not a network (expected CIDR such as 10.0.0.0/8)" in error


def test_bad_auth_exempt_network():
    [error] = errors(
        """\
        server:
          auth:
            users_file: /etc/mailflow/users
            max_failures_per_ip_exempt: [127.0.0.1/32, webmail]
        """
    )
    assert error == (
        "mailflow.yaml:4: server.auth.max_failures_per_ip_exempt: "
        "'webmail' is not a network (expected CIDR such as 10.0.0.0/8)"
    )
    config = parse_config(
        "server: {auth: {users_file: u, max_failures_per_ip_exempt: ['::1', 10.0.0.0/8]}}\n",
        "mailflow.yaml",
    )
    assert config.server.auth is not None
    assert config.server.auth.max_failures_per_ip_exempt == ["::1", "10.0.0.0/8"]


def test_plugin_listed_twice():
    [error] = errors("plugins:\n  - name: a\n  - name: a\n")
    assert error == "mailflow.yaml:1: plugins: plugin 'a' is listed twice"


def test_plugin_not_installed_names_entry_and_line():
    config = parse_config("server: {}\nplugins:\n  - name: nosuchplugin\n", "mailflow.yaml")
    with pytest.raises(ConfigError) as info:
        App(config)
    [issue] = info.value.issues
    assert (issue.file, issue.path, issue.line) == ("mailflow.yaml", "plugins[0].name", 3)
    assert issue.message.startswith("no installed plugin 'nosuchplugin'; installed: [")


def test_disabled_plugin_need_not_be_installed():
    config = parse_config("plugins:\n  - {name: nosuchplugin, enabled: false}\n")
    assert App(config).pipeline.order == []


# --- `mailflow config validate` -----------------------------------------------------------


def test_validate_ok_exits_0(tmp_path):
    path = tmp_path / "mailflow.yaml"
    path.write_text("server:\n  hostname: mx.example.com\n")
    result = CliRunner().invoke(main, ["config", "validate", str(path)])
    assert (result.exit_code, result.stdout) == (0, f"{path}: OK\n")


def test_validate_without_a_path_checks_the_embedded_default():
    result = CliRunner().invoke(main, ["config", "validate"])
    assert (result.exit_code, result.stdout) == (0, "embedded default config: OK\n")


def test_validate_errors_exit_2_on_stderr(tmp_path):
    path = tmp_path / "mailflow.yaml"
    path.write_text("server:\n  hostname: mx\n  max_recipients: many\nplugins:\n  - name: nope\n")
    result = CliRunner().invoke(main, ["config", "validate", "--config", str(path)])
    assert result.exit_code == 2
    assert result.stdout == ""
    assert result.stderr == (
        f"mailflow: invalid config:\n{path}:3: server.max_recipients: expected a whole number "
        "(got 'many')\n"
    )
    # Once the file parses, plugins are loaded and their problems reported the same way.
    path.write_text("server:\n  hostname: mx\nplugins:\n  - name: nope\n")
    result = CliRunner().invoke(main, ["config", "validate", str(path)])
    assert result.exit_code == 2
    assert f"{path}:4: plugins[0].name: no installed plugin 'nope'" in result.stderr


def test_validate_missing_file_exits_2(tmp_path):
    result = CliRunner().invoke(main, ["config", "validate", str(tmp_path / "absent.yaml")])
    assert result.exit_code == 2
    assert "absent.yaml: cannot read" in result.stderr


# --- the embedded default -----------------------------------------------------------------


def test_embedded_default_is_loopback_any_recipient_maildir_no_relay():
    config = load_config(None)
    assert config._source == DEFAULT_CONFIG_NAME
    assert config.server.listen == ["127.0.0.1:2525"]
    assert config.local_domains == ["*"]
    assert config.relay.default == "none"
    assert config.relay.targets == {}
    assert config.relay_networks == []
    assert config.delivery.method == "maildir"
    assert config.delivery.maildir.root == Path("./mail")
    assert config.actions.reject is None  # the default never refuses mail for its content


async def test_embedded_default_files_mail_for_any_recipient_into_its_maildir(tmp_path):
    default = load_config(None)
    # Only what a test must change: a free port and directories under tmp_path.
    config = default.model_copy(
        update={
            "server": default.server.model_copy(update={"listen": ["127.0.0.1:0"]}),
            "delivery": default.delivery.model_copy(
                update={
                    "maildir": default.delivery.maildir.model_copy(
                        update={"root": tmp_path / "mail"}
                    )
                }
            ),
            "queue": default.queue.model_copy(
                update={"directory": tmp_path / "spool", "scan_interval": 0.05}
            ),
        }
    )
    rcpts = ["someone@anywhere.example", "other@elsewhere.test"]
    async with running_server(config) as srv:
        assert await send(srv.port, "a@example.org", rcpts, make_message()) == {}
        for rcpt in rcpts:
            await srv.wait_delivered(rcpt)
            assert list((tmp_path / "mail" / rcpt / "new").iterdir())


def test_an_empty_section_means_its_defaults():
    # What is left after commenting out every key under a section.
    config = parse_config("server:\nactions:\nlog:\n  file:\nrelay:\n  targets:\n")
    assert config.server.listen == ["127.0.0.1:2525"]
    assert config.actions.reject is None
    assert config.log.file is None
    assert config.relay.targets == {}


def test_a_section_with_nothing_but_a_missing_required_key():
    assert errors("relay:\n  targets:\n    smart:\n") == [
        "mailflow.yaml:3: relay.targets.smart.host: required key is missing"
    ]


def test_keys_must_be_plain_names():
    assert errors("? [a, b]\n: 1\n") == [
        "mailflow.yaml:1: keys must be plain names, not lists or mappings"
    ]


def test_errors_are_listed_in_file_order():
    text = (
        "queue:\n  workers: 0\nserver:\n  hostname: [a]\n  max_recipients: x\nlog: {level: LOUD}\n"
    )
    assert [e.split(": ")[1] for e in errors(text)] == [
        "queue.workers",
        "server.hostname",
        "server.max_recipients",
        "log.level",
    ]
